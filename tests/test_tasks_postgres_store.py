"""The PostgreSQL backend against the shared storage contract, on a real
server, plus what only PostgreSQL has: the versioned schema migrated once
by hosts starting together, retried serialization failures, and wake-ups
through LISTEN/NOTIFY that survive a dropped connection."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Iterator, List, Optional

import pytest

from storage_contract import (StorageContract, check_seeded_tasks_run_on, seed_durable_tasks,
                              source_indexes)

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: "
                                                "pip install 'callbackworker[postgres]'")

from callbackworker.durable import CallbackRecord  # noqa: E402
from callbackworker.errors import StorageBusyError  # noqa: E402
from callbackworker.tasks import postgres  # noqa: E402
from callbackworker.tasks.postgres import SCHEMA_VERSION, PostgresTaskStore  # noqa: E402
from callbackworker.tasks.schema import expected_columns  # noqa: E402
from callbackworker.tasks.sqlmanage import listing  # noqa: E402
from callbackworker.tasks.status import TaskStatus  # noqa: E402
from callbackworker.tasks.storage import NEVER, Outcome  # noqa: E402


@pytest.fixture
def store(pg_schema_dsn: str) -> Iterator[PostgresTaskStore]:
    s = PostgresTaskStore(pg_schema_dsn)
    try:
        yield s
    finally:
        s.close()


class TestPostgresStore(StorageContract):
    """Every contract test, in a fresh schema on the server."""


def _sql(dsn: str, sql: str, params: object = None) -> list:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# ---- schema ---------------------------------------------------------------

def test_schema_version_is_recorded(store: PostgresTaskStore) -> None:
    assert _sql(store.dsn, "SELECT version FROM cbw_schema_version") == [(SCHEMA_VERSION,)]


def test_reopening_keeps_data_and_does_not_migrate_again(pg_schema_dsn: str) -> None:
    first = PostgresTaskStore(pg_schema_dsn)
    first.ensure_queue("q")
    first.enqueue("q", "t1", b"x", 0)
    first.close()
    second = PostgresTaskStore(pg_schema_dsn)
    try:
        record = second.get("t1")
        assert record is not None and record.status == "pending"
    finally:
        second.close()


def test_hosts_starting_at_once_migrate_exactly_once(pg_schema_dsn: str) -> None:
    """Eight stores opened at the same moment on an empty schema: the
    advisory lock lets one migrate; the others wait, then find it done."""
    barrier = threading.Barrier(8)
    stores: List[PostgresTaskStore] = []
    errors: List[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            stores.append(PostgresTaskStore(pg_schema_dsn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 8
    assert _sql(pg_schema_dsn, "SELECT version FROM cbw_schema_version") == [(SCHEMA_VERSION,)]


def _schema_at_version(dsn: str, version: int) -> None:
    """Builds the schema as the release at ``version`` left it, with its
    own migrations."""
    _sql(dsn, "CREATE TABLE cbw_schema_version (one boolean PRIMARY KEY DEFAULT true "
              "CHECK (one), version integer NOT NULL)")
    for step in postgres._MIGRATIONS[:version]:
        for statement in step:
            _sql(dsn, statement)
    _sql(dsn, f"INSERT INTO cbw_schema_version(version) VALUES ({version})")


def test_a_version_1_schema_is_migrated_keeping_its_tasks(pg_schema_dsn: str) -> None:
    """A deployment made before durable callbacks: its tasks survive the
    upgrade, and can then suspend."""
    _schema_at_version(pg_schema_dsn, 1)
    _sql(pg_schema_dsn, "INSERT INTO cbw_queues(name) VALUES ('q')")
    _sql(pg_schema_dsn, "INSERT INTO cbw_tasks(id, queue, payload, status, next_run_at, "
                        "created_at) VALUES ('old', 'q', 'x', 'pending', 0, 0)")
    store = PostgresTaskStore(pg_schema_dsn)
    try:
        assert _sql(pg_schema_dsn, "SELECT version FROM cbw_schema_version") == \
            [(SCHEMA_VERSION,)]
        task, = store.claim("q", owner="me", limit=1, now=0, lease_ms=100)
        store.durable_add_callback(CallbackRecord("cb", "old", "approval", 0))
        assert store.settle([Outcome("old", task.token, "suspend", "", 1, awaiting="cb")])
        assert store.get("old").status == "suspended"  # type: ignore[union-attr]
    finally:
        store.close()
    columns, indexes = _live_schema(pg_schema_dsn)
    assert columns == expected_columns("postgresql")
    assert indexes == source_indexes("postgresql")


def _live_schema(dsn: str) -> "tuple[dict, dict]":
    """The columns ``{table: {column: (type, nullable)}}`` and secondary
    indexes ``{name: (table, columns)}`` of the schema ``dsn`` uses (the
    version table aside)."""
    columns: dict = {}
    for table, column, kind, nullable in _sql(dsn, """
            SELECT table_name, column_name, data_type, is_nullable = 'YES'
            FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name <> 'cbw_schema_version'"""):
        columns.setdefault(table, {})[column] = (kind, nullable)
    indexes = {name: (table, tuple(keys)) for name, table, keys in _sql(dsn, """
            SELECT i.relname, t.relname, array_agg(a.attname::text ORDER BY k.n)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, n)
            JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
            WHERE t.relnamespace = current_schema()::regnamespace
                  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
            GROUP BY i.relname, t.relname""")}
    return columns, indexes


def test_a_fresh_schema_is_the_described_one(store: PostgresTaskStore) -> None:
    columns, indexes = _live_schema(store.dsn)
    assert columns == expected_columns("postgresql")
    assert indexes == source_indexes("postgresql")
    assert len(postgres._MIGRATIONS) == SCHEMA_VERSION


def test_the_status_check_allows_exactly_the_task_statuses(store: PostgresTaskStore) -> None:
    (check,), = _sql(store.dsn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                                "WHERE conname = 'cbw_tasks_status_check' "
                                "AND connamespace = current_schema()::regnamespace")
    assert sorted(re.findall(r"'(\w+)'", check)) == sorted(s.value for s in TaskStatus)


def test_a_newer_schema_is_refused(pg_schema_dsn: str) -> None:
    PostgresTaskStore(pg_schema_dsn).close()
    _sql(pg_schema_dsn, "UPDATE cbw_schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        PostgresTaskStore(pg_schema_dsn)


def test_unknown_durability_is_a_value_error(pg_schema_dsn: str) -> None:
    with pytest.raises(ValueError, match="durability"):
        PostgresTaskStore(pg_schema_dsn, durability="sometimes")


def test_full_durability_forces_synchronous_commit(pg_schema_dsn: str) -> None:
    s = PostgresTaskStore(pg_schema_dsn, durability="full")
    try:
        assert s._run(lambda c: c.execute("SHOW synchronous_commit").fetchone()) == ("on",)
    finally:
        s.close()


def test_an_unreachable_server_fails_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(psycopg.OperationalError):
        PostgresTaskStore(f"postgresql://cbw@127.0.0.1:{port}/cbw", patience_s=60)


def test_closed_store_refuses_use(pg_schema_dsn: str) -> None:
    s = PostgresTaskStore(pg_schema_dsn)
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.queues()


# ---- starts ------------------------------------------------------------------

def _rows_read_from_tasks(plan: dict) -> int:
    """The most rows any one scan of ``cbw_tasks`` or of one of its indexes
    in ``plan`` (EXPLAIN ANALYZE's JSON) read in one loop, those its filter
    removed included."""
    scans = plan.get("Node Type") != "ModifyTable" and (
        plan.get("Relation Name") == "cbw_tasks"
        or str(plan.get("Index Name", "")).startswith("cbw_tasks"))
    most = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0) if scans else 0
    return max([most, *(_rows_read_from_tasks(p) for p in plan.get("Plans", []))])


@pytest.mark.parametrize("kind", ["start", "complete"])
def test_a_settle_reads_only_the_tasks_it_settles(store: PostgresTaskStore, kind: str) -> None:
    """Many tasks running for other workers: a settle finds its own
    through their ids, never scanning the others."""
    store.ensure_queue("q")
    store.ensure_queue("busy")
    store.enqueue_many("busy", [(f"b{i}", b"") for i in range(2000)], now=0)
    store.enqueue_many("q", [(f"q{i}", b"") for i in range(1000)], now=0)
    assert len(store.claim("busy", owner="other", limit=2000, now=0, lease_ms=60_000)) == 2000
    mine = store.claim("q", owner="me", limit=40, now=0, lease_ms=60_000)
    if kind == "start":
        sql = postgres._DIALECT.sql("start")
        params = {"batch": json.dumps([[t.id, t.token, 1, None] for t in mine])}
    else:
        sql = postgres._DIALECT.sql("settle")
        params = {"batch": json.dumps([[t.id, t.token, "complete", "", 1, "", None, None]
                                       for t in mine]), "channel": postgres.CHANNEL}

    def explain(conn: psycopg.Connection, mode: str) -> dict:
        # As prepared on a pooled connection: the plan for these values, or
        # the generic plan the server settles on after a few executions.
        cur = psycopg.ClientCursor(conn)
        with conn.transaction(force_rollback=True):
            cur.execute(f"SET LOCAL plan_cache_mode = {mode}")
            cur.execute("PREPARE cbw_probe AS " + sql.replace("%(batch)s", "$1")
                        .replace("%(channel)s", "$2::text"))
            args = ", ".join(["%(batch)s", "%(channel)s"][:len(params)])
            row = cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE cbw_probe({args})",
                              params).fetchone()
            cur.execute("DEALLOCATE cbw_probe")
        assert row is not None
        return row[0][0]["Plan"]

    for mode in ("force_custom_plan", "force_generic_plan"):
        # Each task's earlier row versions are still indexed (not vacuumed
        # yet): a few reads per task, not one per task running elsewhere.
        assert _rows_read_from_tasks(store._run(lambda conn: explain(conn, mode))) \
            <= 4 * len(mine)


def _spy_statements(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The text of every statement the store's connections execute from
    now on, in order."""
    statements: List[str] = []
    execute = psycopg.Connection.execute

    def spy(self: psycopg.Connection, query: str, *args: object, **kwargs: object) -> object:
        statements.append(str(query))
        return execute(self, query, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(psycopg.Connection, "execute", spy)
    return statements


def test_only_a_batch_of_starts_alone_skips_the_servers_flush(
        store: PostgresTaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starts alone commit with ``synchronous_commit = off``; a batch that
    also holds outcomes must keep the server's setting for them."""
    store.ensure_queue("q")
    store.enqueue_many("q", [("a", b""), ("b", b"")], now=0)
    a, b = store.claim("q", owner="me", limit=2, now=0, lease_ms=60_000)
    statements = _spy_statements(monkeypatch)
    assert store.settle([Outcome(a.id, a.token, "start", "", 1)]) == [True]
    assert any("synchronous_commit" in q for q in statements)
    statements.clear()
    assert store.settle([Outcome(b.id, b.token, "start", "", 1),
                         Outcome(a.id, a.token, "complete", "", 2)]) == [True, True]
    assert statements and not any("synchronous_commit" in q for q in statements)


def test_a_claim_alone_skips_the_servers_flush_but_not_a_spaced_one(
        store: PostgresTaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain claim commits with ``synchronous_commit = off``; a claim
    under ``delay_ms`` (which moves the queue's next start in the same
    transaction) keeps the server's setting, so the gap survives a crash."""
    store.ensure_queue("q")
    store.enqueue_many("q", [("a", b""), ("b", b"")], now=0)
    statements = _spy_statements(monkeypatch)
    a, = store.claim("q", owner="me", limit=1, now=0, lease_ms=60_000)
    assert a.id == "a"
    assert len(statements) == 1 and "synchronous_commit" in statements[0]
    statements.clear()
    b, = store.claim("q", owner="me", limit=5, now=0, lease_ms=60_000, delay_ms=1000)
    assert b.id == "b" and b.token != a.token
    assert statements and not any("synchronous_commit" in q for q in statements)
    assert store.settle([Outcome(a.id, a.token, "complete", "", 1)]) == [True]


# ---- transient failures -----------------------------------------------------

def test_serialization_failure_in_a_completion_is_retried(store: PostgresTaskStore) -> None:
    """A trigger makes the first completion fail with SQLSTATE 40001 (the
    sequence it counts with is not rolled back); the store retries, and the
    second try commits."""
    _sql(store.dsn, """
        CREATE SEQUENCE completions;
        CREATE FUNCTION fail_first_completion() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('completions') = 1 THEN
                RAISE EXCEPTION 'injected' USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_first_completion BEFORE UPDATE ON cbw_tasks
            FOR EACH ROW WHEN (NEW.status = 'completed') EXECUTE FUNCTION fail_first_completion();
    """)
    store.ensure_queue("q")
    store.enqueue("q", "t1", b"x", 0)
    (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=1000)
    assert store.complete(task.id, task.token, "done", 5) is True
    assert _sql(store.dsn, "SELECT last_value FROM completions") == [(2,)]
    record = store.get("t1")
    assert record is not None and (record.status, record.message) == ("completed", "done")


def test_a_lasting_failure_ends_in_storage_busy_error(store: PostgresTaskStore) -> None:
    _sql(store.dsn, """
        CREATE FUNCTION always_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = 'deadlock_detected'; END $$;
        CREATE TRIGGER always_conflict BEFORE UPDATE ON cbw_tasks
            FOR EACH ROW EXECUTE FUNCTION always_conflict();
    """)
    store.ensure_queue("q")
    store.enqueue("q", "t1", b"x", 0)
    store._patience_s = 0.2
    with pytest.raises(StorageBusyError):
        store.claim("q", owner="me", limit=1, now=0, lease_ms=1000)


def test_a_terminated_connection_is_replaced(store: PostgresTaskStore) -> None:
    """The pooled connection's server process is killed between two calls:
    the next call fails over to a new connection instead of failing."""
    store.ensure_queue("q")
    pooled = store._run(lambda conn: conn.info.backend_pid)
    assert _sql(store.dsn, "SELECT pg_terminate_backend(%s)", (pooled,)) == [(True,)]
    assert store.queues() == ["q"]
    assert store._run(lambda conn: conn.info.backend_pid) != pooled


# ---- wake-ups ---------------------------------------------------------------

class Wakes:
    """A waker that records what it was told."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: List[Optional[str]] = []

    def __call__(self, queue: Optional[str]) -> None:
        with self.cond:
            self.seen.append(queue)
            self.cond.notify_all()

    def wait_for(self, queue: Optional[str], timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: queue in self.seen, timeout)

    def clear(self) -> None:
        with self.cond:
            self.seen.clear()


def _wait_listening(store: PostgresTaskStore, other_than: Optional[int] = None) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid = store.listener_pid
        if pid is not None and pid != other_than:
            return pid
        time.sleep(0.01)
    raise AssertionError("the listener did not connect")


def test_enqueue_notifies_listeners_in_other_processes(store: PostgresTaskStore) -> None:
    wakes = Wakes()
    store.set_waker(wakes)
    _wait_listening(store)
    assert wakes.wait_for(None)  # woken once connected: it may have missed work
    other = PostgresTaskStore(store.dsn)
    try:
        other.ensure_queue("emails")
        other.enqueue("emails", "t1", b"x", 0)
    finally:
        other.close()
    assert wakes.wait_for("emails")


def test_listener_reconnects_after_pg_terminate_backend(store: PostgresTaskStore) -> None:
    wakes = Wakes()
    store.set_waker(wakes)
    first = _wait_listening(store)
    assert _sql(store.dsn, "SELECT pg_terminate_backend(%s)", (first,)) == [(True,)]
    second = _wait_listening(store, other_than=first)
    assert second != first
    wakes.clear()
    store.ensure_queue("q")
    store.enqueue("q", "t1", b"x", 0)
    assert wakes.wait_for("q")


def test_set_waker_none_stops_the_listener(store: PostgresTaskStore) -> None:
    wakes = Wakes()
    store.set_waker(wakes)
    _wait_listening(store)
    store.set_waker(None)
    assert store.listener_pid is None


def test_a_task_given_back_notifies_its_queue(store: PostgresTaskStore) -> None:
    """Released, retried or recovered, a task is pending again: the other
    services hear of it without waiting for their next poll."""
    store.ensure_queue("q")
    store.enqueue_many("q", [("a", b""), ("b", b""), ("c", b"")], 0)
    a, b, c = store.claim("q", owner="me", limit=3, now=0, lease_ms=100)
    wakes = Wakes()
    store.set_waker(wakes)
    _wait_listening(store)
    assert wakes.wait_for(None)
    for give_back in (lambda: store.release(a.id, a.token, 1),
                      lambda: store.retry(b.id, b.token, "E: x", 50),
                      lambda: store.recover("q", now=100, max_attempts=3)):
        wakes.clear()
        assert give_back()
        assert wakes.wait_for("q")
    assert store.get(c.id).status == "pending"  # type: ignore[union-attr]


def test_a_large_batch_is_cut_into_statements_all_or_nothing(
        store: PostgresTaskStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the chunk size a batch takes several statements, still in one
    transaction: a duplicate id in the last chunk adds nothing."""
    monkeypatch.setattr(postgres, "_CHUNK_BYTES", 10)
    store.ensure_queue("q")
    store.enqueue_many("q", [(f"t{i}", b"1234") for i in range(7)], 0)
    assert store.counts()["q"]["pending"] == 7
    assert [t.id for t in store.claim("q", owner="me", limit=7, now=0, lease_ms=1)] == \
        [f"t{i}" for i in range(7)]
    with pytest.raises(psycopg.errors.UniqueViolation):
        store.enqueue_many("q", [(f"new{i}", b"1234") for i in range(5)] + [("t0", b"")], 0)
    assert store.get("new0") is None


# ---- durable callbacks ------------------------------------------------------

def test_a_signal_that_wakes_a_suspended_task_notifies_its_queue(
        store: PostgresTaskStore) -> None:
    store.ensure_queue("q")
    store.enqueue("q", "t", b"", 0)
    task, = store.claim("q", owner="me", limit=1, now=0, lease_ms=100)
    store.durable_add_callback(CallbackRecord("cb", "t", "approval", 0))
    assert store.settle([Outcome("t", task.token, "suspend", "", 1, awaiting="cb")])
    wakes = Wakes()
    store.set_waker(wakes)
    _wait_listening(store)
    assert wakes.wait_for(None)
    wakes.clear()
    other = PostgresTaskStore(store.dsn)
    try:
        other.durable_signal("cb", "succeeded", b"ok", None, 2)
    finally:
        other.close()
    assert wakes.wait_for("q")
    assert store.get("t").status == "pending"  # type: ignore[union-attr]


def test_a_signal_racing_the_suspension_is_never_lost(store: PostgresTaskStore) -> None:
    """The suspension and the signal, from two threads at once, many
    times: whichever commits first, the task ends pending (due now), never
    suspended on a callback that was already signalled."""
    store.ensure_queue("q")
    for i in range(40):
        task_id, callback_id = f"t{i}", f"cb{i}"
        store.enqueue("q", task_id, b"", 0)
        task, = store.claim("q", owner="me", limit=1, now=0, lease_ms=10_000)
        store.durable_add_callback(CallbackRecord(callback_id, task_id, "approval", 0))
        start = threading.Barrier(2)

        def suspend() -> None:
            start.wait()
            assert store.settle([Outcome(task_id, task.token, "suspend", "", 5,
                                         awaiting=callback_id)])

        def signal() -> None:
            start.wait()
            store.durable_signal(callback_id, "succeeded", b"ok", None, 5)

        threads = [threading.Thread(target=suspend), threading.Thread(target=signal)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        record = store.get(task_id)
        assert record is not None and (record.status, record.next_run_at) == ("pending", 5), i
        assert record.next_run_at != NEVER


def test_a_version_2_schema_is_upgraded_in_place_and_keeps_its_tasks(pg_schema_dsn: str) -> None:
    """A deployment made by the release before tasks as functions (schema
    2, written by its own migrations): its tasks are found and run on."""
    _schema_at_version(pg_schema_dsn, 2)
    _sql(pg_schema_dsn, "INSERT INTO cbw_queues(name) VALUES ('q')")
    _sql(pg_schema_dsn, "INSERT INTO cbw_tasks(id, queue, payload, status, message, next_run_at, "
                        "created_at, finished_at) VALUES ('done', 'q', '\\x01', 'completed', "
                        "'ok', 0, 5, 9), ('todo', 'q', '\\x01', 'pending', '', 0, 5, NULL)")
    store = PostgresTaskStore(pg_schema_dsn)
    try:
        assert _sql(pg_schema_dsn, "SELECT version FROM cbw_schema_version") == \
            [(SCHEMA_VERSION,)]
        done = store.get("done")
        assert done is not None
        assert (done.status, done.message, done.name, done.result, done.created_at,
                done.finished_at) == ("completed", "ok", None, None, 5, 9)
        (task,) = store.claim("q", owner="me", limit=5, now=0, lease_ms=1000)
        assert (task.id, task.payload, task.name) == ("todo", b"\x01", None)
    finally:
        store.close()
    columns, indexes = _live_schema(pg_schema_dsn)
    assert columns == expected_columns("postgresql")
    assert indexes == source_indexes("postgresql")


def test_a_version_7_schema_with_durable_tasks_migrates_and_runs_on(pg_schema_dsn: str) -> None:
    """Version 8 marks the tasks that have durable state: a schema made
    before it, with pending, running and suspended tasks holding logs and
    callbacks, migrates, and each task's state still ends with it."""
    _schema_at_version(pg_schema_dsn, 7)
    seed_durable_tasks(lambda sql: _sql(pg_schema_dsn, sql), "cbw_", "'\\x01'::bytea")
    store = PostgresTaskStore(pg_schema_dsn)
    try:
        assert _sql(pg_schema_dsn, "SELECT version FROM cbw_schema_version") == \
            [(SCHEMA_VERSION,)]
        check_seeded_tasks_run_on(store)
    finally:
        store.close()
    columns, indexes = _live_schema(pg_schema_dsn)
    assert columns == expected_columns("postgresql")
    assert indexes == source_indexes("postgresql")


def test_the_claim_reads_the_claim_index_in_order(store: PostgresTaskStore) -> None:
    """The claim's plan on a queue of 20 000 due tasks: a scan of
    ``cbw_tasks_claim`` in its order under a limit, no sort of every due
    task, so it stops after ``limit`` rows however many are pending."""
    _sql(store.dsn, "INSERT INTO cbw_queues(name) VALUES ('q')")
    _sql(store.dsn, "INSERT INTO cbw_tasks(id, queue, payload, status, next_run_at, created_at, "
                    "priority) SELECT 't' || i, 'q', '', 'pending', i, 0, i % 3 "
                    "FROM generate_series(1, 20000) AS i")
    _sql(store.dsn, "ANALYZE cbw_tasks")
    plan = "\n".join(row[0] for row in _sql(store.dsn, "EXPLAIN " + store.dialect.sql("claim"), {
        "owner": "me", "expires": 1, "token": "t", "queue": "q", "now": 10**12, "limit": 5}))
    assert "Index Scan using cbw_tasks_claim" in plan, plan
    assert "Sort" not in plan, plan


@pytest.mark.parametrize("filters, status", [
    ((), ""), (("queue",), ""), (("name",), ""), (("status",), "failed"),
    (("queue", "status"), "failed"), (("queue", "status", "name"), "failed")])
def test_listing_reads_an_index_in_order(store: PostgresTaskStore, filters: "tuple[str, ...]",
                                         status: str) -> None:
    """``list_tasks``'s plan for every filter, over 20 000 tasks in ten
    queues, a tenth of them failed: a scan of an index (or of the key)
    newest first, no sort of every matching task, so a page stops after
    ``limit`` rows; failed tasks through their own index."""
    _sql(store.dsn, "INSERT INTO cbw_queues(name) SELECT 'q' || i FROM generate_series(0, 9) i")
    _sql(store.dsn, "INSERT INTO cbw_tasks(id, queue, payload, status, next_run_at, created_at, "
                    "name) SELECT 't' || i, 'q' || i % 10, '', "
                    "CASE WHEN i % 11 = 0 THEN 'failed' ELSE 'completed' END, i, 0, "
                    "'fn' || i % 7 FROM generate_series(1, 20000) AS i")
    _sql(store.dsn, "ANALYZE cbw_tasks")
    sql = "EXPLAIN " + listing(store.dialect, filters, status)
    plan = "\n".join(row[0] for row in _sql(store.dsn, sql, {
        "queue": "q1", "name": "fn1", "before": 2**62, "limit": 10}))
    assert "Index Scan Backward using cbw_tasks" in plan, plan
    assert "Sort" not in plan, plan
    if status == "failed":
        assert "cbw_tasks_failed" in plan, plan
