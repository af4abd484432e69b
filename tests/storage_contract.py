"""The ``TaskStore`` contract, as one test class every backend must pass.

A backend's test module subclasses ``StorageContract`` and provides a
``store`` fixture yielding a fresh, empty store; the tests here use only the
contract (``callbackworker.tasks.storage``), explicit times, and no sleeps.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Tuple

import pytest

from callbackworker.durable import CallbackRecord
from callbackworker.errors import (
    CallbackAlreadyCompletedError,
    NonDeterminismError,
    TaskNotRetryableError,
    UnknownCallbackError,
    UnknownQueueError,
    UnknownTaskError,
)
from callbackworker.tasks.schema import INDEXES
from callbackworker.tasks.storage import NEVER, STATUSES, ClaimedTask, NewCall, Outcome, TaskStore

LEASE = 30_000


def _enqueue(store: TaskStore, queue: str, n: int, now: int = 0, prefix: str = "t") -> List[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    store.enqueue_many(queue, [(task_id, f"payload {task_id}".encode()) for task_id in ids], now)
    return ids


def _claimed_one(store: TaskStore, lease_ms: int = LEASE) -> ClaimedTask:
    """A queue "q" with one task, claimed by "me" at time 0."""
    store.ensure_queue("q")
    _enqueue(store, "q", 1)
    (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=lease_ms)
    return task


def _suspended_one(store: TaskStore, timeout_ms: int = 0, heartbeat_ms: int = 0,
                   callback_id: str = "cb") -> ClaimedTask:
    """Task "t0" of queue "q", claimed at 0, with callback ``callback_id``
    created at 0, suspended on it at 10."""
    task = _claimed_one(store)
    store.durable_add_callback(CallbackRecord(callback_id, task.id, "approval", 0, timeout_ms,
                                              heartbeat_ms, last_beat_ms=0))
    assert store.settle([Outcome(task.id, task.token, "suspend", "", 10,
                                 awaiting=callback_id)]) == [True]
    return task


def source_indexes(backend: str) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """``schema.INDEXES[backend]`` as ``{name: (table, key columns)}``, the
    form each backend's schema test reads its live indexes in."""
    parsed = {}
    for name, text in INDEXES[backend].items():
        table, _, rest = text.removeprefix("UNIQUE ").partition("(")
        parsed[name] = (table, tuple(c.split()[0] for c in rest.partition(")")[0].split(",")))
    return parsed


def seed_durable_tasks(execute: Callable[[str], object], prefix: str, blob: str) -> None:
    """Fills a schema at version 7 (before tasks were marked ``durable``)
    through ``execute``: queue "q" with a pending task that has a log, a
    running one (token "tok") with a log and a pending callback, a
    suspended one waiting for callback "cb-s", and a plain pending one.
    ``prefix`` goes before table names; ``blob`` is a payload literal."""
    execute(f"INSERT INTO {prefix}queues(name) VALUES ('q')")
    execute(f"""INSERT INTO {prefix}tasks(id, queue, payload, status, attempt, next_run_at,
                                         created_at, owner, lease_expires_at, token,
                                         started_at, awaiting)
                VALUES ('pend', 'q', {blob}, 'pending', 1, 0, 0, NULL, NULL, NULL, NULL, NULL),
                       ('run', 'q', {blob}, 'running', 1, 0, 0, 'old', {LEASE}, 'tok', 0, NULL),
                       ('susp', 'q', {blob}, 'suspended', 1, {NEVER}, 0, NULL, NULL, NULL,
                        NULL, 'cb-s'),
                       ('plain', 'q', {blob}, 'pending', 0, 0, 0, NULL, NULL, NULL, NULL,
                        NULL)""")
    execute(f"""INSERT INTO {prefix}durable_ops(task_id, seq, kind, name, value)
                VALUES ('pend', 0, 'step', 'a', {blob}), ('run', 0, 'step', 'a', {blob}),
                       ('susp', 0, 'callback', 'b', {blob})""")
    execute(f"""INSERT INTO {prefix}durable_callbacks(id, task_id, name, created_at,
                                                     last_beat_at, timeout_ms,
                                                     heartbeat_timeout_ms)
                VALUES ('cb-r', 'run', 'n', 0, 0, 0, 0), ('cb-s', 'susp', 'n', 0, 0, 0, 0)""")


def check_seeded_tasks_run_on(store: TaskStore) -> None:
    """After ``seed_durable_tasks`` and a migration: every task runs on, and
    each one's durable state ends when it finishes, as a new task's does."""
    assert store.complete("run", "tok", "", 1) is True
    assert store.durable_ops("run") == []
    assert store.durable_callback("cb-r").state == "closed"  # type: ignore[union-attr]
    store.durable_signal("cb-s", "succeeded", b"r", None, 2)
    assert store.get("susp").status == "pending"  # type: ignore[union-attr]
    _enqueue(store, "q", 1, now=2, prefix="new")
    claimed = store.claim("q", owner="me", limit=10, now=3, lease_ms=LEASE)
    assert sorted(t.id for t in claimed) == ["new0", "pend", "plain", "susp"]
    store.durable_record("new0", 0, "step", "a", b"v")
    assert all(store.settle([Outcome(t.id, t.token, "complete", "", 4) for t in claimed]))
    for task_id in ("pend", "susp", "new0"):
        assert store.durable_ops(task_id) == [], task_id
    done = store.durable_callback("cb-s")
    assert done is not None and (done.state, done.result) == ("succeeded", None)


class StorageContract:
    """Every documented behaviour of ``TaskStore``."""

    # ---- queues and enqueue --------------------------------------------

    def test_ensure_queue_is_idempotent(self, store: TaskStore) -> None:
        store.ensure_queue("b")
        store.ensure_queue("a")
        store.ensure_queue("b")
        assert store.queues() == ["a", "b"]

    def test_enqueue_adds_pending_tasks_with_attempt_zero(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        store.enqueue("q", "t1", b"x", 5)
        record = store.get("t1")
        assert record is not None
        assert (record.queue, record.status, record.message, record.attempt) == ("q", "pending", "", 0)
        assert record.next_run_at == 5

    @pytest.mark.parametrize("n", [1, 3])
    def test_enqueue_to_unknown_queue_raises_and_adds_nothing(self, store: TaskStore,
                                                              n: int) -> None:
        store.ensure_queue("other")
        with pytest.raises(UnknownQueueError):
            store.enqueue_many("nope", [(f"t{i}", b"x") for i in range(n)], 0)
        assert [store.get(f"t{i}") for i in range(n)] == [None] * n

    def test_enqueue_many_is_all_or_nothing(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        store.enqueue("q", "dup", b"x", 0)
        with pytest.raises(Exception):
            store.enqueue_many("q", [("fresh", b"y"), ("dup", b"z")], 0)
        assert store.get("fresh") is None

    def test_get_unknown_task_is_none(self, store: TaskStore) -> None:
        assert store.get("missing") is None

    # ---- claims --------------------------------------------------------

    def test_claim_takes_oldest_due_first_under_a_lease(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        ids = _enqueue(store, "q", 5)
        claimed = store.claim("q", owner="me", limit=3, now=10, lease_ms=LEASE)
        assert [t.id for t in claimed] == ids[:3]
        assert [t.payload for t in claimed] == [f"payload {i}".encode() for i in ids[:3]]
        assert all(t.attempt == 1 and t.token for t in claimed)
        record = store.get(ids[0])
        assert record is not None
        assert (record.status, record.owner, record.lease_expires_at) == ("running", "me", 10 + LEASE)

    def test_claim_skips_tasks_not_yet_due(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        store.enqueue("q", "later", b"", 100)
        assert store.claim("q", owner="me", limit=5, now=99, lease_ms=LEASE) == []
        assert [t.id for t in store.claim("q", owner="me", limit=5, now=100, lease_ms=LEASE)] == ["later"]

    def test_claim_only_from_its_queue(self, store: TaskStore) -> None:
        store.ensure_queue("a")
        store.ensure_queue("b")
        _enqueue(store, "a", 2, prefix="a")
        assert store.claim("b", owner="me", limit=5, now=0, lease_ms=LEASE) == []

    def test_claim_never_hands_a_task_out_twice(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 200)
        seen: List[str] = []
        lock = threading.Lock()

        def take() -> None:
            while True:
                got = store.claim("q", owner="me", limit=7, now=0, lease_ms=LEASE)
                if not got:
                    return
                with lock:
                    seen.extend(t.id for t in got)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(seen) == sorted(f"t{i}" for i in range(200))

    def test_claim_with_delay_starts_one_task_per_gap(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        assert len(store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE, delay_ms=100)) == 1
        assert store.claim("q", owner="me", limit=3, now=99, lease_ms=LEASE, delay_ms=100) == []
        assert store.next_due("q") == 100
        assert len(store.claim("q", owner="other", limit=3, now=100, lease_ms=LEASE, delay_ms=100)) == 1

    def test_claim_with_zero_limit_claims_nothing(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 1)
        assert store.claim("q", owner="me", limit=0, now=0, lease_ms=LEASE) == []

    # ---- settling ------------------------------------------------------

    def test_complete_with_current_token(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.complete(task.id, task.token, "done", 7) is True
        record = store.get(task.id)
        assert record is not None
        assert (record.status, record.message, record.attempt, record.finished_at) == ("completed", "done", 1, 7)
        assert record.owner is None and record.lease_expires_at is None

    @pytest.mark.parametrize("n", [3, 30])
    def test_a_group_commit_keeps_text_and_times_exactly(self, store: TaskStore, n: int) -> None:
        """Messages, results and times settled together (few, or many at
        once) come back as they were given, whatever characters the text
        holds."""
        store.ensure_queue("q")
        _enqueue(store, "q", n)
        claimed = store.claim("q", owner="me", limit=n, now=0, lease_ms=LEASE)
        texts = ['tab\t nl\n quote" back\\ é ☃ 😀 \u2028 \x7f \x01',
                 '{"a": [1, "x\\u0000y"], "b": null}', "[1, 2]"] * (n // 3)
        later = 2**62
        outcomes = [Outcome(t.id, t.token, "start", "", 1, lease_until=later) for t in claimed]
        outcomes += [Outcome(t.id, t.token, "complete", text, later + i, result=text)
                     for i, (t, text) in enumerate(zip(claimed, texts))]
        assert store.settle(outcomes) == [True] * 2 * n
        for i, (t, text) in enumerate(zip(claimed, texts)):
            record = store.get(t.id)
            assert record is not None
            assert (record.message, record.result, record.finished_at, record.attempt) == \
                (text, text, later + i, 1)

    def test_fail_is_terminal(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.fail(task.id, task.token, "ValueError: no", 3) is True
        record = store.get(task.id)
        assert record is not None and (record.status, record.message) == ("failed", "ValueError: no")
        assert store.claim("q", owner="me", limit=1, now=10**9, lease_ms=LEASE) == []

    def test_retry_returns_to_pending_with_attempt_counted(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.retry(task.id, task.token, "E: x", 1000) is True
        assert store.claim("q", owner="me", limit=1, now=999, lease_ms=LEASE) == []
        (again,) = store.claim("q", owner="me", limit=1, now=1000, lease_ms=LEASE)
        assert again.attempt == 2 and again.token != task.token

    def test_release_gives_the_attempt_back(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.release(task.id, task.token, 5) is True
        record = store.get(task.id)
        assert record is not None and (record.status, record.attempt) == ("pending", 0)

    def test_release_after_a_recorded_start_gives_the_attempt_back(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.start(task.id, task.token, 3) is True
        assert store.release(task.id, task.token, 5) is True
        record = store.get(task.id)
        assert record is not None and (record.status, record.attempt) == ("pending", 0)

    # ---- starts: the attempt is counted when the run begins --------------

    def test_a_claim_counts_no_attempt_until_its_run_starts(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert task.attempt == 1, "the claim tells the number its run will have"
        assert store.get(task.id).attempt == 0  # type: ignore[union-attr]
        assert store.start(task.id, task.token, 5) is True
        record = store.get(task.id)
        assert record is not None and (record.status, record.attempt) == ("running", 1)

    def test_a_start_counts_once_and_names_the_claims_token(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.start(task.id, "stale", 5) is False
        assert store.start(task.id, task.token, 5) is True
        assert store.start(task.id, task.token, 6) is True  # applied again, counted once
        assert store.complete(task.id, task.token, "ok", 7) is True
        record = store.get(task.id)
        assert record is not None and (record.status, record.attempt) == ("completed", 1)
        assert store.start(task.id, task.token, 8) is False

    def test_an_outcome_without_a_recorded_start_counts_the_attempt(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.retry(task.id, task.token, "E: x", 0) is True
        (again,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=LEASE)
        assert again.attempt == 2 and store.get(task.id).attempt == 1  # type: ignore[union-attr]

    def test_recover_frees_a_claim_whose_run_never_started(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 2)
        orphan, ran = store.claim("q", owner="dead", limit=2, now=0, lease_ms=LEASE)
        assert store.start(ran.id, ran.token, 1) is True
        assert store.recover("q", now=2, max_attempts=1, owners=["dead"]) == 2
        record = store.get(orphan.id)
        assert record is not None
        assert (record.status, record.attempt, record.message, record.owner) == (
            "pending", 0, "", None)
        lost = store.get(ran.id)
        assert lost is not None and (lost.status, lost.attempt) == ("failed", 1)
        (again,) = store.claim("q", owner="me", limit=1, now=2, lease_ms=LEASE)
        assert again.id == orphan.id and again.attempt == 1

    def test_a_claim_taken_back_unstarted_marks_the_task_confirm_start(
            self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 2)
        orphan, ran = store.claim("q", owner="dead", limit=2, now=0, lease_ms=LEASE)
        assert not orphan.confirm_start and not ran.confirm_start
        assert store.start(ran.id, ran.token, 1) is True
        assert store.recover("q", now=2, max_attempts=5, owners=["dead"]) == 2
        claimed = {t.id: t for t in store.claim("q", owner="me", limit=2, now=2, lease_ms=LEASE)}
        assert claimed[orphan.id].confirm_start, "its run may have begun uncounted"
        assert not claimed[ran.id].confirm_start, "its run was counted"
        again = claimed[orphan.id]
        assert store.retry(again.id, again.token, "E: x", 3) is True
        (third,) = store.claim("q", owner="me", limit=1, now=3, lease_ms=LEASE)
        assert third.id == orphan.id and third.confirm_start, "the mark is for good"

    def test_stale_token_is_rejected(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.recover("q", now=LEASE, max_attempts=5) == 1
        (again,) = store.claim("q", owner="other", limit=1, now=LEASE, lease_ms=LEASE)
        assert store.complete(task.id, task.token, "late", LEASE) is False
        assert store.fail(task.id, task.token, "late", LEASE) is False
        assert store.retry(task.id, task.token, "late", LEASE) is False
        assert store.release(task.id, task.token, LEASE) is False
        record = store.get(task.id)
        assert record is not None and (record.status, record.owner) == ("running", "other")
        assert store.complete(again.id, again.token, "ok", LEASE) is True

    def test_settle_twice_is_rejected(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.complete(task.id, task.token, "a", 1) is True
        assert store.complete(task.id, task.token, "b", 2) is False
        record = store.get(task.id)
        assert record is not None and record.message == "a"

    def test_settle_batch_reports_each_outcome(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        a, b, c = store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE)
        results = store.settle([
            Outcome(a.id, a.token, "complete", "ok", 1),
            Outcome(b.id, "stale", "complete", "no", 1),
            Outcome(c.id, c.token, "retry", "E: again", 50),
        ])
        assert results == [True, False, True]
        assert [store.get(t.id).status for t in (a, b, c)] == ["completed", "running", "pending"]  # type: ignore[union-attr]

    def test_a_large_batch_tells_which_outcomes_applied(self, store: TaskStore) -> None:
        """A group commit of many starts and completions, one of each stale
        and one completion given twice: each outcome's answer is its own."""
        store.ensure_queue("q")
        _enqueue(store, "q", 20)
        claimed = store.claim("q", owner="me", limit=20, now=0, lease_ms=LEASE)
        tokens = [t.token for t in claimed]
        tokens[3] = "stale"
        outcomes = [Outcome(t.id, token, "start", "", 1) for t, token in zip(claimed, tokens)]
        outcomes += [Outcome(t.id, token, "complete", "ok", 2)
                     for t, token in zip(claimed, tokens)]
        outcomes.append(Outcome(claimed[5].id, claimed[5].token, "complete", "again", 3))
        expected = [i != 3 for i in range(20)] * 2 + [False]
        assert store.settle(outcomes) == expected
        records = [store.get(t.id) for t in claimed]
        assert [(r.status, r.attempt) for r in records] == [  # type: ignore[union-attr]
            ("running", 0) if i == 3 else ("completed", 1) for i in range(20)]

    def test_a_batch_with_a_runs_start_and_its_end_counts_one_attempt(
            self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 2)
        a, b = store.claim("q", owner="me", limit=2, now=0, lease_ms=LEASE)
        assert store.settle([Outcome(a.id, a.token, "start", "", 1),
                             Outcome(b.id, b.token, "start", "", 1),
                             Outcome(a.id, a.token, "complete", "ok", 2),
                             Outcome(a.id, a.token, "complete", "again", 3)]) == [
            True, True, True, False]
        done, running = store.get(a.id), store.get(b.id)
        assert done is not None and (done.status, done.attempt, done.message) == (
            "completed", 1, "ok")
        assert running is not None and (running.status, running.attempt) == ("running", 1)

    def test_settle_rejects_an_unknown_kind(self, store: TaskStore) -> None:
        with pytest.raises(ValueError):
            store.settle([Outcome("t", "tok", "explode", "", 0)])

    # ---- leases --------------------------------------------------------

    def test_renew_leases_extends_only_the_owners_running_tasks(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        mine = store.claim("q", owner="me", limit=2, now=0, lease_ms=LEASE)
        (theirs,) = store.claim("q", owner="them", limit=1, now=0, lease_ms=LEASE)
        for task in (*mine, theirs):
            assert store.start(task.id, task.token, 0)
        assert store.renew_leases("me", 99_999) == 2
        assert store.get(mine[0].id).lease_expires_at == 99_999  # type: ignore[union-attr]
        assert store.get(theirs.id).lease_expires_at == LEASE  # type: ignore[union-attr]

    def test_renew_leases_of_named_tasks_leaves_the_others_to_expire(self,
                                                                     store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        kept, lost, other = store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE)
        assert store.renew_leases("me", 99_999, [kept.id, other.id, "no-such-task"]) == 2
        assert store.get(kept.id).lease_expires_at == 99_999  # type: ignore[union-attr]
        assert store.get(lost.id).lease_expires_at == LEASE  # type: ignore[union-attr]
        assert store.renew_leases("me", 99_999, []) == 0
        assert store.recover("q", now=LEASE, max_attempts=3) == 1
        assert store.get(lost.id).status == "pending"  # type: ignore[union-attr]

    def test_an_orphan_claim_left_unrenewed_comes_back_free(self, store: TaskStore) -> None:
        """A live owner renews the tasks it knows it holds: an orphan claim
        (its answer lost with the connection) expires and comes back free."""
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        held, waiting, orphan = store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE)
        _enqueue(store, "q", 1, prefix="u")
        (theirs,) = store.claim("q", owner="them", limit=1, now=0, lease_ms=LEASE)
        assert store.start(held.id, held.token, 0)
        assert store.renew_leases("me", 99_999, [held.id, waiting.id, theirs.id]) == 2
        leases = [store.get(t.id).lease_expires_at  # type: ignore[union-attr]
                  for t in (held, waiting, orphan, theirs)]
        assert leases == [99_999, 99_999, LEASE, LEASE]
        assert store.renew_leases("me", 99_999, []) == 0
        assert store.recover("q", now=LEASE, max_attempts=1) == 2
        assert store.get(orphan.id)[2:5] == ("pending", "", 0)  # type: ignore[index]
        assert store.start(waiting.id, waiting.token, 5, lease_until=5 + LEASE)
        assert store.get(waiting.id).lease_expires_at == 5 + LEASE  # type: ignore[union-attr]

    def test_running_owners(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        store.claim("q", owner="b", limit=1, now=0, lease_ms=LEASE)
        store.claim("q", owner="a", limit=2, now=0, lease_ms=LEASE)
        assert store.running_owners("q") == ["a", "b"]

    def test_recover_takes_back_only_expired_leases(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 2)
        (old,) = store.claim("q", owner="a", limit=1, now=0, lease_ms=100)
        (fresh,) = store.claim("q", owner="b", limit=1, now=0, lease_ms=1000)
        assert store.start(old.id, old.token, 0) and store.start(fresh.id, fresh.token, 0)
        assert store.recover("q", now=99, max_attempts=3) == 0
        assert store.recover("q", now=100, max_attempts=3) == 1
        record = store.get(old.id)
        assert record is not None
        assert (record.status, record.attempt, record.owner) == ("pending", 1, None)
        assert store.get(fresh.id).status == "running"  # type: ignore[union-attr]
        (again,) = store.claim("q", owner="b", limit=1, now=100, lease_ms=1000)
        assert again.id == old.id and again.attempt == 2

    def test_recover_takes_back_tasks_of_dead_owners_at_once(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 2)
        (dead,) = store.claim("q", owner="dead", limit=1, now=0, lease_ms=LEASE)
        store.claim("q", owner="alive", limit=1, now=0, lease_ms=LEASE)
        assert store.recover("q", now=1, max_attempts=3, owners=["dead"]) == 1
        assert store.get(dead.id).status == "pending"  # type: ignore[union-attr]
        assert store.running_owners("q") == ["alive"]

    def test_recover_fails_tasks_with_no_attempt_left(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 1)
        (task,) = store.claim("q", owner="a", limit=1, now=0, lease_ms=10)
        assert store.start(task.id, task.token, 0) is True
        assert store.recover("q", now=10, max_attempts=1) == 1
        record = store.get(task.id)
        assert record is not None
        assert (record.status, record.attempt, record.finished_at) == ("failed", 1, 10)
        assert "worker lost" in record.message

    # ---- management ----------------------------------------------------

    def test_cancel_pending(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 1)
        assert store.cancel("t0", 4) == "pending"
        record = store.get("t0")
        assert record is not None and (record.status, record.finished_at) == ("cancelled", 4)

    def test_cancel_reports_the_status_it_refused(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        running, done, failed = store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE)
        store.complete(done.id, done.token, "", 1)
        store.fail(failed.id, failed.token, "", 1)
        assert store.cancel(running.id, 2) == "running"
        assert store.cancel(done.id, 2) == "completed"
        assert store.cancel(failed.id, 2) == "failed"
        assert store.get(running.id).status == "running"  # type: ignore[union-attr]
        assert store.cancel("missing", 2) is None

    def test_cancel_twice_reports_cancelled(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 1)
        store.cancel("t0", 1)
        assert store.cancel("t0", 2) == "cancelled"

    def test_clear_cancels_pending_only(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        store.ensure_queue("other")
        _enqueue(store, "q", 4)
        _enqueue(store, "other", 1, prefix="o")
        (running,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=LEASE)
        assert store.clear("q", 9) == 3
        assert store.get(running.id).status == "running"  # type: ignore[union-attr]
        assert store.get("o0").status == "pending"  # type: ignore[union-attr]
        assert store.clear("q", 9) == 0

    def test_counts_per_queue_per_status(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        store.ensure_queue("empty")
        _enqueue(store, "q", 4)
        a, b = store.claim("q", owner="me", limit=2, now=0, lease_ms=LEASE)
        store.complete(a.id, a.token, "", 1)
        store.cancel("t3", 1)
        assert store.counts() == {
            "empty": dict.fromkeys(STATUSES, 0),
            "q": {"pending": 1, "running": 1, "suspended": 0, "completed": 1, "failed": 0,
                  "cancelled": 1},
        }

    def test_next_due(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        assert store.next_due("q") is None
        store.enqueue("q", "b", b"", 50)
        store.enqueue("q", "a", b"", 20)
        assert store.next_due("q") == 20

    def test_sweep_deletes_old_terminal_tasks_only(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 4)
        done, failed, running = store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE)
        store.complete(done.id, done.token, "", 100)
        store.fail(failed.id, failed.token, "", 200)
        store.cancel("t3", 100)
        assert store.sweep("q", finished_before=101) == 2
        assert store.get(done.id) is None and store.get("t3") is None
        assert store.get(failed.id) is not None
        assert store.get(running.id) is not None
        assert store.sweep("q", finished_before=10**12) == 1
        assert store.get(running.id) is not None

    def test_sweep_keeps_failed_tasks_until_their_own_retention(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 2)
        done, failed = store.claim("q", owner="me", limit=2, now=0, lease_ms=LEASE)
        store.complete(done.id, done.token, "", 100)
        store.fail(failed.id, failed.token, "", 100)
        assert store.sweep("q", finished_before=101, failed_before=50) == 1
        assert store.get(done.id) is None and store.get(failed.id) is not None
        assert store.sweep("q", finished_before=0, failed_before=101) == 1
        assert store.get(failed.id) is None

    # ---- listing, retrying and purging tasks -----------------------------

    def _finished(self, store: TaskStore) -> None:
        """Queue "a": a0 completed, a1 failed, a2 cancelled, a3 pending;
        queue "b": the call b0 ("fn") pending."""
        store.ensure_queue("a")
        _enqueue(store, "a", 4, prefix="a")
        store.enqueue_call("b", NewCall("b0", "fn", "[[], {}]", 0, 0), 0)
        done, failed = store.claim("a", owner="me", limit=2, now=0, lease_ms=LEASE)
        store.complete(done.id, done.token, "", 1)
        store.settle([Outcome(failed.id, failed.token, "fail", "E: no", 1, traceback="tb")])
        store.cancel("a2", 1)

    def test_list_tasks_is_newest_first(self, store: TaskStore) -> None:
        self._finished(store)
        assert [r.id for r in store.list_tasks()] == ["b0", "a3", "a2", "a1", "a0"]
        (record,) = store.list_tasks(status="failed")
        assert (record.id, record.queue, record.message, record.traceback) == \
            ("a1", "a", "E: no", "tb")

    def test_list_tasks_filters_by_queue_status_and_name(self, store: TaskStore) -> None:
        self._finished(store)
        assert [r.id for r in store.list_tasks(queue="a")] == ["a3", "a2", "a1", "a0"]
        assert [r.id for r in store.list_tasks(queue="a", status="pending")] == ["a3"]
        assert [r.id for r in store.list_tasks(status="pending")] == ["b0", "a3"]
        assert [r.id for r in store.list_tasks(name="fn")] == ["b0"]
        assert store.list_tasks(queue="a", name="fn") == []
        assert store.list_tasks(queue="nope") == []

    def test_list_tasks_pages_by_before_id(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 5)
        first = store.list_tasks(limit=2)
        second = store.list_tasks(limit=2, before_id=first[-1].id)
        third = store.list_tasks(limit=2, before_id=second[-1].id)
        assert [[r.id for r in page] for page in (first, second, third)] == \
            [["t4", "t3"], ["t2", "t1"], ["t0"]]
        assert store.list_tasks(before_id="t0") == []

    def test_list_tasks_before_an_unknown_id_raises(self, store: TaskStore) -> None:
        with pytest.raises(UnknownTaskError):
            store.list_tasks(before_id="missing")

    def test_retry_task_makes_a_failed_or_cancelled_task_pending_due_now(
            self, store: TaskStore) -> None:
        self._finished(store)
        assert store.retry_task("a1", 50) == "failed"
        assert store.retry_task("a2", 50) == "cancelled"
        for task_id in ("a1", "a2"):
            record = store.get(task_id)
            assert record is not None
            assert (record.status, record.attempt, record.next_run_at, record.finished_at) == \
                ("pending", 0, 50, None)
        assert store.get("a1").traceback == "tb"  # type: ignore[union-attr]
        claimed = store.claim("a", owner="me", limit=5, now=50, lease_ms=LEASE)
        assert sorted(t.id for t in claimed) == ["a1", "a2", "a3"]
        assert all(t.attempt == 1 for t in claimed)

    def test_retry_task_changes_nothing_in_other_statuses(self, store: TaskStore) -> None:
        self._finished(store)
        assert store.retry_task("a0", 50) == "completed"
        assert store.retry_task("a3", 50) == "pending"
        assert store.get("a0").status == "completed"  # type: ignore[union-attr]
        assert store.retry_task("missing", 50) is None

    def test_retry_task_refuses_while_an_unfinished_task_holds_its_dedup_key(
            self, store: TaskStore) -> None:
        store.enqueue_call("q", NewCall("old", "fn", "[[], {}]", 0, 0, "k"), 0)
        (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=LEASE)
        store.fail(task.id, task.token, "E", 1)
        store.enqueue_call("q", NewCall("new", "fn", "[[], {}]", 0, 0, "k"), 2)
        with pytest.raises(TaskNotRetryableError, match="task 'new' of its queue holds"):
            store.retry_task("old", 3)
        assert store.get("old").status == "failed"  # type: ignore[union-attr]

    def test_purge_deletes_up_to_limit_of_one_status_oldest_first(
            self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 5)
        for task_id in ("t0", "t1", "t2", "t4"):
            store.cancel(task_id, 1)
        assert store.purge("q", "cancelled", 2) == 2
        assert store.get("t0") is None and store.get("t1") is None
        assert store.purge("q", "cancelled", 10) == 2
        assert [r.id for r in store.list_tasks()] == ["t3"]
        assert store.purge("q", "cancelled", 10) == 0

    def test_purge_refuses_an_unfinished_status(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 1)
        with pytest.raises(ValueError, match="only finished tasks are purged"):
            store.purge("q", "pending", 10)
        assert store.get("t0") is not None

    def test_purge_deletes_the_tasks_durable_state(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        store.durable_record(task.id, 0, "step", "a", b"v")
        store.durable_add_callback(CallbackRecord("cb", task.id, "approval", 0))
        store.fail(task.id, task.token, "E", 1)
        assert store.purge("q", "failed", 10) == 1
        assert store.durable_callback("cb") is None and store.durable_ops(task.id) == []

    # ---- durable operation logs and callbacks ---------------------------

    def test_operation_log_keeps_order_and_bytes(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        store.durable_record(task.id, 0, "step", "a", b"\x00one")
        store.durable_record(task.id, 1, "callback", "b", b"two")
        assert store.durable_ops(task.id) == [("step", "a", b"\x00one"), ("callback", "b", b"two")]
        assert store.durable_ops("other") == []

    def test_recording_a_taken_sequence_number_is_a_non_determinism_error(
            self, store: TaskStore) -> None:
        task = _claimed_one(store)
        store.durable_record(task.id, 0, "step", "a", b"1")
        with pytest.raises(NonDeterminismError):
            store.durable_record(task.id, 0, "step", "b", b"2")
        assert store.durable_ops(task.id) == [("step", "a", b"1")]

    def test_durable_rows_of_a_missing_task_are_refused(self, store: TaskStore) -> None:
        """The log and callbacks belong to a task: none is kept for an id
        that was never enqueued or was swept."""
        with pytest.raises(UnknownTaskError):
            store.durable_record("missing", 0, "step", "a", b"")
        with pytest.raises(UnknownTaskError):
            store.durable_add_callback(CallbackRecord("cb", "missing", "approval", 0))
        store.ensure_queue("q")
        _enqueue(store, "q", 1)
        store.sweep("q", 1)  # nothing terminal: t0 stays
        store.durable_record("t0", 0, "step", "a", b"")
        assert store.durable_ops("t0") == [("step", "a", b"")]
        assert store.durable_callback("cb") is None

    def test_callback_round_trip(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        store.durable_add_callback(CallbackRecord("cb", task.id, "approval", 5, 100, 20,
                                                  last_beat_ms=5))
        record = store.durable_callback("cb")
        assert record == CallbackRecord("cb", task.id, "approval", 5, 100, 20, last_beat_ms=5)
        assert store.durable_callback("missing") is None

    def test_suspend_keeps_the_attempt_and_waits_for_the_expiry(self, store: TaskStore) -> None:
        _suspended_one(store, timeout_ms=1000)
        record = store.get("t0")
        assert record is not None
        assert (record.status, record.attempt, record.owner, record.next_run_at) == (
            "suspended", 1, None, 1000)
        assert store.next_due("q") == 1000
        assert store.claim("q", owner="me", limit=1, now=999, lease_ms=LEASE) == []
        (replay,) = store.claim("q", owner="me", limit=1, now=1000, lease_ms=LEASE)
        assert replay.attempt == 1, "a replay is the same attempt"

    def test_suspend_without_limits_is_never_due(self, store: TaskStore) -> None:
        _suspended_one(store)
        assert store.get("t0").next_run_at == NEVER  # type: ignore[union-attr]
        assert store.next_due("q") is None
        assert store.claim("q", owner="me", limit=1, now=NEVER - 1, lease_ms=LEASE) == []

    def test_success_signal_wakes_the_suspended_task_now(self, store: TaskStore) -> None:
        _suspended_one(store)
        record = store.durable_signal("cb", "succeeded", b"yes", None, 50)
        assert (record.state, record.result, record.owner) == ("succeeded", b"yes", "t0")
        task = store.get("t0")
        assert task is not None and (task.status, task.next_run_at) == ("pending", 50)
        (replay,) = store.claim("q", owner="me", limit=1, now=50, lease_ms=LEASE)
        assert replay.attempt == 1
        stored = store.durable_callback("cb")
        assert stored is not None and (stored.state, stored.result) == ("succeeded", b"yes")

    def test_failure_signal_stores_the_error(self, store: TaskStore) -> None:
        _suspended_one(store)
        store.durable_signal("cb", "failed", None, "declined", 50)
        stored = store.durable_callback("cb")
        assert stored is not None and (stored.state, stored.error) == ("failed", "declined")
        assert store.get("t0").status == "pending"  # type: ignore[union-attr]

    def test_a_signal_is_applied_once(self, store: TaskStore) -> None:
        _suspended_one(store)
        store.durable_signal("cb", "succeeded", b"first", None, 50)
        for state, result, error in (("succeeded", b"again", None), ("failed", None, "no"),
                                     ("pending", None, None)):
            with pytest.raises(CallbackAlreadyCompletedError) as info:
                store.durable_signal("cb", state, result, error, 60)
            assert info.value.state == "succeeded"
        assert store.durable_callback("cb").result == b"first"  # type: ignore[union-attr]

    def test_signal_for_an_unknown_callback(self, store: TaskStore) -> None:
        with pytest.raises(UnknownCallbackError):
            store.durable_signal("missing", "succeeded", b"", None, 0)

    def test_signal_past_the_timeout_is_refused_as_timed_out(self, store: TaskStore) -> None:
        _suspended_one(store, timeout_ms=100)
        with pytest.raises(CallbackAlreadyCompletedError) as info:
            store.durable_signal("cb", "succeeded", b"late", None, 100)
        assert info.value.state == "timed_out"
        assert store.durable_callback("cb").state == "pending"  # type: ignore[union-attr]

    def test_heartbeat_moves_the_suspended_tasks_due_time(self, store: TaskStore) -> None:
        _suspended_one(store, timeout_ms=10_000, heartbeat_ms=100)
        assert store.get("t0").next_run_at == 100  # type: ignore[union-attr]
        record = store.durable_signal("cb", "pending", None, None, 90)
        assert record.last_beat_ms == 90
        task = store.get("t0")
        assert task is not None and (task.status, task.next_run_at) == ("suspended", 190)
        with pytest.raises(CallbackAlreadyCompletedError) as info:
            store.durable_signal("cb", "pending", None, None, 190)
        assert info.value.state == "timed_out"

    def test_a_signal_before_the_suspension_is_settled_is_not_lost(
            self, store: TaskStore) -> None:
        task = _claimed_one(store)
        store.durable_add_callback(CallbackRecord("cb", task.id, "approval", 0, 0, 0))
        store.durable_signal("cb", "succeeded", b"early", None, 5)
        assert store.get(task.id).status == "running"  # type: ignore[union-attr]
        store.settle([Outcome(task.id, task.token, "suspend", "", 10, awaiting="cb")])
        record = store.get(task.id)
        assert record is not None and (record.status, record.next_run_at) == ("pending", 10)
        (replay,) = store.claim("q", owner="me", limit=1, now=10, lease_ms=LEASE)
        assert replay.attempt == 1

    def test_a_signal_for_another_callback_leaves_the_task_suspended(
            self, store: TaskStore) -> None:
        task = _suspended_one(store)
        store.durable_add_callback(CallbackRecord("other", task.id, "second", 0, 0, 0))
        store.durable_signal("other", "succeeded", b"", None, 20)
        assert store.get(task.id).status == "suspended"  # type: ignore[union-attr]

    def test_concurrent_signals_apply_exactly_one(self, store: TaskStore) -> None:
        _suspended_one(store)
        wins: List[bytes] = []
        losses: List[str] = []
        lock = threading.Lock()

        def send(n: int) -> None:
            try:
                store.durable_signal("cb", "succeeded", b"%d" % n, None, 20)
            except CallbackAlreadyCompletedError as exc:
                with lock:
                    losses.append(exc.state)
            else:
                with lock:
                    wins.append(b"%d" % n)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and losses == ["succeeded"] * 7
        assert store.durable_callback("cb").result == wins[0]  # type: ignore[union-attr]

    def test_a_terminal_status_drops_the_log_and_closes_callbacks(
            self, store: TaskStore) -> None:
        task = _claimed_one(store)
        store.durable_record(task.id, 0, "step", "a", b"1")
        store.durable_add_callback(CallbackRecord("open", task.id, "a", 0, 0, 0))
        store.durable_add_callback(CallbackRecord("done", task.id, "b", 0, 0, 0))
        store.durable_signal("done", "succeeded", b"big result", None, 1)
        store.complete(task.id, task.token, "", 2)
        assert store.durable_ops(task.id) == []
        assert store.durable_callback("open").state == "closed"  # type: ignore[union-attr]
        done = store.durable_callback("done")
        assert done is not None and (done.state, done.result) == ("succeeded", None)
        with pytest.raises(CallbackAlreadyCompletedError) as info:
            store.durable_signal("open", "succeeded", b"", None, 3)
        assert info.value.state == "closed"

    @pytest.mark.parametrize("finish", ["complete", "fail", "recover", "cancel", "clear"])
    def test_every_way_to_finish_a_task_ends_its_durable_state_only(
            self, store: TaskStore, finish: str) -> None:
        """However a task reaches a terminal status, its log goes and its
        pending callbacks close in that transaction; another task's durable
        state stays, as does a task that never had any."""
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        claimed = store.claim("q", owner="me", limit=3, now=0, lease_ms=LEASE)
        task, other, plain = sorted(claimed, key=lambda t: t.id)
        for t in (task, other):
            store.durable_record(t.id, 0, "step", "a", b"1")
            store.durable_add_callback(CallbackRecord(f"cb-{t.id}", t.id, "approval", 0))
        assert store.start(task.id, task.token, 1) is True
        if finish == "complete":
            assert store.complete(task.id, task.token, "", 2) is True
        elif finish == "fail":
            assert store.fail(task.id, task.token, "E", 2) is True
        elif finish == "recover":  # the other two never started: pending again
            assert store.recover("q", now=2, max_attempts=1, owners=["me"]) == 3
        else:
            assert store.release(task.id, task.token, 2) is True
            if finish == "cancel":
                assert store.cancel(task.id, 3) == "pending"
            else:
                assert store.clear("q", 3) == 1
        assert store.complete(plain.id, plain.token, "", 4) is (finish != "recover")
        assert store.get(task.id).status != "running"  # type: ignore[union-attr]
        finished = store.get(task.id)
        assert finished is not None and finished.finished_at is not None
        counts = store.counts()["q"]
        assert sum(counts.values()) == 3 and counts[finished.status] >= 1, counts
        ended = store.durable_callback(f"cb-{task.id}")
        kept = store.durable_callback(f"cb-{other.id}")
        assert store.durable_ops(task.id) == [] and ended is not None and ended.state == "closed"
        assert store.durable_ops(other.id) == [("step", "a", b"1")]
        assert kept is not None and kept.state == "pending"

    def test_cancel_a_suspended_task_closes_its_callbacks(self, store: TaskStore) -> None:
        _suspended_one(store)
        assert store.cancel("t0", 20) == "suspended"
        assert store.get("t0").status == "cancelled"  # type: ignore[union-attr]
        assert store.durable_callback("cb").state == "closed"  # type: ignore[union-attr]

    def test_clear_cancels_suspended_tasks(self, store: TaskStore) -> None:
        _suspended_one(store)
        assert store.clear("q", 20) == 1
        assert store.get("t0").status == "cancelled"  # type: ignore[union-attr]

    def test_sweep_deletes_the_tasks_callbacks(self, store: TaskStore) -> None:
        _suspended_one(store)
        store.cancel("t0", 20)
        assert store.sweep("q", finished_before=21) == 1
        assert store.durable_callback("cb") is None
        with pytest.raises(UnknownCallbackError):
            store.durable_signal("cb", "succeeded", b"", None, 30)

    def test_recover_after_a_lost_replay_counts_an_attempt(self, store: TaskStore) -> None:
        _suspended_one(store, timeout_ms=100)
        (replay,) = store.claim("q", owner="me", limit=1, now=100, lease_ms=10)
        assert replay.attempt == 1
        assert store.start(replay.id, replay.token, 100) is True
        assert store.get(replay.id).attempt == 1  # type: ignore[union-attr]
        assert store.recover("q", now=110, max_attempts=3) == 1
        (again,) = store.claim("q", owner="me", limit=1, now=110, lease_ms=10)
        assert again.attempt == 2

    def test_recover_of_a_replay_that_never_started_keeps_it_a_replay(
            self, store: TaskStore) -> None:
        _suspended_one(store, timeout_ms=100)
        store.claim("q", owner="me", limit=1, now=100, lease_ms=10)
        assert store.recover("q", now=110, max_attempts=1) == 1
        (again,) = store.claim("q", owner="me", limit=1, now=110, lease_ms=10)
        assert again.attempt == 1
        assert store.start(again.id, again.token, 110) is True
        assert store.get(again.id).attempt == 1  # type: ignore[union-attr]

    def test_releasing_a_replay_claim_keeps_the_attempt(self, store: TaskStore) -> None:
        _suspended_one(store, timeout_ms=100)
        (replay,) = store.claim("q", owner="me", limit=1, now=100, lease_ms=LEASE)
        assert store.release(replay.id, replay.token, 100) is True
        assert store.get(replay.id).attempt == 1  # type: ignore[union-attr]

    # ---- function calls (tasks as functions) ----------------------------

    def test_declare_queue_creates_the_queue_and_stores_its_config(
            self, store: TaskStore) -> None:
        assert store.queue_config("q") is None
        store.declare_queue("q", '{"concurrency":2}')
        assert store.queues() == ["q"]
        assert store.queue_config("q") == '{"concurrency":2}'

    def test_declare_queue_again_replaces_the_config(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        assert store.queue_config("q") is None
        store.declare_queue("q", "{}")
        store.declare_queue("q", '{"max_retries":1}')
        assert store.queue_config("q") == '{"max_retries":1}'

    def _call(self, store: TaskStore, task_id: str, *, queue: str = "q", priority: int = 0,
              run_at: int = 0, dedup_key: "str | None" = None, now: int = 0) -> str:
        return store.enqueue_call(queue, NewCall(task_id, "mod.fn", f'[["{task_id}"],{{}}]',
                                                 priority, run_at, dedup_key), now)

    def test_enqueue_call_creates_the_queue_and_stores_name_and_args(
            self, store: TaskStore) -> None:
        assert self._call(store, "c1", now=7) == "c1"
        assert store.queues() == ["q"]
        record = store.get("c1")
        assert record is not None
        assert (record.status, record.name, record.created_at, record.result) == (
            "pending", "mod.fn", 7, None)
        (task,) = store.claim("q", owner="me", limit=1, now=7, lease_ms=LEASE)
        assert (task.id, task.name, task.args, task.payload) == ("c1", "mod.fn", '[["c1"],{}]', b"")

    def test_raw_tasks_have_no_name(self, store: TaskStore) -> None:
        (task,) = [_claimed_one(store)]
        assert task.name is None and task.args is None
        assert store.get(task.id).name is None  # type: ignore[union-attr]

    def test_claim_takes_higher_priority_first_then_fifo(self, store: TaskStore) -> None:
        for task_id, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5),
                                  ("mid", 1)]:
            self._call(store, task_id, priority=priority)
        claimed = store.claim("q", owner="me", limit=5, now=0, lease_ms=LEASE)
        assert [t.id for t in claimed] == ["high1", "high2", "mid", "low1", "low2"]

    def test_claim_leaves_calls_before_their_run_at(self, store: TaskStore) -> None:
        self._call(store, "later", priority=9, run_at=100)
        self._call(store, "now")
        assert [t.id for t in store.claim("q", owner="me", limit=5, now=99,
                                          lease_ms=LEASE)] == ["now"]
        assert store.next_due("q") == 100
        assert [t.id for t in store.claim("q", owner="me", limit=5, now=100,
                                          lease_ms=LEASE)] == ["later"]

    def test_dedup_key_returns_the_unfinished_task_holding_it(self, store: TaskStore) -> None:
        assert self._call(store, "first", dedup_key="k") == "first"
        assert self._call(store, "second", dedup_key="k") == "first"  # pending
        (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=LEASE)
        assert self._call(store, "third", dedup_key="k") == "first"  # running
        assert store.get("second") is None and store.get("third") is None
        assert store.complete(task.id, task.token, "", 1)
        assert self._call(store, "fourth", dedup_key="k") == "fourth"  # first is finished

    def test_dedup_key_holds_while_suspended(self, store: TaskStore) -> None:
        self._call(store, "t0", dedup_key="k")
        (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=LEASE)
        store.durable_add_callback(CallbackRecord("cb", task.id, "approval", 0))
        assert store.settle([Outcome(task.id, task.token, "suspend", "", 1, awaiting="cb")])
        assert self._call(store, "t1", dedup_key="k") == "t0"

    def test_dedup_keys_are_per_queue(self, store: TaskStore) -> None:
        assert self._call(store, "a", queue="q1", dedup_key="k") == "a"
        assert self._call(store, "b", queue="q2", dedup_key="k") == "b"

    def test_concurrent_enqueues_with_one_dedup_key_store_one_task(
            self, store: TaskStore) -> None:
        ids: List[str] = []
        lock = threading.Lock()

        def enqueue(i: int) -> None:
            got = self._call(store, f"t{i}", dedup_key="k")
            with lock:
                ids.append(got)

        threads = [threading.Thread(target=enqueue, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 1 and len(ids) == 8
        assert store.counts()["q"]["pending"] == 1

    def test_complete_stores_the_result(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.settle([Outcome(task.id, task.token, "complete", "", 1, result="[1,2]")])
        assert store.get(task.id).result == "[1,2]"  # type: ignore[union-attr]

    def test_fail_and_retry_store_the_attempts_traceback(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.settle([Outcome(task.id, task.token, "retry", "E: 1", 0, traceback="tb1")])
        assert store.get(task.id).traceback == "tb1"  # type: ignore[union-attr]
        (task,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=LEASE)
        assert store.settle([Outcome(task.id, task.token, "fail", "E: 2", 1, traceback="tb2")])
        record = store.get(task.id)
        assert record is not None and (record.status, record.traceback) == ("failed", "tb2")

    def test_set_progress_needs_the_running_token(self, store: TaskStore) -> None:
        task = _claimed_one(store)
        assert store.set_progress(task.id, task.token, '{"done":1}') is True
        assert store.get(task.id).progress == '{"done":1}'  # type: ignore[union-attr]
        assert store.set_progress(task.id, "stale", '{"done":2}') is False
        assert store.complete(task.id, task.token, "", 1)
        assert store.set_progress(task.id, task.token, '{"done":3}') is False
        assert store.get(task.id).progress == '{"done":1}'  # type: ignore[union-attr]

    def test_a_claim_that_never_ran_keeps_the_last_traceback_when_taken_back(
            self, store: TaskStore) -> None:
        task = _claimed_one(store, lease_ms=10)
        assert store.settle([Outcome(task.id, task.token, "retry", "E: 1", 0, traceback="tb")])
        store.claim("q", owner="me", limit=1, now=0, lease_ms=10)
        assert store.recover("q", now=10, max_attempts=2) == 1
        record = store.get(task.id)
        assert record is not None
        assert (record.status, record.message, record.traceback) == ("pending", "E: 1", "tb")

    def test_a_lost_attempt_leaves_no_traceback(self, store: TaskStore) -> None:
        task = _claimed_one(store, lease_ms=10)
        assert store.settle([Outcome(task.id, task.token, "retry", "E: 1", 0, traceback="tb")])
        (again,) = store.claim("q", owner="me", limit=1, now=0, lease_ms=10)
        assert store.start(again.id, again.token, 0)  # the lost run had started
        assert store.recover("q", now=10, max_attempts=2) == 1
        record = store.get(task.id)
        assert record is not None and (record.status, record.traceback) == ("failed", None)

    # ---- periodic schedules ----------------------------------------------

    @staticmethod
    def _tick_call(task_id: str) -> NewCall:
        return NewCall(task_id, "mod.tick", "[[],{}]", 0, 0)

    def _registered(self, store: TaskStore, spec: str = "every 1000 ms") -> None:
        """Schedule "s" on queue "q", baseline tick 1000, next run 2000."""
        store.register_schedule("s", spec, queue="q", task="mod.tick", baseline=1000,
                                next_run_at=2000, now=1500)

    def test_register_schedule_files_a_new_schedule_from_its_baseline(
            self, store: TaskStore) -> None:
        self._registered(store)
        assert store.schedules() == [("s", "every 1000 ms", "q", "mod.tick", 1000, 2000, 1500)]

    def test_claim_tick_enqueues_the_call_and_moves_the_last_tick(
            self, store: TaskStore) -> None:
        self._registered(store)
        assert store.claim_tick("s", "every 1000 ms", 2000, 3000, "q", self._tick_call("t1"),
                                2001) is True
        record = store.get("t1")
        assert record is not None
        assert (record.queue, record.status, record.name) == ("q", "pending", "mod.tick")
        assert store.queues() == ["q"]
        (schedule,) = store.schedules()
        assert (schedule.last_tick, schedule.next_run_at) == (2000, 3000)

    def test_a_tick_is_claimed_once(self, store: TaskStore) -> None:
        self._registered(store)
        assert store.claim_tick("s", "every 1000 ms", 2000, 3000, "q", self._tick_call("t1"), 0)
        assert not store.claim_tick("s", "every 1000 ms", 2000, 3000, "q",
                                    self._tick_call("t2"), 0)
        assert store.get("t2") is None

    def test_an_older_tick_is_refused_after_a_newer_one(self, store: TaskStore) -> None:
        self._registered(store)
        assert store.claim_tick("s", "every 1000 ms", 5000, 6000, "q", self._tick_call("t5"), 0)
        assert not store.claim_tick("s", "every 1000 ms", 4000, 5000, "q",
                                    self._tick_call("t4"), 0)
        assert store.get("t4") is None
        assert store.schedules()[0].last_tick == 5000

    def test_a_claim_under_another_spec_is_refused(self, store: TaskStore) -> None:
        self._registered(store, spec="cron 0 * * * *")
        assert not store.claim_tick("s", "every 1000 ms", 2000, 3000, "q",
                                    self._tick_call("t1"), 0)
        assert store.get("t1") is None

    def test_a_claim_of_an_unknown_schedule_is_refused(self, store: TaskStore) -> None:
        assert not store.claim_tick("nope", "every 1000 ms", 2000, 3000, "q",
                                    self._tick_call("t1"), 0)
        assert store.get("t1") is None

    def test_a_failed_enqueue_leaves_the_tick_unclaimed(self, store: TaskStore) -> None:
        self._registered(store)
        store.enqueue_call("q", self._tick_call("taken"), 0)
        with pytest.raises(Exception):
            store.claim_tick("s", "every 1000 ms", 2000, 3000, "q", self._tick_call("taken"), 0)
        assert store.schedules()[0].last_tick == 1000
        assert store.claim_tick("s", "every 1000 ms", 2000, 3000, "q", self._tick_call("t1"), 0)

    def test_reregistering_the_same_spec_keeps_the_last_tick(self, store: TaskStore) -> None:
        self._registered(store)
        assert store.claim_tick("s", "every 1000 ms", 2000, 3000, "q", self._tick_call("t1"), 0)
        store.register_schedule("s", "every 1000 ms", queue="q2", task="mod.other",
                                baseline=9000, next_run_at=10_000, now=9500)
        assert store.schedules() == [("s", "every 1000 ms", "q2", "mod.other", 2000, 3000, 9500)]

    def test_registering_a_changed_spec_starts_from_the_new_baseline(
            self, store: TaskStore) -> None:
        self._registered(store)
        assert store.claim_tick("s", "every 1000 ms", 2000, 3000, "q", self._tick_call("t1"), 0)
        store.register_schedule("s", "every 5000 ms", queue="q", task="mod.tick",
                                baseline=5000, next_run_at=10_000, now=9500)
        assert store.schedules() == [("s", "every 5000 ms", "q", "mod.tick", 5000, 10_000, 9500)]

    def test_remove_schedule_deletes_it(self, store: TaskStore) -> None:
        self._registered(store)
        assert store.remove_schedule("s") is True
        assert store.remove_schedule("s") is False
        assert store.schedules() == []

    def test_concurrent_claims_of_one_tick_enqueue_one_call(self, store: TaskStore) -> None:
        self._registered(store)
        won: List[str] = []
        lock = threading.Lock()

        def claim(i: int) -> None:
            if store.claim_tick("s", "every 1000 ms", 2000, 3000, "q",
                                self._tick_call(f"t{i}"), 0):
                with lock:
                    won.append(f"t{i}")

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert store.counts()["q"]["pending"] == 1
