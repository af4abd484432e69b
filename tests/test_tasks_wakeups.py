"""Cross-process wake-ups on a SQLite task database (``tasks/wakeups.py``).

Each store on a file is a listener of its own, so two stores in one test
process stand for two processes; one test uses a real second process.  A
wait that only a wake-up can end has a poll interval far past the test's
patience: polling cannot be what ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

import pytest

from callbackworker import QueueConfig, TaskService
from callbackworker.tasks.sqlite import SQLiteTaskStore
from callbackworker.tasks.wakeups import WakeChannel

PATIENCE_S = 30.0
NEVER_POLL_MS = 60_000  # the longest poll_ms; the tests end long before
NEVER_RENEW_MS = 600_000  # leases renewed (a dispatcher pass) every 200 s


def test_an_enqueue_in_another_process_wakes_an_idle_service(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    ran = threading.Event()
    with TaskService(db, poll_ms=NEVER_POLL_MS, lease_ms=NEVER_RENEW_MS) as service:
        service.create_queue("q", QueueConfig(), handler=lambda payload: ran.set())
        service.flush()  # served, and its dispatcher idle
        code = ("from callbackworker.tasks import TaskClient\n"
                f"with TaskClient.open({str(db)!r}) as c: c.enqueue('q', b'x')\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=PATIENCE_S)
        assert ran.wait(PATIENCE_S)


def test_the_waker_hears_enqueues_of_other_stores_with_their_queue(tmp_path: Path) -> None:
    db = str(tmp_path / "tasks.db")
    heard: List[Optional[str]] = []
    woken = threading.Event()
    listener, writer = SQLiteTaskStore(db), SQLiteTaskStore(db)
    try:
        listener.set_waker(lambda queue: (heard.append(queue), woken.set()))
        writer.ensure_queue("q")
        writer.enqueue("q", "t1", b"x", 0)
        assert woken.wait(PATIENCE_S)
        assert heard[0] == "q"
    finally:
        listener.close()
        writer.close()


def test_a_store_does_not_wake_itself(tmp_path: Path) -> None:
    db = str(tmp_path / "tasks.db")
    heard = threading.Event()
    store = SQLiteTaskStore(db)
    try:
        store.set_waker(lambda queue: heard.set())
        store.ensure_queue("q")
        store.enqueue("q", "t1", b"x", 0)
        other = SQLiteTaskStore(db)  # its wake-up comes after any of the first's
        other.enqueue("q", "t2", b"x", 0)
        other.close()
        assert heard.wait(PATIENCE_S)
        assert store._wake is not None and store._wake._listeners() == []
    finally:
        store.close()


def test_tasks_finished_by_another_store_wake_result_watchers(tmp_path: Path) -> None:
    db = str(tmp_path / "tasks.db")
    finished = threading.Event()
    watcher, worker = SQLiteTaskStore(db), SQLiteTaskStore(db)
    try:
        watcher.watch_finished(finished.set)
        worker.ensure_queue("q")
        worker.enqueue("q", "t1", b"x", 0)
        (task,) = worker.claim("q", owner="w", limit=1, now=0, lease_ms=1000)
        assert not finished.is_set()
        assert worker.complete(task.id, task.token, "done", 1)
        assert finished.wait(PATIENCE_S)
    finally:
        watcher.close()
        worker.close()


def test_a_result_wait_watches_for_tasks_finished_elsewhere(tmp_path: Path) -> None:
    """From its first ``result`` a client watches the channel, so a commit
    in another process cuts its pauses (up to half a second) short."""
    db = tmp_path / "tasks.db"
    with TaskService(db, poll_ms=NEVER_POLL_MS, lease_ms=NEVER_RENEW_MS) as worker, \
            TaskService(db) as waiter:
        worker.create_queue("q", handler=lambda payload: "done")
        task_id = waiter.enqueue("q", b"x")
        assert waiter.result(task_id, timeout_ms=int(PATIENCE_S * 1000)) == "done"
        assert waiter._store._on_finished is not None  # type: ignore[attr-defined]


def test_a_stale_socket_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    db = str(tmp_path / "tasks.db")
    store = SQLiteTaskStore(db)
    try:
        assert store._wake is not None
        stale = os.path.join(store._wake.directory, "1-dead")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(stale)
        sock.close()  # bound, then gone: nobody reads it
        store.ensure_queue("q")
        store.enqueue("q", "t1", b"x", 0)
        assert not os.path.exists(stale)
    finally:
        store.close()


def test_without_a_channel_work_is_found_by_polling(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    Path(WakeChannel.directory_for(str(db))).write_text("not a directory")
    assert WakeChannel.open(str(db)) is None
    ran = threading.Event()
    with TaskService(db, poll_ms=20) as service:
        service.create_queue("q", handler=lambda payload: ran.set())
        service.flush()
        other = SQLiteTaskStore(str(db))
        other.enqueue("q", "t1", b"x", 0)
        other.close()
        assert ran.wait(PATIENCE_S)
    os.unlink(WakeChannel.directory_for(str(db)))


def test_a_path_too_long_for_a_socket_address_gets_a_short_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    db = str(deep / "tasks.db")
    channel = WakeChannel.open(db)
    assert channel is not None and len(channel.directory) < 60
    again = WakeChannel.open(db)
    assert again is not None and again.directory == channel.directory  # every process agrees
    channel.close()
    again.close()


def test_no_channel_for_an_in_memory_database() -> None:
    assert WakeChannel.open(":memory:") is None
    store = SQLiteTaskStore(":memory:")
    try:
        store.set_waker(lambda queue: None)  # a no-op: polling only
        store.ensure_queue("q")
        store.enqueue("q", "t1", b"x", 0)
    finally:
        store.close()


def _refused_once(db: str, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """Opening the channel of ``db`` twice gives no channel, and one
    warning naming the directory and ``reason``."""
    caplog.set_level(logging.WARNING, logger="callbackworker.tasks.wakeups")
    directory = WakeChannel.directory_for(db)
    assert WakeChannel.open(db) is None
    assert WakeChannel.open(db) is None
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "callbackworker.tasks.wakeups" and directory in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0], warnings
    assert "polling only" in warnings[0]


def test_the_wake_directory_is_made_private(tmp_path: Path) -> None:
    db = str(tmp_path / "tasks.db")
    channel = WakeChannel.open(db)
    assert channel is not None
    try:
        assert stat.S_IMODE(os.stat(channel.directory).st_mode) == 0o700
    finally:
        channel.close()


def test_a_wake_directory_writable_by_others_is_refused(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    db = str(tmp_path / "tasks.db")
    os.mkdir(WakeChannel.directory_for(db))
    os.chmod(WakeChannel.directory_for(db), 0o777)
    _refused_once(db, caplog, "writable by other users (mode 0777)")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a directory to another user needs root")
def test_a_wake_directory_of_another_user_is_refused(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    db = str(tmp_path / "tasks.db")
    directory = WakeChannel.directory_for(db)
    os.mkdir(directory, 0o700)
    os.chown(directory, 65534, 65534)
    _refused_once(db, caplog, "owned by user id 65534")


def test_a_wake_directory_that_is_a_symbolic_link_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = str(tmp_path / "tasks.db")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", WakeChannel.directory_for(db))
    _refused_once(db, caplog, "symbolic link")


def test_a_tmp_wake_directory_made_by_someone_else_first_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The short directory for a long path lives in /tmp, where any local
    user may make it first."""
    deep = tmp_path / ("e" * 120)
    deep.mkdir()
    db = str(deep / "tasks.db")
    directory = WakeChannel.directory_for(db)
    assert directory.startswith("/tmp/callbackworker-wake-")
    os.mkdir(directory)
    try:
        os.chmod(directory, 0o1777)
        _refused_once(db, caplog, "writable by other users")
        with TaskService(db, poll_ms=20) as service:  # polling still finds the work
            ran = threading.Event()
            service.create_queue("q", handler=lambda payload: ran.set())
            service.enqueue("q", b"x")
            assert ran.wait(PATIENCE_S)
    finally:
        os.rmdir(directory)
