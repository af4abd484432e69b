"""Every exception callbackworker raises.

``CallbackWorkerError`` is the base.  Several classes also derive from the
built-in a caller would naturally catch (``KeyError`` for an unknown id,
``TimeoutError`` for timeouts, ``RuntimeError`` for a closed worker), so
generic code keeps working.  Wrong argument types raise plain ``TypeError``;
values out of range raise plain ``ValueError``.
"""

from __future__ import annotations

from typing import Optional

from .states import Status

__all__ = [
    "CallbackInterrupt",
    "CallbackWorkerError",
    "UnknownJobError",
    "JobNotCompleteError",
    "JobFailedError",
    "JobTimeoutError",
    "JobCancelledError",
    "ShutdownError",
    "WaitTimeoutError",
    "WorkerClosedError",
    "DeadlockError",
    "UnknownRouteError",
    "RouteClosedError",
    "DurableError",
    "CallbackFailedError",
    "CallbackTimeoutError",
    "UnknownCallbackError",
    "CallbackAlreadyCompletedError",
    "NonDeterminismError",
    "TaskError",
    "UnknownTaskError",
    "UnknownQueueError",
    "QueueExistsError",
    "TaskNotCancellableError",
    "TaskNotRetryableError",
    "ServiceClosedError",
    "StorageBusyError",
    "TaskFailedError",
    "TaskCancelledError",
    "Retry",
    "NoRetry",
]


class CallbackInterrupt(BaseException):
    """Raised inside a callback that ran past its run-time limit (or whose
    worker is shutting down at interpreter exit).  It derives from
    ``BaseException`` so that ``except Exception`` in user code lets it pass.
    The job has already completed with ``Status.TIMEOUT``; whatever the
    callback does afterwards is discarded."""


class CallbackWorkerError(Exception):
    """Base class of every callbackworker error."""


class _LookupFailure(KeyError):
    """A ``KeyError`` whose message reads as a sentence: ``KeyError`` itself
    would print it quoted."""

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownJobError(CallbackWorkerError, _LookupFailure):
    """The job id was never issued by this worker, or the job was destroyed
    (by ``wait``, ``take`` or ``take_blob``)."""

    def __init__(self, job_id: object) -> None:
        super().__init__(f"unknown job id {job_id!r}: never issued or already destroyed")
        self.job_id = job_id


class JobNotCompleteError(CallbackWorkerError):
    """``take``/``take_blob``/``job_blob_result_size`` on a job that has not
    completed yet.  The job is untouched."""


class JobFailedError(CallbackWorkerError):
    """The job completed without success.

    ``status`` is the job's ``Status``; ``error_text`` the worker's
    description.  When the callback raised, ``__cause__`` is that exception,
    with its traceback.
    """

    def __init__(self, job_id: int, status: int, error_text: str) -> None:
        super().__init__(f"job {job_id} {_STATUS_WORDS.get(status, 'failed')}: {error_text}")
        self.job_id = job_id
        self.status = status
        self.error_text = error_text


class JobTimeoutError(JobFailedError, TimeoutError):
    """The callback ran past its run-time limit (``timeout_ms`` at start)."""


class JobCancelledError(JobFailedError):
    """The job was cancelled before it started."""


class ShutdownError(JobFailedError):
    """The worker was closed before the job could finish, or while a caller
    was waiting for it."""


class WaitTimeoutError(CallbackWorkerError, TimeoutError):
    """A wait ran out of time.  The job is untouched and may be waited for
    again."""


class WorkerClosedError(CallbackWorkerError, RuntimeError):
    """The worker has been closed: no verb but ``close`` works any more."""


class DeadlockError(CallbackWorkerError, RuntimeError):
    """The call could never return: a callback waited for its own job, or for
    a job queued behind it on its own route with no other thread free to run
    it, or asked to drain the worker it runs on."""


class UnknownRouteError(CallbackWorkerError, _LookupFailure):
    """No route with that name exists on this worker."""

    def __init__(self, name: object) -> None:
        super().__init__(f"unknown route {name!r}")
        self.route = name


class RouteClosedError(CallbackWorkerError):
    """The route was closed with ``close_route`` and accepts no new jobs."""


class DurableError(CallbackWorkerError):
    """Base class of the durable external callbacks' errors."""


class CallbackFailedError(DurableError):
    """``callback_result``: the outside system signalled failure.
    ``.error`` is the text it sent."""

    def __init__(self, callback_id: str, error: str) -> None:
        super().__init__(f"callback {callback_id} failed: {error}")
        self.callback_id = callback_id
        self.error = error


class CallbackTimeoutError(DurableError, TimeoutError):
    """``callback_result``: the callback was not signalled within its
    ``timeout_ms``, or a heartbeat did not arrive within its
    ``heartbeat_timeout_ms`` (``.reason`` is ``"timeout"`` or
    ``"heartbeat"``)."""

    def __init__(self, callback_id: str, reason: str) -> None:
        what = "no heartbeat arrived in time" if reason == "heartbeat" else "it was not signalled in time"
        super().__init__(f"callback {callback_id} timed out: {what}")
        self.callback_id = callback_id
        self.reason = reason


class UnknownCallbackError(DurableError, _LookupFailure):
    """No callback with that id exists (malformed, never issued, or
    forgotten)."""

    def __init__(self, callback_id: object) -> None:
        super().__init__(f"unknown callback id {callback_id!r}")
        self.callback_id = callback_id


class CallbackAlreadyCompletedError(DurableError):
    """A signal for a callback that can take none any more: it already
    succeeded or failed (a duplicate signal is rejected, never applied
    twice), timed out, or its job ended.  ``.state`` says which:
    ``"succeeded"``, ``"failed"``, ``"timed_out"`` or ``"closed"``."""

    def __init__(self, callback_id: str, state: str) -> None:
        why = {
            "succeeded": "it has already succeeded",
            "failed": "it has already failed",
            "timed_out": "it has timed out",
            "closed": "its job has ended",
        }.get(state, f"its state is {state!r}")
        super().__init__(f"callback {callback_id} takes no more signals: {why}")
        self.callback_id = callback_id
        self.state = state


class NonDeterminismError(DurableError):
    """A replayed job issued its durable operations in a different order (or
    with different names) than the run that recorded them.  Durable jobs
    must make the same calls, in the same order, every time they run."""


class TaskError(CallbackWorkerError):
    """Base class of the persistent task queues' errors (``TaskService``)."""


class UnknownTaskError(TaskError, _LookupFailure):
    """No task with that id exists: it was never enqueued, or retention
    deleted it."""

    def __init__(self, task_id: object) -> None:
        super().__init__(f"unknown task id {task_id!r}: never enqueued or already swept")
        self.task_id = task_id


class UnknownQueueError(TaskError, _LookupFailure):
    """No queue with that name exists in the task database."""

    def __init__(self, name: object) -> None:
        super().__init__(f"unknown queue {name!r}: no service has created it in this database")
        self.queue = name


class QueueExistsError(TaskError, ValueError):
    """``create_queue`` for a name this service already created."""


class TaskNotCancellableError(TaskError):
    """``cancel`` on a task that is neither pending nor suspended; ``.status`` says what it is
    (``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``)."""

    def __init__(self, task_id: str, status: str) -> None:
        reason = {
            "running": "it is running (only pending and suspended tasks can be cancelled)",
            "completed": "it has already completed",
            "failed": "it has already failed",
            "cancelled": "it was already cancelled",
        }.get(status, f"its status is {status!r}")
        super().__init__(f"cannot cancel task {task_id!r}: {reason}")
        self.task_id = task_id
        self.status = status


class TaskNotRetryableError(TaskError):
    """``retry_task`` on a task that is neither failed nor cancelled (``.status`` says what
    it is), or whose ``dedup_key`` an unfinished task holds now (``.holder``, that task's
    id, or "" when it could not be read)."""

    def __init__(self, task_id: str, status: str, holder: "str | None" = None) -> None:
        if holder is not None:
            holding = f"task {holder!r}" if holder else "another task"
            reason = (f"{holding} of its queue holds its dedup_key and is not finished "
                      "(wait for it, or cancel it)")
        else:
            reason = {
                "pending": "it is pending already",
                "running": "it is running",
                "suspended": "it is suspended, waiting for a callback",
                "completed": "it completed (only failed and cancelled tasks can be retried)",
            }.get(status, f"its status is {status!r}")
        super().__init__(f"cannot retry task {task_id!r}: {reason}")
        self.task_id = task_id
        self.status = status
        self.holder = holder


class ServiceClosedError(TaskError, RuntimeError):
    """The ``TaskService`` or ``TaskClient`` has been closed: no verb but
    ``close`` works any more."""


class StorageBusyError(TaskError, TimeoutError):
    """The task database stayed locked by other connections for longer than
    the store's patience (transient contention is retried, never raised)."""


class TaskFailedError(TaskError):
    """``TaskService.result`` of a task that failed: ``.message`` is the
    last attempt's error (``"ExcType: message"``), ``.traceback`` its
    formatted traceback (None when there is none, e.g. a lost worker) and
    ``.attempt`` how many attempts ran."""

    def __init__(self, task_id: str, message: str, traceback: Optional[str],
                 attempt: int) -> None:
        super().__init__(f"task {task_id!r} failed after {attempt} attempt"
                         f"{'' if attempt == 1 else 's'}: {message}")
        self.task_id = task_id
        self.message = message
        self.traceback = traceback
        self.attempt = attempt


class TaskCancelledError(TaskError):
    """``TaskService.result`` of a task that was cancelled."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} was cancelled")
        self.task_id = task_id


class Retry(CallbackWorkerError):
    """Raised by a task function to run it again after ``delay_ms`` (None:
    the task's backoff).  It counts as a failed attempt: once the task's
    ``max_retries`` are used up, the task fails instead.  Raise it ``from``
    the exception that caused it to keep that in the stored traceback."""

    def __init__(self, delay_ms: Optional[int] = None) -> None:
        if delay_ms is not None:
            if type(delay_ms) is not int:
                raise TypeError(f"delay_ms must be an int or None, not {type(delay_ms).__name__}")
            if not 0 <= delay_ms <= 604_800_000:
                raise ValueError(f"delay_ms must be between 0 and 604800000, not {delay_ms}")
        super().__init__("retry requested" if delay_ms is None
                         else f"retry requested in {delay_ms} ms")
        self.delay_ms = delay_ms


class NoRetry(CallbackWorkerError):
    """Raised by a task function to fail its task at once, whatever retries
    are left; ``message`` becomes the task's error message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_STATUS_WORDS = {
    Status.ERROR: "failed",
    Status.TIMEOUT: "timed out",
    Status.SHUTDOWN: "was shut down",
    Status.CANCELLED: "was cancelled",
}


def failure_for_status(job_id: int, status: int, error_text: str,
                       cause: Optional[BaseException] = None) -> JobFailedError:
    """The exception a failed job raises from ``wait``/``take``."""
    cls = _FAILURE_CLASSES.get(status, JobFailedError)
    err = cls(job_id, status, error_text)
    if cause is not None:
        err.__cause__ = cause
    return err


_FAILURE_CLASSES = {
    Status.TIMEOUT: JobTimeoutError,
    Status.SHUTDOWN: ShutdownError,
    Status.CANCELLED: JobCancelledError,
}
