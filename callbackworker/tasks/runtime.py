"""The task runtime: the threads that claim, run and settle tasks.

DESIGN

* Execution.  The runtime owns a ``Worker`` with one route per queue it
  serves (``task:<name>``, ``concurrency`` threads).  A dispatcher thread
  claims due tasks, never more than the queue's free slots plus its
  prefetch (below), and starts each as a job on that route
  (``Worker.run_detached``, one ``_Attempt`` work item per claimed task).
  Handlers run on the C threads.  The worker, the committer and the
  dispatcher are created with the first queue: a service that only
  enqueues and inspects starts no thread.
* Prefetch.  ``prefetch`` when set; by default a queue prefetches what it
  finishes in ``PREFETCH_HORIZON_S`` at its rate over the last
  ``_RATE_EVERY_S``, or over a shorter span once ``_RATE_MIN_COUNT``
  attempts, and twice its concurrency (more than one round of a burst),
  have finished in it, so that a queue that starts on a backlog
  of short tasks grows its window within milliseconds instead of claiming
  one or two at a time (at least its concurrency, at most
  ``PREFETCH_MAX``):
  short tasks are claimed hundreds at a time, long ones no further ahead
  than their concurrency, and a prefetched task waits in this process
  about the horizon at most while another process could have run it.
  While every handler of the queue is busy, the dispatcher claims only
  once half of that window is free, so claims come in batches, not one
  per finished task.
* Leases.  A claim leases the task to this runtime (``owner`` =
  host/pid/nonce, ``owners.py``) until ``now + lease_ms`` and gives it a
  fresh token.  Every ``lease_ms / 3`` the dispatcher renews the leases of
  the tasks it holds (claimed and not yet settled by the committer), by
  id: a claim whose answer was lost with its connection, or an outcome a
  crashed server lost after confirming it, expires.  A task whose lease
  expires (its process died or stalled) is taken back by whichever runtime
  serves the queue: pending again, with the attempt counted if its run
  had started, or failed when no attempt is left.  Serving a queue also
  takes back, at once, tasks of a predecessor that is provably dead: same
  host, process gone.
* Attempts.  The attempt is counted when the run starts, not at claim,
  so a prefetched task that never ran, or a claim whose answer was lost,
  comes back as it was.  The route thread hands a "start" record (which
  also renews the lease) to the group committer and calls the handler at
  once: the start shares the next transaction with the outcomes and
  starts of other runs, and a run that ends before that transaction
  settles start and end in one outcome.  A crash before the start is
  committed (a few milliseconds) takes the task back uncounted, marked
  ``confirm_start``; a run of such a task, or one whose lease may have run
  out meanwhile (claimed or renewed more than half a lease ago), waits
  until its start is committed before the handler runs.  So a handler
  that kills its process runs uncounted once at most, and a claim that
  was lost is never run.
* Sweep.  Every minute the dispatcher deletes the finished tasks of its
  queues that are past their retention.
* Outcomes.  A finished handler's outcome goes to the group committer
  (``committer.py``); at-least-once execution, never two holders at once
  while leases are renewed.
* Wake-ups.  ``wake`` (an enqueue or a signal in this process, and a
  finished attempt that leaves its queue room to claim) makes the
  dispatcher look again; so does the store,
  from its own thread, when it learns that another process added work
  (``TaskStore.set_waker``: PostgreSQL's LISTEN/NOTIFY, SQLite's wake-up
  sockets, ``wakeups.py``).  Otherwise it sleeps until the next due time,
  at most ``poll_ms``, which is how it notices work written by other
  processes when no notification came.
* Durable tasks.  A handler may use ``current_job().create_callback`` /
  ``callback_result`` / ``step`` (``callbackworker.durable``); the
  runtime's worker hands it a ``DurableRun`` over the task's own store
  (``TaskDurableStore``).  When ``callback_result`` finds its callback
  pending, the run ends with ``SuspendJob`` and the attempt settles as
  "suspend": the task is ``suspended`` (no lease, the attempt given back),
  due when the callback expires or never.  A signal updates the callback
  and makes the task due in one transaction; the dispatcher claims it like
  any due task and the handler replays from the log.  A signal that races
  the suspension is caught by the store when the suspension is settled.
* Tasks as functions.  A claimed task with a ``name`` is a stored call:
  the service's ``FunctionRegistry`` runs it and its return value is
  settled as the result.  A raw task (no name) goes to the queue's handler;
  a queue served only for functions has none, and fails such a task at
  once.  Either may raise ``Retry`` (retry after its delay, within the
  retries left) or ``NoRetry`` (fail now); any other exception is a failed
  attempt under the policy (a registered task's ``max_retries`` and
  ``backoff_ms`` over its queue's).  A failed attempt's traceback is
  stored with its message.
* Time limits.  Each attempt runs as a job with the task's ``timeout_ms``
  (registered), else its queue's (``QueueConfig.timeout_ms``, the route's
  limit).  The core interrupts an overdue attempt; the runtime settles it
  as a failed attempt saying it timed out.  A run stuck outside Python
  code cannot be interrupted: the core abandons its thread (the route
  keeps its thread count) and the runtime's watchdog, every lease renewal,
  settles any run ``ABANDON_GRACE_S`` past its limit as timed out.
* Progress.  While an attempt runs, ``current_task().progress`` writes
  through a ``ProgressReporter`` under the attempt's token; its last value
  is written before the outcome is handed to the committer.
* Close.  No task is claimed and no handler starts once ``close`` has
  begun; running handlers finish and their outcomes are committed; tasks
  claimed but not yet started are given back (pending, attempt returned).
* Lock order: ``_cond`` (runtime state) is never held while calling the
  store or the worker; it may be held while handing an outcome to the
  committer (whose lock is innermost).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, NoReturn, Optional, Set, Tuple

from .._validate import ROUTE_NAME_MAX
from ..durable import DurableBackend, DurableRun, SuspendJob
from ..errors import (
    CallbackInterrupt,
    CallbackWorkerError,
    NoRetry,
    QueueExistsError,
    Retry,
    ServiceClosedError,
)
from ..worker import Worker
from .committer import GroupCommitter
from .config import Handler, QueueConfig, TaskContext, retry_delay_ms
from .durablestore import TaskDurableStore
from .events import TaskEvents
from .functions import CallResult, FunctionRegistry
from .owners import new_owner, owner_is_dead
from .progress import ProgressReporter, reporting
from .results import Completions
from .storage import ClaimedTask, Outcome, TaskStore

__all__ = ["TaskRuntime", "current_task"]

log = logging.getLogger(__name__)

ABANDON_GRACE_S = 1.0
"""How long past its time limit a run may go on before it is abandoned."""
_SWEEP_EVERY_S = 60.0

_running = threading.local()


def current_task() -> Optional[TaskContext]:
    """Inside a handler, the task it is running; None anywhere else."""
    return getattr(_running, "task", None)


def _suspend_task(wake_after_ms: int, request: bytes) -> NoReturn:
    """Ends a task's run that waits for a callback; ``_attempt`` settles it
    as suspended (the store works out when it is due)."""
    raise SuspendJob()


class _TaskDurable(DurableBackend):
    """The durable backend of the runtime's worker: a task handler's
    durable operations go to the task's store, not to the worker's memory.
    The run of the task the calling thread handles is made by its first
    durable operation."""

    def __init__(self, store: TaskStore, clock: Callable[[], int]) -> None:
        self._store = store
        self._clock = clock

    def run_for(self, job_id: int, attempt: int, request: Callable[[], bytes]) -> DurableRun:
        durable: Optional[DurableRun] = getattr(_running, "durable", None)
        if durable is None:
            task = current_task()
            if task is None:
                raise CallbackWorkerError("durable operations of a task must run in its handler")
            store = TaskDurableStore(self._store, self._clock, task.id)
            durable = _running.durable = DurableRun(store, task.id, b"", _suspend_task)
        return durable


def _route_for(queue: str) -> str:
    """The worker route of a queue: ``task:<name>``, or a digest of the name
    when that would pass the worker's 128-byte limit ("task#" cannot clash
    with a "task:" name)."""
    route = f"task:{queue}"
    if len(route.encode("utf-8", "surrogatepass")) <= ROUTE_NAME_MAX:
        return route
    return "task#" + hashlib.blake2b(queue.encode("utf-8", "surrogatepass"), digest_size=24).hexdigest()


PREFETCH_HORIZON_S = 0.02
"""The default prefetch holds what the queue finishes in this long."""
PREFETCH_MAX = 1000
"""The most tasks the default prefetch claims beyond the free slots."""
_RATE_EVERY_S = 0.02
_RATE_MIN_COUNT = 8
_RATE_MIN_S = 0.001
SHED_AFTER_S = 0.25
"""Claimed tasks that have waited this long to run while more wait than
their queue's window now holds (its tasks became slower, so its default
prefetch shrank) are given back beyond the window: pending again, for any
process to run."""
_SHED_EVERY_S = 0.05


@dataclass(eq=False)
class _Queue:
    name: str
    route: str
    config: QueueConfig
    handler: Optional[Handler]  # None: the queue serves task functions only
    in_flight: int = 0  # claimed by this runtime and not yet finished
    finished: int = 0  # attempts finished so far
    rate: float = 0.0  # attempts finished per second, lately
    rate_since: float = 0.0  # monotonic, when ``rate_count`` was taken
    rate_count: int = 0  # ``finished`` then

    def measure_rate(self, mono: float) -> None:
        """Updates ``rate`` once ``_RATE_EVERY_S`` has passed, or once
        ``_RATE_MIN_COUNT`` attempts, and twice the concurrency, have
        finished in at least ``_RATE_MIN_S`` (under the runtime's
        ``_cond``).  Tasks started together finish together: a span
        shorter than a task's run holds at most one finish per slot, so
        twice as many finishes take a run at least, and the rate read over
        them is at most twice the true one, where one round of a burst
        alone would read it hundreds of times too high."""
        elapsed = mono - self.rate_since
        finished = self.finished - self.rate_count
        enough = max(_RATE_MIN_COUNT, 2 * self.config.concurrency)
        if elapsed >= _RATE_EVERY_S or (finished >= enough and elapsed >= _RATE_MIN_S):
            self.rate = finished / elapsed
            self.rate_since, self.rate_count = mono, self.finished


class _Attempt:
    """The work item of one claimed task's job (``Worker.run_detached``)."""

    __slots__ = ("runtime", "queue", "task", "epoch", "timeout_ms", "started", "settled",
                 "begun", "lease_until", "claimed", "seq")

    def __init__(self, runtime: "TaskRuntime", queue: _Queue, task: ClaimedTask,
                 epoch: int, lease_until: int, claimed: float) -> None:
        self.runtime = runtime
        self.queue = queue
        self.task = task
        self.epoch = epoch  # of the runtime's flushes, when it was claimed
        self.lease_until = lease_until  # the store's clock, as last claimed or renewed
        self.timeout_ms = queue.config.timeout_ms  # the attempt's limit, -1: none
        self.started = 0.0  # monotonic, when its run began
        self.settled = False  # its outcome is with the committer and it is counted out
        self.begun = 0.0  # monotonic, when its run began (for the events)
        self.claimed = claimed  # monotonic, when its batch was claimed
        self.seq = 0  # claim order in the runtime

    def run(self) -> None:
        self.runtime._run(self)


class TaskRuntime:
    """Serves queues of a store: claims their due tasks, runs them on a
    ``Worker`` and settles their outcomes.  ``TaskService`` owns one; its
    arguments are validated there.  With ``background=False`` no dispatcher
    thread runs and ``dispatch_once`` does one pass."""

    def __init__(self, store: TaskStore, clock: Callable[[], int], *, lease_ms: int,
                 poll_ms: int, prefetch: Optional[int], background: bool,
                 calls: Optional[FunctionRegistry] = None,
                 completions: Optional[Completions] = None,
                 events: Optional[TaskEvents] = None) -> None:
        self._store = store
        self._events = TaskEvents() if events is None else events
        self._calls = calls
        self._completions = completions
        self._clock = clock
        self._lease_ms = lease_ms
        self._poll_ms = poll_ms
        self._prefetch = prefetch
        self._background = background
        self._owner = new_owner()
        self._cond = threading.Condition()
        self._create_lock = threading.Lock()
        self._queues: Dict[str, _Queue] = {}
        self._unstarted: Set[_Attempt] = set()  # claimed, handed to the worker, not yet run
        self._started: Set[_Attempt] = set()  # running, with a time limit, not yet settled
        # Tasks this runtime claimed whose outcome is not yet settled: the
        # only leases it renews.
        self._held: Set[str] = set()
        # Attempts claimed and not yet finished, counted by the epoch they
        # were claimed in; each flush() begins a new epoch and waits for the
        # counts of the earlier ones.
        self._epoch = 0
        self._active: Dict[int, int] = {}
        self._claims = 0  # attempts tracked so far (their ``seq``)
        self._next_shed = 0.0
        self._kicked = False
        self._closed = False
        self._worker: Optional[Worker] = None
        self._committer: Optional[GroupCommitter] = None
        self._dispatcher: Optional[threading.Thread] = None

    def _now(self) -> int:
        return int(self._clock())

    def queue_names(self) -> List[str]:
        """The queues this runtime serves, sorted."""
        with self._cond:
            return sorted(self._queues)

    def serve(self, name: str, config: QueueConfig, handler: Optional[Handler]) -> None:
        """Joins the queue ``name`` in the store and starts running its
        tasks with ``handler`` (None: its task functions only), after
        recovering the running tasks of dead predecessors (see
        ``TaskService.create_queue``)."""
        with self._create_lock:
            if self._closed:
                raise ServiceClosedError("the TaskService has been closed")
            if name in self._queues:
                raise QueueExistsError(f"queue {name!r} was already created by this service")
            self._store.ensure_queue(name)
            dead = [o for o in self._store.running_owners(name) if owner_is_dead(o)]
            recovered = self._store.recover(name, now=self._now(),
                                            max_attempts=self._recovery_limit(config),
                                            owners=dead)
            if recovered:
                self._events.recovered(name, recovered, "lease expired or process gone")
            queue = _Queue(name, _route_for(name), config, handler)
            self._start_machinery().open_route(queue.route, concurrency=config.concurrency,
                                               timeout_ms=config.timeout_ms)
            with self._cond:
                self._queues[name] = queue
                self._kick_locked()

    def _start_machinery(self) -> Worker:
        """The worker, committer and dispatcher, created with the first queue
        (a service that only enqueues and inspects needs none)."""
        if self._worker is None:
            self._committer = GroupCommitter(self._store, self._kick, self._now,
                                             on_settled=self._settled)
            self._worker = Worker(durable_backend=_TaskDurable(self._store, self._now))
            if self._background:
                self._store.set_waker(self.wake)
                self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True,
                                                    name="callbackworker-task-dispatch")
                self._dispatcher.start()
        return self._worker

    def wake(self, queue: Optional[str]) -> None:
        """Tells the dispatcher that work may be due: in ``queue`` (ignored
        unless served here) or, with None, in any queue.  Called after an
        enqueue or a signal, and by the store's waker from its thread."""
        with self._cond:
            if queue is None or queue in self._queues:
                self._kick_locked()

    def flush(self) -> None:
        """Returns once every task claimed so far has finished (its handler
        returned, or it was given back) and its outcome is committed; at
        once when no queue is served.  Tasks claimed meanwhile are not
        waited for."""
        if self._committer is None:
            return
        with self._cond:
            epoch = self._epoch
            self._epoch += 1
            while any(e <= epoch for e in self._active):
                self._cond.wait()
        self._committer.flush()

    def _track_locked(self, queue: _Queue, claimed: List[ClaimedTask],
                      lease_until: int) -> List[_Attempt]:
        """The attempts of tasks just claimed in ``queue`` (leased until
        ``lease_until``), counted in flight and unstarted until they run
        (under ``_cond``)."""
        mono, epoch = time.monotonic(), self._epoch
        attempts = [_Attempt(self, queue, task, epoch, lease_until, mono) for task in claimed]
        for seq, attempt in enumerate(attempts, self._claims + 1):
            attempt.seq = seq
        self._claims += len(attempts)
        self._unstarted.update(attempts)
        self._held.update(task.id for task in claimed)
        self._active[self._epoch] = self._active.get(self._epoch, 0) + len(attempts)
        queue.in_flight += len(attempts)
        return attempts

    def _settled(self, task_ids: List[str]) -> None:
        """The committer is done with these tasks' outcomes (settled,
        rejected or given up at close): their leases are no longer ours, and
        result waiters of this process read again."""
        with self._cond:
            self._held.difference_update(task_ids)
        if self._completions is not None:
            self._completions.notify()

    def _finished_locked(self, attempt: _Attempt, ran: bool = True) -> None:
        """Counts ``attempt`` out of its queue's and its epoch's in-flight
        counts (under ``_cond``; its outcome is with the committer), and
        into the queue's rate if it ``ran``."""
        attempt.queue.in_flight -= 1
        if ran:
            attempt.queue.finished += 1
        left = self._active[attempt.epoch] - 1
        if left:
            self._active[attempt.epoch] = left
        else:
            del self._active[attempt.epoch]
            self._cond.notify_all()  # what flush() waits for

    def close(self) -> None:
        """Stops claiming, lets running handlers finish, commits their
        outcomes and gives back tasks claimed but not started.  Leaves the
        store open."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join()
        if self._worker is not None:
            self._worker.close()  # running handlers finish; queued jobs never run
        if self._committer is not None:
            with self._cond:
                unstarted = list(self._unstarted)
            self._give_back(unstarted)  # their jobs never run
            self._committer.close()

    def _kick(self) -> None:
        with self._cond:
            self._kick_locked()

    def _kick_locked(self) -> None:
        self._kicked = True
        self._cond.notify_all()

    def _dispatch_loop(self) -> None:
        renew_every = self._lease_ms / 3000
        next_renewal = next_sweep = 0.0
        while True:
            with self._cond:
                if self._closed:
                    return
                self._kicked = False
            try:
                mono = time.monotonic()
                if mono >= next_renewal:
                    self._maintain(sweep=mono >= next_sweep)
                    next_renewal = mono + renew_every
                    next_sweep = next_sweep if mono < next_sweep else mono + _SWEEP_EVERY_S
                _, wait_ms = self._claim_and_start()
            except Exception:
                log.exception("task dispatcher: pass failed; retrying")
                wait_ms = self._poll_ms
            wait_ms = min(wait_ms, max(0.0, next_renewal - time.monotonic()) * 1000)
            deadline = time.monotonic() + wait_ms / 1000
            with self._cond:  # woken by a kick or close, not by flush()'s notifications
                while not self._kicked and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def _maintain(self, sweep: bool) -> None:
        """Renews this runtime's leases, takes back expired ones in its
        queues and, with ``sweep``, deletes tasks past their retention."""
        self._abandon_overdue()
        now = self._now()
        with self._cond:
            held = sorted(self._held)
        renewed = self._store.renew_leases(self._owner, now + self._lease_ms, held)
        # The leases unstarted runs may count on; if any was lost, none is
        # trusted (their starts wait for their answers).
        ids = set(held) if renewed == len(held) else set()
        with self._cond:
            for attempt in self._unstarted:
                if attempt.task.id in ids:
                    attempt.lease_until = max(attempt.lease_until, now + self._lease_ms)
            queues = list(self._queues.values())
        for q in queues:
            recovered = self._store.recover(q.name, now=now,
                                            max_attempts=self._recovery_limit(q.config))
            if recovered:
                self._events.recovered(q.name, recovered, "lease expired")
            if sweep:
                self._store.sweep(q.name, now - q.config.retention_ms,
                                  now - q.config.failed_retention_ms)

    def _claim_and_start(self) -> Tuple[int, float]:
        """Claims due tasks up to each queue's free slots and starts them.
        Returns how many started and how long (ms) until more may be due."""
        mono = time.monotonic()
        self._shed_excess(mono)
        with self._cond:
            free = [(q, self._slots_locked(q, mono)) for q in self._queues.values()]
        started, wait_ms = 0, float(self._poll_ms)
        for queue, slots in free:
            if slots <= 0:
                continue  # a finishing handler kicks the dispatcher
            now = self._now()
            claimed = self._store.claim(queue.name, owner=self._owner, limit=slots, now=now,
                                        lease_ms=self._lease_ms, delay_ms=queue.config.delay_ms)
            self._start(queue, claimed, now + self._lease_ms)
            started += len(claimed)
            if len(claimed) < slots and not self._kicked:  # kicked: no sleep after this pass
                due = self._store.next_due(queue.name)
                if due is not None:
                    wait_ms = min(wait_ms, max(0, due - now))
        return started, wait_ms

    def _slots_locked(self, queue: _Queue, mono: float) -> int:
        """How many tasks to claim in ``queue`` now (under ``_cond``): up to
        its free slots plus its prefetch, but while every handler is busy
        only once half of that window is free, so that claims come in
        batches rather than one per finished task."""
        window = queue.config.concurrency + self._prefetch_of(queue, mono)
        free = window - queue.in_flight
        if queue.in_flight >= queue.config.concurrency and free * 2 < window:
            return 0
        return free

    def _prefetch_of(self, queue: _Queue, mono: float) -> int:
        """How many tasks the queue claims beyond its free slots: as set,
        or by default what it finishes in ``PREFETCH_HORIZON_S`` at its
        recent rate (at most ``PREFETCH_MAX``), and at least its
        concurrency."""
        if self._prefetch is not None:
            return self._prefetch
        queue.measure_rate(mono)
        return max(queue.config.concurrency,
                   min(PREFETCH_MAX, int(queue.rate * PREFETCH_HORIZON_S)))

    def _start(self, queue: _Queue, claimed: List[ClaimedTask], lease_until: int) -> None:
        """Hands the attempts of ``claimed`` to the queue's route, in claim
        order, each with its time limit (a registered task's own, else the
        route's)."""
        if not claimed:
            return
        assert self._worker is not None
        with self._cond:
            attempts = self._track_locked(queue, claimed, lease_until)
        calls, run_detached, route = self._calls, self._worker.run_detached, queue.route
        for i, attempt in enumerate(attempts):
            name = attempt.task.name  # a raw task (None) has no registered limit
            own = calls.timeout_ms(name) if calls is not None and name is not None else None
            try:
                if own is None:
                    run_detached(attempt, route=route)
                else:
                    attempt.timeout_ms = own
                    run_detached(attempt, route=route, timeout_ms=own)
            except Exception:
                self._give_back(attempts[i:])  # none of them will run
                if not self._closed:
                    raise
                return

    def _give_back(self, attempts: List[_Attempt]) -> None:
        """Releases claimed attempts whose jobs never run (those ``close``
        has not released already): pending again, no attempt counted."""
        assert self._committer is not None
        with self._cond:
            taken = [a for a in attempts if a in self._unstarted]
            self._unstarted.difference_update(taken)
        now = self._now()
        for attempt in taken:
            task = attempt.task
            self._committer.put(Outcome(task.id, task.token, "release", "", now))
        with self._cond:
            for attempt in taken:
                self._finished_locked(attempt, ran=False)

    def _shed_excess(self, mono: float) -> None:
        """Gives back (``_give_back``) the newest claimed tasks waiting
        beyond their queue's window once its oldest has waited
        ``SHED_AFTER_S``: after a burst of quick tasks the default prefetch
        may have claimed hundreds of slow ones, which other processes
        should run.  Looked at every ``_SHED_EVERY_S``."""
        if mono < self._next_shed:
            return
        self._next_shed = mono + _SHED_EVERY_S
        excess: List[_Attempt] = []
        with self._cond:
            if self._closed or not self._unstarted:
                return
            waiting: Dict[str, List[_Attempt]] = {}
            for attempt in self._unstarted:
                waiting.setdefault(attempt.queue.name, []).append(attempt)
            for attempts in waiting.values():
                queue = attempts[0].queue
                if mono - min(a.claimed for a in attempts) < SHED_AFTER_S:
                    continue
                running = queue.in_flight - len(attempts)
                keep = max(0, queue.config.concurrency + self._prefetch_of(queue, mono) - running)
                if len(attempts) > keep:
                    attempts.sort(key=lambda a: a.seq)
                    excess.extend(attempts[keep:])
        if excess:
            log.debug("gave back %d claimed task(s) waiting beyond their queues' windows",
                      len(excess))
            self._give_back(excess)

    def _run(self, attempt: _Attempt) -> None:
        """Runs one claimed task's handler (``_Attempt.run``, on a C thread)."""
        queue, task = attempt.queue, attempt.task
        with self._cond:
            if attempt not in self._unstarted:
                return  # given back unstarted (_shed_excess): its release is on its way
            self._unstarted.remove(attempt)
            closing = self._closed
            attempt.begun = begun = time.monotonic()
            if attempt.timeout_ms >= 0:
                attempt.started = begun
                self._started.add(attempt)
        if not closing:
            self._events.started(task.id, queue.name, task.name, task.attempt)
        outcome: Optional[Outcome] = None
        began = None if closing else self._begin(attempt)
        if began is False:  # the lease was lost: the task is someone else's now
            with self._cond:
                self._held.discard(task.id)
            self._settle(attempt, None)
            return
        try:
            if not began:  # close() has begun, or the start could not be recorded
                outcome = Outcome(task.id, task.token, "release", "", self._now())
            else:
                outcome = self._attempt(queue, task)
        except CallbackInterrupt:
            if attempt.timeout_ms >= 0:
                outcome = self._failure(queue, task, f"TimeoutError: the attempt ran past its "
                                                     f"time limit of {attempt.timeout_ms} ms "
                                                     "and was interrupted")
            raise
        finally:
            if outcome is None:  # interrupted by a BaseException
                outcome = self._failure(queue, task, "interrupted: the handler did not return")
            self._settle(attempt, outcome)

    def _begin(self, attempt: _Attempt) -> Optional[bool]:
        """Records the start of the attempt's run through the committer.
        Returns True at once, the start on its way in the next group
        commit; or, for a task marked ``confirm_start`` or a lease that may
        have run out (more than half of it gone), waits until the start is
        committed: True if it applied, False if the lease was lost, None if
        ``close`` gave up committing it (see ``GroupCommitter.start``)."""
        assert self._committer is not None
        task = attempt.task
        now = self._now()
        record = Outcome(task.id, task.token, "start", "", now,
                         lease_until=now + self._lease_ms)
        if not task.confirm_start and now < attempt.lease_until - self._lease_ms // 2:
            self._committer.put(record)
            return True
        began = self._committer.start(record)
        if began is False:  # it waited past its lease (not renewed before a start)
            log.info("task %s: its claim expired before its run started; not run here",
                     task.id)
        return began

    def _settle(self, attempt: _Attempt, outcome: Optional[Outcome]) -> None:
        """Hands the attempt's outcome (None: nothing to settle) to the
        committer and counts it out, once: the watchdog
        (``_abandon_overdue``) may have done it first.
        (An interrupt for a deadline that passed as the run ended may land
        here; the flag is set between the two steps, so whatever part ran,
        a later pass neither loses nor repeats the count.)"""
        assert self._committer is not None
        with self._cond:
            if attempt.settled:
                return
            if outcome is not None:
                self._committer.put(outcome)
            attempt.settled = True
            self._started.discard(attempt)
            self._finished_locked(attempt)
            # A kick still pending brings a pass anyway; else kick if that
            # pass would claim (if not, a later finish will).
            if not self._kicked and self._slots_locked(attempt.queue, time.monotonic()) > 0:
                self._kick_locked()
        if outcome is None:
            return  # the lease was lost before the run: nothing ran here
        task = attempt.task
        self._events.finished(task.id, attempt.queue.name, task.name, task.attempt, outcome.kind,
                              time.monotonic() - attempt.begun, outcome.message,
                              outcome.traceback)

    def _abandon_overdue(self) -> None:
        """Settles, as failed attempts, runs still going ``ABANDON_GRACE_S``
        past their time limit: the core has interrupted them, and a run that
        did not stop is stuck in C code, its thread abandoned and replaced.
        Whatever such a run does later is ignored."""
        now = time.monotonic()
        with self._cond:
            overdue = [a for a in self._started
                       if now - a.started > a.timeout_ms / 1000 + ABANDON_GRACE_S]
        for attempt in overdue:
            log.warning("task %s: its attempt %d is stuck past its time limit of %d ms; "
                        "abandoned", attempt.task.id, attempt.task.attempt, attempt.timeout_ms)
            self._settle(attempt, self._failure(
                attempt.queue, attempt.task,
                f"TimeoutError: the attempt ran past its time limit of {attempt.timeout_ms} "
                "ms and did not stop (stuck outside Python code); it was abandoned"))

    def _attempt(self, queue: _Queue, task: ClaimedTask) -> Outcome:
        view = memoryview(task.payload)
        _running.task = TaskContext(task.id, queue.name, task.attempt)
        _running.durable = None
        outcome: Outcome
        unwound = False  # by SuspendJob, as callback_result suspends
        reporter = ProgressReporter(
            task.id, lambda text: self._store.set_progress(task.id, task.token, text))
        try:
            with reporting(reporter):
                outcome = self._call(queue, task, view)
        except SuspendJob:
            unwound = True
            outcome = self._failure(queue, task, "SuspendJob: raised outside callback_result")
        except NoRetry as exc:
            outcome = Outcome(task.id, task.token, "fail", f"NoRetry: {exc.message}",
                              self._now(), traceback=traceback.format_exc())
        except Retry as exc:
            outcome = self._failure(queue, task, f"Retry: {exc}", exc.delay_ms,
                                    traceback.format_exc())
        except Exception as exc:
            outcome = self._failure(queue, task, f"{type(exc).__name__}: {exc}",
                                    tb=traceback.format_exc())
        finally:
            durable: Optional[DurableRun] = _running.durable
            _running.task = _running.durable = None
            try:
                view.release()
            except BufferError:
                pass  # the handler kept an export; the bytes stay valid anyway
        if durable is not None and durable.suspended_on is not None:
            if not unwound:  # the handler caught SuspendJob: the wait still stands
                log.warning("task %s: the handler went on after callback_result suspended it; "
                            "its outcome is ignored and the task stays suspended", task.id)
            return Outcome(task.id, task.token, "suspend", "", self._now(),
                           awaiting=durable.suspended_on)
        return outcome

    def _recovery_limit(self, config: QueueConfig) -> int:
        """The attempts a lost lease may use up in a queue before recovery
        fails its task: the queue's, or a registered task's if more."""
        retries = (self._calls.most_retries(config) if self._calls is not None
                   else config.max_retries)
        return retries + 1

    def _call(self, queue: _Queue, task: ClaimedTask, view: memoryview) -> Outcome:
        """Runs the task: a stored call through the registry, a raw payload
        through the queue's handler.  What they raise propagates."""
        if task.name is None:
            if queue.handler is None:
                return Outcome(task.id, task.token, "fail",
                               f"queue {queue.name!r} serves task functions only: a raw "
                               "payload needs a handler (create_queue)", self._now())
            message = queue.handler(view)
            if message is None:
                message = ""
            elif not isinstance(message, str):
                raise TypeError(f"the handler must return a str or None, "
                                f"not {type(message).__name__}")
            return Outcome(task.id, task.token, "complete", message, self._now())
        if self._calls is not None:
            retries, _ = self._calls.limits(task.name, queue.config)
            if task.attempt > retries + 1:  # recovery let it through for a longer limit
                return Outcome(task.id, task.token, "fail",
                               f"worker lost during attempt {task.attempt - 1}; "
                               f"no attempts left (max_retries={retries})", self._now())
        done = (self._calls.run(task) if self._calls is not None
                else CallResult(None, "this runtime runs no task functions"))
        if done.refusal is not None:
            return Outcome(task.id, task.token, "fail", done.refusal, self._now())
        return Outcome(task.id, task.token, "complete", "", self._now(), result=done.result)

    def _failure(self, queue: _Queue, task: ClaimedTask, text: str,
                 delay_ms: Optional[int] = None, tb: Optional[str] = None) -> Outcome:
        """A failed attempt: retried after ``delay_ms`` (None: the backoff)
        while retries are left, else failed; ``tb`` is its traceback."""
        now = self._now()
        retries, backoff_ms = (self._calls.limits(task.name, queue.config)
                               if self._calls is not None
                               else (queue.config.max_retries, queue.config.backoff_ms))
        if task.attempt <= retries:
            if delay_ms is None:
                delay_ms = retry_delay_ms(backoff_ms, task.attempt)
            return Outcome(task.id, task.token, "retry", text, now + delay_ms, traceback=tb)
        return Outcome(task.id, task.token, "fail", text, now, traceback=tb)

    def dispatch_once(self) -> int:
        """One full pass, synchronously: renews leases, recovers expired
        ones, sweeps retention, claims every due task that fits the free
        slots, runs them and commits their outcomes before returning.
        Returns how many tasks ran."""
        if self._worker is None:
            return 0
        self._maintain(sweep=True)
        started, _ = self._claim_and_start()
        self.flush()
        return started
