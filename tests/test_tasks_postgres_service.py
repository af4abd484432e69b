"""``TaskService`` on PostgreSQL: how a sleeping dispatcher learns of work
written by another process.  (Every other service behaviour runs on both
backends in ``test_tasks_service.py``.)

The runners here poll only every 60 s and renew leases every 40 s, so a
task that runs within seconds was announced by a notification: that is
what these tests check, with generous deadlines.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

pytest.importorskip("psycopg", reason="psycopg 3 is not installed: "
                                      "pip install 'callbackworker[postgres]'")

import psycopg  # noqa: E402

import callbackworker  # noqa: E402
from callbackworker import TaskService  # noqa: E402
from callbackworker.tasks.postgres import PostgresTaskStore, redact_dsn  # noqa: E402

SLEEPY = {"poll_ms": 60_000, "lease_ms": 120_000}
DEADLINE_S = 10.0


class Ran:
    """A handler that remembers the payloads it ran."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.payloads: List[bytes] = []

    def __call__(self, payload: memoryview) -> str:
        with self.cond:
            self.payloads.append(bytes(payload))
            self.cond.notify_all()
        return "ran"

    def wait_for(self, payload: bytes) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: payload in self.payloads, DEADLINE_S)


@pytest.fixture
def ran() -> Ran:
    return Ran()


@pytest.fixture
def runner(pg_schema_dsn: str, ran: Ran) -> Iterator[TaskService]:
    """A background service serving queue "q", asleep unless woken."""
    with TaskService(pg_schema_dsn, **SLEEPY) as service:
        service.create_queue("q", handler=ran)
        yield service


def _listener_pid(service: TaskService, other_than: object = None) -> int:
    store = service._store
    assert isinstance(store, PostgresTaskStore)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        pid = store.listener_pid
        if pid is not None and pid != other_than:
            return pid
        time.sleep(0.01)
    raise AssertionError("the listener did not connect")


def test_postgresql_dsn_selects_the_postgresql_store(pg_schema_dsn: str) -> None:
    with TaskService(pg_schema_dsn) as service:
        assert isinstance(service._store, PostgresTaskStore)
        assert "PostgresTaskStore" in repr(service)


def test_repr_hides_the_password(pg_schema_dsn: str) -> None:
    dsn = pg_schema_dsn.replace("cbw@", "cbw:s3cret@")
    with TaskService(dsn) as service:
        assert "s3cret" not in repr(service)


def test_a_task_enqueued_by_another_process_wakes_the_dispatcher(
        pg_schema_dsn: str, runner: TaskService, ran: Ran) -> None:
    _listener_pid(runner)
    with TaskService(pg_schema_dsn) as producer:
        producer.enqueue("q", b"notified")
    assert ran.wait_for(b"notified")


def test_a_task_written_without_notification_is_found_by_polling(
        pg_schema_dsn: str, ran: Ran) -> None:
    with TaskService(pg_schema_dsn, poll_ms=100) as service:
        service.create_queue("q", handler=ran)
        with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO cbw_tasks(id, queue, payload, status, next_run_at, "
                         "created_at) VALUES (%s, 'q', 'silent', 'pending', 0, 0)",
                         (uuid.uuid4().hex,))
        assert ran.wait_for(b"silent")


def test_wakeups_resume_after_the_listener_connection_is_terminated(
        pg_schema_dsn: str, runner: TaskService, ran: Ran) -> None:
    first = _listener_pid(runner)
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (first,))
    _listener_pid(runner, other_than=first)
    with TaskService(pg_schema_dsn) as producer:
        producer.enqueue("q", b"after reconnect")
    assert ran.wait_for(b"after reconnect")


def test_a_signal_from_another_process_resumes_a_sleeping_dispatcher(
        pg_schema_dsn: str) -> None:
    """The suspended task is due by the signal, in another process: only
    the notification can get it replayed within seconds."""
    seen: List[str] = []
    resumed = threading.Event()

    def handler(payload: memoryview) -> str:
        ctx = callbackworker.current_job()
        handle = ctx.create_callback("approval")
        seen.append(handle.callback_id)
        result = ctx.callback_result(handle)
        resumed.set()
        return result.decode()

    with TaskService(pg_schema_dsn, **SLEEPY) as runner:
        runner.create_queue("q", handler=handler)
        _listener_pid(runner)
        task = runner.enqueue("q", b"")
        deadline = time.monotonic() + DEADLINE_S
        while runner.get(task).status != "suspended" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.get(task).status == "suspended"
        with TaskService(pg_schema_dsn) as other:
            other.send_callback_success(seen[0], b"approved elsewhere")
        assert resumed.wait(DEADLINE_S)
        while runner.get(task).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.get(task).message == "approved elsewhere"


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://app:s3cret@db:5432/tasks", "postgresql://app:***@db:5432/tasks"),
    ("postgres://db/tasks?password=s3cret&sslmode=require",
     "postgres://db/tasks?password=***&sslmode=require"),
    ("postgresql://app@db/tasks", "postgresql://app@db/tasks"),
    ("C:\\data\\tasks.db", "C:\\data\\tasks.db"),
])
def test_redact_dsn_hides_passwords_only(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_without_psycopg_a_postgresql_dsn_says_which_extra_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from callbackworker import TaskService\n"
            "try:\n    TaskService('postgresql://localhost/tasks')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout
    assert "callbackworker[postgres]" in out


def test_a_server_restart_is_ridden_out(ran: Ran) -> None:
    """The server restarts under a serving service (on a cluster of its
    own): the dead pooled connections are replaced, the listener
    reconnects, and tasks enqueued after the restart run, the notified
    ones included."""
    from pg_server import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None or sys.platform == "win32":
        pytest.skip("needs the PostgreSQL server programs to restart a cluster of its own")
    cluster = PostgresCluster(bindir).start()
    try:
        with TaskService(cluster.dsn, **SLEEPY) as service:
            service.create_queue("q", handler=ran)
            first = _listener_pid(service)
            service.enqueue("q", b"before")
            assert ran.wait_for(b"before")
            cluster.restart()
            service.enqueue("q", b"after, from the service itself")
            assert ran.wait_for(b"after, from the service itself")
            _listener_pid(service, other_than=first)
            with TaskService(cluster.dsn) as producer:
                producer.enqueue("q", b"after, notified")
            assert ran.wait_for(b"after, notified")
    finally:
        cluster.stop()
