"""The task commands facing ordinary mistakes, run as a user runs them
(``python -m callbackworker ...`` in a subprocess): one line on stderr
that names the database or the app, never a traceback, and the documented
exit status (1 for a failure at run time, 2 for wrong arguments); and no
control character from the database written raw to the terminal."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest

from callbackworker import TaskService
from callbackworker.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE
from callbackworker.tasks.sqlite import SQLiteTaskStore

TESTS = Path(__file__).parent
TOKEN = "t" * 40


def cli(*args: str, env: Optional[Dict[str, str]] = None,
        stdout: "int | None" = subprocess.PIPE,
        cwd: Optional[Path] = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "callbackworker", *args], stdout=stdout,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                          timeout=60, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(TESTS), **(env or {})))


def assert_one_line(out: "subprocess.CompletedProcess[str]", status: int, command: str,
                    *expected: str) -> str:
    """The command failed with ``status`` and one stderr line that holds
    every ``expected`` text."""
    lines = out.stderr.splitlines()
    assert out.returncode == status and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"callbackworker {command}: "), lines[0]
    for text in expected:
        assert text in lines[0]
    return lines[0]


def _queue_db(path: Path) -> Path:
    with TaskService(path) as service:
        service.create_queue("q", handler=lambda payload: "ok")
        service.enqueue("q", b"x")
    return path


def _directory(tmp: Path) -> Path:
    (tmp / "dir.db").mkdir()
    return tmp / "dir.db"


def _not_a_database(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("these are my notes, not a database\n" * 20)
    return tmp / "notes.txt"


def _corrupt(tmp: Path) -> Path:
    path = _queue_db(tmp / "corrupt.db")
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # the header survives, the pages do not
    path.write_bytes(bytes(data))
    return path


def _newer_schema(tmp: Path) -> Path:
    path = _queue_db(tmp / "newer.db")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 999")
    return path


@pytest.mark.parametrize("make_db, reason", [
    (_directory, "is a directory"),
    (_not_a_database, "file is not a database"),
    (_corrupt, "malformed"),
    (_newer_schema, "newer"),
])
@pytest.mark.parametrize("command", [["queues"], ["task", "0" * 32], ["enqueue", "q", "x"]])
def test_a_database_that_cannot_be_opened_is_one_line_naming_it(
        tmp_path: Path, make_db: Callable[[Path], Path], reason: str, command: list) -> None:
    db = make_db(tmp_path)
    out = cli(command[0], "--db", str(db), *command[1:])
    assert_one_line(out, EXIT_FAILURE, command[0], str(db), reason)


@pytest.fixture
def read_only_db(tmp_path: Path) -> "Path":
    """A task database the command cannot write: immutable when the tests
    run as root (who ignores file modes), else mode 0444."""
    db = _queue_db(tmp_path / "ro.db")
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i")
        yield db
        subprocess.run(["chattr", "-i", str(db)], check=True)
    else:
        db.chmod(0o444)
        yield db


def test_a_read_only_database_is_one_line_naming_it(read_only_db: Path) -> None:
    out = cli("enqueue", "--db", str(read_only_db), "q", "x")
    assert_one_line(out, EXIT_FAILURE, "enqueue", str(read_only_db), "readonly")


@pytest.mark.parametrize("command", [["queues"], ["task", "0" * 32]])
def test_commands_that_only_read_refuse_a_missing_file(tmp_path: Path, command: list) -> None:
    db = tmp_path / "typo.db"
    out = cli(command[0], "--db", str(db), *command[1:])
    assert_one_line(out, EXIT_FAILURE, command[0], str(db), "no task database")
    assert not db.exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("query", ["", "?sslpassword=SSLSECRET"])
def test_an_unreachable_postgresql_is_one_line_without_the_password(query: str) -> None:
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed")
    dsn = f"postgresql://app:PWSECRET@127.0.0.1:{_closed_port()}/tasks{query}"
    out = cli("queues", "--db", dsn)
    line = assert_one_line(out, EXIT_FAILURE, "queues", "postgresql://app:***@127.0.0.1",
                           "Connection refused")
    assert "SECRET" not in line


def test_a_wrong_postgresql_password_is_one_line_without_it() -> None:
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed")
    from pg_server import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None or sys.platform == "win32":
        pytest.skip("needs the PostgreSQL server programs for a cluster with password auth")
    cluster = PostgresCluster(bindir).start()
    try:
        cluster.require_password("the-right-one")
        out = cli("queues", "--db", cluster.dsn.replace("://cbw@", "://cbw:PWSECRET@"))
    finally:
        cluster.stop()
    line = assert_one_line(out, EXIT_FAILURE, "queues", "postgresql://cbw:***@127.0.0.1",
                           "password authentication failed")
    assert "SECRET" not in line


@pytest.mark.parametrize("app, expected", [
    ("no_such_module_anywhere:queues", "cannot import no_such_module_anywhere"),
    ("task_apps:no_such_queues", "task_apps has no attribute no_such_queues"),
    ("no_colon", "module:attribute"),
])
def test_an_app_that_cannot_be_loaded_is_a_usage_error(tmp_path: Path, app: str,
                                                       expected: str) -> None:
    out = cli("worker", "--db", str(tmp_path / "t.db"), "--app", app)
    assert_one_line(out, EXIT_USAGE, "worker", expected)


@pytest.mark.parametrize("source, raised", [
    ("raise RuntimeError('no settings file')\n", "RuntimeError: no settings file"),
    ("import json\nSETTINGS = json.loads('{not json')\n", "JSONDecodeError: Expecting"),
])
def test_an_app_that_raises_while_imported_is_one_line_naming_it(tmp_path: Path, source: str,
                                                                  raised: str) -> None:
    (tmp_path / "crashing_app.py").write_text(source + "queues = {}\n")
    out = cli("worker", "--db", str(tmp_path / "t.db"), "--app", "crashing_app:queues",
              cwd=tmp_path)
    assert_one_line(out, EXIT_USAGE, "worker", "--app crashing_app:queues",
                    f"importing crashing_app raised {raised}")
    assert out.stdout == ""


@pytest.mark.parametrize("source, app", [
    ("queues = {}\n", "idle_app:queues"),
    ("def setup(service):\n    pass\n", "idle_app:setup"),
    ("import os\nfrom callbackworker import TaskService\n"
     "svc = TaskService(os.path.join(os.path.dirname(__file__), 'own.db'))\n", "idle_app:svc"),
])
def test_a_worker_with_no_queue_to_serve_is_refused(tmp_path: Path, source: str,
                                                    app: str) -> None:
    (tmp_path / "idle_app.py").write_text(source)
    db = [] if app.endswith(":svc") else ["--db", str(tmp_path / "t.db")]
    out = cli("worker", *db, "--app", app, cwd=tmp_path)
    assert out.returncode == EXIT_USAGE and out.stdout == "", out.stderr
    assert "Traceback" not in out.stderr  # the log may say the schema was created first
    assert out.stderr.splitlines()[-1].startswith(
        f"callbackworker worker: --app {app} defines no queue to serve: ")


def test_serve_refuses_a_port_out_of_range(tmp_path: Path) -> None:
    out = cli("serve", "--db", str(tmp_path / "t.db"), "--port", "99999",
              env={"CALLBACKWORKER_TOKEN": TOKEN})
    assert_one_line(out, EXIT_USAGE, "serve", "--port", "99999")


def test_serve_on_a_port_in_use_is_one_line_and_never_says_serving(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("serve", "--db", str(tmp_path / "t.db"), "--port", str(port),
                  env={"CALLBACKWORKER_TOKEN": TOKEN})
    assert_one_line(out, EXIT_FAILURE, "serve", f"port {port}", "in use")
    assert out.stdout == ""


def test_a_closed_stdout_ends_the_command_quietly(tmp_path: Path) -> None:
    """``callbackworker queues | head -1``: the reader went away."""
    db = _queue_db(tmp_path / "t.db")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = cli("queues", "--db", str(db), stdout=write_end)
    finally:
        os.close(write_end)
    assert out.returncode == EXIT_FAILURE and out.stderr == ""


def _wait_until_reading_stdin(pid: int) -> None:
    """Waits until the process blocks in read(0, ...) (Linux: the
    syscall number and first argument in /proc/PID/syscall)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                if f.read().startswith("0 0x0 "):
                    return
        except OSError:
            pytest.skip("needs /proc/PID/syscall to know when the command reads stdin")
        time.sleep(0.02)
    raise AssertionError("the command never read stdin")


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="tells a blocked read(0) by its x86-64 syscall number")
def test_ctrl_c_while_enqueue_reads_stdin_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "callbackworker", "enqueue", "--db",
                             str(tmp_path / "t.db"), "q", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_reading_stdin(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED and err == "callbackworker enqueue: interrupted\n"


# ---- nothing raw from the database reaches the terminal -------------------

def test_queue_names_with_control_characters_are_refused(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db") as service:
        for name in ["red\x1b[31m", "two\nlines", "nul\0", "bidi\u202eevil", "lone\udc80"]:
            with pytest.raises(ValueError, match="unprintable"):
                service.create_queue(name, handler=lambda payload: "ok")
    out = cli("enqueue", "--db", str(tmp_path / "t.db"), "clear\x1b[2J", "x")
    assert_one_line(out, EXIT_FAILURE, "enqueue", "unprintable")
    assert "\x1b" not in out.stderr


def test_task_escapes_control_characters_of_the_message(tmp_path: Path) -> None:
    with TaskService(tmp_path / "t.db", background=False) as service:
        service.create_queue("q", handler=lambda payload: "done\x1b[2J\x1b]0;owned\x07\u202e!")
        task_id = service.enqueue("q", b"")
        service._dispatch_once()
    out = cli("task", "--db", str(tmp_path / "t.db"), task_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2] == "message: done\\x1b[2J\\x1b]0;owned\\x07\\u202e!"


def test_queues_escapes_control_characters_of_queue_names(tmp_path: Path) -> None:
    """A name written before names were checked (here: by the store itself)."""
    db = tmp_path / "t.db"
    store = SQLiteTaskStore(db)
    try:
        store.ensure_queue("old\x1b[31mname")
    finally:
        store.close()
    out = cli("queues", "--db", str(db))
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert out.stdout.splitlines()[1].split()[0] == "old\\x1b[31mname"
