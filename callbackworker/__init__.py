"""callbackworker: a C-accelerated job runner for Python.

A job is a Python callback plus an input blob.  A small C core runs jobs on
its own threads and calls back into Python only to run callbacks; callers
query a job's phase, status and metadata in the asyncmeta vocabulary, wait
for it, take its result or cancel it::

    import callbackworker

    def shout(request: memoryview) -> None:
        request[:] = bytes(request).upper()

    with callbackworker.Worker() as w:
        job = w.start(shout, b"hello", timeout_ms=5000)
        print(w.wait(job))          # b'HELLO'

The module-level functions (``callbackworker.start``, ``callbackworker.wait``,
...) act on a default worker created on first use.
"""

from __future__ import annotations

# First, before anything loads the compiled module: importing _gilcheck
# refuses a free-threaded interpreter running without the GIL.
from . import _gilcheck  # noqa: F401
from . import asyncmeta
from ._default import FUNCTIONS as _FUNCTIONS
from ._default import default_worker
from .asyncmeta import (
    STATUS_PENDING,
    Capability,
    JobMetaKey,
    Phase,
    Profile,
    RouteMetaKey,
    RouteState,
)
from .durable import CallbackHandle
from .errors import (
    CallbackAlreadyCompletedError,
    CallbackFailedError,
    CallbackInterrupt,
    CallbackTimeoutError,
    CallbackWorkerError,
    DeadlockError,
    JobCancelledError,
    JobFailedError,
    JobNotCompleteError,
    JobTimeoutError,
    NonDeterminismError,
    NoRetry,
    QueueExistsError,
    Retry,
    RouteClosedError,
    ServiceClosedError,
    ShutdownError,
    StorageBusyError,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskNotCancellableError,
    TaskNotRetryableError,
    UnknownCallbackError,
    UnknownJobError,
    UnknownQueueError,
    UnknownRouteError,
    UnknownTaskError,
    WaitTimeoutError,
    WorkerClosedError,
)
from .executor import Executor
from .jobcontext import JobContext, current_job
from .states import State, Status
from .tasks import QueueConfig, Task, TaskClient, TaskInfo, TaskService, current_task
from .worker import Worker, WorkItem

__version__ = "0.1.0"

start = _FUNCTIONS["start"]
start_text = _FUNCTIONS["start_text"]
start_many = _FUNCTIONS["start_many"]
wait = _FUNCTIONS["wait"]
wait_many = _FUNCTIONS["wait_many"]
wait_complete = _FUNCTIONS["wait_complete"]
take = _FUNCTIONS["take"]
take_blob = _FUNCTIONS["take_blob"]
cancel = _FUNCTIONS["cancel"]
phase = _FUNCTIONS["phase"]
phase_text = _FUNCTIONS["phase_text"]
status = _FUNCTIONS["status"]
status_text = _FUNCTIONS["status_text"]
state = _FUNCTIONS["state"]
error_text = _FUNCTIONS["error_text"]
job_known = _FUNCTIONS["job_known"]
job_timeout = _FUNCTIONS["job_timeout"]
job_has_blob_result = _FUNCTIONS["job_has_blob_result"]
job_blob_result_size = _FUNCTIONS["job_blob_result_size"]
job_meta = _FUNCTIONS["job_meta"]
info = _FUNCTIONS["info"]
capabilities = _FUNCTIONS["capabilities"]
close = _FUNCTIONS["close"]
open_route = _FUNCTIONS["open_route"]
close_route = _FUNCTIONS["close_route"]
wait_drained = _FUNCTIONS["wait_drained"]
route_meta = _FUNCTIONS["route_meta"]
route_info = _FUNCTIONS["route_info"]
progress = _FUNCTIONS["progress"]
query = _FUNCTIONS["query"]

__all__ = [
    "Worker", "WorkItem", "CallbackInterrupt", "Executor", "default_worker", "asyncmeta", "current_job", "JobContext",
    "Phase", "Status", "State", "STATUS_PENDING", "Capability", "Profile", "RouteState",
    "JobMetaKey", "RouteMetaKey",
    "CallbackWorkerError", "UnknownJobError", "JobNotCompleteError", "JobFailedError",
    "JobTimeoutError", "JobCancelledError", "ShutdownError", "WaitTimeoutError",
    "WorkerClosedError", "DeadlockError", "UnknownRouteError", "RouteClosedError",
    "TaskService", "TaskClient", "QueueConfig", "TaskInfo", "TaskError", "UnknownTaskError",
    "UnknownQueueError", "QueueExistsError", "TaskNotCancellableError", "TaskNotRetryableError", "ServiceClosedError",
    "StorageBusyError", "Task", "current_task", "TaskFailedError", "TaskCancelledError", "Retry",
    "NoRetry",
    "CallbackHandle", "CallbackFailedError", "CallbackTimeoutError", "UnknownCallbackError",
    "CallbackAlreadyCompletedError", "NonDeterminismError",
    *_FUNCTIONS,
]
