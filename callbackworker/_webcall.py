"""How the HTTP endpoint and the dashboard call the task store.

A request handler runs each store call on a worker thread (the store
blocks) under ``bounded_patience(REQUEST_PATIENCE_S)``: while the database
is unreachable or stays locked, the request fails after a few seconds with
503 and ``Retry-After: RETRY_AFTER_S`` instead of waiting out the store's
own patience (a minute, meant for workers, which should ride out a
restart).  The bound lives in a context variable set on that worker thread
for that call only, so the store's other users keep their patience.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from starlette.concurrency import run_in_threadpool

from .tasks.sql import bounded_patience

__all__ = ["REQUEST_PATIENCE_S", "RETRY_AFTER_S", "call_store"]

T = TypeVar("T")

REQUEST_PATIENCE_S = 3.0
"""How long one HTTP request's store call keeps retrying a database that
is down or locked before the request is answered with 503."""

RETRY_AFTER_S = 5
"""The ``Retry-After`` (seconds) of a 503 answer."""


def _bounded(fn: Callable[..., T], *args: Any) -> T:
    with bounded_patience(REQUEST_PATIENCE_S):
        return fn(*args)


async def call_store(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread, its store calls giving up after
    ``REQUEST_PATIENCE_S`` (``StorageBusyError``)."""
    return await run_in_threadpool(_bounded, fn, *args)
