"""``GroupCommitter``: how starts and outcomes share transactions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Sequence

from callbackworker.tasks.client import open_store
from callbackworker.tasks.committer import GroupCommitter
from callbackworker.tasks.storage import Outcome, TaskStore


class Recording:
    """Wraps a store: records every batch settled (as kinds and task ids);
    the first one blocks until ``go`` is set, and says so in ``busy``."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.batches: List[List[str]] = []
        self.busy, self.go = threading.Event(), threading.Event()

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        self.batches.append([f"{o.kind} {o.task_id}" for o in outcomes])
        if len(self.batches) == 1:
            self.busy.set()
            self.go.wait(30)
        return self._store.settle(outcomes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_run_that_ends_before_its_start_is_committed_settles_once(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "t.db"), "normal")
    store.ensure_queue("q")
    store.enqueue_many("q", [("a", b""), ("b", b""), ("c", b"")], now=0)
    a, b, c = store.claim("q", owner="me", limit=3, now=0, lease_ms=60_000)
    recording = Recording(store)
    committer = GroupCommitter(recording, lambda: None, lambda: 2)  # type: ignore[arg-type]
    committer.put(Outcome(a.id, a.token, "complete", "", 1))
    assert recording.busy.wait(30)  # the first batch is being committed
    committer.put(Outcome(b.id, b.token, "start", "", 1))
    committer.put(Outcome(c.id, c.token, "start", "", 1))
    committer.put(Outcome(b.id, b.token, "complete", "", 2))
    recording.go.set()
    committer.flush()
    committer.close()
    assert recording.batches == [["complete a"], ["start c", "complete b"]]
    assert [(store.get(t.id).status, store.get(t.id).attempt)  # type: ignore[union-attr]
            for t in (a, b, c)] == [
        ("completed", 1), ("completed", 1), ("running", 1)]
    store.close()


def test_the_end_of_an_earlier_claim_does_not_drop_a_new_runs_start(tmp_path: Path) -> None:
    """A task whose lease lapsed is claimed again by the same runtime: the
    stale end of its first run and the start of its new run meet in one
    batch.  The start is a different run's (another token): it is written."""
    store = open_store(str(tmp_path / "t.db"), "normal")
    store.ensure_queue("q")
    store.enqueue_many("q", [("a", b""), ("x", b"")], now=0)
    a, x = store.claim("q", owner="me", limit=2, now=0, lease_ms=100)
    assert store.recover("q", now=1000, max_attempts=3) == 2
    a2, x2 = store.claim("q", owner="me", limit=2, now=1000, lease_ms=60_000)
    recording = Recording(store)
    committer = GroupCommitter(recording, lambda: None, lambda: 2000)  # type: ignore[arg-type]
    committer.put(Outcome(x2.id, x2.token, "complete", "", 1000))
    assert recording.busy.wait(30)
    committer.put(Outcome(a.id, a.token, "complete", "", 1001))  # refused: an old token
    committer.put(Outcome(a2.id, a2.token, "start", "", 1002, lease_until=61_000))
    recording.go.set()
    committer.flush()
    committer.close()
    assert recording.batches[1] == ["complete a", "start a"]
    info = store.get(a.id)
    assert info is not None and (info.status, info.attempt) == ("running", 1)
    store.close()
