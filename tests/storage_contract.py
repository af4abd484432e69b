"""The ``TaskStore`` contract, as one test class every backend must pass.

A backend's test module subclasses ``StorageContract`` and provides a
``store`` fixture yielding a fresh, empty store; the tests here use only the
contract (``callbackworker.tasks.storage``), explicit times, and no sleeps.
"""

from __future__ import annotations

import threading
from typing import List

import pytest

from callbackworker.errors import UnknownQueueError
from callbackworker.tasks.storage import STATUSES, ClaimedTask, Outcome, TaskStore

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

    def test_enqueue_to_unknown_queue_raises_and_adds_nothing(self, store: TaskStore) -> None:
        with pytest.raises(UnknownQueueError):
            store.enqueue_many("nope", [("t1", b"x")], 0)
        assert store.get("t1") is None

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

    def test_settle_rejects_an_unknown_kind(self, store: TaskStore) -> None:
        with pytest.raises(ValueError):
            store.settle([Outcome("t", "tok", "explode", "", 0)])

    # ---- leases --------------------------------------------------------

    def test_renew_leases_extends_only_the_owners_running_tasks(self, store: TaskStore) -> None:
        store.ensure_queue("q")
        _enqueue(store, "q", 3)
        mine = store.claim("q", owner="me", limit=2, now=0, lease_ms=LEASE)
        (theirs,) = store.claim("q", owner="them", limit=1, now=0, lease_ms=LEASE)
        assert store.renew_leases("me", 99_999) == 2
        assert store.get(mine[0].id).lease_expires_at == 99_999  # type: ignore[union-attr]
        assert store.get(theirs.id).lease_expires_at == LEASE  # type: ignore[union-attr]

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
