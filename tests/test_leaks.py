"""Leak checks through the Python API.

(a) The core's heap is back where it was once a worker that ran 10 000 jobs
    of every kind (success, in-place edit, longer response on both of
    ``wait``'s paths, int return, failure, cancel, timeout, ``start_text``,
    ``start_many``, a second route, jobs left completed or queued at close)
    is closed, deleted and collected: ``lib.cbw_live_allocations()``, which
    counts every block the core holds, returns to its value before the
    worker was created.  While the worker lives, a drained worker also holds
    the same number of blocks after the last round as after the first.

(b) RSS (``/proc/self/statm``) grows by less than 1 % over
    ``CBW_LEAK_CYCLES`` start/wait cycles (default 1 000 000) measured after
    a warm-up of ``CBW_LEAK_WARMUP`` cycles (default 100 000).  A strictly
    one-at-a-time start -> wait cycle costs ~45-50 us on the 2-core CI
    machine (the job hops to a worker thread and back: ~50 s per million),
    so cycles run in groups of ``CBW_LEAK_GROUP`` (default 16): 16 starts,
    then 16 waits.  Every cycle is still one ``start`` and one ``wait`` of
    its own job (~5 us each, ~6 s per million); every 16th job returns a
    longer response, so the core's response allocation is in the loop too.
    ``CBW_LEAK_GROUP=1`` gives the strict one-at-a-time variant.  Skipped
    under a sanitizer runtime (ASan's quarantine keeps freed memory).

(c) The Python-side registries, ``worker._table.callbacks`` (callables that
    queued jobs refer to) and ``worker._table.failures`` (exceptions waiting
    to be re-raised by ``wait``/``take``), are empty once every job has been
    consumed, also when every job has a fresh lambda (and those lambdas are
    then freed), and also when a callback raises after its job timed out
    and was consumed.

The core's allocation count is process-global, so each test first checks
that no other worker is open (the module-level default worker may exist; it
is then idle and allocates nothing) and collects garbage.  A worker left by
an earlier test module can still be freed late (by a thread it abandoned
after a timeout); (a) runs again, up to three times, if the count ends up
below its baseline, since such a free could hide a leak.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from callbackworker import (
    JobCancelledError,
    JobFailedError,
    JobTimeoutError,
    Worker,
)
from callbackworker._native import lib
from heapcheck import quiet_baseline, settle

WAIT_MS = 10_000
TOTAL_JOBS = 10_000
ROUNDS = 20
TIMEOUTS_PER_ROUND = 2
LEAK_CYCLES = int(os.environ.get("CBW_LEAK_CYCLES", "1000000"))
LEAK_WARMUP = int(os.environ.get("CBW_LEAK_WARMUP", "100000"))
LEAK_GROUP = int(os.environ.get("CBW_LEAK_GROUP", "16"))
RSS_GROWTH_MAX = 0.01
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# ---- callbacks ---------------------------------------------------------------


def cb_upper(request: memoryview) -> None:
    request[:] = bytes(request).upper()


def cb_long(request: memoryview) -> bytes:
    return bytes(request) * 40  # > 256 bytes: wait's slow path


def cb_grow(request: memoryview) -> bytes:
    return bytes(request) + b"+"  # longer, small: wait's fast path


def cb_int(request: memoryview) -> int:
    return len(request)


def cb_fail(request: memoryview) -> None:
    raise ValueError(bytes(request).decode())


def cb_noop(request: memoryview) -> None:
    return None


def cb_overdue(request: memoryview) -> None:
    """Runs past its timeout; the interrupt lands in the loop (bounded)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        time.sleep(0.001)


def cb_gated(gate: threading.Event) -> Callable[[memoryview], None]:
    def callback(request: memoryview) -> None:
        gate.wait(WAIT_MS / 1000)

    return callback


# Outcome a job must have: ("ok", response) | ("fail", None) | ("cancel-or-ok", response)
# | ("timeout", None)
Expect = Tuple[str, Optional[bytes]]


def start_round(w: Worker, base: int, count: int) -> Dict[int, Expect]:
    jobs: Dict[int, Expect] = {}
    i = 0
    while i < count:
        req = b"r%d" % (base + i)
        kind = i % 12
        if kind == 0:
            jobs[w.start(cb_upper, req)] = ("ok", req.upper())
        elif kind == 1:
            jobs[w.start(cb_long, req)] = ("ok", req * 40)
        elif kind == 2:
            jobs[w.start(cb_grow, req)] = ("ok", req + b"+")
        elif kind == 3:
            jobs[w.start(cb_int, req)] = ("ok", req)
        elif kind == 4:
            jobs[w.start(cb_fail, req)] = ("fail", None)
        elif kind == 5:
            jid = w.start(cb_upper, req)
            jobs[jid] = ("cancel-or-ok", req.upper())
            w.cancel(jid)
        elif kind == 6:
            text = "t%dé" % (base + i)
            jobs[w.start_text(cb_upper, text)] = ("ok", text.encode().upper())
        elif kind == 7:
            jobs[w.start(cb_grow, req, route="side")] = ("ok", req + b"+")
        elif kind == 8:
            jobs[w.start(cb_fail, req, route="side")] = ("fail", None)
        elif kind == 9:
            reqs = [req + b".%d" % k for k in range(8)]
            for jid, r in zip(w.start_many(cb_grow, reqs), reqs):
                jobs[jid] = ("ok", r + b"+")
            i += 7
        elif kind == 10:
            reqs = [req + b":%d" % k for k in range(4)]
            for jid, r in zip(w.start_many(cb_upper, reqs, route="side"), reqs):
                jobs[jid] = ("ok", r.upper())
            i += 3
        else:
            jobs[w.start(cb_noop, bytearray(req))] = ("ok", req)
        i += 1
    return jobs


def consume(w: Worker, jobs: Dict[int, Expect], problems: List[str],
            seen: Optional[Counter] = None) -> None:
    seen = Counter() if seen is None else seen
    for n, (jid, (kind, expect)) in enumerate(jobs.items()):
        try:
            if n % 5 == 0:
                assert w.wait_complete(jid, WAIT_MS), f"job {jid} did not complete"
                got = w.take(jid)
            else:
                got = w.wait(jid, WAIT_MS)
        except JobCancelledError:
            seen["cancelled"] += 1
            if kind != "cancel-or-ok":
                problems.append(f"job {jid} ({kind}) was cancelled")
            continue
        except JobTimeoutError:
            seen["timeout"] += 1
            if kind != "timeout":
                problems.append(f"job {jid} ({kind}) timed out")
            continue
        except JobFailedError as exc:
            seen["failed"] += 1
            if kind != "fail" or not isinstance(exc.__cause__, ValueError):
                problems.append(f"job {jid} ({kind}) failed: {exc!r} cause {exc.__cause__!r}")
            continue
        seen["ok"] += 1
        if kind in ("fail", "timeout") or got != expect:
            problems.append(f"job {jid} ({kind}): got {got!r:.80}, expected {expect!r:.80}")


# ---- (a) ---------------------------------------------------------------------


def _heap_run() -> Tuple[int, List[int], Counter]:
    """One run of (a): (blocks left after close + collect, blocks held after
    each drained round, outcome counts)."""
    base = quiet_baseline()
    w = Worker(concurrency=2)
    ref = weakref.ref(w)
    gate = threading.Event()
    problems: List[str] = []
    seen: Counter = Counter()
    drained: List[int] = []
    # However slow the machine, no thread is abandoned after a timeout (an
    # abandoned thread's record is kept until the worker is freed, by design).
    lib.cbw_worker_set_grace(w._w, 120_000)
    try:
        w.open_route("side", concurrency=2)
        w.open_route("slow", concurrency=1, timeout_ms=5)
        w.open_route("held", concurrency=1)
        per_round = TOTAL_JOBS // ROUNDS
        started = 0
        for r in range(ROUNDS):
            jobs = start_round(w, started, per_round - TIMEOUTS_PER_ROUND)
            for _ in range(TIMEOUTS_PER_ROUND):  # the route's 5 ms limit applies
                jobs[w.start(cb_overdue, b"late", route="slow")] = ("timeout", None)
            started += len(jobs)
            consume(w, jobs, problems, seen)
            assert settle(lambda: not w._table.callbacks and not w._table.failures), (
                f"round {r}: registries not empty: {w._table.callbacks}, {w._table.failures}")
            drained.append(int(lib.cbw_live_allocations()))
        assert started >= TOTAL_JOBS - ROUNDS * 8
        # Left for close: completed but never taken, and queued behind a busy
        # callback (close shuts those down), and one still running at close.
        leftover = [w.start(cb_long, b"left%d" % i) for i in range(20)]
        w.start(cb_gated(gate), b"hold", route="held")
        leftover += [w.start(cb_upper, b"q%d" % i, route="held") for i in range(20)]
        assert settle(lambda: w.wait_complete(leftover[19], 0))
        timer = threading.Timer(0.05, gate.set)  # close waits for the running callback
        timer.start()
        w.close()
        timer.join()
    finally:
        gate.set()
        w.close()
    assert not problems, "\n".join(problems[:30])
    assert seen["timeout"] == ROUNDS * TIMEOUTS_PER_ROUND and seen["failed"] > 0, seen
    assert sum(seen.values()) >= TOTAL_JOBS - ROUNDS * 8, seen
    del w
    gc.collect()
    assert ref() is None, "the Worker was not collected"
    settle(lambda: lib.cbw_live_allocations() == base)
    return int(lib.cbw_live_allocations()) - base, drained, seen


def test_core_heap_is_empty_after_close() -> None:
    for attempt in range(3):
        left, drained, seen = _heap_run()
        if left >= 0 and all(d >= drained[0] for d in drained):
            break
        # Fewer blocks than the baseline: a worker abandoned by an earlier
        # test was freed meanwhile, which could hide a leak; run again.
    print(f"outcomes: {dict(seen)}; blocks held after each drained round: {drained}")
    # A drained worker holds the same blocks after the last round as after
    # the first (threads, timer, routes, the callback-token table...).
    assert drained[-1] == drained[0], f"blocks held by the drained worker per round: {drained}"
    assert left == 0, f"{left} core block(s) still live after close + del + gc.collect()"


# ---- (b) ---------------------------------------------------------------------


def _cycles(w: Worker, count: int, group: int) -> None:
    start, wait = w.start, w.wait
    payloads = [b"p" * (k % 64) for k in range(group)]
    done = 0
    while done < count:
        n = min(group, count - done)
        ids = [start(cb_grow if k == 0 else cb_noop, payloads[k]) for k in range(n)]
        for jid in ids:
            wait(jid)
        done += n


def _sanitizer_runtime() -> Optional[str]:
    """The sanitizer runtime loaded into this process, if any."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    return next((name for name in ("libasan", "libtsan", "libmsan") if name in maps), None)


def test_rss_is_flat_over_many_start_wait_cycles() -> None:
    runtime = _sanitizer_runtime()
    if runtime is not None:
        pytest.skip(f"{runtime} is loaded: its allocator quarantines freed memory, so RSS "
                    "grows by design and says nothing about leaks")
    assert LEAK_GROUP >= 1
    quiet_baseline()
    with Worker() as w:
        _cycles(w, LEAK_WARMUP, LEAK_GROUP)
        gc.collect()
        before = rss_bytes()
        core_before = int(lib.cbw_live_allocations())
        t0 = time.monotonic()
        _cycles(w, LEAK_CYCLES, LEAK_GROUP)
        elapsed = time.monotonic() - t0
        gc.collect()
        after = rss_bytes()
        core_after = int(lib.cbw_live_allocations())
    growth = (after - before) / before
    print(f"{LEAK_CYCLES} cycles (groups of {LEAK_GROUP}) in {elapsed:.1f} s; RSS "
          f"{before / 2**20:.2f} -> {after / 2**20:.2f} MiB ({growth:+.3%}); core blocks "
          f"{core_before} -> {core_after}")
    # (<=: a worker abandoned by an earlier test may be freed meanwhile.)
    assert core_after <= core_before, "the core holds more blocks after the cycles"
    assert growth < RSS_GROWTH_MAX, (
        f"RSS grew {growth:.3%} ({before} -> {after} bytes) over {LEAK_CYCLES} cycles")


# ---- (c) ---------------------------------------------------------------------


def registries_empty(w: Worker) -> bool:
    return not w._table.callbacks and not w._table.failures


def test_registries_empty_after_jobs_with_shared_callbacks() -> None:
    quiet_baseline()
    with Worker(concurrency=2) as w:
        w.open_route("side", concurrency=2)
        problems: List[str] = []
        for r in range(3):
            jobs = start_round(w, r * 1000, 1000)
            consume(w, jobs, problems)
        assert not problems, "\n".join(problems[:30])
        assert settle(lambda: registries_empty(w)), (
            f"left: callbacks {list(w._table.callbacks.values())[:10]}, "
            f"failures {dict(list(w._table.failures.items())[:10])}")


def test_registries_empty_with_a_fresh_lambda_per_job() -> None:
    quiet_baseline()
    n = 10_000
    with Worker(concurrency=2) as w:
        w.open_route("side", concurrency=1)
        refs: List[weakref.ref] = []
        ids: List[Tuple[int, int]] = []
        for i in range(n):
            if i % 4 == 3:
                def fn(request: memoryview, i: int = i) -> None:
                    raise KeyError(i)
            else:
                fn = lambda request, i=i: b"%d" % i  # noqa: E731 - a new function object each time
            refs.append(weakref.ref(fn))
            jid = w.start(fn, b"x", route="side" if i % 3 == 0 else None)
            if i % 10 == 5:
                w.cancel(jid)
            ids.append((i, jid))
            del fn  # only the worker's registry keeps it alive now
        for i, jid in ids:
            try:
                got = w.wait(jid, WAIT_MS)
            except JobCancelledError:
                continue
            except JobFailedError as exc:
                assert i % 4 == 3 and isinstance(exc.__cause__, KeyError), repr(exc)
                continue
            assert got == b"%d" % i
        assert settle(lambda: registries_empty(w)), (
            f"{len(w._table.callbacks)} callback(s) and {len(w._table.failures)} failure(s) "
            "left in the registries after every job was consumed")
        gc.collect()
        alive = sum(1 for r in refs if r() is not None)
        assert alive == 0, f"{alive} of {n} per-job callables still alive"


def test_failures_registry_empty_when_a_callback_raises_after_its_job_timed_out() -> None:
    """A callback whose cleanup raises after its job ran past the timeout and
    the caller already consumed the TIMEOUT: its exception has nobody left to
    be re-raised to, so it must not stay in ``failures`` for the worker's
    life (one entry, with its traceback and frames, per such job)."""
    quiet_baseline()
    with Worker() as w:
        for round_ in range(3):
            consumed = threading.Event()
            finished = threading.Event()

            def callback(request: memoryview) -> None:
                try:
                    deadline = time.monotonic() + WAIT_MS / 1000
                    while time.monotonic() < deadline:
                        time.sleep(0.001)  # interrupted here, past the timeout
                finally:
                    consumed.wait(WAIT_MS / 1000)
                    finished.set()
                    raise RuntimeError("cleanup failed")  # e.g. closing a connection

            jid = w.start(callback, b"x", timeout_ms=20)
            with pytest.raises(JobTimeoutError):
                w.wait(jid, WAIT_MS)
            consumed.set()
            assert finished.wait(WAIT_MS / 1000)
            # The thread records the failure right after the callback returns;
            # a later job on the same (only) thread proves it is done.
            assert w.wait(w.start(cb_noop, b"y"), WAIT_MS) == b"y"
            left = dict(w._table.failures)
            assert not left, (
                f"round {round_}: failures registry holds {left!r} for job {jid}, which "
                "was already consumed as TIMEOUT: nothing can ever pop it")
