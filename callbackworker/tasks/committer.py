"""The group committer: finished attempts are settled in batches.

DESIGN

* One thread.  Handlers hand their outcome (``Outcome``) to ``put`` and
  go on; the committer thread settles everything that piled up while the
  previous batch was being committed in one ``TaskStore.settle``
  transaction (at most ``BATCH_MAX`` outcomes).
* Crash safety.  A crash before that commit loses the outcome but not the
  task: its lease expires and it runs again (at-least-once execution).
  An outcome the store rejects (its lease was lost and the task recovered
  meanwhile) is logged and dropped; a failed commit is logged, and those
  tasks come back when their leases expire.
* Suspensions.  After a batch with a suspension the committer calls
  ``on_suspended``: a callback signalled while the handler was suspending
  has made that task due, and the dispatcher must look again.
* Completions.  After every committed batch the committer calls
  ``on_committed`` (if given): result waiters of this process read again.
* ``flush`` waits until everything put so far is committed; ``close``
  commits what is left and stops the thread.  The lock is never held while
  calling the store, ``on_suspended`` or ``on_committed``.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, List, Optional

from .storage import Outcome, TaskStore

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)


class GroupCommitter:
    """One thread that settles finished attempts in batches: everything that
    piled up while the previous batch was being committed goes in the next
    transaction.  The thread starts with the committer."""

    BATCH_MAX = 10_000
    """Most outcomes settled in one transaction."""

    def __init__(self, store: TaskStore, on_suspended: Callable[[], None],
                 on_committed: Optional[Callable[[], None]] = None) -> None:
        self._store = store
        self._on_suspended = on_suspended
        self._on_committed = on_committed
        self._cond = threading.Condition()
        self._queue: List[Outcome] = []
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="callbackworker-task-commit",
                                        daemon=True)
        self._thread.start()

    def put(self, outcome: Outcome) -> None:
        """Queues ``outcome`` for the next batch; returns at once."""
        with self._cond:
            self._queue.append(outcome)
            if len(self._queue) == 1:
                self._cond.notify_all()

    def flush(self) -> None:
        """Returns once everything put so far has been committed (or its
        commit has failed and been logged)."""
        with self._cond:
            while (self._queue or self._busy) and self._thread.is_alive():
                self._cond.wait()

    def close(self) -> None:
        """Commits what is left, then stops the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue[:self.BATCH_MAX]
                del self._queue[:self.BATCH_MAX]
                self._busy = True
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _commit(self, batch: List[Outcome]) -> None:
        try:
            applied = self._store.settle(batch)
            for outcome, ok in zip(batch, applied):
                if not ok:
                    log.warning("task %s: outcome %r rejected: its lease was lost "
                                "(the task was recovered meanwhile)",
                                outcome.task_id, outcome.kind)
            if any(o.kind == "suspend" for o in batch):
                self._on_suspended()  # one whose callback was signalled meanwhile is due
            if self._on_committed is not None:
                self._on_committed()
        except Exception:
            log.exception("could not commit %d task outcomes; those tasks run again "
                          "once their leases expire", len(batch))
