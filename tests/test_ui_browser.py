"""The web dashboard in a real headless browser: Debian's ``chromium``,
driven through ``chromedriver`` by selenium (pointed at both binaries, so
nothing is downloaded).  ``callbackworker serve`` runs as its own process
on a free loopback port over a SQLite file; this process runs the tasks
(a ``TaskService`` serving the queue), as a worker would.

Skips, saying why, when chromium, chromedriver or selenium is missing.
The screenshots go to pytest's temporary directory and, when
``CBW_SCREENSHOT_DIR`` is set, there too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, NamedTuple

import httpx
import pytest

from callbackworker import TaskService

from helpers import wait_for

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as page  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/lib/chromium/chromedriver",) if os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="the browser tests need Chromium and chromedriver (Debian: apt-get install "
           "chromium chromium-driver); .ci/run installs them")

TOKEN = "browser-test-token-of-at-least-32-characters"


class Site(NamedTuple):
    url: str
    service: TaskService
    flaky: Any
    broken: Any


def _import_pipeline(x: int) -> dict:
    return _parse_row(x)


def _parse_row(x: int) -> dict:
    raise ValueError(f"row {x}: column <amount> is not a number")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """``callbackworker serve`` on a free port, and a service running the
    tasks of queue ``reports``: ``reports.flaky`` fails its first run and
    succeeds after; ``reports.broken`` always fails."""
    tmp = tmp_path_factory.mktemp("browser")
    db = tmp / "tasks.db"
    service = TaskService(db, poll_ms=20)
    runs: List[int] = []
    lock = threading.Lock()

    @service.task(name="reports.flaky", queue="reports")
    def flaky(n: int) -> dict:
        with lock:
            runs.append(n)
            first = len(runs) == 1
        if first:
            raise ConnectionError("the upstream <API> timed out")
        return {"rows": n}

    @service.task(name="reports.broken", queue="reports")
    def broken(x: int) -> dict:
        return _import_pipeline(x)

    service.serve()
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    server = subprocess.Popen(
        [sys.executable, "-m", "callbackworker", "serve", "--db", str(db), "--port", "0",
         "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "serving callbacks for ... on http://127.0.0.1:PORT"
        dashboard = server.stdout.readline().decode()
        assert dashboard.startswith("dashboard: http://127.0.0.1:"), dashboard
        url = dashboard.split()[1].removesuffix("/ui/")
        assert httpx.get(url + "/ui/login", timeout=10).status_code == 200
        yield Site(url, service, flaky, broken)
    finally:
        server.terminate()
        server.wait(10)
        service.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _until(browser: Any, condition: Callable[[Any], Any]) -> Any:
    """Waits (up to 30 s) for a click's navigation to reach ``condition``,
    and returns what it found."""
    return WebDriverWait(browser, 30).until(condition)


def _log_in(browser: Any, site: Site) -> None:
    browser.get(site.url + "/ui/")
    assert browser.current_url == site.url + "/ui/login"
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    _until(browser, page.url_to_be(site.url + "/ui/"))
    _until(browser, page.presence_of_element_located((By.CSS_SELECTOR, "table.queues")))


def _failed(site: Site, enqueue: Callable[[], str]) -> str:
    task_id = enqueue()
    wait_for(lambda: site.service.get(task_id).status == "failed", 30)
    return task_id


def _screenshot(browser: Any, tmp_path: Path, name: str) -> Path:
    """Saves the window as ``name`` (PNG) under ``tmp_path`` and, when
    ``CBW_SCREENSHOT_DIR`` is set, there too."""
    path = tmp_path / name
    assert browser.save_screenshot(str(path))
    target = os.environ.get("CBW_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def test_log_in_see_the_traceback_press_retry_and_see_the_task_complete(
        site: Site, browser: Any) -> None:
    task_id = _failed(site, lambda: site.flaky.enqueue(7))
    _log_in(browser, site)
    browser.find_element(By.CSS_SELECTOR, f'a[href="/ui/tasks/{task_id}"]').click()
    traceback = _until(browser, page.presence_of_element_located((By.ID, "traceback"))).text
    assert traceback.startswith("Traceback (most recent call last)")
    assert "ConnectionError: the upstream <API> timed out" in traceback
    assert browser.find_element(By.ID, "status").text == "failed"

    browser.find_element(By.ID, "retry").click()
    _until(browser, page.url_to_be(f"{site.url}/ui/tasks/{task_id}?done=retried"))
    notice = _until(browser, page.presence_of_element_located((By.CSS_SELECTOR, ".flash.ok")))
    assert notice.text == "The task is pending again."

    def completed() -> bool:
        browser.refresh()
        return browser.find_element(By.ID, "status").text == "completed"

    wait_for(completed, 30)
    assert '"rows": 7' in browser.find_element(By.ID, "result").text
    assert browser.find_elements(By.ID, "retry") == []


def test_screenshots_of_the_overview_and_a_failed_task_page(
        site: Site, browser: Any, tmp_path: Path) -> None:
    for n in range(3):
        site.flaky.enqueue(n)
    task_id = _failed(site, lambda: site.broken.enqueue(42))
    _log_in(browser, site)
    overview = _screenshot(browser, tmp_path, "dashboard-overview.png")
    browser.get(f"{site.url}/ui/tasks/{task_id}")
    assert "column <amount> is not a number" in browser.find_element(By.ID, "traceback").text
    task_page = _screenshot(browser, tmp_path, "dashboard-failed-task.png")
    for png in (overview, task_page):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000  # a rendered page, not a blank one
