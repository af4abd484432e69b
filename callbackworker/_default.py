"""Module-level verbs acting on one lazily created default worker, mirroring
the reference's plugin-level functions (``callbackworker.start(...)``,
``callbackworker.close()``...).  As in the reference, once ``close()`` has
been called every other verb raises ``WorkerClosedError``; a forked child
gets a fresh default worker."""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from . import _lifecycle
from .worker import Worker

_lock = threading.Lock()
_worker: Optional[Worker] = None


def default_worker() -> Worker:
    """The default worker, created on first use."""
    global _worker
    w = _worker
    if w is None:
        with _lock:
            if _worker is None:
                _worker = Worker()
            w = _worker
    return w


def _forward(name: str) -> Callable[..., Any]:
    method = getattr(Worker, name)

    def verb(*args: Any, **kwargs: Any) -> Any:
        return getattr(default_worker(), name)(*args, **kwargs)

    verb.__name__ = verb.__qualname__ = name
    verb.__doc__ = f"``Worker.{name}`` on the default worker.\n\n{method.__doc__ or ''}"
    return verb


VERBS = (
    "start", "start_text", "start_many", "wait", "wait_many", "wait_complete", "take",
    "take_blob", "cancel", "phase", "phase_text", "status", "status_text", "state", "error_text",
    "job_known", "job_timeout", "job_has_blob_result", "job_blob_result_size", "job_meta",
    "info", "capabilities", "close", "open_route", "close_route", "wait_drained",
    "route_meta", "route_info", "progress", "query",
)

FUNCTIONS = {name: _forward(name) for name in VERBS}


def _reset_in_child() -> None:
    global _lock
    _lock = threading.Lock()


_lifecycle.on_fork_in_child(_reset_in_child)
