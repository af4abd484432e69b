"""The SQLite backend against the shared storage contract, plus what only
SQLite has: pragmas, schema versioning, and lock contention between
connections."""

from __future__ import annotations

import contextlib
import math
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Mapping

import pytest

from callbackworker.durable import CallbackRecord
from callbackworker.errors import StorageBusyError
from callbackworker.tasks.schema import SCHEMA_VERSION, expected_columns
from callbackworker.tasks.sqlmanage import listing
from callbackworker.tasks.sql import bounded_patience
from callbackworker.tasks.sqlite import SQLiteTaskStore
from callbackworker.tasks.storage import Outcome
from callbackworker.tasks.taskids import new_task_ids

from storage_contract import (StorageContract, check_seeded_tasks_run_on, seed_durable_tasks,
                              source_indexes)


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
    assert _pragma(path, "user_version") == SCHEMA_VERSION


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


def _enqueue_on_a_thread(store: SQLiteTaskStore,
                         task_id: str) -> "tuple[threading.Thread, List[BaseException]]":
    """A thread (not started) that enqueues ``task_id`` into queue "q", and
    the list that gets what the enqueue raises."""
    errors: List[BaseException] = []

    def enqueue() -> None:
        try:
            store.enqueue("q", task_id, b"x", 0)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    return threading.Thread(target=enqueue), errors


def test_writes_wait_out_another_connection_holding_the_lock(tmp_path: Path) -> None:
    """A write lock held by another connection longer than busy_timeout is
    retried, never reported as "database is locked"."""
    path = tmp_path / "t.db"
    store = SQLiteTaskStore(path)
    store.ensure_queue("q")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    writer, errors = _enqueue_on_a_thread(store, "t1")
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


def test_an_endless_patience_keeps_sqlite_s_own_wait(tmp_path: Path) -> None:
    """``patience_s=math.inf`` (retry for as long as it takes) opens a store
    whose SQLite waits its usual time for a file lock."""
    store = SQLiteTaskStore(tmp_path / "t.db", patience_s=math.inf)
    try:
        store.ensure_queue("q")
        store.enqueue("q", "t1", b"x", 0)
        assert store._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 2000
    finally:
        store.close()


def test_a_lock_held_past_patience_is_storage_busy_error(tmp_path: Path) -> None:
    """Past ``patience_s`` the retry loop gives up with one clear error."""
    path = tmp_path / "t.db"
    store = SQLiteTaskStore(path, patience_s=0.1)
    store.ensure_queue("q")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageBusyError, match="stayed locked"):
            store.enqueue("q", "t1", b"x", 0)
        # SQLite's own wait for the file lock (2 s by default) is cut to
        # the patience: one attempt used to wait all of it
        assert store._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 100
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()


_BOUND_S = 0.5
"""The ``bounded_patience`` of the tests below: well under ``busy_timeout``
(2 s), the wait one attempt used to make inside SQLite whatever the bound."""


def _bounded_enqueue(store: SQLiteTaskStore, task_id: str,
                     ended: List["tuple[str, float, BaseException | None]"]) -> None:
    """``store.enqueue`` under ``bounded_patience(_BOUND_S)``; appends the
    task id, the seconds it took and what it raised to ``ended``."""
    started = time.monotonic()
    try:
        with bounded_patience(_BOUND_S):
            store.enqueue("q", task_id, b"x", 0)
        error = None
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        error = exc
    ended.append((task_id, time.monotonic() - started, error))


def test_concurrent_bounded_calls_on_a_locked_database_each_end_with_their_bound(
        tmp_path: Path) -> None:
    """Calls of several threads under ``bounded_patience`` (HTTP requests)
    each give up about when their own bound runs out: none waits for the
    store's lock while another call's retries, or SQLite's busy wait, run
    past it.  (The limit is generous: twice the bound.)"""
    path = tmp_path / "t.db"
    store = SQLiteTaskStore(path, patience_s=3600)
    store.ensure_queue("q")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    ended: List["tuple[str, float, BaseException | None]"] = []
    try:
        callers = [threading.Thread(target=_bounded_enqueue, args=(store, f"t{i}", ended))
                   for i in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        assert len(ended) == 4
        for task_id, took_s, error in ended:
            assert isinstance(error, StorageBusyError), (task_id, error)
            assert f"for {_BOUND_S:g} s" in str(error)
            assert took_s < 2 * _BOUND_S, (task_id, took_s)
        # SQLite's busy wait is back to the store's own for unbounded calls.
        assert store._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 2000
        store.enqueue("q", "after", b"x", 0)
    finally:
        store.close()


def test_a_bounded_call_behind_an_unbounded_one_ends_with_its_bound(tmp_path: Path) -> None:
    """An unbounded call (a worker's, patient for the store's ``patience_s``)
    retrying on a locked database does not hold a bounded call of another
    thread past the bound; once the lock is released the unbounded call
    succeeds."""
    path = tmp_path / "t.db"
    store = SQLiteTaskStore(path, patience_s=5)  # patient enough, and no hang before the fix
    store.ensure_queue("q")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    worker, patient_errors = _enqueue_on_a_thread(store, "patient")
    ended: List["tuple[str, float, BaseException | None]"] = []
    try:
        worker.start()
        time.sleep(0.1)  # the patient call is in SQLite's busy wait, holding the store
        _bounded_enqueue(store, "bounded", ended)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        worker.join()
    try:
        [(_, took_s, error)] = ended
        assert took_s < 2 * _BOUND_S, took_s
        assert isinstance(error, StorageBusyError) and f"for {_BOUND_S:g} s" in str(error)
        assert patient_errors == [] and store.get("patient") is not None
    finally:
        store.close()


def test_opening_a_current_database_reads_while_another_connection_writes(
        tmp_path: Path) -> None:
    """A store on a database already at ``SCHEMA_VERSION`` takes no write
    lock to open, so the commands and pages that only read never wait
    behind a writer (a write lock held past the store's patience would
    make the open fail)."""
    path = tmp_path / "t.db"
    with contextlib.closing(SQLiteTaskStore(path)) as first:
        first.ensure_queue("q")
        first.enqueue("q", "t1", b"x", 0)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("UPDATE tasks SET message = 'being written'")
    try:
        with contextlib.closing(SQLiteTaskStore(path, patience_s=0.1)) as reader:
            assert reader.counts()["q"]["pending"] == 1
            assert reader.get("t1").message == ""  # the last committed state
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_an_older_database_is_migrated_under_the_write_lock(tmp_path: Path) -> None:
    """A database that needs a migration waits for the write lock (and past
    the patience says so), since migrating writes."""
    path = tmp_path / "t.db"
    SQLiteTaskStore(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageBusyError, match="stayed locked"):
            SQLiteTaskStore(path, patience_s=0.1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_sqlite_without_json_functions_settles_row_by_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from callbackworker.tasks import sqlite as backend

    monkeypatch.setattr(backend, "_has_json", lambda: False)
    # as if json_each were missing: the joined statements cannot run
    monkeypatch.setattr(backend, "_BULK_SQL", {k: "SELECT json_each_missing()"
                                               for k in backend._BULK_SQL})
    s = SQLiteTaskStore(tmp_path / "t.db")
    try:
        s.ensure_queue("q")
        s.enqueue_many("q", [(task_id, b"x") for task_id in new_task_ids(20)], 1)
        claimed = s.claim("q", owner="me", limit=20, now=1, lease_ms=60_000)
        outcomes = [Outcome(t.id, t.token, "complete", "done", 2) for t in claimed]
        assert s.settle(outcomes) == [True] * 20
        assert {s.get(t.id).status for t in claimed} == {"completed"}
    finally:
        s.close()


def _settle_completions(store: SQLiteTaskStore, results: List[str]) -> List[bool]:
    """Claims one task per result and settles them as completed with those
    results in one call (a batch the joined statement would take)."""
    store.ensure_queue("q")
    ids = new_task_ids(len(results))
    store.enqueue_many("q", [(task_id, b"x") for task_id in ids], 1)
    claimed = {t.id: t for t in store.claim("q", owner="me", limit=len(ids), now=1,
                                            lease_ms=60_000)}
    return store.settle([Outcome(task_id, claimed[task_id].token, "complete", "", 2,
                                 result=result) for task_id, result in zip(ids, results)])


def test_a_batch_of_completions_keeps_text_after_a_nul_character(
        store: SQLiteTaskStore) -> None:
    """A NUL character goes into the joined statement's JSON as ``\\u0000``,
    where SQLite's JSON functions end the text: such a batch is written row
    by row, so every result is stored whole, as a smaller batch's is."""
    results = [f'"r{i}"' for i in range(9)] + ['"before\x00after"']
    assert _settle_completions(store, results) == [True] * len(results)
    stored = {r[0] for r in store._conn().execute("SELECT result FROM tasks")}
    assert stored == set(results)


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setlimit"),
                    reason="Connection.setlimit is Python 3.11+")
def test_a_batch_of_completions_longer_than_one_sqlite_value_is_written_row_by_row(
        store: SQLiteTaskStore) -> None:
    """The joined statement takes the whole batch as one text, which SQLite
    refuses past its length limit (10^9 bytes by default: a thousand results
    of 1 MiB) although every row fits: such a batch is written row by row."""
    store._conn().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 64 * 1024)
    results = [f'"{i:02}{"x" * 10_000}"' for i in range(10)]  # 100 kB in all
    assert _settle_completions(store, results) == [True] * len(results)
    stored = {r[0] for r in store._conn().execute("SELECT result FROM tasks")}
    assert stored == set(results)


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
        assert _pragma(path, "user_version") == SCHEMA_VERSION
        (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=1000)
        assert (task.id, task.attempt) == ("old", 1)
        store.durable_record("old", 0, "step", "s", b"v")
        assert store.durable_ops("old") == [("step", "s", b"v")]
    finally:
        store.close()


# A named (``:name``) or numbered (``?1``) placeholder: bound from a
# sequence, Python 3.12 warns and 3.14 raises.
_NAMED = re.compile(r"(?<![:\w])[:@$][A-Za-z_]\w*|\?\d")


class _CheckedConnection:
    """A connection that records every statement whose placeholders do not
    match the kind of parameters it was given."""

    def __init__(self, db: sqlite3.Connection, mismatches: List[str]) -> None:
        self._db = db
        self._mismatches = mismatches

    def _check(self, sql: str, params: Any) -> None:
        if not isinstance(params, Mapping) and _NAMED.search(sql):
            self._mismatches.append(sql)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self._check(sql, params)
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        for params in rows[:1]:
            self._check(sql, params)
        return self._db.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_named_placeholders_are_bound_from_mappings_only(store: SQLiteTaskStore) -> None:
    """Every operation binds positional parameters to ``?`` only and named
    ones from a mapping (the mix is deprecated since Python 3.12)."""
    mismatches: List[str] = []
    store._db = _CheckedConnection(store._conn(), mismatches)  # type: ignore[assignment]
    store.ensure_queue("q")
    store.enqueue_many("q", [("a", b"x"), ("b", b"y")], 0)
    task, = store.claim("q", owner="o", limit=1, now=0, lease_ms=10)
    store.durable_record("a", 0, "step", "n", b"v")
    store.durable_ops("a")
    store.durable_add_callback(CallbackRecord("cb", "a", "n", 0, 100, 0, last_beat_ms=0))
    store.settle([Outcome("a", task.token, "suspend", "", 1, awaiting="cb")])
    store.durable_signal("cb", "pending", None, None, 2)
    store.durable_signal("cb", "succeeded", b"r", None, 3)
    store.durable_callback("cb")
    store.next_due("q")
    store.counts()
    store.get("a")
    store.claim("q", owner="o", limit=2, now=5, lease_ms=10, delay_ms=3)
    store.renew_leases("o", 100)
    store.running_owners("q")
    store.recover("q", now=1000, max_attempts=1, owners=["x", "y"])
    store.cancel("b", 5)
    store.clear("q", 5)
    store.sweep("q", 10**9)
    assert mismatches == []


def _live_schema(path: Path) -> "tuple[dict, dict]":
    """The columns ``{table: {column: (type, nullable)}}`` and secondary
    indexes ``{name: (table, columns)}`` of the database at ``path``."""
    with sqlite3.connect(path) as db:
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        columns = {table: {name: (kind, not (notnull or pk))
                           for _, name, kind, notnull, _, pk in db.execute(
                               f"PRAGMA table_info({table})")}
                   for table in tables}
        indexes = {name: (table, tuple(row[2] for row in db.execute(
                       f"PRAGMA index_info({name})")))
                   for name, table in db.execute(
                       "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' "
                       "AND name NOT LIKE 'sqlite_autoindex_%'")}
    return columns, indexes


def test_a_fresh_database_has_the_described_schema(store: SQLiteTaskStore) -> None:
    columns, indexes = _live_schema(Path(store.path))
    assert columns == expected_columns("sqlite")
    assert indexes == source_indexes("sqlite")
    assert _pragma(Path(store.path), "user_version") == SCHEMA_VERSION


def test_a_migrated_database_has_the_described_schema(tmp_path: Path) -> None:
    from callbackworker.tasks.sqlite import _MIGRATIONS

    assert len(_MIGRATIONS) == SCHEMA_VERSION
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        for statement in _MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
    SQLiteTaskStore(path).close()
    columns, indexes = _live_schema(path)
    assert columns == expected_columns("sqlite")
    assert indexes == source_indexes("sqlite")


def test_a_version_2_database_is_upgraded_in_place_and_keeps_its_tasks(tmp_path: Path) -> None:
    """A database made by the release before tasks as functions (schema 2,
    written by its own migrations): its tasks are found and run on."""
    from callbackworker.tasks.sqlite import _MIGRATIONS

    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as db:
        for step in _MIGRATIONS[:2]:
            for statement in step:
                db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO queues(name) VALUES ('q')")
        db.executemany("INSERT INTO tasks(id, queue, payload, status, message, next_run_at, "
                       "created_at, finished_at) VALUES (?, 'q', x'01', ?, ?, 0, 5, ?)",
                       [("done", "completed", "ok", 9), ("todo", "pending", "", None)])
    store = SQLiteTaskStore(path)
    try:
        assert _pragma(path, "user_version") == SCHEMA_VERSION
        done = store.get("done")
        assert done is not None
        assert (done.status, done.message, done.name, done.result, done.created_at,
                done.finished_at) == ("completed", "ok", None, None, 5, 9)
        (task,) = store.claim("q", owner="me", limit=5, now=0, lease_ms=1000)
        assert (task.id, task.payload, task.name) == ("todo", b"\x01", None)
    finally:
        store.close()


def test_a_version_7_database_with_durable_tasks_migrates_and_runs_on(tmp_path: Path) -> None:
    """Version 8 marks the tasks that have durable state: a database made
    before it, with pending, running and suspended tasks holding logs and
    callbacks, migrates, and each task's state still ends with it."""
    from callbackworker.tasks.sqlite import _MIGRATIONS

    path = tmp_path / "v7.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for step in _MIGRATIONS[:7]:
            for statement in step:
                db.execute(statement)
        db.execute("PRAGMA user_version = 7")
        seed_durable_tasks(db.execute, "", "x'01'")
    store = SQLiteTaskStore(path)
    try:
        assert _pragma(path, "user_version") == SCHEMA_VERSION
        check_seeded_tasks_run_on(store)
    finally:
        store.close()
    columns, indexes = _live_schema(path)
    assert columns == expected_columns("sqlite")
    assert indexes == source_indexes("sqlite")


def _plan(store: SQLiteTaskStore, name: str, **params: Any) -> str:
    sql = store.dialect.sql(name)
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        return " / ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_the_counts_per_status_read_indexes_only(store: SQLiteTaskStore) -> None:
    """The dashboard's counts read each status from the index of its phase
    (waiting, running, finished) and never a task's row."""
    plan = _plan(store, "counts")
    assert [step for step in plan.split(" / ") if "tasks" in step] == [
        f"SCAN tasks USING COVERING INDEX {index}"
        for index in ("tasks_waiting", "tasks_running", "tasks_finished")], plan


@pytest.mark.parametrize("name, index", [
    ("next_due", "COVERING INDEX tasks_waiting (queue=? AND status=? AND next_run_at<?)"),
    ("clear", "COVERING INDEX tasks_waiting (queue=? AND status=?)"),
    ("recover", "INDEX tasks_running (queue=? AND status=?)"),
    ("running_owners", "COVERING INDEX tasks_running (queue=? AND status=?)"),
    ("sweep", "COVERING INDEX tasks_finished (queue=? AND status=? AND finished_at<?)")])
def test_a_queue_s_tasks_in_one_phase_are_found_through_its_index(
        store: SQLiteTaskStore, name: str, index: str) -> None:
    sql = store.dialect.sql(name).replace("owner IN (:dead_owners)", "owner IN (:owner)")
    names = set(re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", sql))
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        plan = " / ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql,
                                                       dict.fromkeys(names, 0)))
    assert f"SEARCH tasks USING {index}" in plan, plan


def test_renewing_an_owner_s_leases_reads_the_running_tasks_only(
        store: SQLiteTaskStore) -> None:
    plan = _plan(store, "renew_leases", owner="o", expires=1)
    assert plan == "SCAN tasks USING INDEX tasks_running", plan


def test_the_claim_reads_the_claim_index_in_order(store: SQLiteTaskStore) -> None:
    """The claim's plan: a search of ``tasks_claim`` on the queue, in the
    index's order (no sort of every due task), so it stops after ``limit``
    rows however many are pending."""
    sql = store.dialect.sql("claim")
    with sqlite3.connect(store.path) as db:
        plan = " / ".join(row[3] for row in db.execute(
            "EXPLAIN QUERY PLAN " + sql, {"owner": "me", "expires": 1, "token": "t",
                                          "queue": "q", "now": 0, "limit": 5}))
    assert "USING INDEX tasks_claim (queue=?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


@pytest.mark.parametrize("filters, status", [
    ((), ""), (("queue",), ""), (("name",), ""), (("status",), "failed"),
    (("status",), "completed"), (("queue", "status"), "failed"),
    (("queue", "status"), "pending"), (("queue", "status", "name"), "failed")])
def test_listing_reads_an_index_in_order(store: SQLiteTaskStore, filters: "tuple[str, ...]",
                                         status: str) -> None:
    """``list_tasks``'s plan for every filter: a search of an index (or of
    the table's key), newest first, with no sort of every matching task, so
    a page stops after ``limit`` rows; failed tasks through their own
    index."""
    with sqlite3.connect(store.path) as db:
        plan = " / ".join(row[3] for row in db.execute(
            "EXPLAIN QUERY PLAN " + listing(store.dialect, filters, status),
            {"queue": "q", "name": "fn", "before": 10, "limit": 5}))
    assert "SEARCH tasks USING" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
    if status == "failed":
        assert "USING INDEX tasks_failed" in plan, plan


def test_a_purge_of_failed_tasks_reads_their_index(store: SQLiteTaskStore) -> None:
    """A batch of a purge of failed tasks finds them through their partial
    index, not by walking the queue's other tasks."""
    with sqlite3.connect(store.path) as db:
        plan = " / ".join(row[3] for row in db.execute(
            "EXPLAIN QUERY PLAN " + store.dialect.sql("purge_failed"),
            {"queue": "q", "limit": 5}))
    assert "USING INDEX tasks_failed_by_queue" in plan, plan
