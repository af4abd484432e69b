"""The SQLite backend against the shared storage contract, plus what only
SQLite has: pragmas, schema versioning, and lock contention between
connections."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

from callbackworker.tasks.sqlite import SQLiteTaskStore

from storage_contract import StorageContract


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteTaskStore]:
    s = SQLiteTaskStore(tmp_path / "tasks.db")
    try:
        yield s
    finally:
        s.close()


class TestSQLiteStore(StorageContract):
    """Every contract test, on a fresh SQLite file."""


def _pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as db:
        return db.execute(f"PRAGMA {name}").fetchone()[0]


def test_wal_journal_and_schema_version(store: SQLiteTaskStore) -> None:
    path = Path(store.path)
    assert _pragma(path, "journal_mode") == "wal"
    assert _pragma(path, "user_version") == 2


@pytest.mark.parametrize("durability, level", [("normal", 1), ("full", 2)])
def test_durability_sets_synchronous(tmp_path: Path, durability: str, level: int) -> None:
    s = SQLiteTaskStore(tmp_path / "d.db", durability=durability)
    try:
        assert s._conn().execute("PRAGMA synchronous").fetchone()[0] == level
    finally:
        s.close()


def test_unknown_durability_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        SQLiteTaskStore(tmp_path / "d.db", durability="sometimes")


def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = SQLiteTaskStore(path)
    first.ensure_queue("q")
    first.enqueue("q", "t1", b"x", 0)
    first.close()
    second = SQLiteTaskStore(path)
    try:
        record = second.get("t1")
        assert record is not None and record.status == "pending"
    finally:
        second.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    SQLiteTaskStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteTaskStore(path)


def test_writes_wait_out_another_connection_holding_the_lock(tmp_path: Path) -> None:
    """A write lock held by another connection longer than busy_timeout is
    retried, never reported as "database is locked"."""
    path = tmp_path / "t.db"
    store = SQLiteTaskStore(path)
    store.ensure_queue("q")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    errors: List[BaseException] = []

    def enqueue() -> None:
        try:
            store.enqueue("q", "t1", b"x", 0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writer = threading.Thread(target=enqueue)
    writer.start()
    writer.join(2.5)  # past busy_timeout (2 s): the store is in its retry loop
    blocker.execute("COMMIT")
    writer.join()
    blocker.close()
    try:
        assert errors == []
        assert store.get("t1") is not None
    finally:
        store.close()


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    s = SQLiteTaskStore(tmp_path / "t.db")
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.queues()


def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    from callbackworker.tasks.sqlite import _MIGRATIONS

    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        for statement in _MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO queues(name) VALUES ('q')")
        db.execute("INSERT INTO tasks(id, queue, payload, status, next_run_at, created_at) "
                   "VALUES ('old', 'q', x'00', 'pending', 0, 0)")
    store = SQLiteTaskStore(path)
    try:
        assert _pragma(path, "user_version") == 2
        (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=1000)
        assert (task.id, task.attempt) == ("old", 1)
        store.durable_record("old", 0, "step", "s", b"v")
        assert store.durable_ops("old") == [("step", "s", b"v")]
    finally:
        store.close()
