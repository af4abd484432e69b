"""Logging of task events (``callbackworker.tasks.events``), its set-up for
the command line (``callbackworker.logs``) and the worker command's log
options."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from callbackworker import NoRetry, QueueConfig, Retry, TaskService, current_job, current_task
from callbackworker.logs import JsonFormatter, configure_logging
from callbackworker.tasks.events import LOGGER_NAME
from callbackworker.tasks.sqlite import SQLiteTaskStore
from helpers import FakeClock

TESTS = Path(__file__).parent
SECRET = "s3cr3t-payload-7f1c"


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="callbackworker")
    return caplog


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Puts the root logger back as it was after ``configure_logging``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _task_records(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER_NAME]


def _attempt() -> int:
    task = current_task()
    assert task is not None
    return task.attempt


def _run(svc: TaskService, task_id: str) -> None:
    try:
        svc.result(task_id, timeout_ms=30_000)
    except Exception:
        pass
    svc.flush()


def test_a_failed_task_is_logged_as_an_error_with_its_traceback(
        tmp_path: Path, events: pytest.LogCaptureFixture) -> None:
    with TaskService(tmp_path / "t.db") as svc:
        @svc.task(name="explode")
        def explode() -> None:
            raise ValueError("the ledger is out of balance")

        task_id = explode.enqueue()
        svc.serve()
        _run(svc, task_id)
    (record,) = [r for r in _task_records(events) if r.levelno == logging.ERROR]
    assert record.getMessage() == (f"task {task_id} (explode) failed on attempt 1 "
                                   "(queue 'default'); no retry: ValueError: the ledger is "
                                   "out of balance")
    assert record.exc_text is not None and record.exc_text.startswith("Traceback")
    assert 'raise ValueError("the ledger is out of balance")' in record.exc_text
    assert (record.task_id, record.queue, record.task_name, record.attempt,  # type: ignore
            record.outcome) == (task_id, "default", "explode", 1, "fail")  # type: ignore
    assert "Traceback (most recent call last)" in logging.Formatter().format(record)


def test_a_retried_attempt_is_logged_as_a_warning_with_its_traceback(
        tmp_path: Path, events: pytest.LogCaptureFixture) -> None:
    with TaskService(tmp_path / "t.db") as svc:
        @svc.task(name="flaky", max_retries=1, backoff_ms=0)
        def flaky() -> str:
            if _attempt() == 1:
                raise ConnectionError("try again")
            return "ok"

        task_id = flaky.enqueue()
        svc.serve()
        _run(svc, task_id)
    levels = [(r.levelname, r.outcome) for r in _task_records(events)  # type: ignore
              if hasattr(r, "outcome")]
    assert levels == [("WARNING", "retry"), ("INFO", "complete")]
    warning = next(r for r in _task_records(events) if r.levelno == logging.WARNING)
    assert "it will be retried: ConnectionError: try again" in warning.getMessage()
    assert warning.exc_text is not None and "ConnectionError: try again" in warning.exc_text


def test_start_is_logged_at_debug_and_completion_at_info(
        tmp_path: Path, events: pytest.LogCaptureFixture) -> None:
    with TaskService(tmp_path / "t.db") as svc:
        @svc.task(name="add")
        def add(a: int, b: int) -> int:
            return a + b

        task_id = add.enqueue(1, 2)
        svc.serve()
        _run(svc, task_id)
    records = [r for r in _task_records(events) if getattr(r, "task_id", None) == task_id]
    assert [r.levelname for r in records] == ["DEBUG", "INFO"]
    assert records[0].getMessage() == f"task {task_id} (add) started (queue 'default', attempt 1)"
    assert records[1].getMessage().startswith(f"task {task_id} (add) completed in ")
    assert records[1].duration_ms >= 0  # type: ignore[attr-defined]


def test_lease_recovery_is_logged_as_a_warning(tmp_path: Path,
                                               events: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    path = tmp_path / "t.db"
    with TaskService(path, clock=clock, background=False) as svc:
        svc.create_queue("q", QueueConfig(max_retries=1), handler=lambda p: "ok")
        task_id = svc.enqueue("q", b"x")
        other = SQLiteTaskStore(path)
        try:  # another worker claims the task, then disappears
            other.claim("q", owner="lost-host/1/ab", limit=1, now=clock(), lease_ms=1000)
        finally:
            other.close()
        clock.advance(1001)
        svc._dispatch_once()
        assert svc.get(task_id).status == "completed"
    (record,) = [r for r in _task_records(events) if r.levelno == logging.WARNING]
    assert record.getMessage() == ("queue 'q': took back 1 running task(s) of lost workers "
                                   "(lease expired): they run again, or fail when no attempt "
                                   "is left")


def test_no_log_record_holds_payloads_arguments_results_or_callback_ids(
        tmp_path: Path, events: pytest.LogCaptureFixture) -> None:
    callback_ids: List[str] = []
    with TaskService(tmp_path / "t.db") as svc:
        @svc.task(name="echo")
        def echo(secret: str) -> str:
            return secret + "-result"

        @svc.task(name="refuse")
        def refuse(secret: str) -> None:
            raise NoRetry("refused")

        @svc.task(name="retry_once", max_retries=1, backoff_ms=0)
        def retry_once(secret: str) -> None:
            if _attempt() == 1:
                raise Retry(delay_ms=0)

        def wait_for_approval(payload: memoryview) -> str:
            handle = current_job().create_callback("approval")
            callback_ids.append(handle.callback_id)
            return current_job().callback_result(handle).decode()

        svc.create_queue("raw", handler=wait_for_approval)
        ids = [echo.enqueue(SECRET), refuse.enqueue(SECRET), retry_once.enqueue(SECRET)]
        raw = svc.enqueue("raw", SECRET.encode())
        svc.serve()
        for task_id in ids:
            _run(svc, task_id)
        deadline = time.monotonic() + 30
        while svc.get(raw).status != "suspended":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        svc.send_callback_success(callback_ids[0], SECRET.encode() + b"-signal")
        _run(svc, raw)
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in events.records)
    assert _task_records(events) and callback_ids
    assert SECRET not in text
    assert callback_ids[0] not in text


def test_json_lines_carry_time_level_logger_message_task_fields_and_traceback(
        tmp_path: Path, root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("INFO", "json", out)
    with TaskService(tmp_path / "t.db") as svc:
        @svc.task(name="explode")
        def explode() -> None:
            raise ValueError("boom")

        task_id = explode.enqueue()
        svc.serve()
        _run(svc, task_id)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [line for line in lines if line.get("task_id") == task_id]
    assert len(failed) == 1
    (line,) = failed
    assert line["level"] == "ERROR" and line["logger"] == LOGGER_NAME
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert line["message"].endswith("no retry: ValueError: boom")
    assert (line["queue"], line["task_name"], line["attempt"], line["outcome"]) == \
        ("default", "explode", 1, "fail")
    assert line["traceback"].startswith("Traceback") and "ValueError: boom" in line["traceback"]


def test_json_formatter_keeps_a_multi_line_message_on_one_line() -> None:
    record = logging.LogRecord("callbackworker", logging.WARNING, __file__, 1, "a\nb", None,
                               None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and json.loads(line)["message"] == "a\nb"


def test_configure_logging_refuses_an_unknown_level_or_format() -> None:
    with pytest.raises(ValueError, match="log level must be one of"):
        configure_logging("LOUD")
    with pytest.raises(ValueError, match="log format must be one of"):
        configure_logging("INFO", "xml")


def test_configure_logging_twice_keeps_one_handler(root_logging: None) -> None:
    before = len(logging.getLogger().handlers)
    configure_logging("INFO", "text", io.StringIO())
    configure_logging("DEBUG", "json", io.StringIO())
    assert len(logging.getLogger().handlers) == before + 1
    assert logging.getLogger().level == logging.DEBUG


def _worker(db: Path, *options: str) -> "subprocess.Popen[str]":
    proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "worker", "--app",
                             "ops_app:svc", *options],
                            env=dict(os.environ, PYTHONPATH=str(TESTS), CBW_APP_DB=str(db)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
    return proc


def _stop(proc: "subprocess.Popen[str]") -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return err


def test_worker_command_prints_a_failed_task_with_its_traceback_by_default(
        tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    proc = _worker(db)
    try:
        with TaskService(db) as producer:
            failing = producer.enqueue_task("ops.explode", [SECRET], queue="ops")
            doubled = producer.enqueue_task("ops.double", [21], queue="ops")
            assert producer.result(doubled, timeout_ms=30_000) == 42
            with pytest.raises(Exception):
                producer.result(failing, timeout_ms=30_000)
    finally:
        err = _stop(proc)
    assert f"ERROR callbackworker.tasks.events: task {failing} (ops.explode) failed on " \
           "attempt 1 (queue 'ops'); no retry: ValueError: the ledger is out of balance" in err
    assert "Traceback (most recent call last):" in err
    assert 'raise ValueError("the ledger is out of balance")' in err
    assert f"INFO callbackworker.tasks.events: task {doubled} (ops.double) completed in " in err
    assert "started" not in err  # DEBUG is below the default level
    assert SECRET not in err


def test_worker_command_log_level_and_json_format(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    proc = _worker(db, "--log-level", "error", "--log-format", "json")
    try:
        with TaskService(db) as producer:
            doubled = producer.enqueue_task("ops.double", [1], queue="ops")
            failing = producer.enqueue_task("ops.explode", ["x"], queue="ops")
            assert producer.result(doubled, timeout_ms=30_000) == 2
            with pytest.raises(Exception):
                producer.result(failing, timeout_ms=30_000)
    finally:
        err = _stop(proc)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [(line["level"], line["task_id"]) for line in lines] == [("ERROR", failing)]
    assert "ValueError: the ledger is out of balance" in lines[0]["traceback"]


def test_the_demo_keeps_its_deliberate_task_failures_off_stderr() -> None:
    out = subprocess.run([sys.executable, "-m", "callbackworker", "demo"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "failed on attempt" not in out.stderr
    assert "Traceback" not in out.stderr


def test_a_worker_on_postgresql_logs_no_password_even_at_debug(tmp_path: Path) -> None:
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed")
    from pg_server import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None or sys.platform == "win32":
        pytest.skip("needs the PostgreSQL server programs for a cluster with password auth")
    cluster = PostgresCluster(bindir).start()
    try:
        cluster.require_password("PWSECRET-42")
        dsn = cluster.dsn.replace("://cbw@", "://cbw:PWSECRET-42@")
        proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "worker", "--db", dsn,
                                 "--app", "task_apps:crash", "--log-level", "DEBUG"],
                                env=dict(os.environ, PYTHONPATH=str(TESTS)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
            with TaskService(dsn) as producer:
                ok, bad = producer.enqueue_many("crash", [b"ok", b"fail"])
                assert producer.result(ok, timeout_ms=30_000) == "done 1"
                with pytest.raises(Exception):
                    producer.result(bad, timeout_ms=30_000)
        finally:
            err = _stop(proc)
    finally:
        cluster.stop()
    assert "failed on attempt 3" in err and "started" in err  # DEBUG and ERROR records
    assert "PWSECRET" not in err
