"""The route verbs of ``Worker``: open, close, drain and describe routes.

A route is a named FIFO queue with its own threads, run-time limit, retry
policy and rate limit, all kept by the C core; the worker remembers each
route's id by name.  ``Worker`` inherits these methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ._native import ffi, lib, raise_for
from ._validate import check_concurrency, check_count, check_key, check_route_name, check_timeout
from .asyncmeta import RouteMetaKey, RouteState
from .errors import WorkerClosedError

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["RouteVerbs"]


class RouteVerbs:
    """The route half of ``Worker``."""

    def _route_id(self: "Worker", route: str) -> int:
        rid = self._routes.get(route) if type(route) is str else None
        if rid is None:
            rid = lib.cbw_route_find(self._w, check_route_name(route))
            if rid < 0:
                raise_for(rid, route)
            self._routes[route] = rid
        return rid

    def open_route(self: "Worker", name: str, *, concurrency: int = 1, timeout_ms: int = -1,
                   max_retries: int = 0, backoff_ms: int = 1000, delay_ms: int = 0) -> int:
        """Adds a named FIFO route and returns its id.

        ``concurrency`` threads run its jobs; ``timeout_ms`` is the run-time
        limit of jobs started on it without one.  A job whose callback
        raises is run again, from a fresh copy of its original request, up
        to ``max_retries`` more times: attempt n + 1 starts
        ``backoff_ms * 2**(n-1)`` ms (at most one hour) after attempt n
        failed, meanwhile the job is pending and its waiters keep waiting.
        Only the last attempt's error is reported.  A timed-out, cancelled
        or shut-down job is not retried.  ``delay_ms`` is the least time
        between two consecutive starts on the route (a rate limit, across
        all its threads).  Retry and delay timers live in the C core.
        """
        raw = check_route_name(name)
        concurrency = check_concurrency(concurrency)
        config = ffi.new("cbw_route_config *")
        config.concurrency = concurrency
        config.timeout_ms = check_timeout(timeout_ms)
        config.max_retries = check_count(max_retries, "max_retries")
        config.backoff_ms = check_count(backoff_ms, "backoff_ms")
        config.delay_ms = check_count(delay_ms, "delay_ms")
        self._check_open()
        rid = lib.cbw_route_open_config(self._w, raw, config)
        if rid < 0:
            raise_for(rid, name)
        self._routes[name] = rid
        return rid

    def advance_clock(self: "Worker", ms: int) -> None:
        """Moves the route clock of a worker made with ``manual_clock=True``
        forward by ``ms`` milliseconds (for tests of retry backoff and
        ``delay_ms`` without sleeping).  Retries that fall due are queued
        before this returns.  Run-time limits always use the real clock."""
        ms = check_count(ms, "ms")
        if not self._manual_clock:
            raise RuntimeError("advance_clock() needs a Worker(manual_clock=True)")
        self._check_open()
        rc = lib.cbw_worker_advance_clock(self._w, ms)
        if rc < 0:
            raise_for(rc)

    def close_route(self: "Worker", name: str) -> bool:
        """Stops the route accepting jobs (queued and running ones finish);
        True if it was open."""
        self._check_open()
        rc = lib.cbw_route_close(self._w, self._route_id(name))
        if rc < 0:
            raise_for(rc, name)
        return rc == 1

    def wait_drained(self: "Worker", name: str, timeout_ms: int = -1) -> bool:
        """Blocks until the route has no queued or running job; False if
        ``timeout_ms`` passed first."""
        timeout_ms = check_timeout(timeout_ms)
        self._check_open()
        rid = self._route_id(name)
        rc = self._blocking(lib.cbw_route_wait_drained, rid, timeout_ms, timed_out=0)
        if rc == lib.CBW_ESHUTDOWN:
            raise WorkerClosedError(f"the worker was closed while waiting for route "
                                    f"{name!r} to drain")
        if rc < 0:
            raise_for(rc, name)
        return rc == 1

    def _route_info(self: "Worker", name: str) -> Any:
        self._check_open()
        out = ffi.new("cbw_route_info *")
        rc = lib.cbw_route_info_get(self._w, self._route_id(name), out)
        if rc < 0:
            raise_for(rc, name)
        return out

    def route_meta(self: "Worker", name: str, key: int) -> int:
        """One route field by ``RouteMetaKey``; ``KNOWN`` gives 0 for an
        unknown route, other keys raise ``UnknownRouteError``."""
        key = check_key(key, RouteMetaKey)
        if key is RouteMetaKey.KNOWN:
            raw = check_route_name(name)
            self._check_open()
            return int(name in self._routes or lib.cbw_route_find(self._w, raw) > 0)
        r = self._route_info(name)
        busy = r.queued + r.delayed + r.running
        return int({
            RouteMetaKey.STATE: r.state,
            RouteMetaKey.TIMEOUT: r.timeout_ms,
            RouteMetaKey.PENDING: r.queued + r.delayed,
            RouteMetaKey.QUEUED: r.queued,
            RouteMetaKey.RUNNING: r.running,
            RouteMetaKey.DRAINED: busy == 0,
            RouteMetaKey.CLOSE_ACCEPTED: r.close_accepted,
            RouteMetaKey.CLOSED_QUEUED: r.state == RouteState.CLOSED and busy > 0,
        }[key])

    def route_info(self: "Worker", name: str) -> str:
        """One line of ``key=value`` pairs describing the route."""
        r = self._route_info(name)
        state = "open" if r.state == RouteState.OPEN else "closed"
        return (f"id={r.id} name={quote(name, safe='')} state={state} "
                f"concurrency={r.concurrency} timeout_ms={r.timeout_ms} "
                f"max_retries={r.max_retries} backoff_ms={r.backoff_ms} "
                f"delay_ms={r.delay_ms} pending={r.queued + r.delayed} "
                f"queued={r.queued} running={r.running} threads={r.threads} "
                f"close_accepted={r.close_accepted}")
