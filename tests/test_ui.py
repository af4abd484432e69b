"""The web dashboard (``callbackworker.ui``) through Starlette's TestClient.

The service runs with a ``FakeClock`` and ``background=False`` (each test
drives dispatching itself); the dashboard is given the same clock, so
session expiry and recent throughput are measured on it.  A POST carries
``Origin: http://testserver``, the TestClient's own origin, as a browser
does.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, NamedTuple

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import callbackworker
from callbackworker import QueueConfig, TaskService
from callbackworker import ui
from callbackworker._webcall import REQUEST_PATIENCE_S, RETRY_AFTER_S
from callbackworker.http import create_app
from callbackworker.uisession import SESSION_MAX_AGE_S

from helpers import FakeClock

TOKEN = "dashboard-token"
ORIGIN = {"Origin": "http://testserver"}


class Dashboard(NamedTuple):
    service: TaskService
    clock: FakeClock
    http: TestClient


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dashboard]:
    clock = FakeClock(1_700_000_000_000)
    service = TaskService(tmp_path / "t.db", clock=clock, background=False)
    app = Starlette(routes=[Mount("/ui", app=ui.create_dashboard(service.client, TOKEN,
                                                                  clock=clock))])
    try:
        with TestClient(app, follow_redirects=False) as http:
            yield Dashboard(service, clock, http)
    finally:
        service.close()


def login(http: TestClient, token: str = TOKEN) -> None:
    r = http.post("/ui/login", data={"token": token}, headers=ORIGIN)
    assert r.status_code == 303, r.text


def csrf_of(http: TestClient, path: str = "/ui/") -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', http.get(path).text)
    assert match, "the page carries no CSRF field"
    return match.group(1)


def drain(service: TaskService) -> None:
    while service._dispatch_once():
        pass


def failing_task(service: TaskService, name: str = "jobs.flaky") -> str:
    """A task that failed once (max_retries=0), with a traceback; it
    succeeds when run again."""
    calls: List[int] = []

    @service.task(name=name, queue="work")
    def flaky(x: int) -> dict:
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("disk <full> & gone")
        return {"doubled": 2 * x}

    task_id = flaky.enqueue(21)
    service.serve()
    drain(service)
    assert service.get(task_id).status == "failed"
    return task_id


# ---- before login ------------------------------------------------------------

@pytest.mark.parametrize("path", ["/ui/", "/ui/tasks", "/ui/tasks?queue=secret-queue",
                                  "/ui/tasks/0123456789abcdef"])
def test_every_page_redirects_to_the_login_page_before_login(dash: Dashboard, path: str) -> None:
    dash.service.enqueue_task("jobs.x", queue="secret-queue")
    r = dash.http.get(path)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login"
    assert "secret-queue" not in r.text


@pytest.mark.parametrize("path", ["/ui/tasks/abc/retry", "/ui/tasks/abc/cancel", "/ui/logout"])
def test_actions_are_refused_before_login(dash: Dashboard, path: str) -> None:
    r = dash.http.post(path, data={"csrf": "x"}, headers=ORIGIN)
    assert r.status_code == 403
    assert "log in again" in r.text


def test_the_login_page_and_the_stylesheet_need_no_session(dash: Dashboard) -> None:
    r = dash.http.get("/ui/login")
    assert r.status_code == 200 and 'type="password"' in r.text
    css = dash.http.get("/ui/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/ui/no-such-page", "/ui/tasks/abc/no-such-verb",
                                  "/ui/static/other.css", "/ui/admin/"])
def test_unknown_paths_redirect_to_the_login_page_before_login(dash: Dashboard,
                                                               path: str) -> None:
    """Before login an unknown path answers as a known one does, so nobody
    learns which paths exist; after login it is 404."""
    r = dash.http.get(path)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    r = dash.http.post(path, data={"csrf": "x"}, headers=ORIGIN)
    assert r.status_code == 403 and "log in again" in r.text
    login(dash.http)
    assert dash.http.get(path).status_code == 404


def test_unknown_dashboard_paths_of_create_app_redirect_before_login(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db", background=False) as service:
        with TestClient(create_app(service, TOKEN), follow_redirects=False) as http:
            r = http.get("/ui/no-such-page")
            assert r.status_code == 303 and r.headers["location"] == "/ui/login"


# ---- login, the cookie, logout -------------------------------------------

def test_login_sets_a_signed_httponly_samesite_strict_cookie_for_12_hours(
        dash: Dashboard) -> None:
    r = dash.http.post("/ui/login", data={"token": TOKEN}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{ui.COOKIE_NAME}=v1.")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/ui/", f"max-age={12 * 3600}"} <= flags
    assert "secure" not in flags  # plain HTTP here; set over HTTPS
    assert TOKEN not in cookie
    assert dash.http.get("/ui/").status_code == 200


def test_the_cookie_is_secure_over_https(dash: Dashboard) -> None:
    http = TestClient(dash.http.app, base_url="https://testserver", follow_redirects=False)
    r = http.post("/ui/login", data={"token": TOKEN}, headers={"Origin": "https://testserver"})
    assert "secure" in {part.strip().lower() for part in r.headers["set-cookie"].split(";")}


@pytest.mark.parametrize("token", ["", "wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper()])
def test_a_wrong_token_is_refused_and_sets_no_cookie(dash: Dashboard, token: str) -> None:
    r = dash.http.post("/ui/login", data={"token": token}, headers=ORIGIN)
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    assert "That is not the token." in r.text
    assert dash.http.get("/ui/").status_code == 303


def test_a_session_expires_after_its_max_age(dash: Dashboard) -> None:
    login(dash.http)
    dash.clock.advance(SESSION_MAX_AGE_S * 1000 - 1)
    assert dash.http.get("/ui/").status_code == 200
    dash.clock.advance(1)
    r = dash.http.get("/ui/")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"


@pytest.mark.parametrize("tamper", [
    lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),             # the signature
    lambda c: c.replace("v1.1", "v1.2", 1),                         # the issue time
    lambda c: "v1.1700000000000.00.deadbeef",                       # made up
    lambda c: "",
])
def test_a_forged_or_altered_cookie_is_refused(dash: Dashboard, tamper) -> None:
    login(dash.http)
    forged = tamper(dash.http.cookies[ui.COOKIE_NAME])
    dash.http.cookies.clear()
    dash.http.cookies.set(ui.COOKIE_NAME, forged, path="/ui/")
    assert dash.http.get("/ui/").status_code == 303


def test_a_cookie_issued_for_another_token_is_refused(dash: Dashboard, tmp_path: Path) -> None:
    other = Starlette(routes=[Mount("/ui", app=ui.create_dashboard(
        dash.service.client, "another-token", clock=dash.clock))])
    with TestClient(other, follow_redirects=False) as http:
        login(http, "another-token")
        cookie = http.cookies[ui.COOKIE_NAME]
    dash.http.cookies.set(ui.COOKIE_NAME, cookie, path="/ui/")
    assert dash.http.get("/ui/").status_code == 303


def test_logout_ends_the_session_in_the_browser(dash: Dashboard) -> None:
    login(dash.http)
    r = dash.http.post("/ui/logout", data={"csrf": csrf_of(dash.http)}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert f'{ui.COOKIE_NAME}=""' in r.headers["set-cookie"]
    assert "max-age=0" in r.headers["set-cookie"].lower()
    assert dash.http.get("/ui/").status_code == 303


def test_logout_revokes_the_session_on_the_server(dash: Dashboard) -> None:
    """A copy of the cookie taken before log out is worth nothing after."""
    task_id = failing_task(dash.service)
    login(dash.http)
    cookie, csrf = dash.http.cookies[ui.COOKIE_NAME], csrf_of(dash.http)
    dash.http.post("/ui/logout", data={"csrf": csrf}, headers=ORIGIN)
    dash.http.cookies.set(ui.COOKIE_NAME, cookie, path="/ui/")
    r = dash.http.get("/ui/")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    r = dash.http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf}, headers=ORIGIN)
    assert r.status_code == 403 and "log in again" in r.text
    assert dash.service.get(task_id).status == "failed"


def test_logout_ends_only_its_own_session(dash: Dashboard) -> None:
    other = TestClient(dash.http.app, follow_redirects=False)
    login(dash.http)
    login(other)
    dash.http.post("/ui/logout", data={"csrf": csrf_of(dash.http)}, headers=ORIGIN)
    assert other.get("/ui/").status_code == 200
    login(dash.http)  # logging in again gives a new session
    assert dash.http.get("/ui/").status_code == 200


def test_a_session_is_good_only_with_the_dashboard_that_issued_it(dash: Dashboard) -> None:
    """A restarted dashboard (a new one, same token) refuses the sessions of
    the old one: nothing a logged-out session left behind comes back."""
    login(dash.http)
    cookie = dash.http.cookies[ui.COOKIE_NAME]
    restarted = Starlette(routes=[Mount("/ui", app=ui.create_dashboard(
        dash.service.client, TOKEN, clock=dash.clock))])
    with TestClient(restarted, follow_redirects=False) as http:
        http.cookies.set(ui.COOKIE_NAME, cookie, path="/ui/")
        assert http.get("/ui/").status_code == 303


# ---- CSRF and origin --------------------------------------------------------

@pytest.mark.parametrize("form", [{}, {"csrf": ""}, {"csrf": "0" * 64}])
def test_an_action_without_its_sessions_csrf_token_is_refused(dash: Dashboard,
                                                              form: dict) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    r = dash.http.post(f"/ui/tasks/{task_id}/retry", data=form, headers=ORIGIN)
    assert r.status_code == 403 and "This form has expired" in r.text
    assert dash.service.get(task_id).status == "failed"


def test_another_sessions_csrf_token_is_refused(dash: Dashboard) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    stale = csrf_of(dash.http)
    login(dash.http)  # a new session, with a new token
    r = dash.http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": stale}, headers=ORIGIN)
    assert r.status_code == 403
    assert dash.service.get(task_id).status == "failed"


@pytest.mark.parametrize("headers", [{}, {"Origin": "https://evil.example"},
                                     {"Origin": "null"}, {"Origin": "http://testserver.evil"}])
def test_an_action_from_another_origin_is_refused(dash: Dashboard, headers: dict) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    r = dash.http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf_of(dash.http)},
                       headers=headers)
    assert r.status_code == 403 and "not sent from this dashboard" in r.text
    assert dash.service.get(task_id).status == "failed"


def test_a_login_from_another_origin_is_refused(dash: Dashboard) -> None:
    r = dash.http.post("/ui/login", data={"token": TOKEN},
                       headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_an_action_from_the_same_host_over_another_scheme_is_refused(dash: Dashboard) -> None:
    """The origin is scheme, host and port: a plain-HTTP page of the same
    host (say, one a network attacker injects) is another origin."""
    task_id = failing_task(dash.service)
    http = TestClient(dash.http.app, base_url="https://testserver", follow_redirects=False)
    r = http.post("/ui/login", data={"token": TOKEN}, headers={"Origin": "https://testserver"})
    assert r.status_code == 303
    r = http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf_of(http)},
                  headers={"Origin": "http://testserver"})
    assert r.status_code == 403 and "not sent from this dashboard" in r.text
    assert dash.service.get(task_id).status == "failed"


def test_an_origin_with_the_schemes_default_port_is_the_same_origin(dash: Dashboard) -> None:
    r = dash.http.post("/ui/login", data={"token": TOKEN},
                       headers={"Origin": "http://TestServer:80"})
    assert r.status_code == 303


def _behind_a_proxy(service: TaskService, clock: FakeClock, *allowed: str) -> TestClient:
    """The dashboard as a proxy that rewrites ``Host`` reaches it."""
    app = Starlette(routes=[Mount("/ui", app=ui.create_dashboard(
        service.client, TOKEN, clock=clock, allowed_origins=allowed))])
    return TestClient(app, base_url="http://127.0.0.1:8080", follow_redirects=False)


def test_behind_a_proxy_that_rewrites_host_the_configured_origin_is_accepted(
        dash: Dashboard) -> None:
    task_id = failing_task(dash.service)
    browser = {"Origin": "https://jobs.example.com"}
    http = _behind_a_proxy(dash.service, dash.clock, "https://jobs.example.com/")
    assert http.post("/ui/login", data={"token": TOKEN}, headers=browser).status_code == 303
    r = http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf_of(http)}, headers=browser)
    assert r.status_code == 303
    assert dash.service.get(task_id).status == "pending"


def test_create_app_passes_the_allowed_origins_to_the_dashboard(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db", background=False) as service:
        app = create_app(service, TOKEN, allowed_origins=["https://jobs.example.com"])
        with TestClient(app, base_url="http://127.0.0.1:8080", follow_redirects=False) as http:
            r = http.post("/ui/login", data={"token": TOKEN},
                          headers={"Origin": "https://jobs.example.com"})
            assert r.status_code == 303


def test_behind_a_proxy_an_origin_not_configured_is_refused_saying_what_to_do(
        dash: Dashboard) -> None:
    http = _behind_a_proxy(dash.service, dash.clock)
    r = http.post("/ui/login", data={"token": TOKEN},
                  headers={"Origin": "https://jobs.example.com"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert "it came from https://jobs.example.com, not http://127.0.0.1:8080" in r.text
    assert "--allowed-origin" in r.text


@pytest.mark.parametrize("origin", ["jobs.example.com", "ftp://jobs.example.com",
                                    "https://jobs.example.com/ui", "https://ada@jobs.example.com",
                                    "https://jobs.example.com:99999", "https://", "null"])
def test_an_allowed_origin_of_another_form_is_a_value_error(dash: Dashboard,
                                                            origin: str) -> None:
    with pytest.raises(ValueError, match="must look like https://host"):
        ui.create_dashboard(dash.service.client, TOKEN, allowed_origins=[origin])


def test_serve_refuses_a_malformed_allowed_origin(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "callbackworker", "serve", "--db",
                          str(tmp_path / "t.db"), "--port", "0", "--allowed-origin",
                          "jobs.example.com"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CALLBACKWORKER_TOKEN": "t" * 32})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("callbackworker serve: --allowed-origin: an allowed origin "
                                 "must look like"), out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "t.db").exists()


# ---- pages ------------------------------------------------------------------

def test_pages_forbid_framing_and_scripts(dash: Dashboard) -> None:
    login(dash.http)
    headers = dash.http.get("/ui/").headers
    assert "script-src" not in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"


def test_the_overview_shows_each_queue_with_its_counts(dash: Dashboard) -> None:
    failing_task(dash.service)
    dash.service.enqueue_task("jobs.later", queue="mail", delay_ms=60_000)
    dash.service.enqueue_task("jobs.later", queue="mail", delay_ms=60_000)
    login(dash.http)
    page = dash.http.get("/ui/").text
    mail = re.search(r'<tr>\s*<td><a href="/ui/tasks\?queue=mail">mail</a></td>(.*?)</tr>',
                     page, re.S)
    assert mail, page
    assert re.search(r'href="/ui/tasks\?queue=mail&amp;status=pending">2</a>', mail.group(1))
    assert 'href="/ui/tasks?queue=work&amp;status=failed">1</a>' in page


def test_the_overview_counts_completions_of_the_last_minute_and_hour(dash: Dashboard) -> None:
    @dash.service.task(name="jobs.ok", queue="fast")
    def ok() -> int:
        return 1

    ok.enqueue()
    dash.service.serve()
    drain(dash.service)                 # one completed 2 hours ago
    dash.clock.advance(7_200_000)
    ok.enqueue()
    drain(dash.service)                 # one 30 minutes ago
    dash.clock.advance(1_800_000)
    ok.enqueue()
    ok.enqueue()
    drain(dash.service)                 # two just now
    login(dash.http)
    row = re.search(r'queue=fast">fast</a></td>(.*?)</tr>', dash.http.get("/ui/").text, re.S)
    assert row
    cells = re.findall(r'<td class="num">([^<]*)</td>', row.group(1))
    assert cells[-2:] == ["2", "3"]


def test_the_overview_says_at_least_when_it_reads_only_the_newest(
        dash: Dashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "THROUGHPUT_SCAN", 2)

    @dash.service.task(name="jobs.ok", queue="fast")
    def ok() -> int:
        return 1

    for _ in range(3):
        ok.enqueue()
    dash.service.serve()
    drain(dash.service)
    login(dash.http)
    row = re.search(r'queue=fast">fast</a></td>(.*?)</tr>', dash.http.get("/ui/").text, re.S)
    assert row
    assert re.findall(r'<td class="num">([^<]*)</td>', row.group(1))[-2:] == ["2+", "2+"]


def test_the_overview_lists_the_latest_failures_with_their_tracebacks(dash: Dashboard) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    page = dash.http.get("/ui/").text
    assert f'href="/ui/tasks/{task_id}"' in page
    assert "Traceback (most recent call last)" in page
    assert "RuntimeError: disk &lt;full&gt; &amp; gone" in page


def test_the_failed_list_shows_every_failed_task_with_its_traceback(dash: Dashboard) -> None:
    first = failing_task(dash.service, "jobs.one")
    second = failing_task(dash.service, "jobs.two")
    login(dash.http)
    page = dash.http.get("/ui/tasks?status=failed").text
    assert first[-12:] in page and second[-12:] in page
    assert page.index(second[-12:]) < page.index(first[-12:])  # newest first
    assert page.count('<pre class="traceback">') == 2


def test_the_task_list_filters_by_queue_status_and_name(dash: Dashboard) -> None:
    a = dash.service.enqueue_task("jobs.a", queue="q1")
    b = dash.service.enqueue_task("jobs.b", queue="q1")
    c = dash.service.enqueue_task("jobs.a", queue="q2")
    login(dash.http)
    page = dash.http.get("/ui/tasks?queue=q1&name=jobs.a").text
    assert a[-12:] in page and b[-12:] not in page and c[-12:] not in page
    assert dash.http.get("/ui/tasks?status=completed").text.count("/ui/tasks/") == 0


def test_the_task_list_pages_to_older_tasks(dash: Dashboard,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "PAGE_SIZE", 2)
    ids = [dash.service.enqueue_task("jobs.a", queue="q") for _ in range(3)]
    login(dash.http)
    first = dash.http.get("/ui/tasks?queue=q").text
    assert ids[2][-12:] in first and ids[1][-12:] in first and ids[0][-12:] not in first
    older = re.search(r'href="([^"]+)">Older tasks', first)
    assert older
    second = dash.http.get(older.group(1).replace("&amp;", "&")).text
    assert ids[0][-12:] in second and ids[1][-12:] not in second
    assert "Older tasks" not in second


def test_an_unknown_status_filter_is_400(dash: Dashboard) -> None:
    login(dash.http)
    r = dash.http.get("/ui/tasks?status=<lost>")
    assert r.status_code == 400 and "&lt;lost&gt;" in r.text


def test_a_filter_no_queue_name_can_hold_is_400(dash: Dashboard) -> None:
    login(dash.http)
    r = dash.http.get("/ui/tasks?queue=a%00b")
    assert r.status_code == 400 and "Those filters cannot match a task" in r.text


def test_the_task_page_shows_status_attempts_progress_and_result(dash: Dashboard) -> None:
    @dash.service.task(name="jobs.report", queue="work")
    def report(n: int) -> dict:
        callbackworker.current_task().progress({"done": n, "of": n})
        return {"rows": n}

    task_id = report.enqueue(7)
    dash.service.serve()
    drain(dash.service)
    login(dash.http)
    page = dash.http.get(f"/ui/tasks/{task_id}").text
    assert '<dd id="status">completed</dd>' in page
    assert "<dt>Attempts</dt><dd>1</dd>" in page
    assert '&#34;done&#34;: 7' in page and '&#34;rows&#34;: 7' in page
    assert 'id="retry"' not in page and 'id="cancel"' not in page


def test_the_task_page_of_a_failed_task_shows_its_error_and_traceback(dash: Dashboard) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    page = dash.http.get(f"/ui/tasks/{task_id}").text
    assert "RuntimeError: disk &lt;full&gt; &amp; gone" in page
    assert re.search(r'<pre class="traceback" id="traceback">Traceback', page)
    assert 'id="retry"' in page


def test_the_task_page_shows_the_durable_callbacks_a_task_waits_for(dash: Dashboard) -> None:
    def approval(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        handle = ctx.create_callback("manager <approval>", heartbeat_timeout_ms=5000)
        return ctx.callback_result(handle).decode()

    dash.service.create_queue("approvals", handler=approval)
    task_id = dash.service.enqueue("approvals", b"")
    dash.service._dispatch_once()
    assert dash.service.get(task_id).status == "suspended"
    (record,) = dash.service.client.callbacks(task_id)
    login(dash.http)
    page = dash.http.get(f"/ui/tasks/{task_id}").text
    assert "Durable callbacks" in page
    assert "manager &lt;approval&gt;" in page and record.callback_id in page
    assert "heartbeat 5000 ms" in page
    assert 'id="cancel"' in page


@pytest.mark.parametrize("task_id", ["0" * 32, "nosuchtask", "a%00b", "A" * 32])
def test_the_page_of_an_unknown_or_malformed_task_is_404(dash: Dashboard, task_id: str) -> None:
    login(dash.http)
    r = dash.http.get(f"/ui/tasks/{task_id}")
    assert r.status_code == 404 and "There is no such task" in r.text
    r = dash.http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf_of(dash.http)},
                       headers=ORIGIN)
    assert r.status_code == 404


def test_a_page_cursor_that_is_no_task_id_is_404(dash: Dashboard) -> None:
    login(dash.http)
    assert dash.http.get("/ui/tasks?before=x%00y").status_code == 404


# ---- actions ----------------------------------------------------------------

def test_retry_makes_a_failed_task_pending_and_it_then_completes(dash: Dashboard) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    r = dash.http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf_of(dash.http)},
                       headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == f"/ui/tasks/{task_id}?done=retried"
    assert dash.service.get(task_id).status == "pending"
    assert "The task is pending again." in dash.http.get(r.headers["location"]).text
    drain(dash.service)
    page = dash.http.get(f"/ui/tasks/{task_id}").text
    assert '<dd id="status">completed</dd>' in page and "&#34;doubled&#34;: 42" in page


def test_cancel_cancels_a_pending_task(dash: Dashboard) -> None:
    dash.service.declare_queue("later", QueueConfig())
    task_id = dash.service.enqueue_task("jobs.later", queue="later", delay_ms=60_000)
    login(dash.http)
    r = dash.http.post(f"/ui/tasks/{task_id}/cancel", data={"csrf": csrf_of(dash.http)},
                       headers=ORIGIN)
    assert r.status_code == 303
    assert dash.service.get(task_id).status == "cancelled"


def test_an_action_the_task_cannot_take_says_why_with_409(dash: Dashboard) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    r = dash.http.post(f"/ui/tasks/{task_id}/cancel", data={"csrf": csrf_of(dash.http)},
                       headers=ORIGIN)
    assert r.status_code == 409
    assert 'class="flash error"' in r.text and "failed" in r.text
    assert dash.service.get(task_id).status == "failed"


# ---- escaping ---------------------------------------------------------------

def test_names_messages_and_tracebacks_are_escaped_everywhere(dash: Dashboard) -> None:
    evil = "<script>alert(1)</script>"
    task_id = failing_task(dash.service, name=evil)
    dash.service.enqueue_task("jobs.x", queue='"><img src=x onerror=alert(2)>')
    login(dash.http)
    pages = [dash.http.get(path).text for path in
             ("/ui/", "/ui/tasks", "/ui/tasks?status=failed", f"/ui/tasks/{task_id}",
              "/ui/tasks?name=" + evil)]
    for page in pages:
        assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[3]
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in pages[0]


def test_an_action_on_a_locked_database_is_503_after_a_short_bound(dash: Dashboard,
                                                                   tmp_path: Path) -> None:
    task_id = failing_task(dash.service)
    login(dash.http)
    csrf = csrf_of(dash.http)
    blocker = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        r = dash.http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf}, headers=ORIGIN)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert r.status_code == 503 and r.headers["retry-after"] == str(RETRY_AFTER_S)
    assert f"stayed locked by other connections for {REQUEST_PATIENCE_S:g} s" in r.text
    assert dash.service.get(task_id).status == "failed"


# ---- mounted by create_app -------------------------------------------------------

def test_create_app_serves_the_dashboard_under_ui_with_the_same_token(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db", background=False) as service:
        with TestClient(create_app(service, TOKEN), follow_redirects=False) as http:
            assert http.get("/ui").headers["location"].endswith("/ui/")
            assert http.get("/ui/").headers["location"] == "/ui/login"
            login(http)
            assert http.get("/ui/").status_code == 200
            # The session cookie is not a bearer token for the API.
            assert http.get("/v1/tasks/x").status_code == 401


def test_the_dashboard_works_with_create_app_mounted_inside_another_app(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db", background=False) as service:
        task_id = failing_task(service)
        outer = Starlette(routes=[Mount("/jobs", app=create_app(service, TOKEN))])
        with TestClient(outer, follow_redirects=False) as http:
            assert http.get("/jobs/ui/").headers["location"] == "/jobs/ui/login"
            r = http.post("/jobs/ui/login", data={"token": TOKEN}, headers=ORIGIN)
            assert r.status_code == 303 and "path=/jobs/ui/" in r.headers["set-cookie"].lower()
            page = http.get("/jobs/ui/").text
            assert f'href="/jobs/ui/tasks/{task_id}"' in page
            assert 'href="/jobs/ui/static/dashboard.css"' in page
            r = http.post(f"/jobs/ui/tasks/{task_id}/retry",
                          data={"csrf": csrf_of(http, "/jobs/ui/")}, headers=ORIGIN)
            assert r.headers["location"] == f"/jobs/ui/tasks/{task_id}?done=retried"
            assert http.get(f"/jobs/v1/tasks/{task_id}").status_code == 401
            assert http.get(f"/jobs/v1/tasks/{task_id}",
                            headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_the_dashboard_reads_and_retries_on_each_backend(db: str) -> None:
    clock = FakeClock(1_700_000_000_000)
    with TaskService(db, clock=clock, background=False) as service:
        task_id = failing_task(service)
        app = Starlette(routes=[Mount("/ui", app=ui.create_dashboard(service.client, TOKEN,
                                                                      clock=clock))])
        with TestClient(app, follow_redirects=False) as http:
            login(http)
            assert "RuntimeError: disk &lt;full&gt; &amp; gone" in http.get("/ui/").text
            assert http.get("/ui/tasks/a%00b").status_code == 404
            assert http.get("/ui/tasks?queue=work&before=" + "f" * 32).status_code == 404
            r = http.post(f"/ui/tasks/{task_id}/retry", data={"csrf": csrf_of(http)},
                          headers=ORIGIN)
            assert r.status_code == 303
            drain(service)
            assert '<dd id="status">completed</dd>' in http.get(f"/ui/tasks/{task_id}").text


def test_serve_names_the_dashboard_and_serves_its_login_page(tmp_path: Path) -> None:
    env = {**os.environ, "CALLBACKWORKER_TOKEN": "t" * 32}
    proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "serve", "--db",
                             str(tmp_path / "t.db"), "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        line = proc.stdout.readline().decode()
        assert line.startswith("dashboard: http://127.0.0.1:"), line
        url = line.split()[1]
        r = httpx.get(url, timeout=10)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        assert 'type="password"' in httpx.get(url + "login", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
