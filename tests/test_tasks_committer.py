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
