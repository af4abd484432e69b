"""The group committer: finished attempts are settled in batches.

DESIGN

* One thread.  Handlers hand their outcome (``Outcome``) to ``put`` and
  go on; the committer thread settles everything that piled up while the
  previous batch was being committed in one ``TaskStore.settle``
  transaction (at most ``BATCH_MAX`` outcomes).
* Starts.  A run's "start" record (its attempt counted) goes in the next
  batch like an outcome.  Usually nobody waits for it (``put``): the
  handler runs at once, and a run that ends before its start was taken
  into a batch settles start and end as one outcome (the end counts the
  attempt itself; the start record is dropped), so a short task costs its
  share of one transaction.  ``start`` instead waits until its batch is
  committed, for runs that must not begin uncounted (see the runtime);
  a starting thread that finds no commit under way leads the next one
  itself rather than waking the committer thread and waiting for it
  (group commit with a leader): one hand-off less per start.  Where the
  store commits starts faster on their own (``TaskStore.starts_apart``:
  PostgreSQL does not wait for its flush), a batch holding a waited start
  commits its starts first, and their runs begin while its outcomes
  commit.  Only one batch is committed at a time (``_busy``), so order is
  kept whoever leads.
* Crash safety.  A crash before that commit loses the outcome but not the
  task: its lease expires and it runs again (at-least-once execution).
  An outcome the store rejects (its lease was lost and the task recovered
  meanwhile) is logged and dropped.
* Nothing dropped while the process lives.  A commit that fails for a
  reason that can pass (the database locked, a lost connection, a server
  restarting: anything but a data error) is tried again, with a growing
  pause, until it succeeds; meanwhile the service keeps renewing the
  leases of those tasks, since their outcomes are still on the way.  A
  batch that fails with a data error is settled one outcome at a time, so
  only the outcome that cannot be written fails: its task fails with a
  fixed message that can.  Only ``close`` gives up, after
  ``CLOSE_PATIENCE_S`` of failures: the process is ending, its leases stop
  being renewed, and those tasks come back when they expire.
* Leases.  ``on_settled`` is told, after each batch, which tasks' outcomes
  the committer is done with (settled, rejected, or given up at close):
  the runtime renews the leases of the tasks it holds until then only.
* Suspensions.  After a batch with a suspension the committer calls
  ``on_suspended``: a callback signalled while the handler was suspending
  has made that task due, and the dispatcher must look again.
* ``flush`` waits until everything put so far is committed; ``close``
  commits what is left and stops the thread.  The lock is never held while
  calling the store or ``on_suspended``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Set

from ..errors import StorageBusyError
from .storage import Outcome, TaskStore

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)


class GroupCommitter:
    """One thread that settles finished attempts in batches: everything that
    piled up while the previous batch was being committed goes in the next
    transaction.  The thread starts with the committer."""

    BATCH_MAX = 10_000
    """Most outcomes settled in one transaction."""

    CLOSE_PATIENCE_S = 30.0
    """How long ``close`` keeps trying to commit before it gives up."""

    MAX_PAUSE_S = 2.0
    """Longest pause between two tries of a failing commit."""

    def __init__(self, store: TaskStore, on_suspended: Callable[[], None],
                 clock: Callable[[], int], *,
                 on_settled: Optional[Callable[[List[str]], None]] = None) -> None:
        self._store = store
        self._on_suspended = on_suspended
        self._clock = clock
        self._on_settled = on_settled
        self._cond = threading.Condition()
        self._queue: List[Outcome] = []
        self._waiting: Set[int] = set()  # id() of the starts a thread waits for
        self._answers: Dict[int, Optional[bool]] = {}  # id() of a waited start -> applied
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="callbackworker-task-commit",
                                        daemon=True)
        self._thread.start()

    def put(self, outcome: Outcome) -> None:
        """Queues ``outcome`` (a "start" record too) for the next batch;
        returns at once."""
        with self._cond:
            self._queue.append(outcome)
            if len(self._queue) == 1:
                self._cond.notify_all()

    def start(self, record: Outcome) -> Optional[bool]:
        """Queues a "start" record for the next batch and returns once it is
        committed: True if it applied, False if the store rejected it (the
        lease was lost), None if ``close`` gave up committing it.  When no
        commit is under way, the calling thread commits the batch itself
        (no hand-off to the committer thread)."""
        key = id(record)
        with self._cond:
            self._queue.append(record)
            self._waiting.add(key)
            while key not in self._answers:
                if self._queue and not self._busy:
                    self._lead_locked(starts_only=self._store.starts_apart)
                elif self._thread.is_alive():
                    self._cond.wait()
                else:
                    break
            self._waiting.discard(key)
            return self._answers.pop(key, None)

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
                while not (self._queue and not self._busy) and not (
                        self._stopping and not self._busy):
                    self._cond.wait()
                if not self._queue:
                    return
                self._lead_locked()

    def _lead_locked(self, starts_only: bool = False) -> None:
        """Commits the next batch (under ``_cond``, with no commit under
        way; the lock is released while the store works).  Whichever thread
        leads, batches are committed one at a time, in order.  With
        ``starts_only`` the batch is the queued starts alone, and the
        outcomes are left to the committer thread (a start never needs an
        outcome queued before it: a run's outcome follows its start)."""
        if starts_only:
            batch = [o for o in self._queue if o.kind == "start"][:self.BATCH_MAX]
            taken = {id(o) for o in batch}
            self._queue = [o for o in self._queue if id(o) not in taken]
        else:
            batch = _merge_starts(self._queue[:self.BATCH_MAX], self._waiting)
            del self._queue[:self.BATCH_MAX]
        waited = {id(o) for o in batch if id(o) in self._waiting}
        self._busy = True
        self._cond.release()
        try:
            self._commit(batch, waited)
        finally:
            self._cond.acquire()
            self._busy = False
            self._cond.notify_all()  # the committer thread takes what is left

    def _commit(self, batch: List[Outcome], waited: Set[int]) -> None:
        """Commits ``batch``; ``waited`` holds the ``id()`` of its starts
        that threads wait for."""
        if self._store.starts_apart and waited:
            ends = [o for o in batch if o.kind != "start"]
            self._commit_part([o for o in batch if o.kind == "start"], waited)
            if ends:
                self._commit_part(ends, waited)
            return
        self._commit_part(batch, waited)

    def _commit_part(self, batch: List[Outcome], waited: Set[int]) -> None:
        applied = self._settle(batch)
        starts = [(id(o), None if applied is None else ok)
                  for o, ok in zip(batch, applied or [None] * len(batch)) if id(o) in waited]
        if starts:
            with self._cond:
                self._answers.update(starts)
                self._cond.notify_all()
        ended = [o.task_id for o in batch if o.kind != "start"]
        if ended and self._on_settled is not None:
            self._on_settled(ended)
        if applied is None:
            return
        for outcome, ok in zip(batch, applied):
            if not ok:
                log.warning("task %s: outcome %r rejected: its lease was lost "
                            "(the task was recovered meanwhile)",
                            outcome.task_id, outcome.kind)
        if any(o.kind == "suspend" for o in batch):
            try:
                self._on_suspended()  # one whose callback was signalled meanwhile is due
            except Exception:  # the dispatcher looks again at its next pass anyway
                log.exception("could not wake the dispatcher after a suspension")

    def _settle(self, batch: List[Outcome]) -> Optional[List[bool]]:
        """Settles ``batch``, trying again while the failure can pass;
        returns what ``TaskStore.settle`` returned, or None once ``close``
        has given up."""
        pause, failing_since = 0.05, None
        while True:
            try:
                return self._store.settle(batch)
            except Exception as exc:
                if is_data_error(exc):
                    return self._settle_apart(batch, exc)
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("could not commit %d task outcomes (%s: %s); trying again "
                                "until the store answers", len(batch), type(exc).__name__, exc)
                with self._cond:
                    if self._stopping and now - failing_since >= self.CLOSE_PATIENCE_S:
                        log.error("gave up committing %d task outcomes at close (%s: %s); "
                                  "those tasks run again once their leases expire",
                                  len(batch), type(exc).__name__, exc)
                        return None
                    self._cond.wait(pause)
                pause = min(pause * 2, self.MAX_PAUSE_S)

    def _settle_apart(self, batch: List[Outcome], exc: Exception) -> Optional[List[bool]]:
        """A batch the store refused as data: each outcome on its own, and
        the one that cannot be written replaced by a failure that can."""
        if len(batch) > 1:
            applied: List[bool] = []
            for outcome in batch:
                one = self._settle([outcome])
                applied.append(bool(one and one[0]))
            return applied
        outcome = batch[0]
        log.error("task %s: its outcome %r could not be stored (%s: %s); the task fails",
                  outcome.task_id, outcome.kind, type(exc).__name__, exc)
        if outcome.message == UNSTORABLE and outcome.kind == "fail":
            return [False]  # not even the fixed failure: leave the task to lease expiry
        return self._settle([Outcome(outcome.task_id, outcome.token, "fail", UNSTORABLE,
                                     self._clock())])


def _merge_starts(batch: List[Outcome], waited: Set[int]) -> List[Outcome]:
    """``batch`` without the start records of runs whose end is in it too
    (that end counts the attempt itself), unless a thread waits for the
    start's answer.  A run is a task under one claim's token: the end of
    an earlier claim of the same task does not stand for a new run's
    start."""
    ends = {(o.task_id, o.token) for o in batch if o.kind != "start"}
    if not ends or len(ends) == len(batch):
        return batch
    return [o for o in batch if o.kind != "start" or (o.task_id, o.token) not in ends
            or id(o) in waited]


UNSTORABLE = "the task's outcome could not be stored; see the worker's log"
"""The message of a task whose real outcome the store refused as data."""

_DATA_ERRORS = frozenset({"DataError", "IntegrityError", "ProgrammingError",
                          "NotSupportedError"})


def is_data_error(exc: BaseException) -> bool:
    """True for failures that trying again cannot cure: the store refused
    the data itself (the DB-API's data, integrity and programming errors,
    which sqlite3 and psycopg both raise, or a value Python could not
    bind).  Anything else, a busy or unreachable store included, may pass."""
    if isinstance(exc, StorageBusyError):
        return False
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return True
    return any(cls.__name__ in _DATA_ERRORS for cls in type(exc).__mro__)
