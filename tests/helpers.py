"""Small helpers the test modules share."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Callable


class FakeClock:
    """Milliseconds that move only when a test says so (a ``TaskService``
    ``clock``)."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Returns once ``predicate()`` holds, polling every 2 ms; fails the
    test after ``timeout_s``.  For states reached on other threads, never
    to wait for time to pass."""
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.002)):
        if predicate():
            return
        pause.wait(0.002)
    raise AssertionError("condition not reached in time")


def epoch_ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 time with its offset, such as
    ``"2026-03-29T01:00:00+00:00"`` (for tests of exact tick times)."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)
