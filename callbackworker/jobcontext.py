"""Inside a callback: ``current_job()``, progress reports and the response store.

A callback asks ``current_job()`` about the job it runs (id, route, attempt,
deadline, whether ``cancel()`` was called on it) and reports progress with
``current_job().progress(data)``.

Progress is tracked for jobs started with ``on_progress``, ``store_response``
or ``callback_data``:

* ``on_progress(job_id, data)`` is called for every update, synchronously, on
  the worker thread that runs the job (inside ``progress()``), so it should
  be quick; an exception it raises propagates into the callback.
* ``Worker.progress(job_id)`` returns the latest update.
* With ``store_response=True``, ``Worker.query(job_id)`` returns
  ``callback_data`` merged with every dict update, in order, later keys
  overriding earlier ones.  Without it, ``query`` returns ``callback_data``
  alone.  Updates that are not dicts are reported and kept as the latest,
  but not merged.

The store lives as long as the job: ``wait``/``take`` destroy both.  Jobs
started without these options carry no progress state and cost nothing
extra; their ``progress()`` calls are accepted and dropped.

A tracked job's state is registered under a tag before the job exists; the
core stores the tag with the job (``cbw_run.tag``), and ``progress()`` finds
the state through the core's record of the calling thread's running job.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, TypeVar

from ._native import current_table, ffi, lib
from ._validate import check_bool, check_callable, check_count, check_durable_name
from .errors import CallbackWorkerError

if TYPE_CHECKING:
    from .durable import CallbackHandle, DurableRun

T = TypeVar("T")

__all__ = ["JobContext", "current_job", "ProgressState"]

ProgressCallback = Callable[[int, Any], Any]

STATES: Dict[int, "ProgressState"] = {}
"""Progress state of every tracked job, by tag (unique in the process)."""
_tags = itertools.count(1)


def register(state: "ProgressState") -> int:
    """Files a tracked job's state before the job is started; returns the
    tag to start it with."""
    tag = next(_tags)
    STATES[tag] = state
    return tag


class ProgressState:
    """What one job's progress reports go to."""

    __slots__ = ("on_progress", "store", "merged", "latest")

    def __init__(self, on_progress: Optional[ProgressCallback], store: bool,
                 callback_data: Optional[Dict[str, Any]]) -> None:
        self.on_progress = on_progress
        self.store = store
        self.merged: Dict[str, Any] = dict(callback_data or {})
        self.latest: Any = None

    def report(self, job_id: int, data: Any) -> None:
        self.latest = data
        if self.store and isinstance(data, dict):
            self.merged.update(data)
        if self.on_progress is not None:
            self.on_progress(job_id, data)

    def snapshot(self) -> Dict[str, Any]:
        return dict(self.merged)


def progress_state(on_progress: object, store_response: object,
                   callback_data: object) -> Optional[ProgressState]:
    """Checks the progress options of a start; None when none is used."""
    if on_progress is not None:
        check_callable(on_progress, "on_progress")
    check_bool(store_response, "store_response")
    if callback_data is not None and not isinstance(callback_data, dict):
        raise TypeError(f"callback_data must be a dict, not {type(callback_data).__name__}")
    if on_progress is None and not store_response and callback_data is None:
        return None
    return ProgressState(on_progress, store_response, callback_data)  # type: ignore[arg-type]


class JobContext:
    """The job the calling callback runs.  Obtained from ``current_job()``."""

    __slots__ = ("id", "route", "attempt", "deadline", "timeout_ms")

    def __init__(self, run: Any) -> None:
        self.id: int = int(run.id)
        """The job id."""
        self.route: int = int(run.route)
        """The route id (1 is the default route), as ``job_meta(ROUTE)``."""
        self.attempt: int = int(run.attempt)
        """1 for the first run of the job."""
        self.timeout_ms: int = int(run.timeout_ms)
        self.deadline: Optional[float] = (
            None if run.timeout_ms < 0 else run.deadline_ns / 1e9)
        """When the run-time limit passes, in ``time.monotonic()`` seconds,
        or None without a limit."""

    @property
    def cancel_requested(self) -> bool:
        """True once ``cancel()`` was called on this (running) job.  Cancel
        cannot stop a running callback; a long one should look at this and
        return early."""
        if _current_id() != self.id:
            return False
        return bool(lib.cbw_current_cancel_requested())

    def progress(self, data: Any) -> None:
        """Reports progress: ``on_progress(job_id, data)`` runs now, on this
        thread; ``Worker.progress(job_id)`` returns ``data`` from now on; a
        dict is merged into the response store when the job was started
        with ``store_response=True``."""
        run = lib.cbw_current_run()
        if run == ffi.NULL or run.id != self.id:
            raise CallbackWorkerError(
                f"progress() for job {self.id} called outside that job's callback")
        state = STATES.get(run.tag) if run.tag else None
        if state is not None:
            state.report(self.id, data)

    # ---- durable operations (see callbackworker.durable) ------------

    def _durable(self) -> "DurableRun":
        run = lib.cbw_current_run()
        if run == ffi.NULL or run.id != self.id:
            raise CallbackWorkerError(
                f"durable operations of job {self.id} must run inside that job's callback")
        table = current_table()
        if table is None or table.durable is None:
            raise CallbackWorkerError("the job's worker has no durable backend")
        return table.durable.run_for(int(run.id), int(run.attempt),
                                     lambda: bytes(ffi.buffer(run.data, run.size)))

    def create_callback(self, name: str, timeout_ms: int = 0,
                        heartbeat_timeout_ms: int = 0) -> "CallbackHandle":
        """Records an external callback and returns its handle; never
        suspends.  ``timeout_ms``: the callback times out that long after it
        was created unless signalled; ``heartbeat_timeout_ms``: a heartbeat
        must arrive within each such interval (0: no limit for either)."""
        run = self._durable()
        return run.create_callback(check_durable_name(name), check_count(timeout_ms, "timeout_ms"),
                                   check_count(heartbeat_timeout_ms, "heartbeat_timeout_ms"))

    def callback_result(self, handle: "CallbackHandle") -> bytes:
        """The callback's result once signalled with success; raises
        ``CallbackFailedError`` / ``CallbackTimeoutError``; otherwise
        suspends this job until it is signalled or times out (the job is
        then run again from the start, earlier operations answered from
        its log)."""
        return self._durable().callback_result(handle)

    def step(self, name: str, fn: Callable[[], T]) -> T:
        """Runs ``fn()`` once and records its value; a replay of this job
        returns the recorded value without calling ``fn``."""
        run = self._durable()
        name = check_durable_name(name)
        check_callable(fn, "fn")
        return run.step(name, fn)

    def __repr__(self) -> str:
        return (f"<JobContext id={self.id} route={self.route} attempt={self.attempt} "
                f"deadline={self.deadline}>")


def _current_id() -> int:
    run = lib.cbw_current_run()
    return 0 if run == ffi.NULL else int(run.id)


def current_job() -> JobContext:
    """The job the calling callback runs.  Raises ``CallbackWorkerError``
    outside a callback."""
    run = lib.cbw_current_run()
    if run == ffi.NULL:
        raise CallbackWorkerError("current_job() called outside a callback")
    return JobContext(run)
