"""The HTTP callback endpoint, on a real uvicorn server on loopback, talked
to with httpx.  The service behind it runs with a fake clock and
``background=False``, so the tests drive dispatching themselves."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.testclient import TestClient

import callbackworker
from callbackworker import CallbackFailedError, TaskClient, TaskService
from callbackworker._webcall import REQUEST_PATIENCE_S, RETRY_AFTER_S
from callbackworker.cli import EXIT_USAGE
from callbackworker.errors import StorageBusyError
from callbackworker.http import MAX_BODY_BYTES, create_app
from callbackworker.tasks.client import open_store
from callbackworker.tasks.sql import bounded_patience, patience_left
from callbackworker.tasks.sqlite import SQLiteTaskStore

from helpers import FakeClock

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Endpoint(NamedTuple):
    service: TaskService
    client: httpx.Client
    clock: FakeClock
    handles: List[callbackworker.CallbackHandle]


def _approval(handles: List[callbackworker.CallbackHandle],
              heartbeat_timeout_ms: int = 100) -> Callable[[memoryview], str]:
    def handler(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        handles.append(ctx.create_callback("approval", heartbeat_timeout_ms=heartbeat_timeout_ms))
        try:
            return "approved " + ctx.callback_result(handles[-1]).decode()
        except CallbackFailedError as exc:
            return "declined: " + exc.error

    return handler


@contextlib.contextmanager
def _serving(app: Starlette) -> Iterator[httpx.Client]:
    """``app`` on a uvicorn server on a free loopback port, and a client
    talking to it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def _endpoint_over(db: "str | Path") -> Iterator[Endpoint]:
    """A service on ``db`` serving queue "q" (a handler that waits for an
    approval callback), and the endpoint over it."""
    clock = FakeClock()
    handles: List[callbackworker.CallbackHandle] = []
    with TaskService(db, clock=clock, background=False) as service:
        service.create_queue("q", handler=_approval(handles))
        with _serving(create_app(service, TOKEN)) as client:
            yield Endpoint(service, client, clock, handles)


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    """The endpoint over a SQLite file."""
    with _endpoint_over(tmp_path / "t.db") as e:
        yield e


@pytest.fixture
def any_endpoint(db: str) -> Iterator[Endpoint]:
    """The endpoint once over each backend (``db``: SQLite, PostgreSQL)."""
    with _endpoint_over(db) as e:
        yield e


def _suspended(e: Endpoint) -> str:
    """Enqueues one task and runs it until it waits for its callback."""
    task = e.service.enqueue("q", b"")
    e.service._dispatch_once()
    assert e.service.get(task).status == "suspended"
    return task


def _url(e: Endpoint, verb: str) -> str:
    return f"/v1/callbacks/{e.handles[-1].callback_id}/{verb}"


# ---- auth ---------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/callbacks/" + "A" * 32 + "/success"),
    ("GET", "/v1/tasks/whatever"),
    ("GET", "/no/such/path"),
])
def test_every_request_without_the_token_is_401(endpoint: Endpoint, headers: dict,
                                                method: str, path: str) -> None:
    r = endpoint.client.request(method, path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_paths_are_404_once_authenticated(endpoint: Endpoint) -> None:
    assert endpoint.client.get("/no/such/path", headers=AUTH).status_code == 404


# ---- signals ------------------------------------------------------------

def test_success_end_to_end(endpoint: Endpoint) -> None:
    task = _suspended(endpoint)
    r = endpoint.client.post(_url(endpoint, "success"), content=b"by bob", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    assert endpoint.service.get(task).status == "pending"
    endpoint.service._dispatch_once()
    r = endpoint.client.get(f"/v1/tasks/{task}", headers=AUTH)
    assert r.status_code == 200
    assert r.json().items() >= {"id": task, "status": "completed", "message": "approved by bob",
                                "attempt": 1}.items()


def test_failure_end_to_end(endpoint: Endpoint) -> None:
    task = _suspended(endpoint)
    r = endpoint.client.post(_url(endpoint, "failure"), json={"error": "no budget"},
                             headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "failed"
    endpoint.service._dispatch_once()
    assert endpoint.service.get(task).message == "declined: no budget"


def test_heartbeat_keeps_the_callback_alive(endpoint: Endpoint) -> None:
    task = _suspended(endpoint)
    for _ in range(3):
        endpoint.clock.now += 90
        r = endpoint.client.post(_url(endpoint, "heartbeat"), headers=AUTH)
        assert r.status_code == 200 and r.json()["state"] == "pending"
        assert endpoint.service._dispatch_once() == 0
    assert endpoint.service.get(task).status == "suspended"


def test_get_task_while_suspended(endpoint: Endpoint) -> None:
    task = _suspended(endpoint)
    r = endpoint.client.get(f"/v1/tasks/{task}", headers=AUTH)
    assert r.json().items() >= {"id": task, "status": "suspended", "message": "",
                                "attempt": 1}.items()


def test_get_task_shows_every_task_info_field(endpoint: Endpoint) -> None:
    @endpoint.service.task(name="count", queue="functions")
    def count(n: int) -> List[int]:
        task = callbackworker.current_task()
        assert task is not None
        task.progress({"counted": n})
        return list(range(n))

    task = count.enqueue(3)
    endpoint.service.serve()
    endpoint.service._dispatch_once()
    body = endpoint.client.get(f"/v1/tasks/{task}", headers=AUTH).json()
    assert list(body) == list(callbackworker.TaskInfo._fields)
    assert (body["name"], body["queue"], body["result"], body["progress"], body["traceback"]) == (
        "count", "functions", [0, 1, 2], {"counted": 3}, None)
    assert body["created_at_ms"] == body["finished_at_ms"] == endpoint.clock.now


# ---- refusals -------------------------------------------------------------

def test_duplicate_signal_is_409(endpoint: Endpoint) -> None:
    _suspended(endpoint)
    assert endpoint.client.post(_url(endpoint, "success"), content=b"1",
                                headers=AUTH).status_code == 200
    r = endpoint.client.post(_url(endpoint, "success"), content=b"2", headers=AUTH)
    assert r.status_code == 409 and r.json()["state"] == "succeeded"


def test_timed_out_callback_is_409(endpoint: Endpoint) -> None:
    _suspended(endpoint)
    endpoint.clock.now += 100
    r = endpoint.client.post(_url(endpoint, "heartbeat"), headers=AUTH)
    assert r.status_code == 409 and r.json()["state"] == "timed_out"


@pytest.mark.parametrize("callback_id", ["A" * 32, "short", "x" * 40, "a%20b" + "c" * 27])
def test_unknown_or_malformed_id_is_404(endpoint: Endpoint, callback_id: str) -> None:
    r = endpoint.client.post(f"/v1/callbacks/{callback_id}/success", content=b"",
                             headers=AUTH)
    assert r.status_code == 404


def test_unknown_task_is_404(endpoint: Endpoint) -> None:
    assert endpoint.client.get("/v1/tasks/nope", headers=AUTH).status_code == 404


@pytest.mark.parametrize("body, status", [
    (b"not json", 400), (b'["error"]', 422), (b'{"error": 5}', 422), (b"{}", 422),
    (b'{"error": "' + b"x" * 70_000 + b'"}', 422),
])
def test_bad_failure_bodies(endpoint: Endpoint, body: bytes, status: int) -> None:
    task = _suspended(endpoint)
    r = endpoint.client.post(_url(endpoint, "failure"), content=body, headers=AUTH)
    assert r.status_code == status
    assert endpoint.service.get(task).status == "suspended"


DEEP = 100_000


@pytest.mark.parametrize("body, status", [
    (b'{"error": "a NUL \\u0000 inside"}', 422),
    (b'{"error": "a lone \\udc80 surrogate"}', 422),
    (b"[" * DEEP + b"]" * DEEP, 400),
    (b'{"error": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400),
    (b'{"error": "\xff\xfe is not UTF-8"}', 400),
], ids=["NUL", "surrogate", "nested", "nested-in-object", "not-UTF-8"])
def test_every_bad_failure_body_is_a_4xx_with_a_one_line_json_error(
        any_endpoint: Endpoint, body: bytes, status: int) -> None:
    task = _suspended(any_endpoint)
    r = any_endpoint.client.post(_url(any_endpoint, "failure"), content=body, headers=AUTH)
    assert r.status_code == status
    assert "\n" not in r.text and isinstance(r.json()["error"], str)
    assert any_endpoint.service.get(task).status == "suspended"


@pytest.mark.parametrize("path", [
    "/v1/tasks/%00", "/v1/tasks/" + "0" * 31 + "%00", "/v1/tasks/" + "0" * 32 + "%0A",
    "/v1/tasks/%ED%B2%80", "/v1/callbacks/" + "A" * 31 + "%00/success",
])
def test_an_id_no_store_could_hold_is_404(any_endpoint: Endpoint, path: str) -> None:
    r = any_endpoint.client.request("GET" if "/tasks/" in path else "POST", path, headers=AUTH)
    assert r.status_code == 404 and "\n" not in r.text


def test_oversized_body_by_content_length_is_413(endpoint: Endpoint) -> None:
    _suspended(endpoint)
    r = endpoint.client.post(_url(endpoint, "success"), content=b"x" * (MAX_BODY_BYTES + 1),
                             headers=AUTH)
    assert r.status_code == 413


def test_oversized_streamed_body_is_413(endpoint: Endpoint) -> None:
    """Chunked upload: no Content-Length, the received bytes are counted."""
    _suspended(endpoint)

    def chunks() -> Iterator[bytes]:
        for _ in range(17):
            yield b"x" * 65536

    r = endpoint.client.post(_url(endpoint, "success"), content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert endpoint.client.post(_url(endpoint, "success"), content=b"ok",
                                headers=AUTH).status_code == 200, "nothing was applied"


def test_a_body_of_exactly_the_limit_is_accepted(endpoint: Endpoint) -> None:
    task = _suspended(endpoint)
    r = endpoint.client.post(_url(endpoint, "success"), content=b"y" * MAX_BODY_BYTES,
                             headers=AUTH)
    assert r.status_code == 200
    endpoint.service._dispatch_once()
    assert endpoint.service.get(task).status == "completed"


def test_create_app_refuses_an_empty_token(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db") as service:
        with pytest.raises(ValueError, match="token"):
            create_app(service, " ")


@pytest.mark.parametrize("target", ["client", "store"])
def test_an_app_over_a_client_or_a_bare_store_signals_through_the_database(
        tmp_path: Path, target: str) -> None:
    """Another process (no service of its own) answers the endpoint; the
    service serving the queue replays the task from the database."""
    handles: List[callbackworker.CallbackHandle] = []
    with TaskService(tmp_path / "t.db", background=False) as service:
        service.create_queue("q", handler=_approval(handles, heartbeat_timeout_ms=0))
        task = service.enqueue("q", b"")
        service._dispatch_once()
        store = open_store(tmp_path / "t.db")
        try:
            app = create_app(TaskClient(store) if target == "client" else store, TOKEN)
            with _serving(app) as http:
                r = http.post(f"/v1/callbacks/{handles[-1].callback_id}/success",
                              content=b"over http", headers=AUTH)
                assert r.status_code == 200
                r = http.get(f"/v1/tasks/{task}", headers=AUTH)
                assert r.json().items() >= {"id": task, "status": "pending", "message": "",
                                            "attempt": 1}.items()
        finally:
            store.close()
        service._dispatch_once()
        assert service.get(task).message == "approved over http"


# ---- a database that cannot answer -----------------------------------------

def _assert_unavailable(r: httpx.Response) -> None:
    """A 503 that says to come back, with a one-line JSON error naming the
    request's bound (not the store's own patience)."""
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == str(RETRY_AFTER_S)
    error = r.json()["error"]
    assert "\n" not in error and f"for {REQUEST_PATIENCE_S:g} s" in error, error


def test_a_request_on_a_locked_database_is_503_after_a_short_bound(endpoint: Endpoint,
                                                                   tmp_path: Path) -> None:
    """The store would wait 60 s for the lock (a worker's patience); a
    request answers within ``REQUEST_PATIENCE_S`` and a moment."""
    _suspended(endpoint)
    blocker = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        _assert_unavailable(endpoint.client.post(_url(endpoint, "success"), content=b"x",
                                                 headers=AUTH))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert endpoint.client.post(_url(endpoint, "success"), content=b"x",
                                headers=AUTH).status_code == 200


def test_a_request_while_postgresql_is_down_is_503_after_a_short_bound() -> None:
    pytest.importorskip("psycopg")
    from pg_server import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None or sys.platform == "win32":
        pytest.skip("needs the PostgreSQL server programs to stop a cluster of its own")
    cluster = PostgresCluster(bindir).start()
    try:
        with TaskService(cluster.dsn, background=False) as service:
            task = service.enqueue_task("jobs.x", queue="q")
            with _serving(create_app(service, TOKEN)) as http:
                assert http.get(f"/v1/tasks/{task}", headers=AUTH).status_code == 200
                cluster.stop()
                _assert_unavailable(http.get(f"/v1/tasks/{task}", headers=AUTH))
                assert http.get(f"/v1/tasks/{task}", headers=AUTH).status_code == 503
    finally:
        cluster.stop()


def test_bounded_patience_shortens_store_calls_in_its_own_context_only(
        tmp_path: Path) -> None:
    store = SQLiteTaskStore(tmp_path / "t.db", patience_s=3600)
    store.ensure_queue("q")
    blocker = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    elsewhere: List[object] = []
    try:
        with bounded_patience(0.1):
            assert patience_left() is not None and patience_left() <= 0.1
            thread = threading.Thread(target=lambda: elsewhere.append(patience_left()))
            thread.start()
            thread.join()
            with pytest.raises(StorageBusyError, match="for 0.1 s"):
                store.enqueue("q", "t1", b"x", 0)
        assert patience_left() is None and elsewhere == [None]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()


def test_create_app_refuses_anything_but_a_service_client_or_store() -> None:
    with pytest.raises(TypeError, match="TaskService, a TaskClient or a TaskStore"):
        create_app("tasks.db", TOKEN)  # type: ignore[arg-type]


# ---- the serve command ------------------------------------------------------

CLI_TOKEN = "c" * 32


def _serve(*args: str, token_env: str = "") -> "subprocess.Popen[bytes]":
    env = {k: v for k, v in os.environ.items() if k != "CALLBACKWORKER_TOKEN"}
    if token_env:
        env["CALLBACKWORKER_TOKEN"] = token_env
    return subprocess.Popen([sys.executable, "-m", "callbackworker", "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _banner_port(proc: "subprocess.Popen[bytes]") -> "tuple[str, int]":
    """The banner ``serve`` prints once it listens, and the port it names."""
    assert proc.stdout is not None
    banner = proc.stdout.readline().decode()
    assert banner.startswith("serving callbacks for "), banner
    return banner, int(banner.rstrip().rpartition(":")[2])


def _stop(proc: "subprocess.Popen[bytes]") -> bytes:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    proc = _serve("--db", str(tmp_path / "t.db"), "--port", "0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_USAGE and b"refusing to start without a bearer token" in err


def test_serve_refuses_a_token_shorter_than_32_characters(tmp_path: Path) -> None:
    proc = _serve("--db", str(tmp_path / "t.db"), "--port", "0", token_env="x" * 31)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_USAGE and out == b""
    assert err.decode().splitlines() == [
        "callbackworker serve: refusing a bearer token of 31 characters from "
        "$CALLBACKWORKER_TOKEN: use at least 32 (e.g. openssl rand -hex 32)"]


def test_serve_warns_when_it_listens_beyond_loopback(tmp_path: Path) -> None:
    proc = _serve("--db", str(tmp_path / "t.db"), "--host", "0.0.0.0", "--port", "0",
                  token_env=CLI_TOKEN)
    try:
        _banner_port(proc)
    finally:
        err = _stop(proc)
    assert b"callbackworker serve: warning: listening on 0.0.0.0, not a loopback address" in err


def test_serve_on_loopback_does_not_warn(tmp_path: Path) -> None:
    proc = _serve("--db", str(tmp_path / "t.db"), "--port", "0", token_env=CLI_TOKEN)
    try:
        _banner_port(proc)
    finally:
        err = _stop(proc)
    assert b"warning" not in err


def test_serve_never_shows_the_database_password(pg_schema_dsn: str) -> None:
    if "://cbw@" not in pg_schema_dsn:
        pytest.skip("needs the throwaway cluster (trust auth accepts any password)")
    dsn = pg_schema_dsn.replace("://cbw@", "://cbw:PWSECRET@", 1) + "&sslpassword=SSLSECRET"
    proc = _serve("--db", dsn, "--port", "0", token_env=CLI_TOKEN)
    try:
        banner, _ = _banner_port(proc)
    finally:
        err = _stop(proc)
    assert "cbw:***@" in banner and "sslpassword=***" in banner
    assert "SECRET" not in banner and b"SECRET" not in err


def test_serve_signals_a_task_and_stops_gracefully(tmp_path: Path) -> None:
    """The banner comes once the port listens: the first request connects."""
    db, token_file = tmp_path / "t.db", tmp_path / "token"
    token_file.write_text(CLI_TOKEN + "\n")
    handles: List[callbackworker.CallbackHandle] = []
    with TaskService(db, background=False) as service:
        service.create_queue("q", handler=_approval(handles, heartbeat_timeout_ms=0))
        task = service.enqueue("q", b"")
        service._dispatch_once()
        proc = _serve("--db", str(db), "--port", "0", "--token-file", str(token_file),
                      token_env="ignored-env-token")
        try:
            _, port = _banner_port(proc)
            url = f"http://127.0.0.1:{port}/v1/callbacks/{handles[-1].callback_id}/success"
            with httpx.Client(timeout=10) as client:
                r = client.post(url, content=b"via cli",
                                headers={"Authorization": f"Bearer {CLI_TOKEN}"})
                assert r.status_code == 200
        finally:
            _stop(proc)
        service._dispatch_once()
        assert service.get(task).message == "approved via cli"


R1_TOKEN = "a-token-long-enough-for-serve-32-chars"


def test_a_request_is_answered_within_its_bound_while_the_service_waits_for_a_lock(
        tmp_path: Path) -> None:
    """The app's service also serves a queue, and another connection holds
    the database's write lock: the dispatcher's claim retries, but the store's
    own lock is held per attempt, not across its retries, so a request is
    answered (a WAL read) or refused with 503 within its bound.  It waited
    for the store's lock up to the store's whole patience (60 s)."""
    db = tmp_path / "t.db"
    svc = TaskService(db, poll_ms=20)

    @svc.task(queue="q", name="jobs.x")
    def x() -> int:
        return 1

    task = x.enqueue()
    svc.serve(["q"])
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    release = threading.Timer(15, lambda: blocker.execute("ROLLBACK"))
    try:
        client = TestClient(create_app(svc, R1_TOKEN))
        auth = {"Authorization": f"Bearer {R1_TOKEN}"}
        assert client.get(f"/v1/tasks/{task}", headers=auth).status_code == 200
        blocker.execute("BEGIN IMMEDIATE")
        release.start()
        time.sleep(0.5)  # the dispatcher's next claim waits for the lock, in the store's lock
        began = time.monotonic()
        r = client.get(f"/v1/tasks/{task}", headers=auth)
        took = time.monotonic() - began
        assert r.status_code in (200, 503) and took < REQUEST_PATIENCE_S + 3, (r.status_code, took)
    finally:
        release.cancel()
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        svc.close()
