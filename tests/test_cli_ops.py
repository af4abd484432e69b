"""The operating commands (``tasks``, ``retry``, ``purge``), ``worker``'s
``--prefetch``, ``--poll-ms`` and ``--metrics-port``, and
``CALLBACKWORKER_DB``, run as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import pytest

from callbackworker import TaskService

TESTS = Path(__file__).parent


def cli(*args: str, env: Optional[Dict[str, str]] = None
        ) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "callbackworker", *args], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(TESTS), **(env or {})))


def _finished_tasks(db: Path) -> List[str]:
    """Three tasks in queue "q": completed, failed (with a traceback),
    cancelled; returns their ids in that order."""
    with TaskService(db) as svc:
        @svc.task(name="ok", queue="q")
        def ok() -> int:
            return 1

        @svc.task(name="bad", queue="q")
        def bad() -> None:
            raise ValueError("bad input\nsecond line")

        done, failed, cancelled = ok.enqueue(), bad.enqueue(), ok.options(delay_ms=10**9).enqueue()
        svc.cancel(cancelled)
        svc.serve()
        svc.result(done, timeout_ms=30_000)
        with pytest.raises(Exception):
            svc.result(failed, timeout_ms=30_000)
    return [done, failed, cancelled]


def test_tasks_prints_a_table_newest_first(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    done, failed, cancelled = _finished_tasks(db)
    out = cli("tasks", "--db", str(db))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["id", "status", "attempt", "queue", "name", "created", "(UTC)",
                                "finished", "(UTC)", "message"]
    assert [line.split()[:5] for line in lines[1:]] == [
        [cancelled, "cancelled", "0", "q", "ok"], [failed, "failed", "1", "q", "bad"],
        [done, "completed", "1", "q", "ok"]]
    assert lines[2].endswith("ValueError: bad input")  # the message's first line


def test_tasks_filters_by_queue_status_and_name(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    done, failed, cancelled = _finished_tasks(db)

    def ids(*options: str) -> List[str]:
        out = cli("tasks", "--db", str(db), *options)
        assert out.returncode == 0, out.stderr
        return [line.split()[0] for line in out.stdout.splitlines()[1:]]

    assert ids("--status", "failed") == [failed]
    assert ids("--name", "ok") == [cancelled, done]
    assert ids("--queue", "q", "--status", "completed") == [done]
    out = cli("tasks", "--db", str(db), "--queue", "other")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "no tasks\n")


def test_tasks_pages_with_limit_and_before(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    done, failed, cancelled = _finished_tasks(db)
    first = cli("tasks", "--db", str(db), "--limit", "2")
    assert [line.split()[0] for line in first.stdout.splitlines()[1:]] == [cancelled, failed]
    assert first.stderr == f"more tasks may follow: add --before {failed}\n"
    second = cli("tasks", "--db", str(db), "--limit", "2", "--before", failed)
    assert [line.split()[0] for line in second.stdout.splitlines()[1:]] == [done]
    assert second.stderr == ""


def test_tasks_escapes_text_read_from_the_database(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with TaskService(db) as svc:
        @svc.task(name="evil")
        def evil() -> None:
            raise ValueError("\x1b[2J\x1b]0;title\x07")

        task_id = evil.enqueue()
        svc.serve()
        with pytest.raises(Exception):
            svc.result(task_id, timeout_ms=30_000)
    out = cli("tasks", "--db", str(db))
    assert out.returncode == 0
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "ValueError: \\x1b[2J\\x1b]0;title\\x07" in out.stdout


def test_reading_commands_refuse_a_missing_database_file(tmp_path: Path) -> None:
    for command in (["tasks"], ["retry", "x"], ["purge", "q", "--status", "failed"]):
        out = cli(*command, "--db", str(tmp_path / "missing.db"))
        assert out.returncode == 1
        assert out.stderr.startswith(f"callbackworker {command[0]}: no task database at ")
        assert len(out.stderr.splitlines()) == 1
        assert not (tmp_path / "missing.db").exists()


def test_tasks_refuses_a_limit_out_of_range(tmp_path: Path) -> None:
    out = cli("tasks", "--db", str(tmp_path / "t.db"), "--limit", "0")
    assert out.returncode == 2 and "must be 1..10000, not 0" in out.stderr


def test_retry_makes_a_failed_task_pending_again(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    done, failed, cancelled = _finished_tasks(db)
    out = cli("retry", "--db", str(db), failed)
    assert (out.returncode, out.stdout) == (0, f"task {failed} is pending again\n")
    with TaskService(db) as svc:
        info = svc.get(failed)
        assert (info.status, info.attempt) == ("pending", 0)


def test_retry_of_a_completed_or_unknown_task_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    done, failed, cancelled = _finished_tasks(db)
    out = cli("retry", "--db", str(db), done)
    assert out.returncode == 1
    assert out.stderr == (f"callbackworker retry: cannot retry task '{done}': it completed "
                          "(only failed and cancelled tasks can be retried)\n")
    out = cli("retry", "--db", str(db), "nope")
    assert out.returncode == 1 and out.stderr.startswith("callbackworker retry: unknown task")


def test_purge_deletes_a_status_and_reports_progress_on_stderr_for_a_large_purge(
        tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with TaskService(db) as svc:
        svc.declare_queue("big")
        svc.enqueue_many("big", [b"x"] * 2500)
        svc.clear_queue("big")
        kept = svc.enqueue("big", b"y")
    out = cli("purge", "big", "--db", str(db), "--status", "cancelled")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "purged 2500 cancelled task(s) from queue big\n"
    assert out.stderr.splitlines() == ["purging: 2000 cancelled tasks deleted so far",
                                       "purging: 2500 cancelled tasks deleted so far"]
    with TaskService(db) as svc:
        assert [t.id for t in svc.list_tasks(queue="big")] == [kept]


def test_purge_takes_only_a_finished_status(tmp_path: Path) -> None:
    out = cli("purge", "q", "--db", str(tmp_path / "t.db"), "--status", "pending")
    assert out.returncode == 2 and "invalid choice: 'pending'" in out.stderr


def test_callbackworker_db_is_the_default_database(tmp_path: Path) -> None:
    db = tmp_path / "env.db"
    done, failed, cancelled = _finished_tasks(db)
    env = {"CALLBACKWORKER_DB": str(db)}
    out = cli("tasks", "--status", "failed", env=env)
    assert out.returncode == 0 and out.stdout.splitlines()[1].split()[0] == failed
    assert cli("queues", env=env).stdout.splitlines()[1].split()[0] == "q"
    task_id = cli("enqueue", "q", "payload", env=env).stdout.strip()
    assert cli("task", task_id, env=env).stdout.startswith("status:  pending")
    assert "default: $CALLBACKWORKER_DB" in cli("worker", "--help").stdout


def _worker(*args: str, env: Optional[Dict[str, str]] = None) -> "subprocess.Popen[str]":
    return subprocess.Popen([sys.executable, "-m", "callbackworker", "worker", *args],
                            env=dict(os.environ, PYTHONPATH=str(TESTS), **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_worker_takes_prefetch_and_poll_ms(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    proc = _worker("--db", str(db), "--app", "task_apps:one_at_a_time", "--prefetch", "2",
                   "--poll-ms", "20")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
        with TaskService(db) as producer:
            task_id = producer.enqueue("slow", b"0")
            assert producer.result(task_id, timeout_ms=30_000) == "slept"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_worker_refuses_prefetch_and_poll_ms_with_a_task_service_app(tmp_path: Path) -> None:
    out = cli("worker", "--app", "ops_app:svc", "--prefetch", "4", "--poll-ms", "10",
              env={"CBW_APP_DB": str(tmp_path / "t.db")})
    assert out.returncode == 2
    assert out.stderr.splitlines(keepends=True)[-1] == ("callbackworker worker: --prefetch and --poll-ms cannot be used with "
                          "ops_app:svc: that TaskService was opened with its own options (give "
                          "them to TaskService(...))\n")


def test_worker_metrics_port_serves_prometheus_metrics_on_loopback(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    proc = _worker("--app", "ops_app:svc", "--metrics-port", "0", env={"CBW_APP_DB": str(db)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("serving")
        url = proc.stdout.readline().split()[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with TaskService(db) as producer:
            task_id = producer.enqueue_task("ops.double", [2], queue="ops")
            assert producer.result(task_id, timeout_ms=30_000) == 4
        text = httpx.get(url, timeout=30).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert 'callbackworker_tasks_completed_total{queue="ops",task="ops.double"} 1.0' in text
    assert 'callbackworker_tasks{queue="ops",status="pending"} 0.0' in text


def test_worker_metrics_port_taken_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = cli("worker", "--app", "ops_app:svc", "--metrics-port", str(port),
                  env={"CBW_APP_DB": str(tmp_path / "t.db")})
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (f"callbackworker worker: cannot serve metrics on "
                                           f"127.0.0.1 port {port}: Address already in use")
    assert out.stdout == ""  # no "serving" banner before the refusal


def test_worker_metrics_port_out_of_range_is_refused_before_anything_else(
        tmp_path: Path) -> None:
    out = cli("worker", "--app", "ops_app:svc", "--metrics-port", "70000",
              env={"CBW_APP_DB": str(tmp_path / "t.db")})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "callbackworker worker: --metrics-port must be 0..65535, not 70000\n"
