"""Worker lifecycle (SPEC section 2, "Lifecycle"; and "Errors").

close(): no new job starts; queued jobs complete with SHUTDOWN and blocked
waiters wake with ShutdownError; a running callback may finish; all C threads
are joined before it returns; afterwards every job verb raises
WorkerClosedError and close() again returns 0.  close(drain=True) first runs
every queued job.  Interpreter exit closes every live worker (no hang, no
crash); os.fork() leaves the child with a usable, empty worker state; every
method is thread-safe and may be called from inside a callback.

Anything that could hang the test process runs either in a subprocess with a
timeout or in a helper thread joined with a timeout.  Time bounds are
generous upper bounds only (the machine is shared and noisy).
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from callbackworker import (
    CallbackWorkerError,
    DeadlockError,
    JobCancelledError,
    JobFailedError,
    Phase,
    RouteMetaKey,
    ShutdownError,
    Status,
    TaskService,
    WaitTimeoutError,
    Worker,
    WorkerClosedError,
)

SETTLE = 5.0          # seconds: anything that must eventually happen
SETTLE_MS = int(SETTLE * 1000)
PROMPT = 2.0          # seconds: "at once"
EXIT_LIMIT = 5.0      # seconds: an interpreter exit that must not hang
SUBPROCESS_TIMEOUT = 30

POSIX = os.name == "posix"
LINUX = sys.platform.startswith("linux")


@pytest.fixture
def gates() -> Iterator[List[threading.Event]]:
    """Events that blocked callbacks wait on; all set at teardown."""
    events: List[threading.Event] = []
    try:
        yield events
    finally:
        for event in events:
            event.set()


def _gate(gates: List[threading.Event]) -> threading.Event:
    event = threading.Event()
    gates.append(event)
    return event


def _in_thread(fn: Callable[[], Any], name: str = "helper") -> Tuple[threading.Thread, List[Any]]:
    """Runs fn in a daemon thread; the list receives ("ok", value) or
    ("exc", exception) and the elapsed time."""
    out: List[Any] = []

    def body() -> None:
        t0 = time.monotonic()
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # reported by the caller
            out.append(("exc", exc))
        out.append(time.monotonic() - t0)

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t, out


def _run_script(source: str, timeout: float = SUBPROCESS_TIMEOUT,
                **kwargs: Any) -> Tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(source)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    return proc, time.monotonic() - t0


def _assert_clean_exit(proc: subprocess.CompletedProcess, elapsed: float,
                       limit: float = EXIT_LIMIT) -> None:
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    assert "Traceback" not in proc.stderr, detail
    assert "Fatal Python error" not in proc.stderr, detail
    assert "Exception ignored" not in proc.stderr, detail
    assert elapsed < limit, f"the interpreter took {elapsed:.1f}s to exit\n{detail}"


# ---- close(): queued jobs, waiters, threads ---------------------------------------


def test_close_shuts_down_queued_jobs_and_wakes_their_waiters(gates: List[threading.Event]) -> None:
    w = Worker()
    gate = _gate(gates)
    running = threading.Event()
    finished = threading.Event()
    ran: List[bytes] = []

    def blocker(request: memoryview) -> bytes:
        running.set()
        gate.wait(SETTLE)
        finished.set()
        return b"blocker done"

    first = w.start(blocker, b"")
    queued = [w.start(lambda m: ran.append(bytes(m)), b"q%d" % i) for i in range(7)]
    assert running.wait(SETTLE)
    assert all(w.phase(j) == Phase.QUEUED for j in queued)
    # one waiter per job (two waiters on one job race to destroy it)
    waiters = [_in_thread(lambda j=j: w.wait(j)) for j in queued[:5]]
    waiters += [_in_thread(lambda j=j: w.wait_complete(j)) for j in queued[5:]]
    time.sleep(0.1)  # let them block

    closer, closed = _in_thread(w.close, "closer")
    # The waiters on queued jobs wake while close still waits for the running
    # callback to finish.
    for t, out in waiters:
        t.join(PROMPT + 1)
        assert not t.is_alive(), "a waiter on a queued job did not wake at close()"
        kind, exc = out[0]
        if kind == "ok":
            # wait_complete reports that the job completed (it did: with
            # SHUTDOWN; the closed worker can no longer be asked its status)
            assert exc is True, out
            continue
        assert kind == "exc" and isinstance(exc, (ShutdownError, WorkerClosedError)), out
        if isinstance(exc, ShutdownError):
            assert exc.status == Status.SHUTDOWN
            assert isinstance(exc, JobFailedError)
    # The running callback may finish: close() is still joining its thread.
    assert closer.is_alive()
    assert not finished.is_set()
    gate.set()
    closer.join(SETTLE)
    assert not closer.is_alive(), "close() did not return after the running job finished"
    assert closed[0] == ("ok", 0)
    assert finished.is_set()
    assert ran == [], "a queued job ran although the worker was closed"


def test_waiter_on_the_running_job_wakes_with_shutdown_error(gates: List[threading.Event]) -> None:
    w = Worker()
    gate = _gate(gates)
    running = threading.Event()
    job = w.start(lambda m: running.set() or gate.wait(SETTLE) and None, b"")
    assert running.wait(SETTLE)
    waiter, out = _in_thread(lambda: w.wait(job))
    time.sleep(0.1)
    closer, closed = _in_thread(w.close)
    waiter.join(PROMPT + 1)
    assert not waiter.is_alive()
    assert out[0][0] == "exc" and isinstance(out[0][1], (ShutdownError, WorkerClosedError))
    gate.set()
    closer.join(SETTLE)
    assert closed[0] == ("ok", 0)


def test_queued_job_callbacks_never_run_after_close() -> None:
    w = Worker(concurrency=2)
    ran: List[int] = []
    w.start_many(lambda m: ran.append(1) or time.sleep(0.001), [b""] * 2000)
    w.close()
    count = len(ran)
    time.sleep(0.2)
    assert len(ran) == count < 2000


@pytest.mark.skipif(not LINUX, reason="thread ids checked through /proc")
def test_close_joins_every_thread() -> None:
    w = Worker(concurrency=3)
    w.open_route("side", concurrency=2, timeout_ms=10_000)  # a timer thread too
    tids: set = set()
    barrier = threading.Barrier(5, timeout=SETTLE)

    def record(request: memoryview) -> None:
        tids.add(threading.get_native_id())
        barrier.wait()

    jobs = [w.start(record, b"") for _ in range(3)]
    jobs += [w.start(record, b"", route="side") for _ in range(2)]
    for j in jobs:
        w.wait(j, SETTLE_MS)
    assert len(tids) == 5
    before = len(os.listdir("/proc/self/task"))
    assert w.close() == 0
    # joined threads are gone from the process (allow the kernel a moment to
    # reap the task entries)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/self/task/{t}") for t in tids):
        time.sleep(0.01)
    alive = [t for t in tids if os.path.exists(f"/proc/self/task/{t}")]
    assert alive == [], f"worker threads still alive after close(): {alive}"
    # 5 route threads and the timer thread are gone (other threads of this
    # process may only have left meanwhile, not arrived; on the main thread
    # the close ran on a thread of its own, which the kernel reaps just after)
    while time.monotonic() < deadline and len(os.listdir("/proc/self/task")) > before - 6:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= before - 6


def test_close_returns_zero_and_is_idempotent() -> None:
    w = Worker()
    job = w.start(lambda m: None, b"")
    w.wait(job, SETTLE_MS)
    assert w.close() == 0
    assert w.close() == 0
    assert w.close(drain=True) == 0
    assert w.close(drain=False) == 0
    assert "closed" in repr(w)


def test_close_before_any_job() -> None:
    w = Worker(concurrency=4)
    assert w.close() == 0
    assert w.close() == 0


def test_close_drain_argument_type() -> None:
    with Worker() as w:
        with pytest.raises(TypeError):
            w.close(drain=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            w.close(drain="yes")  # type: ignore[arg-type]
        # the worker is still open
        assert w.wait(w.start(lambda m: b"open", b""), SETTLE_MS) == b"open"


def _closed_verbs(w: Worker) -> Dict[str, Callable[[], Any]]:
    cb = lambda m: None  # noqa: E731
    return {
        "start": lambda: w.start(cb, b""),
        "start(route)": lambda: w.start(cb, b"", route="default"),
        "start_text": lambda: w.start_text(cb, "x"),
        "start_many": lambda: w.start_many(cb, [b"a"]),
        "wait": lambda: w.wait(1),
        "wait(0)": lambda: w.wait(1, 0),
        "wait_complete": lambda: w.wait_complete(1),
        "take": lambda: w.take(1),
        "take_blob": lambda: w.take_blob(1),
        "cancel": lambda: w.cancel(1),
        "phase": lambda: w.phase(1),
        "phase_text": lambda: w.phase_text(1),
        "status": lambda: w.status(1),
        "status_text": lambda: w.status_text(1),
        "state": lambda: w.state(1),
        "error_text": lambda: w.error_text(1),
        "job_known": lambda: w.job_known(1),
        "job_timeout": lambda: w.job_timeout(1),
        "job_has_blob_result": lambda: w.job_has_blob_result(1),
        "job_blob_result_size": lambda: w.job_blob_result_size(1),
        "job_meta": lambda: w.job_meta(1, 1),
        "job_meta(KNOWN)": lambda: w.job_meta(1, 5),
        "info": lambda: w.info(1),
        "open_route": lambda: w.open_route("new"),
        "close_route": lambda: w.close_route("default"),
        "wait_drained": lambda: w.wait_drained("default"),
        "route_meta": lambda: w.route_meta("default", RouteMetaKey.QUEUED),
        "route_meta(KNOWN)": lambda: w.route_meta("default", RouteMetaKey.KNOWN),
        "route_info": lambda: w.route_info("default"),
    }


def test_every_job_verb_raises_worker_closed_error_after_close() -> None:
    w = Worker()
    job = w.start(lambda m: None, b"")
    w.wait_complete(job, SETTLE_MS)  # job 1 exists and is complete
    w.close()
    not_raising = []
    for name, call in _closed_verbs(w).items():
        try:
            call()
        except WorkerClosedError as exc:
            assert isinstance(exc, RuntimeError) and isinstance(exc, CallbackWorkerError)
        except Exception as exc:  # noqa: BLE001 - reported
            not_raising.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            not_raising.append(f"{name}: returned")
    assert not_raising == []


# ---- drain ------------------------------------------------------------------------


def test_close_drain_runs_every_queued_job_first() -> None:
    w = Worker()
    w.open_route("side", concurrency=2)
    ran: List[bytes] = []
    lock = threading.Lock()

    def record(request: memoryview) -> None:
        time.sleep(0.001)
        with lock:
            ran.append(bytes(request))

    main = [b"m%d" % i for i in range(100)]
    side = [b"s%d" % i for i in range(50)]
    w.start_many(record, main)
    for s in side:
        w.start(record, s, route="side")
    assert w.close(drain=True) == 0
    assert [r for r in ran if r.startswith(b"m")] == main  # FIFO on a 1-thread route
    assert sorted(r for r in ran if r.startswith(b"s")) == sorted(side)
    with pytest.raises(WorkerClosedError):
        w.start(record, b"late")


def test_no_new_job_starts_during_a_drain(gates: List[threading.Event]) -> None:
    """close(drain=True) runs the queued jobs, but no new job starts once
    close() has begun, not even from a callback running during the drain."""
    w = Worker()
    gate = _gate(gates)
    outcomes: List[str] = []

    def spawner(request: memoryview) -> None:
        gate.wait(SETTLE)
        try:
            w.start(lambda m: None, b"")
            outcomes.append("started")
        except WorkerClosedError:
            outcomes.append("refused")

    w.start_many(spawner, [b""] * 5)
    closer, closed = _in_thread(lambda: w.close(drain=True))
    # Wait until close() has begun: starts from this thread are refused.
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        try:
            w.start(lambda m: None, b"")
        except WorkerClosedError:
            break
        time.sleep(0.005)
    else:
        pytest.fail("close(drain=True) never started refusing jobs")
    assert closer.is_alive()  # still draining: the spawners are blocked
    gate.set()
    closer.join(SETTLE)
    assert closed[0] == ("ok", 0)
    assert outcomes == ["refused"] * 5


# ---- context manager ----------------------------------------------------------


def test_context_manager_closes() -> None:
    with Worker() as w:
        assert w.wait(w.start(lambda m: bytes(m) * 2, b"ab"), SETTLE_MS) == b"abab"
        queued = w.start_many(lambda m: time.sleep(0.01), [b""] * 50)
    assert queued
    with pytest.raises(WorkerClosedError):
        w.start(lambda m: None, b"")
    with pytest.raises(WorkerClosedError):
        w.status(queued[-1])
    assert w.close() == 0


def test_context_manager_closes_on_exception_and_propagates_it() -> None:
    with pytest.raises(ZeroDivisionError):
        with Worker() as w:
            w.start(lambda m: time.sleep(0.01), b"")
            1 / 0
    with pytest.raises(WorkerClosedError):
        w.start(lambda m: None, b"")


# ---- close from inside a callback ----------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
def test_close_from_inside_a_callback(concurrency: int) -> None:
    w = Worker(concurrency=concurrency)
    done, queued = threading.Event(), threading.Event()
    seen: Dict[str, Any] = {}

    def closer(request: memoryview) -> bytes:
        queued.wait(SETTLE)  # an idle worker starts its first job at once
        seen["rc"] = w.close()
        seen["rc2"] = w.close()
        try:
            w.start(lambda m: None, b"")
        except WorkerClosedError:
            seen["start_after"] = "WorkerClosedError"
        done.set()
        return b"closer"

    ran: List[int] = []
    if concurrency > 1:
        w.start_many(lambda m: time.sleep(0.05), [b""] * (concurrency - 1))
    job = w.start(closer, b"")
    w.start_many(lambda m: ran.append(1), [b""] * 10)
    queued.set()
    assert done.wait(SETTLE), "close() from inside a callback deadlocked"
    assert seen == {"rc": 0, "rc2": 0, "start_after": "WorkerClosedError"}
    # the worker is closed afterwards, from every thread
    with pytest.raises(WorkerClosedError):
        w.start(lambda m: None, b"")
    with pytest.raises(WorkerClosedError):
        w.wait(job)
    assert w.close() == 0
    time.sleep(0.1)
    if concurrency == 1:
        assert ran == []  # queued behind the closer: shut down, never run


def test_close_drain_from_inside_a_callback_raises_deadlock_error() -> None:
    w = Worker()
    seen: List[Any] = []

    def drainer(request: memoryview) -> bytes:
        try:
            w.close(drain=True)
            seen.append("returned")
        except DeadlockError as exc:
            seen.append(exc)
        return b"after"

    job = w.start(drainer, b"")
    behind = w.start(lambda m: b"behind", b"")
    assert w.wait(job, SETTLE_MS) == b"after"
    assert len(seen) == 1 and isinstance(seen[0], DeadlockError), seen
    assert isinstance(seen[0], RuntimeError)
    # the refused drain left the worker open and working
    assert w.wait(behind, SETTLE_MS) == b"behind"
    assert w.close(drain=True) == 0


def test_close_from_a_callback_of_another_worker() -> None:
    a, b = Worker(), Worker()
    b.start_many(lambda m: time.sleep(0.005), [b""] * 20)
    out: List[Any] = []
    job = a.start(lambda m: out.append(b.close(drain=True)) or b"ok", b"")
    assert a.wait(job, SETTLE_MS * 2) == b"ok"
    assert out == [0]
    with pytest.raises(WorkerClosedError):
        b.start(lambda m: None, b"")
    a.close()


# ---- close racing with other threads ------------------------------------------


ALLOWED_AT_CLOSE = (WorkerClosedError, ShutdownError)


@pytest.mark.parametrize("round_", range(6))
def test_close_racing_with_start_and_wait_from_four_threads(round_: int) -> None:
    rng = random.Random(round_)
    w = Worker(concurrency=rng.choice([1, 2]))
    stop = threading.Event()
    closing = threading.Event()
    problems: List[str] = []
    counts = [0] * 4

    def echo(request: memoryview) -> bytes:
        return bytes(request)[::-1]

    def hammer(k: int) -> None:
        r = random.Random(k * 100 + round_)
        n = 0
        while not stop.is_set():
            n += 1
            payload = b"%d-%d" % (k, n)
            try:
                op = r.random()
                if op < 0.4:
                    j = w.start(echo, payload)
                    got = w.wait(j, SETTLE_MS)
                    if got != payload[::-1]:
                        problems.append(f"thread {k}: wrong response {got!r}")
                    counts[k] += 1
                elif op < 0.6:
                    js = w.start_many(echo, [payload] * 5)
                    for j in js:
                        if w.wait_complete(j, SETTLE_MS):
                            assert w.take(j) == payload[::-1]
                    counts[k] += 1
                elif op < 0.75:
                    j = w.start_text(echo, payload.decode())
                    w.cancel(j)
                    try:
                        w.wait(j, SETTLE_MS)
                    except JobCancelledError:
                        pass
                    counts[k] += 1
                else:
                    j = w.start(echo, payload)
                    w.phase(j)
                    w.info(j)
                    w.wait(j, SETTLE_MS)
                    counts[k] += 1
            except ALLOWED_AT_CLOSE as exc:
                # legitimate only once close() has begun; afterwards keep
                # hammering the closed worker until told to stop
                if not closing.is_set():
                    problems.append(f"thread {k}: {type(exc).__name__} before close(): {exc}")
                    return
            except WaitTimeoutError as exc:
                problems.append(f"thread {k}: a wait hung: {exc}")
                return
            except JobFailedError as exc:
                problems.append(f"thread {k}: job {exc.job_id} ended {Status(exc.status).name} "
                                f"with error text {exc.error_text!r} (cause {exc.__cause__!r})")
                return
            except BaseException as exc:  # noqa: BLE001 - reported
                problems.append(f"thread {k}: {type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.05, 0.3))
    # two concurrent closes: both return 0, the second once the first is done
    closing.set()
    closers = [_in_thread(w.close, "closer-a"), _in_thread(w.close, "closer-b")]
    for t, out in closers:
        t.join(SETTLE * 2)
        assert not t.is_alive(), "close() hung while other threads were using the worker"
        assert out[0] == ("ok", 0)
    # every thread now sees the closed worker and leaves
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(SETTLE * 2)
        assert not t.is_alive(), "a thread hung in a verb after close()"
    assert problems == [], "\n".join(problems)
    assert sum(counts) > 0
    with pytest.raises(WorkerClosedError):
        w.start(echo, b"")


def test_threads_blocked_in_waits_all_wake_at_close(gates: List[threading.Event]) -> None:
    w = Worker(concurrency=2)
    w.open_route("side")
    gate = _gate(gates)
    blockers = [w.start(lambda m: gate.wait(SETTLE) and None, b"") for _ in range(4)]
    blockers += [w.start(lambda m: gate.wait(SETTLE) and None, b"", route="side")]
    queued = [w.start(lambda m: None, b"") for _ in range(6)]
    calls: List[Callable[[], Any]] = []
    # one waiter per job (two waiters on one job race to destroy it)
    for i, j in enumerate(blockers + queued):
        calls.append((lambda j=j: w.wait(j)) if i % 2 else (lambda j=j: w.wait_complete(j)))
    calls.append(lambda: w.wait_drained("side"))
    calls.append(lambda: w.wait_drained("default"))
    waiters = [_in_thread(c) for c in calls]
    time.sleep(0.2)
    closer, closed = _in_thread(w.close)
    time.sleep(0.3)
    gate.set()
    closer.join(SETTLE)
    assert closed and closed[0] == ("ok", 0)
    for t, out in waiters:
        t.join(SETTLE)
        assert not t.is_alive(), "a waiter did not wake at close()"
        kind, value = out[0]
        if kind == "exc":
            assert isinstance(value, ALLOWED_AT_CLOSE), repr(value)
        else:
            # wait_complete on a queued job: it did complete (with SHUTDOWN);
            # wait_drained: the route is empty once close() shut it down
            assert value in (True, False), repr(value)


# ---- verbs from inside a callback on its own worker ---------------------------------


def test_callback_can_start_jobs_on_its_own_worker() -> None:
    with Worker() as w:
        children: List[int] = []

        def parent(request: memoryview) -> bytes:
            children.append(w.start(lambda m: bytes(m).upper(), b"child"))
            children.append(w.start_text(lambda m: None, "text"))
            children.extend(w.start_many(lambda m: None, [b"a", b"b"]))
            return b"parent"

        assert w.wait(w.start(parent, b""), SETTLE_MS) == b"parent"
        assert len(children) == 4
        assert w.wait(children[0], SETTLE_MS) == b"CHILD"
        assert w.wait(children[1], SETTLE_MS) == b"text"
        assert [w.wait(j, SETTLE_MS) for j in children[2:]] == [b"a", b"b"]


def test_callback_waiting_on_its_own_job_raises_deadlock_error() -> None:
    with Worker() as w:
        ids: List[int] = []
        seen: Dict[str, Any] = {}
        known = threading.Event()

        def selfish(request: memoryview) -> bytes:
            known.wait(SETTLE)
            me = ids[0]
            for name, call in (("wait", lambda: w.wait(me)),
                               ("wait_complete", lambda: w.wait_complete(me)),
                               ("wait(timeout)", lambda: w.wait(me, 10_000))):
                try:
                    seen[name] = call()
                except DeadlockError as exc:
                    seen[name] = exc
                except BaseException as exc:  # noqa: BLE001 - reported
                    seen[name] = exc
            seen["cancel"] = w.cancel(me)
            seen["phase"] = w.phase(me)
            return b"survived"

        ids.append(w.start(selfish, b""))
        known.set()
        assert w.wait(ids[0], SETTLE_MS) == b"survived"
        assert isinstance(seen["wait"], DeadlockError), seen
        assert isinstance(seen["wait_complete"], DeadlockError), seen
        assert isinstance(seen["wait(timeout)"], DeadlockError), seen
        assert seen["cancel"] is False
        assert seen["phase"] == Phase.RUNNING


def test_callback_waiting_on_a_job_queued_behind_it_raises_deadlock_error() -> None:
    with Worker(concurrency=1) as w:
        seen: Dict[str, Any] = {}

        def impatient(request: memoryview) -> bytes:
            behind = w.start(lambda m: b"behind", b"")
            seen["behind"] = behind
            try:
                w.wait(behind)
            except DeadlockError as exc:
                seen["wait"] = exc
            try:
                w.wait_complete(behind)
            except DeadlockError as exc:
                seen["wait_complete"] = exc
            # a bounded wait is not a deadlock: it times out
            try:
                w.wait(behind, 50)
            except WaitTimeoutError as exc:
                seen["bounded"] = exc
            seen["phase"] = w.phase(behind)
            seen["cancel_other"] = w.cancel(w.start(lambda m: None, b""))
            return b"ok"

        assert w.wait(w.start(impatient, b""), SETTLE_MS) == b"ok"
        assert isinstance(seen.get("wait"), DeadlockError), seen
        assert isinstance(seen.get("wait_complete"), DeadlockError), seen
        assert isinstance(seen.get("bounded"), WaitTimeoutError), seen
        assert seen["phase"] == Phase.QUEUED
        assert seen["cancel_other"] is True
        assert w.wait(seen["behind"], SETTLE_MS) == b"behind"


def test_callback_waiting_on_a_job_queued_behind_it_with_a_free_thread_works() -> None:
    with Worker(concurrency=2) as w:
        seen: List[Any] = []

        def patient(request: memoryview) -> bytes:
            behind = w.start(lambda m: b"behind", b"")
            seen.append(w.wait(behind, SETTLE_MS))
            return b"ok"

        assert w.wait(w.start(patient, b""), SETTLE_MS * 2) == b"ok"
        assert seen == [b"behind"]


def test_callback_waiting_on_a_job_of_another_route_works() -> None:
    with Worker() as w:
        w.open_route("other")
        seen: List[Any] = []

        def cross(request: memoryview) -> bytes:
            o = w.start(lambda m: bytes(m) + b"!", b"other", route="other")
            seen.append(w.wait(o))
            o2 = w.start(lambda m: None, b"", route="other")
            seen.append(w.wait_complete(o2))
            seen.append(w.take(o2))
            return b"ok"

        assert w.wait(w.start(cross, b""), SETTLE_MS * 2) == b"ok"
        assert seen == [b"other!", True, b""]


def test_callbacks_on_two_routes_waiting_on_each_other_in_turn() -> None:
    """Nested waits across routes: A (default) waits on B (other), which waits
    on C (default, queued behind A on a 2-thread route)."""
    with Worker(concurrency=2) as w:
        w.open_route("other")

        def c(m: memoryview) -> bytes:
            return b"c"

        def b(m: memoryview) -> bytes:
            return b"b" + w.wait(w.start(c, b""), SETTLE_MS)

        def a(m: memoryview) -> bytes:
            return b"a" + w.wait(w.start(b, b"", route="other"), SETTLE_MS)

        assert w.wait(w.start(a, b""), SETTLE_MS * 2) == b"abc"


# ---- garbage collection -----------------------------------------------------------------


def test_gc_of_an_unclosed_worker_with_queued_jobs() -> None:
    # The worker goes here, not on a route thread: were it in a reference
    # cycle and collected there, its finalizer would return while that
    # thread's own job is still to run (the test below covers that case).
    ran: List[int] = []
    gc.disable()
    try:
        w = Worker(concurrency=2)
        w.start(lambda m: time.sleep(0.1), b"")
        w.start_many(lambda m: ran.append(1), [b"q"] * 5000)
        ref = weakref.ref(w)
        t0 = time.monotonic()
        del w
        gc.collect()
    finally:
        gc.enable()
    assert ref() is None
    assert time.monotonic() - t0 < SETTLE
    count = len(ran)
    time.sleep(0.1)
    assert len(ran) == count  # nothing runs after the worker was collected


def test_worker_collected_on_its_own_thread_before_a_job_calls_its_callback() -> None:
    # The collector runs on the route thread as the bridge allocates the next
    # job's request view: the Worker's finalizer releases the worker and
    # clears its registry, which held the only reference to that job's
    # callback.  The job must still run its callback, not a freed object
    # (this crashed the test process with a segmentation fault).
    proc, elapsed = _run_script("""
        import gc, threading, weakref, callbackworker as cw
        gate, collected = threading.Lock(), threading.Lock()
        gate.acquire()
        collected.acquire()
        where, ran = [], []
        def first(m):
            gate.acquire()      # held until the worker is garbage
            gc.set_threshold(1)
            gc.enable()         # the next allocation, the view, collects
        def note():
            where.append(threading.get_ident())
            collected.release()
        gc.collect()
        gc.disable()
        w = cw.Worker(concurrency=1)
        w.itself = w            # a user's reference cycle: only the collector frees it
        weakref.finalize(w, note)
        w.start(first, b"")
        w.start_many(lambda m: ran.append(1), [b"q"] * 50)  # only the registry holds it
        del w
        gate.release()
        assert collected.acquire(timeout=10)
        gc.set_threshold(700)
        assert where != [threading.get_ident()], "collected on the main thread"
        print("ok", flush=True)
    """)
    _assert_clean_exit(proc, elapsed, limit=SUBPROCESS_TIMEOUT)
    assert proc.stdout.split() == ["ok"]


def test_gc_of_an_idle_unclosed_worker_and_many_workers() -> None:
    refs = []
    for i in range(20):
        w = Worker(concurrency=1 + i % 3)
        w.wait(w.start(lambda m: None, b""), SETTLE_MS)
        w.start_many(lambda m: None, [b""] * 10)
        refs.append(weakref.ref(w))
        del w
    gc.collect()
    assert all(r() is None for r in refs)


def test_worker_collected_when_its_last_reference_drops_inside_its_own_callback() -> None:
    proc, elapsed = _run_script("""
        import gc, threading, time, callbackworker as cw
        box = [cw.Worker()]
        go, done = threading.Event(), threading.Event()
        def cb(m):
            go.wait(10)
            box.clear()       # the last reference to the worker
            gc.collect()
            done.set()
            return b"z"
        box[0].start(cb, b"x")
        box[0].start_many(lambda m: None, [b"q"] * 100)
        go.set()
        assert done.wait(10)
        time.sleep(0.3)
        # the module-level worker still works afterwards
        j = cw.start(lambda m: bytes(m) * 2, b"ok")
        assert cw.wait(j, 5000) == b"okok"
        print("ok", flush=True)
    """)
    _assert_clean_exit(proc, elapsed, limit=SUBPROCESS_TIMEOUT)
    assert proc.stdout.split() == ["ok"]


# ---- interpreter exit -------------------------------------------------------------------

EXIT_SCRIPTS = {
    # Interpreter exit while another thread is already closing the worker
    # with weaker flags: the exit-time close escalates that close instead of
    # waiting for a callback that never returns.
    "another_thread_closing": """
        import threading, time, callbackworker as cw
        w = cw.Worker()
        started = threading.Event()
        def forever(m):
            started.set()
            while True:
                time.sleep(0.01)
        w.start(forever, b"x")
        started.wait()
        threading.Thread(target=w.close, daemon=True).start()
        time.sleep(0.2)
        print("exiting", flush=True)
    """,
    "another_thread_draining": """
        import threading, time, callbackworker as cw
        w = cw.Worker()
        started = threading.Event()
        def forever(m):
            started.set()
            while True:
                time.sleep(0.01)
        w.start(forever, b"x")
        w.start_many(lambda m: None, [b"q"] * 100)
        started.wait()
        threading.Thread(target=w.close, kwargs={"drain": True}, daemon=True).start()
        time.sleep(0.2)
        print("exiting", flush=True)
    """,
    "executor_shutdown_without_wait": """
        import threading, time, callbackworker as cw
        ex = cw.Executor()
        started = threading.Event()
        def forever():
            started.set()
            while True:
                time.sleep(0.01)
        ex.submit(forever)
        started.wait()
        ex.shutdown(wait=False)
        print("exiting", flush=True)
    """,
    "10k_queued_and_busy_loop": """
        import time, callbackworker as cw
        w = cw.Worker()
        started = []
        def busy(m):
            started.append(1)
            n = 0
            while True:
                n += 1
        j = w.start(busy, b"x")
        ids = w.start_many(lambda m: None, [b"q"] * 10000)
        while not started:
            time.sleep(0.01)
        print("exiting", w.phase(j).name, len(ids), flush=True)
    """,
    "sleep_60": """
        import time, callbackworker as cw
        w = cw.Worker()
        started = []
        j = w.start(lambda m: started.append(1) or time.sleep(60), b"x")
        while not started:
            time.sleep(0.01)
        print("exiting", w.phase(j).name, flush=True)
    """,
    "never_closed_and_garbage": """
        import gc, time, callbackworker as cw
        def make():
            w = cw.Worker(concurrency=2)
            w.start(lambda m: time.sleep(0.3), b"x")
            w.start_many(lambda m: None, [b"q"] * 1000)
        make()
        gc.collect()
        w2 = cw.Worker()
        w2.start(lambda m: time.sleep(0.2), b"x")
        w2.start_many(lambda m: None, [b"q"] * 1000)
        del w2                         # garbage, never closed, not yet collected
        cw.start(lambda m: time.sleep(60), b"x")   # the default worker, busy
        cw.start_many(lambda m: None, [b"q"] * 1000)
        time.sleep(0.1)
        print("exiting", flush=True)
    """,
    "daemon_thread_blocked_in_wait": """
        import threading, time, callbackworker as cw
        w = cw.Worker()
        j = w.start(lambda m: time.sleep(60), b"x")
        q = w.start(lambda m: None, b"q")
        def waiter(job):
            try:
                w.wait(job)
            except (cw.ShutdownError, cw.WorkerClosedError):
                pass
        for job in (j, q):
            threading.Thread(target=waiter, args=(job,), daemon=True).start()
        time.sleep(0.2)
        print("exiting", flush=True)
    """,
    "busy_loops_on_several_routes": """
        import time, callbackworker as cw
        w = cw.Worker(concurrency=2)
        w.open_route("a", concurrency=2)
        def busy(m):
            n = 0
            while True:
                n += 1
        for route in (None, None, "a", "a"):
            w.start(busy, b"", route=route)
        w.start_many(busy, [b""] * 100)
        time.sleep(0.2)
        print("exiting", flush=True)
    """,
    "sys_exit_with_a_job_running": """
        import sys, time, callbackworker as cw
        w = cw.Worker()
        w.start(lambda m: time.sleep(60), b"x", timeout_ms=100_000)
        time.sleep(0.1)
        print("exiting", flush=True)
        sys.exit(0)
    """,
}


@pytest.mark.parametrize("name", sorted(EXIT_SCRIPTS))
def test_interpreter_exit_with_jobs_queued_and_running(name: str) -> None:
    proc, elapsed = _run_script(EXIT_SCRIPTS[name])
    _assert_clean_exit(proc, elapsed)
    assert proc.stdout.startswith("exiting"), proc.stdout


EXIT_ORDER_SCRIPT = """
    import sys, threading, time
    import callbackworker as cw

    def announce(name, obj, method):
        original = getattr(obj, method)
        def closing(*args, **kwargs):
            print("closing", name, flush=True)
            return original(*args, **kwargs)
        setattr(obj, method, closing)

    running = threading.Event()
    tasks = []
    def handler(payload):
        running.set()
        time.sleep(0.3)  # still running when the interpreter exits
        return "finished"

    def open_service():
        service = cw.TaskService(sys.argv[1])
        service.create_queue("q", handler=handler)
        tasks.append(service.enqueue("q", b"x"))
        announce("service", service, "close")
        return service

    def open_worker():
        worker = cw.Worker()
        announce("worker", worker, "_close")
        return worker

    first, second = (open_service, open_worker) if sys.argv[2] == "service" else (open_worker, open_service)
    kept = [first(), second()]
    running.wait(10)
    print(tasks[0], "exiting", flush=True)
"""


@pytest.mark.parametrize("opened_first", ["service", "worker"])
def test_interpreter_exit_closes_task_services_before_workers(tmp_path: Any,
                                                             opened_first: str) -> None:
    """The exit hook closes every task service first, while its worker can
    still finish the handler it runs, then every worker, whichever was
    opened first."""
    db = str(tmp_path / "tasks.db")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(EXIT_ORDER_SCRIPT), db,
                           opened_first], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    _assert_clean_exit(proc, 0.0)
    lines = proc.stdout.splitlines()
    assert [line.split()[-1] for line in lines] == ["exiting", "service", "worker"], proc.stdout
    task_id = lines[0].split()[0]
    with TaskService(db) as service:  # the handler finished: its outcome was kept
        assert service.get(task_id)[:2] == ("completed", "finished")


# ---- os.fork() --------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_fork_child_gets_a_usable_empty_worker_and_parent_is_unaffected() -> None:
    proc, elapsed = _run_script("""
        import os, sys, threading, time, callbackworker as cw

        w = cw.Worker(concurrency=2)
        w.open_route("side")
        cw.wait(cw.start(lambda m: None, b"warm"), 5000)   # the default worker exists

        def slow(m):
            time.sleep(0.4)
            return b"slow-" + bytes(m)

        started = threading.Event()
        def first(m):
            started.set()
            return slow(m)

        parent_jobs = [w.start(first, b"0")] + [w.start(slow, b"%d" % i) for i in range(1, 5)]
        side_job = w.start(slow, b"side", route="side")
        default_job = cw.start(slow, b"d")
        started.wait(5)
        assert w.phase(parent_jobs[0]) == cw.Phase.RUNNING

        pid = os.fork()
        if pid == 0:
            code = 10
            try:
                # the parent's jobs do not exist here
                code = 11
                assert not w.job_known(parent_jobs[0])
                assert not cw.job_known(default_job)
                code = 12
                j = w.start(lambda m: bytes(m).upper(), b"child")
                assert w.wait(j, 5000) == b"CHILD"
                code = 13
                js = w.start_many(lambda m: bytes(m)[::-1], [b"ab", b"cd"])
                assert [w.wait(x, 5000) for x in js] == [b"ba", b"dc"]
                code = 14
                k = cw.start(lambda m: bytes(m) + b"!", b"default")
                assert cw.wait(k, 5000) == b"default!"
                code = 15
                # routes start over too: only "default" exists
                assert w.route_meta("side", cw.RouteMetaKey.KNOWN) == 0
                w.open_route("side")
                s = w.start(lambda m: b"side-child", b"", route="side")
                assert w.wait(s, 5000) == b"side-child"
                code = 16
                t = w.start(lambda m: time.sleep(5), b"", timeout_ms=100)
                try:
                    w.wait(t, 5000)
                except cw.JobTimeoutError:
                    pass
                else:
                    raise AssertionError("no timeout in the child")
                code = 17
                w.close()
                code = 42
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                print("child hung")
                sys.exit(3)
            time.sleep(0.02)
        print("child", os.waitstatus_to_exitcode(status))
        results = [w.wait(j, 10000) for j in parent_jobs]
        print("parent", results == [b"slow-%d" % i for i in range(5)])
        print("side", w.wait(side_job, 10000) == b"slow-side")
        print("default", cw.wait(default_job, 10000) == b"slow-d")
        w.close()
    """)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["child 42", "parent True", "side True", "default True"], \
        f"{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_fork_with_a_closed_worker_and_from_a_busy_parent() -> None:
    proc, elapsed = _run_script("""
        import os, sys, time, callbackworker as cw
        closed = cw.Worker()
        closed.close()
        busy = cw.Worker(concurrency=2)
        busy.start_many(lambda m: time.sleep(0.001), [b""] * 1000)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    closed.start(lambda m: None, b"")
                except cw.WorkerClosedError:
                    code = 2
                j = busy.start(lambda m: b"child", b"")
                if busy.wait(j, 5000) == b"child" and code == 2:
                    code = 42
                busy.close()
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        busy.close(drain=True)
        print("parent done")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["child 42", "parent done"], proc.stdout + proc.stderr


# ---- KeyboardInterrupt while waiting -------------------------------------------------


SIGINT_SCRIPT = """
import signal, sys, time, callbackworker as cw
# a shell may start background jobs with SIGINT ignored: ask for Ctrl-C
signal.signal(signal.SIGINT, signal.default_int_handler)
verb = sys.argv[1]
w = cw.Worker()
def slow(m):
    time.sleep(2.0)
    return b"unharmed"
j = w.start(slow, b"x")
print("ready", flush=True)
try:
    if verb == "wait":
        w.wait(j)
    elif verb == "wait_complete":
        w.wait_complete(j)
    elif verb == "wait_timeout":
        w.wait(j, 60000)
    elif verb == "wait_drained":
        w.wait_drained("default")
    print("not interrupted", flush=True)
    sys.exit(0)
except KeyboardInterrupt:
    print("KeyboardInterrupt %.6f" % time.monotonic(), flush=True)
print("known", w.job_known(j), flush=True)
print("status", w.status(j).name, flush=True)
print("result", w.wait(j, 20000).decode(), flush=True)
w.close()
"""


def _interrupt(script: str, *args: str, pauses: Tuple[float, ...] = (0.5,)
               ) -> Tuple[int, str, str, float]:
    """Runs ``script`` (which prints "ready" first), sends it SIGINT after
    each of ``pauses`` (seconds) and returns its exit status, stdout,
    stderr and when the first SIGINT was sent (CLOCK_MONOTONIC, shared
    with the child)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        sent = 0.0
        for i, pause in enumerate(pauses):
            time.sleep(pause)
            if i == 0:
                sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err, sent


@pytest.mark.skipif(not POSIX, reason="sends SIGINT")
@pytest.mark.parametrize("verb", ["wait", "wait_complete", "wait_timeout", "wait_drained"])
def test_keyboard_interrupt_while_the_main_thread_waits(verb: str) -> None:
    returncode, out, err, sent = _interrupt(SIGINT_SCRIPT, verb)
    assert returncode == 0, err
    assert "Traceback" not in err, err
    lines = out.splitlines()
    assert lines[0].startswith("KeyboardInterrupt "), out
    # promptly: well before the job (2 s) completes
    if LINUX:
        latency = float(lines[0].split()[1]) - sent
        assert latency < 1.0, f"KeyboardInterrupt {latency:.2f}s after SIGINT"
    assert lines[1:] == ["known True", "status PENDING", "result unharmed"], out


CLOSE_SIGINT_SCRIPT = """
import gc, signal, sys, threading, time, callbackworker as cw

signal.signal(signal.SIGINT, signal.default_int_handler)
verb = sys.argv[1]
started = threading.Event()
def slow(*args):
    started.set()
    time.sleep(3.0)
    return b"done"
finished, later = threading.Event(), []
if verb == "executor_shutdown":
    ex = cw.Executor()
    future = ex.submit(slow)
else:
    w = cw.Worker()
    j = w.start(slow, b"x")
    w.start(lambda m: finished.set(), b"")
    w.start(lambda m: later.append(1), b"")
started.wait()
print("ready", flush=True)
try:
    if verb == "close":
        w.close()
    elif verb == "close_drain":
        w.start(lambda m: None, b"queued")
        w.close(drain=True)
    elif verb == "gc_del":          # the last reference goes
        del w
    elif verb == "gc_collect":      # the collector finds it in a cycle
        cycle = [w]
        cycle.append(cycle)
        del w, cycle
        gc.collect()
    else:
        ex.shutdown()
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt %.6f" % time.monotonic(), flush=True)
if verb.startswith("gc_"):
    # the release went on in the background: the queued jobs never run
    time.sleep(3.5)
    print("queued jobs ran" if later or finished.is_set() else "queued jobs shut down", flush=True)
"""


@pytest.mark.skipif(not POSIX, reason="sends SIGINT")
@pytest.mark.parametrize("verb", ["close", "close_drain", "executor_shutdown", "gc_del",
                                  "gc_collect"])
def test_keyboard_interrupt_while_the_main_thread_closes(verb: str) -> None:
    """Ctrl-C interrupts a close waiting for a running callback, also the
    one a collected worker's finalizer runs (where the interrupt is raised
    in the code that let the worker go, not printed as "Exception ignored"
    and dropped); the close goes on in the background and the interpreter
    still exits cleanly."""
    returncode, out, err, sent = _interrupt(CLOSE_SIGINT_SCRIPT, verb)
    assert returncode == 0, err
    assert "Traceback" not in err, err
    lines = out.splitlines()
    assert "Exception ignored" not in err, err
    assert lines and lines[0].startswith("KeyboardInterrupt "), out
    if LINUX:  # promptly: well before the callback (3 s) returns
        latency = float(lines[0].split()[1]) - sent
        assert latency < 1.5, f"KeyboardInterrupt {latency:.2f}s after SIGINT"
    if verb.startswith("gc_"):
        assert lines[1:] == ["queued jobs shut down"], out


# ---- fork from inside a callback -------------------------------------------------

FORK_IN_CALLBACK = """
import os, sys, time, callbackworker as cw

w = cw.Worker()
later = []

def forks(request):
    pid = os.fork()
    if pid == 0:
        if request[0:1] == b"x":
            sys.exit(7)
        return None              # the child ends here
    request[:] = str(pid).encode().ljust(len(request))[:len(request)]

def queued(request):
    later.append(os.getpid())

for first, want in ((b" ", 0), (b"x", 7)):
    gate = w.start(forks, first + b" " * 11)
    w.start(queued, b"")          # queued behind: the child must not run it
    pid = int(w.wait(gate).strip())
    deadline = time.monotonic() + 5
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert done, "the forked child did not end"
    assert os.waitstatus_to_exitcode(status) == want, status
w.wait_drained("default", 5000)
assert later == [os.getpid()] * 2, later
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_from_inside_a_callback_ends_the_child_when_the_callback_returns():
    """A child forked from inside a callback is a copy of one worker thread;
    it ends when the callback returns (0, or as SystemExit says) and never
    runs the parent's queued jobs; the parent is unaffected."""
    proc, elapsed = _run_script(FORK_IN_CALLBACK)
    _assert_clean_exit(proc, elapsed, limit=SUBPROCESS_TIMEOUT)
    assert proc.stdout.strip() == "ok"


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="compares CLOCK_MONOTONIC across processes (Linux)")
def test_interpreter_exit_with_10k_queued_and_one_running_takes_under_a_second() -> None:
    """Issue bar: the interpreter exits within a second of the end of the
    script, with 10k jobs queued and one callback spinning in Python."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time, callbackworker as cw
        w = cw.Worker()
        def spin(m):
            while True:
                pass
        w.start(spin, b"")
        w.start_many(lambda m: None, [b"q"] * 10_000)
        time.sleep(0.2)
        print(time.monotonic(), flush=True)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    ended = time.monotonic()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    exit_started = float(out.strip().splitlines()[-1])
    assert t0 < exit_started < ended
    assert ended - exit_started < 1.0, f"exit took {ended - exit_started:.2f}s"


def test_waiting_behind_a_thread_that_waits_on_another_route_is_not_a_deadlock() -> None:
    """A callback waiting (no limit) for a job queued on its own route is only
    refused when every other thread of the route is stuck waiting on that
    route too; a sibling waiting on another route's job will come free."""
    w = Worker(concurrency=2)
    try:
        w.open_route("other")
        gate = threading.Event()
        other = w.start(lambda m: gate.wait(10), b"", route="other")
        a_waiting = threading.Event()
        outcome: Dict[str, Any] = {}

        def a(m: memoryview) -> None:           # blocks on another route's job
            a_waiting.set()
            w.wait(other)

        def b(m: memoryview) -> None:           # waits for a job queued behind it
            assert a_waiting.wait(10)
            time.sleep(0.05)                    # let A block in its wait
            queued = w.start(lambda m: None, b"later")
            threading.Timer(0.2, gate.set).start()
            try:
                outcome["b"] = w.wait(queued)
            except BaseException as exc:  # recorded and asserted below
                outcome["b"] = exc

        ja, jb = w.start(a, b""), w.start(b, b"")
        w.wait(ja, 10_000)
        w.wait(jb, 10_000)
        assert outcome["b"] == b"later", outcome
    finally:
        w.close()


# ---- Ctrl-C during a collected worker's close: where the interrupt lands -----------

GC_SIGINT_PREAMBLE = r"""
import os, signal, sys, threading, time, callbackworker as cw
signal.signal(signal.SIGINT, signal.default_int_handler)
started = threading.Event()
def slow(*args):
    started.set(); time.sleep(3.0); return b"done"
w = cw.Worker(); w.start(slow, b"x"); started.wait()
"""

HOLDER_DEL_SCRIPT = GC_SIGINT_PREAMBLE + r"""
class Holder:
    def __init__(self, w): self.w = w
    def __del__(self):
        self.w = None      # the worker's finalizer runs here, Ctrl-C comes during it
        len("x")           # a call in this __del__ after it
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    h = Holder(w); del w; del h
    time.sleep(2)
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""

PROFILER_SCRIPT = GC_SIGINT_PREAMBLE + r"""
calls = []
def profiler(frame, event, arg):
    calls.append(event)
sys.setprofile(profiler)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    del w
    time.sleep(2)
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
print("profiler kept" if sys.getprofile() is profiler and calls else "profiler lost", flush=True)
"""

STALE_SCRIPT = GC_SIGINT_PREAMBLE + r"""
print("ready", flush=True)
try:
    del w                    # Ctrl-C during the release: delivered at the next call
    i = 0
    while i < 10 ** 10:      # no call here: a second Ctrl-C ends the loop first
        i += 1
    print("loop ended", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)   # the first interrupt must not land here
print("after", flush=True)
"""


@pytest.mark.skipif(not POSIX, reason="sends SIGINT")
@pytest.mark.parametrize("script", ["holder_del", "profiler"])
def test_ctrl_c_during_a_collected_workers_close_reaches_the_code(script: str) -> None:
    """The interrupt is raised at the first call outside every finalizer:
    not inside an object's ``__del__`` that let the worker go (where the
    interpreter would print "Exception ignored" and drop it), and through a
    profile function the program had set, which stays set."""
    source = HOLDER_DEL_SCRIPT if script == "holder_del" else PROFILER_SCRIPT
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert "Exception ignored" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:1] == ["KeyboardInterrupt"], (proc.stdout, proc.stderr)
    if script == "profiler":
        assert lines[1:] == ["profiler kept"], proc.stdout


@pytest.mark.skipif(not POSIX, reason="sends SIGINT")
@pytest.mark.skipif(sys.version_info[:2] == (3, 13),
                    reason="CPython 3.13: while any profile function is set, a "
                           "KeyboardInterrupt a signal raises in a loop escapes the "
                           "enclosing try (exit 130), with or without this package")
def test_a_second_ctrl_c_drops_the_interrupt_still_to_be_delivered() -> None:
    """Ctrl-C during a collected worker's close, then code that makes no
    call, then Ctrl-C again: the second interrupt ends the code, and the
    first, still pending, is not raised into the handler of the second."""
    returncode, out, err, _ = _interrupt(STALE_SCRIPT, pauses=(0.5, 1.0))  # release, loop
    assert returncode == 0, err
    assert out.splitlines() == ["KeyboardInterrupt", "after"], (out, err)
