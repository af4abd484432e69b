"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import Iterator

import pytest

from callbackworker import Worker


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A fresh Worker, closed after the test."""
    w = Worker()
    try:
        yield w
    finally:
        w.close()
