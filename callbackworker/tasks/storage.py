"""The storage contract of persistent task queues: ``TaskStore``.

A backend keeps queues and tasks and makes every state change atomic.  It
knows nothing of handlers, threads or clocks: every method that depends on
time takes ``now`` (milliseconds, from the service's clock), and every
policy decision (how long to back off, whether an owner is dead) is made by
the caller, ``TaskService``.  One shared test class,
``tests/storage_contract.py``, states the contract; every backend must pass
it unchanged.

The life of a task::

    pending --claim--> running --complete--> completed
       ^               (start) \\--fail-----> failed
       |                  |
       +----retry---------+      (attempt kept; due at run_at)
       +----release-------+      (graceful shutdown: no attempt counted)
       +----recover-------+      (lease lost: attempt kept if the run had
                                  started, or failed when the attempts are
                                  used up; a claim that never started is
                                  free)
    pending --cancel / clear--> cancelled

    running --suspend--> suspended        (a durable handler awaits a callback;
       ^                   |                  lease dropped)
       |                   +--signal--> pending (due now)
       +--------claim------+  (a suspended task is claimable once due: when
                                 its callback expires)
    suspended --cancel / clear--> cancelled

A task that suspended is in the same attempt until its handler finishes:
claiming it again (to replay the handler) does not count an attempt, and
releasing such a claim gives none back.  A lease lost during a replay
counts one, like any lost lease.

Durable operation logs (``callbackworker.durable``) live in the same store:
every task may own an operation log (rows keyed by ``(task_id, seq)``) and
callbacks (keyed by the callback id).  When a task reaches a terminal state
its log is deleted and its pending callbacks are closed (later signals are
refused); the callbacks' rows themselves go when retention deletes the task.
The store keeps step values as opaque bytes: serializing them is the
caller's business.

A claim is a lease: the task records its ``owner``, ``lease_expires_at`` and
a fresh ``token``.  ``attempt`` grows by one when the run starts (a
``"start"`` outcome, or the outcome ending a run whose start was not
recorded), so a task claimed but never run, whether its worker died or the
claim's answer was lost, is taken back with no attempt counted.  Every
transition out of
``running`` names the token; a token that no longer matches (the lease was
recovered and the task claimed again, or it was settled already) is
rejected and changes nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..durable import CallbackRecord
from ..errors import CallbackAlreadyCompletedError
from .status import TaskStatus

__all__ = [
    "STATUSES", "TASK_COLUMNS", "TaskStatus", "NEVER", "TaskRecord", "ClaimedTask", "NewCall", "Outcome",
    "ScheduleRecord",
    "TaskStore",
    "Waker", "CALLBACK_COLUMNS", "callback_record", "check_signal_state", "apply_signal",
    "place_suspension", "storable_text", "MAX_MESSAGE_CHARS",
]

TASK_COLUMNS = ("id, queue, status, message, attempt, next_run_at, finished_at, owner, "
                "lease_expires_at, name, result, traceback, progress, created_at")
"""The columns of a ``TaskRecord``, in its order, for a ``SELECT``."""

STATUSES: Tuple[str, ...] = tuple(status.value for status in TaskStatus)
"""Every task status as stored, in the order tables show them."""

NEVER = 2**62
"""``next_run_at`` of a suspended task that only a signal can wake."""


Waker = Callable[[Optional[str]], None]
"""``waker(queue)``: told that the queue may have due tasks (``None``: any
queue may); see ``TaskStore.set_waker``."""


class TaskRecord(NamedTuple):
    """A task as stored."""

    id: str
    queue: str
    status: str
    message: str
    attempt: int
    next_run_at: int
    finished_at: Optional[int]
    owner: Optional[str]
    lease_expires_at: Optional[int]
    name: Optional[str] = None
    result: Optional[str] = None
    traceback: Optional[str] = None
    progress: Optional[str] = None
    created_at: int = 0


class ClaimedTask(NamedTuple):
    """A task handed out by ``TaskStore.claim``: run it, then settle it with
    its ``token``.  A function call (``enqueue_call``) has its ``name`` and
    ``args``; a raw task has its ``payload``.  ``confirm_start`` is set for
    a task taken back once from a claim whose run's start was never
    recorded: its run must wait until its start is (``settle``) before the
    handler runs."""

    id: str
    payload: bytes
    attempt: int
    token: str
    name: Optional[str] = None
    args: Optional[str] = None
    confirm_start: bool = False


class NewCall(NamedTuple):
    """A function call to store (``TaskStore.enqueue_call``): the task
    ``name``, its ``args`` (JSON text), its ``priority`` (higher is claimed
    first), when it is due (``run_at``) and its ``dedup_key`` (or None)."""

    id: str
    name: str
    args: str
    priority: int
    run_at: int
    dedup_key: Optional[str] = None


class ScheduleRecord(NamedTuple):
    """A periodic schedule as stored: its ``spec`` (``Schedule.spec``), the
    ``queue`` and ``task`` name it enqueues, the ``last_tick`` enqueued (or
    the baseline it was registered with), the ``next_run_at`` after it and
    when a service last registered it (``updated_at``); times in epoch
    milliseconds."""

    name: str
    spec: str
    queue: str
    task: str
    last_tick: int
    next_run_at: int
    updated_at: int


@dataclass
class Outcome:
    """How one attempt ended, for ``TaskStore.settle``.  Nothing changes
    one once made (it is not frozen only because a frozen dataclass takes
    four times as long to make, and every run makes two).

    ``kind`` ``"start"`` records that the attempt's run has begun (``at``,
    its start time): the task stays running, its lease runs until
    ``lease_until`` (if given), and the attempt is counted then (once per
    claim; not for the replay of a suspended task).  An
    outcome that ends the run counts the attempt itself if no start was
    recorded.  ``kind`` is ``"complete"`` or ``"fail"`` (terminal: ``at`` is the finish
    time), ``"retry"`` (back to pending with the attempt counted: ``at`` is
    when it is due again), ``"release"`` (back to pending, due at ``at``,
    with no attempt counted: the handler never ran) or ``"suspend"``
    (a durable handler waits for the callback ``awaiting``: the task
    becomes suspended, still in its attempt, due when that callback
    expires, or never; if the callback was signalled or has expired by the
    time this applies, the task is pending and due at ``at`` instead, so a
    signal racing the suspension is never lost).  ``"complete"`` stores
    ``result`` (JSON text of a function's return value); ``"fail"`` and
    ``"retry"`` store ``traceback``, the failed attempt's.
    """

    task_id: str
    token: str
    kind: str
    message: str
    at: int
    awaiting: str = ""
    result: Optional[str] = None
    traceback: Optional[str] = None
    lease_until: Optional[int] = None

    KINDS = ("start", "complete", "fail", "retry", "release", "suspend")

    def __post_init__(self) -> None:
        self.message = storable_text(self.message)
        if self.traceback is not None:
            self.traceback = storable_text(self.traceback)


MAX_MESSAGE_CHARS = 64 * 1024
"""Longest message a task keeps; longer ones are cut, with a marker."""


def storable_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as every store can hold it: lone surrogates (from a name
    decoded with ``surrogateescape``, say) and NUL characters, which SQLite
    or PostgreSQL refuse, are written as backslash escapes, and text over
    ``limit`` characters is cut, saying how much was left out.  Text that
    needs none of this is returned as it is."""
    if len(text) <= limit and text.isascii() and "\x00" not in text:
        return text  # the usual case, checked in C (ASCII holds no surrogate)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        cut = len(text) - limit
        text = f"{text[:limit]}... [{cut} more characters cut]"
    return text


class TaskStore(ABC):
    """Where queues and tasks live.  Every method is atomic and thread-safe;
    none may surface a transient "database is busy" condition (retry it)."""

    # ---- queues -------------------------------------------------------

    @abstractmethod
    def ensure_queue(self, name: str) -> None:
        """Creates the queue if it does not exist (idempotent, shared by
        every process using the store)."""

    @abstractmethod
    def queues(self) -> List[str]:
        """The names of every queue, sorted."""

    @abstractmethod
    def declare_queue(self, name: str, config: str) -> None:
        """Creates the queue if needed and stores ``config`` (JSON text, the
        caller's business) as its declared config, replacing any other."""

    @abstractmethod
    def queue_config(self, name: str) -> Optional[str]:
        """The queue's declared config, or None (no such queue, or none
        declared)."""

    # ---- producing ----------------------------------------------------

    @abstractmethod
    def enqueue_many(self, queue: str, tasks: Sequence["tuple[str, bytes]"], now: int) -> None:
        """Adds ``(task_id, payload)`` pairs as pending tasks due at ``now``,
        all in one transaction, durable when this returns.  Raises
        ``UnknownQueueError`` (nothing is added) if the queue does not
        exist."""

    def enqueue(self, queue: str, task_id: str, payload: bytes, now: int) -> None:
        """Adds one pending task; see ``enqueue_many``."""
        self.enqueue_many(queue, [(task_id, payload)], now)

    @abstractmethod
    def enqueue_call(self, queue: str, call: NewCall, now: int) -> str:
        """Adds a pending function call, due at ``call.run_at``, creating the
        queue if it does not exist, in one transaction; returns its id.
        With a ``dedup_key``, while a task of the queue with that key is
        pending, running or suspended, nothing is added and that task's id
        is returned instead (of concurrent calls, exactly one adds it)."""

    # ---- consuming ----------------------------------------------------

    @abstractmethod
    def claim(self, queue: str, *, owner: str, limit: int, now: int, lease_ms: int,
              delay_ms: int = 0) -> List[ClaimedTask]:
        """Atomically moves up to ``limit`` of the queue's due pending or
        suspended tasks (``next_run_at <= now``; highest ``priority`` first,
        then oldest ``next_run_at``, then insertion order, read in that order
        from an index) to running under a lease: ``owner``, expiry
        ``now + lease_ms``, a fresh token; each carries the number its run
        will have (``attempt + 1``, counted when it starts).  Returns them in
        that order.

        With ``delay_ms > 0`` it claims at most one task, and only when the
        queue's next allowed start (stored, so it holds across processes)
        has come; the claim moves that time to ``now + delay_ms``.

        Claiming a task that suspended (a replay) does not count an attempt.
        """

    starts_apart: bool = False
    """True when a batch of ``"start"`` records alone commits markedly
    faster than with outcomes (PostgreSQL: starts need not wait for the
    server's flush); the group committer then settles them first, on
    their own, and lets their runs begin before the outcomes commit."""

    @abstractmethod
    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        """Applies the outcomes in one transaction (a group commit).  Each
        applies only if its task is running with its token; the result says,
        per outcome, whether it applied (False: stale token, nothing
        changed)."""

    def start(self, task_id: str, token: str, now: int,
              lease_until: Optional[int] = None) -> bool:
        """Records that the claimed task's run began at ``now``: its attempt
        is counted, and its lease runs until ``lease_until`` (None: as it
        was).  False if the token is stale."""
        return self.settle([Outcome(task_id, token, "start", "", now,
                                    lease_until=lease_until)])[0]

    def complete(self, task_id: str, token: str, message: str, now: int) -> bool:
        """Running → completed with ``message``.  False if the token is stale."""
        return self.settle([Outcome(task_id, token, "complete", message, now)])[0]

    def fail(self, task_id: str, token: str, message: str, now: int) -> bool:
        """Running → failed with ``message``.  False if the token is stale."""
        return self.settle([Outcome(task_id, token, "fail", message, now)])[0]

    def retry(self, task_id: str, token: str, message: str, run_at: int) -> bool:
        """Running → pending, due at ``run_at``, the attempt counted.  False
        if the token is stale."""
        return self.settle([Outcome(task_id, token, "retry", message, run_at)])[0]

    def release(self, task_id: str, token: str, now: int) -> bool:
        """Running → pending, due at ``now``, with no attempt counted (the
        handler never ran; a recorded start is taken back).  False if the
        token is stale."""
        return self.settle([Outcome(task_id, token, "release", "", now)])[0]

    @abstractmethod
    def set_progress(self, task_id: str, token: str, progress: str) -> bool:
        """Stores ``progress`` (JSON text) on a task running under
        ``token``; False (nothing changed) if the token is stale."""

    # ---- leases -------------------------------------------------------

    @abstractmethod
    def renew_leases(self, owner: str, expires_at: int,
                     task_ids: Optional[Sequence[str]] = None) -> int:
        """Extends the lease of every running task of ``owner`` to
        ``expires_at`` (with ``task_ids``: of those tasks only, so a claim
        whose answer was lost, or an outcome given up on, is left to
        expire); returns how many."""

    @abstractmethod
    def running_owners(self, queue: str) -> List[str]:
        """The distinct owners holding running tasks of the queue."""

    @abstractmethod
    def recover(self, queue: str, *, now: int, max_attempts: int,
                owners: Iterable[str] = ()) -> int:
        """Takes back the queue's running tasks whose lease expired
        (``lease_expires_at <= now``) or whose owner is in ``owners`` (known
        dead).  A task whose run's start was never recorded goes back to
        pending as it was (no attempt counted), marked so that its later
        claims carry ``confirm_start``.  A started one with ``attempt <
        max_attempts`` goes back to pending, due at ``now``, its attempt
        still counted; the others fail, with a
        message saying the worker was lost.  Returns how many."""

    # ---- management ---------------------------------------------------

    @abstractmethod
    def get(self, task_id: str) -> Optional[TaskRecord]:
        """The task, or None if it does not exist (never did, or swept)."""

    @abstractmethod
    def cancel(self, task_id: str, now: int) -> Optional[str]:
        """Cancels the task if it is pending or suspended.  Returns the
        status it had (``"pending"`` or ``"suspended"`` means it is now
        cancelled; any other status means nothing changed), or None if the
        task does not exist."""

    @abstractmethod
    def clear(self, queue: str, now: int) -> int:
        """Cancels every pending and suspended task of the queue; returns
        how many.  Running tasks are untouched."""

    @abstractmethod
    def counts(self) -> Dict[str, Dict[str, int]]:
        """For every queue, the number of tasks in each of ``STATUSES``
        (zeros included)."""

    @abstractmethod
    def next_due(self, queue: str) -> Optional[int]:
        """The earliest time a claim on the queue could return a task (the
        oldest ``next_run_at`` of its pending tasks and of its suspended
        tasks that will wake by themselves, no earlier than the queue's next
        allowed start), or None when there is no such task."""

    @abstractmethod
    def sweep(self, queue: str, finished_before: int,
              failed_before: Optional[int] = None) -> int:
        """Deletes the queue's completed and cancelled tasks that finished
        before ``finished_before`` and its failed tasks that finished
        before ``failed_before`` (None: ``finished_before`` too); returns
        how many."""

    @abstractmethod
    def list_tasks(self, *, queue: Optional[str] = None, status: Optional[str] = None,
                   name: Optional[str] = None, limit: int = 100,
                   before_id: Optional[str] = None) -> List[TaskRecord]:
        """Up to ``limit`` tasks, newest (last enqueued) first, of the
        queue, status and task name given (None: any), read from an index.
        With ``before_id``, only tasks enqueued before that one: the next
        page after a page whose last task it is.  Raises
        ``UnknownTaskError`` if ``before_id`` does not exist (any more)."""

    @abstractmethod
    def retry_task(self, task_id: str, now: int) -> Optional[str]:
        """Makes a failed or cancelled task pending again, due at ``now``,
        with its attempt count back to 0 (its message and traceback stay
        until its next attempt ends).  Returns the status it had
        (``"failed"`` or ``"cancelled"`` means it is now pending; any other
        means nothing changed), or None if the task does not exist.  Raises
        ``TaskNotRetryableError`` (nothing changes) if an unfinished task
        of its queue holds its ``dedup_key``."""

    @abstractmethod
    def purge(self, queue: str, status: str, limit: int) -> int:
        """Deletes up to ``limit`` of the queue's tasks in ``status`` (a
        terminal one), oldest first, in one transaction; returns how many.
        Their durable logs and callbacks go with them."""

    # ---- periodic schedules ---------------------------------------------

    @abstractmethod
    def register_schedule(self, name: str, spec: str, *, queue: str, task: str,
                          baseline: int, next_run_at: int, now: int) -> None:
        """Files schedule ``name`` as a starting service has it.  A new name,
        or a ``spec`` other than the stored one, starts afresh: its last
        tick becomes ``baseline`` and its next run ``next_run_at``.  The
        same spec keeps the stored last tick and next run, so ticks missed
        while no service ran are still due (and coalesce).  ``queue`` and
        ``task`` are overwritten either way."""

    @abstractmethod
    def claim_tick(self, name: str, spec: str, tick: int, next_run_at: int, queue: str,
                   call: NewCall, now: int) -> bool:
        """Enqueues ``call`` on ``queue`` (creating the queue if needed) as
        tick ``tick`` of schedule ``name``, in one transaction with a
        compare-and-set of the schedule's last tick: it applies only while
        the stored spec is ``spec`` and the stored last tick is older than
        ``tick``, and then moves the last tick to ``tick`` and the next run
        to ``next_run_at``.  Returns whether it applied.  However many
        services claim one tick at once, exactly one call is enqueued; no
        lock outlives the transaction, so a process that dies holds
        nothing."""

    @abstractmethod
    def schedules(self) -> List[ScheduleRecord]:
        """Every stored schedule, by name."""

    @abstractmethod
    def remove_schedule(self, name: str) -> bool:
        """Deletes schedule ``name`` (one no code registers any more);
        returns whether it existed.  A service still serving it registers
        it again, from its next tick."""

    # ---- wake-ups -----------------------------------------------------

    def set_waker(self, waker: Optional[Waker]) -> None:
        """Asks the store to call ``waker(queue)``, from a thread of its own,
        whenever another process may have made tasks of ``queue`` due
        (``None`` stops it).  Optional: a store without notifications keeps
        this default, which does nothing, and its users find such work by
        polling.  ``close`` stops the calls."""

    def watch_finished(self, callback: Optional[Callable[[], None]]) -> None:
        """Asks the store to call ``callback()``, from a thread of its own,
        whenever another process may have finished tasks (``None`` stops
        it), so result waiters read again.  Optional, like ``set_waker``:
        this default does nothing, and waiters poll."""

    # ---- durable operation logs and callbacks ---------------------------

    @abstractmethod
    def durable_ops(self, task_id: str) -> List["tuple[str, str, bytes]"]:
        """The task's operation log as ``(kind, name, value)``, by ``seq``."""

    @abstractmethod
    def durable_record(self, task_id: str, seq: int, kind: str, name: str,
                       value: bytes) -> None:
        """Appends operation ``seq`` to the task's log.  Raises
        ``NonDeterminismError`` (nothing changes) if ``seq`` is taken, and
        ``UnknownTaskError`` if the task does not exist (any more)."""

    @abstractmethod
    def durable_add_callback(self, record: CallbackRecord) -> None:
        """Files a new pending callback owned by task ``record.owner``.
        Raises ``UnknownTaskError`` if that task does not exist (any
        more)."""

    @abstractmethod
    def durable_callback(self, callback_id: str) -> Optional[CallbackRecord]:
        """The callback as stored (state ``"pending"`` even past its limit:
        the caller applies ``expire_if_due``), or None."""

    @abstractmethod
    def durable_signal(self, callback_id: str, state: str, result: Optional[bytes],
                       error: Optional[str], now: int) -> CallbackRecord:
        """Applies one signal in one transaction and returns the callback
        as it now is.  ``state`` ``"succeeded"`` / ``"failed"`` stores the
        result or error; ``"pending"`` is a heartbeat (``last_beat_ms =
        now``).  If the owner task is suspended waiting for this callback,
        a terminal signal makes it pending and due at ``now``, and a
        heartbeat moves its due time to the callback's new expiry.  Raises
        ``UnknownCallbackError`` for an unknown id and
        ``CallbackAlreadyCompletedError`` (nothing changes) if the callback
        is not pending, or is past its limit at ``now`` (state
        ``"timed_out"``); of concurrent signals exactly one applies."""

    @abstractmethod
    def close(self) -> None:
        """Releases the backend's resources; idempotent."""


def check_signal_state(state: str) -> None:
    """``durable_signal``'s ``state`` argument: a ValueError otherwise."""
    if state not in ("succeeded", "failed", "pending"):
        raise ValueError(f"a signal's state must be succeeded, failed or pending, not {state!r}")


def apply_signal(record: CallbackRecord, state: str, result: Optional[bytes],
                 error: Optional[str], now: int) -> Optional[int]:
    """What a signal does to a callback, as read inside the signal's
    transaction; the store writes the change back.  Raises
    ``CallbackAlreadyCompletedError`` if the callback takes no signal any
    more (``timed_out`` once past its limit at ``now``).  Returns, for a
    heartbeat, the due time a task suspended on it gets (``NEVER`` without
    a limit); None for a terminal signal."""
    record.expire_if_due(now)
    if record.state != "pending":
        raise CallbackAlreadyCompletedError(record.callback_id, record.state)
    if state == "pending":
        record.last_beat_ms = now
        at, _ = record.expiry()
        return NEVER if at is None else at
    record.state, record.result, record.error = state, result, error
    return None


CALLBACK_COLUMNS = ("id, task_id, name, created_at, timeout_ms, heartbeat_timeout_ms, state, "
                    "result, error, last_beat_at")
"""The callbacks table's columns, in the order ``callback_record`` reads."""


def callback_record(row: Sequence[Any]) -> CallbackRecord:
    """A callbacks-table row (``CALLBACK_COLUMNS``) as a ``CallbackRecord``."""
    (callback_id, task_id, name, created, timeout_ms, heartbeat_ms, state, result, error,
     last_beat) = row
    return CallbackRecord(callback_id, task_id, name, int(created), int(timeout_ms),
                          int(heartbeat_ms), state, None if result is None else bytes(result),
                          error, last_beat_ms=int(last_beat))


def place_suspension(record: Optional[CallbackRecord], at: int) -> Tuple[str, int]:
    """Where a task suspended on ``record`` goes as its suspension is
    settled at ``at``: ``("suspended", the callback's expiry or NEVER)``,
    or ``("pending", at)`` if the callback is gone, was signalled or has
    expired meanwhile (the replay then sees it at once)."""
    if record is not None and record.state == "pending":
        expiry, _ = record.expiry()
        if expiry is None:
            return TaskStatus.SUSPENDED.value, NEVER
        if at < expiry:
            return TaskStatus.SUSPENDED.value, expiry
    return TaskStatus.PENDING.value, at
