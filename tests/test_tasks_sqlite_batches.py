"""The SQLite store's batch statements: a batch enqueue, a claim and a
renewal of listed leases run a fixed number of SQLite steps, not one per
row (Python's sqlite3 gives up the interpreter lock around every step), and
give what the row-by-row statements gave; without SQLite's JSON functions
the row-by-row statements still run."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from callbackworker.durable import CallbackRecord
from callbackworker.errors import UnknownQueueError
from callbackworker.tasks import sqlite as backend
from callbackworker.tasks.sqlite import SQLiteTaskStore
from callbackworker.tasks.storage import ClaimedTask, NewCall, Outcome
from callbackworker.tasks.taskids import new_task_ids

LEASE = 60_000
ALL_BYTES = bytes(range(256))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteTaskStore]:
    s = SQLiteTaskStore(tmp_path / "tasks.db")
    s.ensure_queue("q")
    try:
        yield s
    finally:
        s.close()


def _stored_payloads(path: Path) -> List[Tuple[str, str, bytes]]:
    """``(id, SQLite type, bytes)`` of every task's payload, in seq order."""
    with sqlite3.connect(path) as db:
        return [(r[0], r[1], r[2]) for r in
                db.execute("SELECT id, typeof(payload), payload FROM tasks ORDER BY seq")]


# ---- enqueue ---------------------------------------------------------------

PAYLOADS = [b"", ALL_BYTES, b"\x00", b"", ALL_BYTES[::-1] * 3, b"\xff\x00\xfe", b"x" * 16]


def test_a_batch_keeps_every_payload_byte_for_byte(store: SQLiteTaskStore,
                                                   tmp_path: Path) -> None:
    ids = new_task_ids(len(PAYLOADS))
    store.enqueue_many("q", list(zip(ids, PAYLOADS)), 5)
    stored = _stored_payloads(tmp_path / "tasks.db")
    assert [(i, p) for i, _, p in stored] == list(zip(ids, PAYLOADS)), "in order, every byte"
    assert {kind for _, kind, _ in stored} == {"blob"}, "an empty payload is an empty BLOB"
    claimed = store.claim("q", owner="me", limit=100, now=5, lease_ms=LEASE)
    assert [(t.id, t.payload, t.attempt) for t in claimed] == [
        (i, p, 1) for i, p in zip(ids, PAYLOADS)]
    assert all(type(t.payload) is bytes for t in claimed)


def test_a_batch_of_empty_payloads_only(store: SQLiteTaskStore, tmp_path: Path) -> None:
    store.enqueue_many("q", [(i, b"") for i in new_task_ids(3)], 5)
    assert [(kind, p) for _, kind, p in _stored_payloads(tmp_path / "tasks.db")] == [
        ("blob", b"")] * 3
    assert [t.payload for t in store.claim("q", owner="me", limit=9, now=5,
                                           lease_ms=LEASE)] == [b""] * 3


def test_one_mib_payloads_round_trip(store: SQLiteTaskStore) -> None:
    big = [bytes([i]) * (1 << 20) for i in (1, 2, 3)]
    store.enqueue_many("q", [(i, p) for i, p in zip(new_task_ids(3), big)], 5)
    claimed = store.claim("q", owner="me", limit=3, now=5, lease_ms=LEASE)
    assert [t.payload for t in claimed] == big


def test_a_batch_over_the_statement_size_is_split_and_stays_all_or_nothing(
        store: SQLiteTaskStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "_CHUNK_BYTES", 600)
    statements = _Counting.install(store)
    tasks = [(i, ALL_BYTES[n:] + ALL_BYTES[:n]) for n, i in enumerate(new_task_ids(10))]
    store.enqueue_many("q", tasks, 5)
    assert statements.count(backend._ENQUEUE_JSON) == 5, "two 256-byte payloads a statement"
    assert [(i, p) for i, _, p in _stored_payloads(tmp_path / "tasks.db")] == tasks
    # a duplicate id in the last statement undoes the first ones too
    again = [(i, b"y" * 256) for i in new_task_ids(5)] + [tasks[0]]
    with pytest.raises(sqlite3.IntegrityError):
        store.enqueue_many("q", again, 6)
    assert len(_stored_payloads(tmp_path / "tasks.db")) == len(tasks)


def test_the_connection_length_limit_splits_a_batch(store: SQLiteTaskStore,
                                                     tmp_path: Path) -> None:
    db = store._conn()
    if not hasattr(db, "setlimit"):
        pytest.skip("Connection.setlimit needs Python 3.11")
    db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 4096)
    tasks = [(i, bytes([n]) * 1000) for n, i in enumerate(new_task_ids(12))]
    store.enqueue_many("q", tasks, 5)
    assert [(i, p) for i, _, p in _stored_payloads(tmp_path / "tasks.db")] == tasks


def test_a_batch_for_an_unknown_queue_adds_nothing(store: SQLiteTaskStore,
                                                    tmp_path: Path) -> None:
    with pytest.raises(UnknownQueueError):
        store.enqueue_many("nope", [(i, b"x") for i in new_task_ids(3)], 5)
    assert _stored_payloads(tmp_path / "tasks.db") == []
    assert "nope" not in store.queues()


# ---- claim -----------------------------------------------------------------

def _seed(store: SQLiteTaskStore) -> None:
    """Queue "q" with plain tasks of every payload size, calls of several
    priorities, a delayed task, a suspended replay that is due, a task
    taken back unstarted (``confirm_start``), one retried (attempt 2) and
    a payload over ``_INLINE_BYTES``."""
    ids = new_task_ids(12)
    store.enqueue_many("q", [(ids[n], PAYLOADS[n % len(PAYLOADS)]) for n in range(10)], 1)
    store.enqueue_many("q", [(ids[10], bytes(range(200)) * 400)], 2)  # 80 kB
    for n, priority in enumerate((5, -1, 5, 0)):
        store.enqueue_call("q", NewCall(id=f"call{n}", name="f", args=f'{{"n": {n}}}',
                                        priority=priority, run_at=3 + n), 3)
    store.enqueue_call("q", NewCall(id="later", name="f", args="[]", priority=9,
                                    run_at=1_000_000), 3)
    # the first three plain tasks: one suspended (due again at 20), one
    # taken back unstarted, one retried after its start
    susp, lost, retried = store.claim("q", owner="dead", limit=3, now=4, lease_ms=LEASE)[-3:]
    store.durable_add_callback(CallbackRecord("cb", susp.id, "approval", 4, 10, 0,
                                              last_beat_ms=4))
    assert store.settle([Outcome(susp.id, susp.token, "start", "", 5),
                         Outcome(susp.id, susp.token, "suspend", "", 10, awaiting="cb"),
                         Outcome(retried.id, retried.token, "start", "", 5),
                         Outcome(retried.id, retried.token, "retry", "E: x", 6)]) == [True] * 4
    assert store.recover("q", now=7, max_attempts=5, owners=["dead"]) == 1
    record = store.get(lost.id)
    assert record is not None and record.status == "pending"


def _claims(store: SQLiteTaskStore) -> List[List[Tuple[Any, ...]]]:
    """A series of claims over ``_seed``'s queue, without the tokens."""
    out = []
    for limit, now, delay in ((1, 30, 0), (4, 30, 0), (3, 30, 500), (3, 30, 500),
                              (3, 600, 500), (100, 600, 0), (5, 2_000_000, 0)):
        claimed = store.claim("q", owner="me", limit=limit, now=now, lease_ms=LEASE,
                              delay_ms=delay)
        assert len({t.token for t in claimed}) <= 1
        out.append([tuple(t._replace(token="")) for t in claimed])
    return out


def test_a_claim_gives_what_the_row_by_row_claim_gave(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.db"
    with _opened(path) as s:
        _seed(s)
    shutil.copy(path, tmp_path / "b.db")
    with _opened(path) as s:
        new = _claims(s)
        new_rows = _task_rows(s)
    with monkeypatch.context() as patched:
        patched.setattr(backend, "_has_json", lambda: False)
        with _opened(tmp_path / "b.db") as s:
            old = _claims(s)
            old_rows = _task_rows(s)
    assert new == old
    assert new_rows == old_rows
    flat = [t for claim in new for t in claim]
    assert len(flat) == 16 and len(new[2]) == len(new[4]) == 1 and new[3] == []
    assert any(t[1] == bytes(range(200)) * 400 for t in flat), "the large payload"
    assert any(t[6] for t in flat), "a confirm_start task"
    assert any(t[2] == 2 for t in flat), "a retried task"


def _task_rows(s: SQLiteTaskStore) -> List[Tuple[Any, ...]]:
    return s._conn().execute("SELECT id, status, attempt, owner, lease_expires_at, started_at, "
                             "confirm_start, awaiting FROM tasks ORDER BY seq").fetchall()


class _opened:
    def __init__(self, path: Path) -> None:
        self.store = SQLiteTaskStore(path)

    def __enter__(self) -> SQLiteTaskStore:
        self.store.ensure_queue("q")
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def test_a_claim_whose_listing_exceeds_the_length_limit_claims_row_by_row(
        store: SQLiteTaskStore, tmp_path: Path) -> None:
    """The claim's one row lists every task's id as JSON: under a low
    length limit, a claim of many small tasks would not fit it, and every
    claim would fail alike.  It claims as the row-by-row statement did."""
    db = store._conn()
    if not hasattr(db, "setlimit"):
        pytest.skip("Connection.setlimit needs Python 3.11")
    tasks = [(i, b"ab") for i in new_task_ids(600)]
    store.enqueue_many("q", tasks, 5)
    db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 20_000)  # 500 ids alone list 18 kB
    claimed = store.claim("q", owner="me", limit=500, now=5, lease_ms=LEASE)
    assert [(t.id, t.payload, t.attempt) for t in claimed] == [(i, p, 1) for i, p in tasks[:500]]
    assert len({t.token for t in claimed}) == 1
    with sqlite3.connect(tmp_path / "tasks.db") as check:
        assert check.execute("SELECT count(*) FROM tasks WHERE status = 'running'"
                             ).fetchone()[0] == 500


def test_a_claim_of_many_reads_larger_payloads_apart(store: SQLiteTaskStore) -> None:
    """Under a large limit, payloads above the limit's share of what a
    claim reads inline come by a statement of their own."""
    tasks = [(i, bytes([n]) * (n * 100)) for n, i in enumerate(new_task_ids(20))]
    store.enqueue_many("q", tasks, 5)
    counting = _Counting.install(store)
    claimed = store.claim("q", owner="me", limit=100_000, now=5, lease_ms=LEASE)
    assert [(t.id, t.payload) for t in claimed] == tasks
    assert counting.count(backend._CLAIM_BIG) == 1
    inline = backend._CHUNK_BYTES // 100_000  # 671 bytes
    assert counting.rows == 1 + sum(len(p) > inline for _, p in tasks) == 1 + 13


def test_a_file_in_utf16_claims_every_payload_byte_for_byte(tmp_path: Path) -> None:
    """A claim joins payloads as text, which is byte for byte in UTF-8
    only: a UTF-16 file is claimed row by row."""
    path = tmp_path / "utf16.db"
    db = sqlite3.connect(path)
    try:  # the encoding is the file's once its first table is written
        db.execute("PRAGMA encoding = 'UTF-16le'")
        db.execute("CREATE TABLE first (x)")
        db.execute("DROP TABLE first")
        db.commit()
    finally:
        db.close()
    with _opened(path) as s:
        assert s._conn().execute("PRAGMA encoding").fetchone()[0] == "UTF-16le"
        tasks = list(zip(new_task_ids(len(PAYLOADS)), PAYLOADS))
        s.enqueue_many("q", tasks, 1)
        claimed = s.claim("q", owner="me", limit=100, now=1, lease_ms=LEASE)
        assert [(t.id, t.payload) for t in claimed] == tasks


def test_the_claim_reads_its_tasks_from_the_claim_index(store: SQLiteTaskStore) -> None:
    plan = store._conn().execute(
        "EXPLAIN QUERY PLAN " + backend._CLAIM_READ,
        {"queue": "q", "now": 1, "limit": 10, "inline": 100}).fetchall()
    details = [row[-1] for row in plan]
    assert any("USING INDEX tasks_claim" in d for d in details), details
    assert not any("TEMP B-TREE" in d for d in details), details


# ---- steps -----------------------------------------------------------------

class _Cursor:
    def __init__(self, cursor: sqlite3.Cursor, counts: "_Counting") -> None:
        self._cursor, self._counts = cursor, counts

    def fetchone(self) -> Optional[Any]:
        row = self._cursor.fetchone()
        self._counts.rows += row is not None
        return row

    def fetchall(self) -> List[Any]:
        rows = self._cursor.fetchall()
        self._counts.rows += len(rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        for row in self._cursor:
            self._counts.rows += 1
            yield row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Counting:
    """Stands in for a store's connection, counting the rows its statements
    bound (``executemany``) and fetched: each is one SQLite step."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.rows = 0
        self.statements: List[str] = []

    @classmethod
    def install(cls, store: SQLiteTaskStore) -> "_Counting":
        counting = cls(store._conn())
        store._db = counting  # type: ignore[assignment]
        return counting

    def count(self, sql: str) -> int:
        return self.statements.count(sql)

    def execute(self, sql: str, *params: Any) -> _Cursor:
        self.statements.append(sql)
        return _Cursor(self._db.execute(sql, *params), self)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        self.statements.extend([sql] * len(rows))
        self.rows += len(rows)
        return self._db.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_batch_enqueue_and_a_claim_do_not_step_per_row(store: SQLiteTaskStore) -> None:
    counting = _Counting.install(store)
    ids = new_task_ids(200)
    store.enqueue_many("q", [(i, b"payload") for i in ids], 5)
    assert counting.rows <= 1 and len(counting.statements) <= 4, counting.statements
    counting.rows, counting.statements = 0, []
    claimed = store.claim("q", owner="me", limit=150, now=5, lease_ms=LEASE)
    assert len(claimed) == 150
    assert counting.rows <= 1 and len(counting.statements) <= 4, counting.statements
    counting.rows, counting.statements = 0, []
    assert store.renew_leases("me", 10 * LEASE, ids[:150]) == 150
    assert counting.rows == 0 and len(counting.statements) == 1, counting.statements
    counting.rows, counting.statements = 0, []
    spaced = store.claim("q", owner="me", limit=10, now=5, lease_ms=LEASE, delay_ms=100)
    assert len(spaced) == 1 and counting.rows <= 2 and len(counting.statements) <= 6


def test_renewing_listed_leases_counts_the_tasks_still_held(store: SQLiteTaskStore) -> None:
    ids = new_task_ids(4)
    store.enqueue_many("q", [(i, b"") for i in ids], 5)
    held = store.claim("q", owner="me", limit=3, now=5, lease_ms=LEASE)
    done = held[0]
    assert store.complete(done.id, done.token, "", 6) is True
    listed = [t.id for t in held] + [ids[3], "no-such-task"]
    assert store.renew_leases("me", 99_999, listed) == 2
    assert store.renew_leases("other", 99_999, listed) == 0
    records = [store.get(t.id) for t in held[1:]]
    assert [r.lease_expires_at for r in records if r is not None] == [99_999, 99_999]


# ---- without JSON functions ------------------------------------------------

def test_without_json_functions_the_row_by_row_statements_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "_has_json", lambda: False)
    # as if json_each were missing: the batch statements cannot run
    for name in ("_ENQUEUE_JSON", "_CLAIM_READ", "_CLAIM_MARK", "_RENEW_LISTED"):
        monkeypatch.setattr(backend, name, "SELECT json_each_missing()")
    s = SQLiteTaskStore(tmp_path / "t.db")
    try:
        s.ensure_queue("q")
        tasks = list(zip(new_task_ids(len(PAYLOADS)), PAYLOADS))
        s.enqueue_many("q", tasks, 1)
        with pytest.raises(UnknownQueueError):
            s.enqueue_many("nope", tasks[:2], 1)
        claimed = s.claim("q", owner="me", limit=100, now=1, lease_ms=LEASE)
        assert [(t.id, t.payload) for t in claimed] == tasks
        assert s.renew_leases("me", 99_999, [t.id for t in claimed]) == len(tasks)
        s.enqueue_many("q", [(i, b"z") for i in new_task_ids(2)], 1)
        spaced = s.claim("q", owner="me", limit=5, now=1, lease_ms=LEASE, delay_ms=10)
        assert [t.payload for t in spaced] == [b"z"]
        assert s.counts()["q"]["running"] == len(tasks) + 1
    finally:
        s.close()
