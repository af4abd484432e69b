"""The task commands of ``callbackworker`` (worker, enqueue, task, queues),
run as subprocesses, and the demo's persistent-queue part."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Sequence

import pytest

from callbackworker import TaskService
from callbackworker.cli import EXIT_ABANDONED, EXIT_USAGE

TESTS = Path(__file__).parent


def cli(*args: str, stdin: bytes = b"") -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "callbackworker", *args], input=stdin.decode(),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(TESTS)))


def _worker(db: Path, log: Path, app: str = "task_apps:one_at_a_time",
            extra: Sequence[str] = ()) -> "subprocess.Popen[bytes]":
    proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "worker", "--db", str(db),
                             "--app", app, *extra],
                            env=dict(os.environ, PYTHONPATH=str(TESTS), CBW_TASK_LOG=str(log)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"serving")
    return proc


def _wait_for_status(db: Path, task_id: str, statuses: List[str]) -> str:
    deadline = time.monotonic() + 30
    with TaskService(db) as reader:
        while (status := reader.get(task_id).status) not in statuses:
            assert time.monotonic() < deadline, status
            time.sleep(0.02)
    return status


@pytest.mark.parametrize("command", ["worker", "enqueue", "task", "queues", "serve", "demo",
                                     "tasks", "retry", "purge"])
def test_every_command_has_help(command: str) -> None:
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout


def test_worker_enqueue_task_queues(tmp_path: Path) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    proc = _worker(db, log)
    try:
        task_id = cli("enqueue", "--db", str(db), "slow", "0").stdout.strip()
        from_stdin = cli("enqueue", "--db", str(db), "slow", "-", stdin=b"0").stdout.strip()
        assert len(task_id) == 32 and len(from_stdin) == 32
        _wait_for_status(db, from_stdin, ["completed"])
        out = cli("task", "--db", str(db), task_id)
        assert out.returncode == 0
        assert out.stdout.splitlines() == ["status:  completed", "attempt: 1", "message: slept"]
        table = cli("queues", "--db", str(db)).stdout.splitlines()
        assert table[0].split() == ["queue", "pending", "running", "suspended", "completed",
                                    "failed", "cancelled"]
        assert table[1].split() == ["slow", "0", "0", "0", "2", "0", "0"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_task_commands_report_errors_without_traceback(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    TaskService(db).close()
    out = cli("task", "--db", db, "nope")
    assert out.returncode == 1 and "unknown task" in out.stderr and "Traceback" not in out.stderr
    out = cli("enqueue", "--db", db, "nope", "x")
    assert out.returncode == 1 and "unknown queue" in out.stderr


def test_sigterm_lets_the_running_task_finish_and_leaves_the_rest_pending(tmp_path: Path) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    proc = _worker(db, log)
    with TaskService(db) as producer:
        running, *waiting = producer.enqueue_many("slow", [b"0.5", b"0", b"0"])
    _wait_for_start(log, running)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read()  # type: ignore[union-attr]
    with TaskService(db) as reader:
        assert reader.get(running)[:3] == ("completed", "slept", 1)
        for task_id in waiting:
            assert reader.get(task_id)[:3] == ("pending", "", 0)
        assert reader.counts()["slow"]["running"] == 0


def test_worker_rejects_a_malformed_app(tmp_path: Path) -> None:
    out = cli("worker", "--db", str(tmp_path / "t.db"), "--app", "no_colon")
    assert out.returncode != 0 and "module:attribute" in out.stderr


def test_demo_tours_a_persistent_queue() -> None:
    out = cli("demo")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "== close (queued jobs are shut down)" in lines  # the Worker tour is still there
    part = lines[lines.index("== raw byte handlers, the layer under the functions "
                             "(TaskService, temporary file)"):]
    assert part[1:] == [
        "enqueue_many(greet, [b'ada', b'nobody']) -> 2 task ids",
        "get(task) -> status='completed' message='hello, ada' attempt=1",
        "get(task) -> status='failed' message='LookupError: no one to greet' attempt=2",
        "after close and reopen: get(first task).status -> 'completed'",
        "",
        "demo finished",
    ]


def test_demo_tours_tasks_as_functions_before_raw_handlers() -> None:
    out = cli("demo")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("== tasks as functions (TaskService on a temporary SQLite file)")
    assert start < lines.index("== raw byte handlers, the layer under the functions "
                               "(TaskService, temporary file)")
    assert lines[start + 1:start + 8] == [
        "@svc.task add; add(2, 3) runs inline -> 5",
        "add.enqueue(2, 3), flaky.enqueue('done'), broken.enqueue() -> 3 task ids "
        "(JSON arguments, queue created on first use)",
        "serve(); result(add) -> 5; get(add).progress -> {'adding': [2, 3]}",
        "result(flaky) -> 'done on attempt 2' (it raised Retry once)",
        "result(broken) raised TaskFailedError: ValueError: no such record "
        "(traceback stored: True)",
        "add.enqueue({1, 2}, 3) raised TypeError: the arguments of task 'add' cannot be "
        "encoded as JSON: Object of type set is not JSON serializable",
        "",
    ]


def test_demo_tours_route_retries_and_a_durable_callback() -> None:
    out = cli("demo")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("== routes: retries with exponential backoff (on a manual clock)")
    end = lines.index("== tasks as functions (TaskService on a temporary SQLite file)")
    assert lines[start + 1:end] == [
        "open_route('flaky', max_retries=2, backoff_ms=1000); start(flaky)",
        "attempt 1 failed: state -> QUEUED, retry in 1000 ms; advance_clock(1000)",
        "attempt 2 failed: state -> QUEUED, retry in 2000 ms; advance_clock(2000)",
        "wait(job) -> b'done on attempt 3'",
        "",
        "== durable external callback (the job suspends until signalled)",
        "state(job) -> SUSPENDED (its thread is free for other jobs)",
        "send_callback_success(id, b'ada'); wait(job) -> b'approved by ada'",
        "a second success raises CallbackAlreadyCompletedError",
        "",
    ]


def _wait_for_start(log: Path, task_id: str) -> None:
    """Waits until the handler has started on the task (claimed is not
    enough: a claimed task that has not started goes back to pending)."""
    deadline = time.monotonic() + 30
    while not (log.exists() and f"start {task_id} " in log.read_text()):
        assert time.monotonic() < deadline, "the handler never started"
        time.sleep(0.02)


@contextmanager
def _killed_at_the_end(proc: "subprocess.Popen[bytes]") -> Iterator[None]:
    """Kills the worker if the test failed before it exited."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _stopping(proc: "subprocess.Popen[bytes]", signum: int) -> None:
    """Sends the first signal and waits until the worker says it is stopping
    (past the log lines it printed before: schema migrations, tasks run)."""
    proc.send_signal(signum)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    while b" INFO callbackworker." in line:
        line = proc.stderr.readline()
    assert line.startswith(b"stopping"), line


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGINT)],
                         ids=["TERM-then-INT", "INT-then-INT"])
def test_a_second_signal_exits_at_once_leaving_the_running_task_to_its_lease(
        tmp_path: Path, first: int, second: int) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    proc = _worker(db, log)
    with _killed_at_the_end(proc):
        with TaskService(db) as producer:
            task_id = producer.enqueue("slow", b"3600")
        _wait_for_start(log, task_id)
        _stopping(proc, first)
        proc.send_signal(second)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_ABANDONED, err
    assert f"left 1 task(s) running: {task_id} (slow)".encode() in err
    assert b"leases expire" in err
    with TaskService(db) as reader:
        assert reader.get(task_id).status == "running"  # until its lease expires


def test_shutdown_timeout_bounds_the_graceful_stop(tmp_path: Path) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    proc = _worker(db, log, extra=["--shutdown-timeout", "0.5"])
    with _killed_at_the_end(proc):
        with TaskService(db) as producer:
            task_id = producer.enqueue("slow", b"3600")
        _wait_for_start(log, task_id)
        _stopping(proc, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_ABANDONED, err
    assert b"--shutdown-timeout 0.5 s passed" in err
    assert f"{task_id} (slow)".encode() in err


def test_shutdown_timeout_leaves_a_graceful_stop_that_fits_alone(tmp_path: Path) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    proc = _worker(db, log, extra=["--shutdown-timeout", "60"])
    with _killed_at_the_end(proc):
        with TaskService(db) as producer:
            task_id = producer.enqueue("slow", b"0.3")
        _wait_for_start(log, task_id)
        _stopping(proc, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with TaskService(db) as reader:
        assert reader.get(task_id).status == "completed"


def test_a_negative_shutdown_timeout_is_a_usage_error(tmp_path: Path) -> None:
    out = cli("worker", "--db", str(tmp_path / "t.db"), "--app", "task_apps:one_at_a_time",
              "--shutdown-timeout", "-1")
    assert out.returncode == EXIT_USAGE
    assert out.stderr.startswith("callbackworker worker: --shutdown-timeout must be")


def test_worker_app_may_be_a_task_service_serving_every_registered_task(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "worker",
                             "--app", "function_app:svc"],
                            env=dict(os.environ, PYTHONPATH=str(TESTS), CBW_APP_DB=str(db)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().split(": ")[-1].strip() == "default, text"
        with TaskService(db) as producer:
            ids = [producer.enqueue_task("add", [2, 3]), producer.enqueue_task("shout", ["hi"],
                                                                              queue="text")]
            assert producer.result(ids[0], timeout_ms=30_000) == 5
            assert producer.result(ids[1], timeout_ms=30_000) == "HI"
        out = cli("task", "--db", str(db), ids[0])
        assert out.stdout.splitlines() == ["status:  completed", "attempt: 1", "message: ",
                                           "name:    add", "result:  5",
                                           'progress: {"adding": [2, 3]}']
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


def test_worker_refuses_db_with_a_task_service_app(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "callbackworker", "worker", "--db",
                          str(tmp_path / "other.db"), "--app", "function_app:svc"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(TESTS),
                                  CBW_APP_DB=str(tmp_path / "t.db")))
    assert out.returncode != 0 and "--db cannot be used with function_app:svc" in out.stderr
