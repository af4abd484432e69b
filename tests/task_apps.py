"""App modules for ``callbackworker worker --app`` in the subprocess tests.

Every run of a handler appends one line to the file ``CBW_TASK_LOG`` names,
with a single ``O_APPEND`` write (whole lines survive the process being
killed): ``<event> <task id> <attempt> <pid>``.
"""

from __future__ import annotations

import os
import random
import time

from callbackworker import QueueConfig, TaskService
from callbackworker.tasks import current_task

_log_fd = os.open(os.environ.get("CBW_TASK_LOG", os.devnull),
                  os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _log(event: str) -> int:
    task = current_task()
    assert task is not None
    os.write(_log_fd, f"{event} {task.id} {task.attempt} {os.getpid()}\n".encode())
    return task.attempt


def churn(payload: memoryview) -> str:
    """A short task; payloads starting with b"fail" always fail."""
    attempt = _log("run")
    time.sleep(random.random() * 0.004)
    if bytes(payload[:4]) == b"fail":
        raise RuntimeError("asked to fail")
    return f"done {attempt}"


def crash(service: TaskService) -> None:
    service.create_queue("crash", QueueConfig(concurrency=8, max_retries=2, backoff_ms=0),
                         handler=churn)


def bracketed(payload: memoryview) -> str:
    """Logs its start and end, so overlapping runs of one task show."""
    _log("start")
    time.sleep(random.random() * 0.002)
    _log("end")
    return "ok"


shared = {"shared": {"handler": bracketed, "concurrency": 4}}


def slow(payload: memoryview) -> str:
    _log("start")
    time.sleep(float(bytes(payload) or b"0"))
    _log("end")
    return "slept"


one_at_a_time = {"slow": slow}


slow_retrying = {"slow": {"handler": slow, "max_retries": 2, "backoff_ms": 0}}


def busy(payload: memoryview) -> str:
    """Holds its worker's only slot for longer than two start gaps, so the
    next starts must go to other workers."""
    _log("start")
    time.sleep(0.4)
    _log("end")
    return "ok"


spaced = {"spaced": {"handler": busy, "concurrency": 1, "delay_ms": 150}}
