"""Checks of the core's heap shared by the leak and fault-injection tests.

The core counts its live allocations process-wide (lib.cbw_live_allocations),
so these tests need every other worker closed and the count at rest.
"""

from __future__ import annotations

import gc
import time
from typing import Callable, List

from callbackworker import _default
from callbackworker import _lifecycle
from callbackworker._native import lib
from callbackworker.worker import Worker

def other_open_workers() -> List[Worker]:
    default = _default._worker
    return [w for w in list(_lifecycle.live_workers) if w is not default]


def stable_count() -> int:
    """The live block count once it has stopped moving for a moment: a worker
    of an earlier test may still be freed by a thread it abandoned (that
    thread frees the worker when its callback finally returns)."""
    deadline = time.monotonic() + 5.0
    last, since = int(lib.cbw_live_allocations()), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.2:
        time.sleep(0.02)
        now = int(lib.cbw_live_allocations())
        if now != last:
            last, since = now, time.monotonic()
    return last


def quiet_baseline() -> int:
    gc.collect()
    others = other_open_workers()
    assert not others, (
        f"{len(others)} other worker(s) open: the allocation count is global, and "
        "their allocations would consume an injected failure")
    return stable_count()


SETTLE_S = 10.0  # bound for things that settle on another thread


def settle(predicate: Callable[[], bool]) -> bool:
    """True once predicate() holds, polling for up to SETTLE_S seconds."""
    deadline = time.monotonic() + SETTLE_S
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(0.005)
    return True
