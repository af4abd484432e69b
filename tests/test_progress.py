"""``current_job()``, progress reports and the response store (SPEC section 3,
seed: progress-and-response-store).

Reference behaviour (seeds/progress-and-response-store.txt): a running job
may send "progress" responses to its caller; with ``callbackStoreResponse``
each response is stored and a "query" returns "a merge where later values
override earlier ones", merging first the ``callbackData`` given at create
time, then each response's data.  SPEC maps that to
``start(..., on_progress=fn, store_response=False, callback_data=None)``,
``current_job().progress(data)``, ``Worker.query(job_id) -> dict`` and
``Worker.progress(job_id)`` (the latest update).  The store lives as long as
the job (``wait``/``take`` destroy both).

Inside a callback ``current_job()`` describes the running job: ``.id``,
``.route`` (1 for the default route), ``.attempt`` (1 on the first run),
``.deadline`` (``time.monotonic()`` seconds, or None without a run-time
limit) and ``.cancel_requested`` (cooperative cancel: ``cancel()`` on a
running job returns False and only sets this flag).

Every wait is bounded; no test asserts that anything is fast.  The deadline
check compares clocks with ordering bounds only (the deadline lies between
"start was called" + timeout and "the callback looked" + timeout).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List

import pytest

import callbackworker
from callbackworker import (
    CallbackWorkerError,
    JobContext,
    JobFailedError,
    JobMetaKey,
    Status,
    UnknownJobError,
    WaitTimeoutError,
    Worker,
    current_job,
)

LONG = 10.0
LONG_MS = 10_000
EPS = 0.05  # seconds: float rounding between the core's clock and time.monotonic()


@pytest.fixture
def events() -> Iterator[List[threading.Event]]:
    """Events callbacks block on; all set at teardown so nothing stays stuck."""
    made: List[threading.Event] = []
    try:
        yield made
    finally:
        for e in made:
            e.set()


def new_event(events: List[threading.Event]) -> threading.Event:
    e = threading.Event()
    events.append(e)
    return e


def noop(request: memoryview) -> None:
    return None


# ---- current_job() -------------------------------------------------------------


def test_current_job_fields_on_the_default_route(worker):
    seen: Dict[str, Any] = {}

    def cb(request: memoryview) -> None:
        ctx = current_job()
        seen.update(ctx=ctx, id=ctx.id, route=ctx.route, attempt=ctx.attempt,
                    deadline=ctx.deadline, cancel=ctx.cancel_requested)

    job = worker.start(cb, b"x")
    route = worker.job_meta(job, JobMetaKey.ROUTE)
    worker.wait(job, LONG_MS)
    assert isinstance(seen["ctx"], JobContext)
    assert seen["id"] == job
    assert seen["route"] == 1 == route
    assert seen["attempt"] == 1
    assert seen["deadline"] is None
    assert seen["cancel"] is False


def test_current_job_route_on_an_opened_route(worker):
    rid = worker.open_route("progress-route", concurrency=2)
    assert rid != 1
    seen: List[Any] = []

    def cb(request: memoryview) -> None:
        ctx = current_job()
        seen.append((ctx.id, ctx.route, ctx.attempt))

    jobs = [worker.start(cb, b"r", route="progress-route") for _ in range(3)]
    routes = [worker.job_meta(j, JobMetaKey.ROUTE) for j in jobs]
    for j in jobs:
        worker.wait(j, LONG_MS)
    assert sorted(seen) == [(j, rid, 1) for j in jobs]
    assert routes == [rid] * 3


def test_current_job_deadline_with_a_timeout(worker):
    timeout_ms = 600_000  # long enough never to pass on a slow machine
    seen: Dict[str, float] = {}

    def cb(request: memoryview) -> None:
        seen["now"] = time.monotonic()
        seen["deadline"] = current_job().deadline

    before = time.monotonic()
    job = worker.start(cb, b"", timeout_ms)
    worker.wait(job, LONG_MS)
    deadline = seen["deadline"]
    assert isinstance(deadline, float)
    # the run started after `before` and no later than the callback looked
    assert before + timeout_ms / 1000 - EPS <= deadline <= seen["now"] + timeout_ms / 1000 + EPS


def test_current_job_deadline_from_the_route_timeout(worker):
    worker.open_route("timed-route", timeout_ms=500_000)
    seen: Dict[str, Any] = {}

    def cb(request: memoryview) -> None:
        seen["now"] = time.monotonic()
        seen["deadline"] = current_job().deadline

    before = time.monotonic()
    job = worker.start(cb, b"", route="timed-route")  # takes the route's timeout
    worker.wait(job, LONG_MS)
    assert before + 500 - EPS <= seen["deadline"] <= seen["now"] + 500 + EPS


def test_current_job_deadline_none_without_timeout(worker):
    seen: List[Any] = []
    job = worker.start(lambda r: seen.append(current_job().deadline), b"", -1)
    worker.wait(job, LONG_MS)
    assert seen == [None]


def test_cancel_requested_on_the_running_job(worker, events):
    started = new_event(events)
    cancelled = new_event(events)
    flags: List[bool] = []

    def cb(request: memoryview) -> bytes:
        ctx = current_job()
        flags.append(ctx.cancel_requested)
        started.set()
        assert cancelled.wait(LONG), "cancel never happened"
        flags.append(ctx.cancel_requested)
        flags.append(current_job().cancel_requested)  # a fresh context agrees
        return b"finished early"

    job = worker.start(cb, b"")
    assert started.wait(LONG)
    assert worker.cancel(job) is False  # running: cannot be removed
    cancelled.set()
    assert worker.wait(job, LONG_MS) == b"finished early"  # completes normally
    assert flags == [False, True, True]


def test_cancel_requested_stays_false_for_other_jobs(worker, events):
    """Cancelling one running job does not flag another one."""
    w2 = Worker(concurrency=2)
    try:
        started = [new_event(events), new_event(events)]
        go = new_event(events)
        flags: Dict[int, bool] = {}

        def cb(request: memoryview) -> None:
            i = request[0]
            started[i].set()
            assert go.wait(LONG)
            flags[i] = current_job().cancel_requested

        a = w2.start(cb, b"\x00")
        b = w2.start(cb, b"\x01")
        assert started[0].wait(LONG) and started[1].wait(LONG)
        assert w2.cancel(a) is False
        go.set()
        w2.wait(a, LONG_MS)
        w2.wait(b, LONG_MS)
        assert flags == {0: True, 1: False}
    finally:
        w2.close()


def test_current_job_outside_a_callback_raises():
    with pytest.raises(CallbackWorkerError):
        current_job()
    errors: List[BaseException] = []

    def in_thread() -> None:
        try:
            current_job()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=in_thread, daemon=True)
    t.start()
    t.join(LONG)
    assert len(errors) == 1 and isinstance(errors[0], CallbackWorkerError)


def test_current_job_after_the_callback_returned_raises(worker):
    """A context kept past its callback cannot report progress any more
    (progress.py: JobContext.progress), and current_job() on that thread,
    between jobs, raises."""
    kept: List[JobContext] = []
    job = worker.start(lambda r: kept.append(current_job()), b"",
                       store_response=True)
    worker.wait_complete(job, LONG_MS)
    with pytest.raises(CallbackWorkerError):
        kept[0].progress({"late": True})
    assert worker.query(job) == {}
    worker.wait(job, LONG_MS)


# ---- progress() and on_progress ---------------------------------------------------


def test_on_progress_called_for_every_update_in_order_on_the_worker_thread(worker):
    calls: List[Any] = []
    cb_thread: List[int] = []
    seen_during: List[int] = []
    updates = [{"pct": 10}, "halfway", 3, {"pct": 100}, None, [1, 2]]

    def on_progress(job_id: int, data: Any) -> None:
        calls.append((job_id, data, threading.get_ident()))

    def cb(request: memoryview) -> None:
        cb_thread.append(threading.get_ident())
        ctx = current_job()
        for u in updates:
            ctx.progress(u)
            seen_during.append(len(calls))  # synchronous: already called

    job = worker.start(cb, b"", on_progress=on_progress)
    worker.wait(job, LONG_MS)
    assert [(j, d) for j, d, _ in calls] == [(job, u) for u in updates]
    assert {t for _, _, t in calls} == {cb_thread[0]}
    assert cb_thread[0] != threading.get_ident()
    assert seen_during == list(range(1, len(updates) + 1))


def test_on_progress_sees_the_same_object(worker):
    got: List[Any] = []
    payload = {"big": list(range(1000))}
    job = worker.start(lambda r: current_job().progress(payload), b"",
                       on_progress=lambda j, d: got.append(d))
    worker.wait(job, LONG_MS)
    assert got == [payload] and got[0] is payload


def test_on_progress_for_several_jobs_gets_each_job_id():
    calls: List[Any] = []
    lock = threading.Lock()

    def on_progress(job_id: int, data: Any) -> None:
        with lock:
            calls.append((job_id, data))

    def cb(request: memoryview) -> None:
        for i in range(5):
            current_job().progress(i)

    with Worker(concurrency=2) as w:
        jobs = [w.start(cb, b"", on_progress=on_progress) for _ in range(20)]
        for j in jobs:
            w.wait(j, LONG_MS)
    for j in jobs:
        assert [d for jid, d in calls if jid == j] == [0, 1, 2, 3, 4]
    assert len(calls) == 100


def test_on_progress_exception_propagates_into_the_callback(worker):
    class Nope(Exception):
        pass

    def on_progress(job_id: int, data: Any) -> None:
        raise Nope("from on_progress")

    caught: List[BaseException] = []

    def catches(request: memoryview) -> None:
        try:
            current_job().progress(1)
        except Nope as exc:
            caught.append(exc)

    job = worker.start(catches, b"", on_progress=on_progress)
    worker.wait(job, LONG_MS)
    assert len(caught) == 1
    job = worker.start(lambda r: current_job().progress(2), b"", on_progress=on_progress)
    with pytest.raises(JobFailedError) as info:
        worker.wait(job, LONG_MS)
    assert isinstance(info.value.__cause__, Nope)


def test_progress_returns_the_latest_update(worker, events):
    step = new_event(events)
    reported = new_event(events)
    snapshots: List[Any] = []

    def cb(request: memoryview) -> None:
        ctx = current_job()
        snapshots.append(worker.progress(ctx.id))  # before the first update
        for u in ({"a": 1}, "text", 7):
            ctx.progress(u)
            snapshots.append(worker.progress(ctx.id))
        reported.set()
        assert step.wait(LONG)

    job = worker.start(cb, b"", on_progress=lambda j, d: None)
    assert reported.wait(LONG)
    assert snapshots == [None, {"a": 1}, "text", 7]
    assert worker.progress(job) == 7  # from outside, while it runs
    step.set()
    assert worker.wait_complete(job, LONG_MS)
    assert worker.progress(job) == 7  # after completion, before wait
    worker.wait(job, LONG_MS)


def test_progress_of_a_job_without_progress_options_is_none(worker):
    job = worker.start(noop, b"")
    worker.wait_complete(job, LONG_MS)
    assert worker.progress(job) is None
    assert worker.query(job) == {}
    worker.wait(job, LONG_MS)


def test_job_without_progress_options_calling_progress_is_a_no_op(worker):
    def cb(request: memoryview) -> bytes:
        ctx = current_job()
        ctx.progress({"ignored": True})
        ctx.progress("also ignored")
        return b"ok"

    job = worker.start(cb, b"")
    assert worker.wait_complete(job, LONG_MS)
    assert worker.status(job) == Status.OK
    assert worker.progress(job) is None
    assert worker.query(job) == {}
    assert worker.wait(job, LONG_MS) == b"ok"


def test_progress_options_and_none_only_is_untracked(worker):
    """callback_data=None, store_response=False, on_progress=None given
    explicitly are the same as not giving them."""
    job = worker.start(lambda r: current_job().progress({"x": 1}), b"",
                       on_progress=None, store_response=False, callback_data=None)
    worker.wait_complete(job, LONG_MS)
    assert worker.progress(job) is None
    assert worker.query(job) == {}
    worker.wait(job, LONG_MS)


# ---- query(): the response store ---------------------------------------------------


def test_query_merge_order(worker, events):
    """callback_data first, then every dict update in order; later keys win;
    non-dict updates are reported and kept as latest, not merged."""
    callback_data = {"a": "cd", "b": "cd", "c": "cd"}
    original = dict(callback_data)
    updates = [
        {"b": "u1", "d": "u1"},
        "a string",
        {"c": "u3", "d": "u3"},
        42,
        {"b": "u5"},
        ["not", "a", "dict"],
    ]
    during: List[Any] = []
    reported: List[Any] = []
    go = new_event(events)
    midway = new_event(events)

    def cb(request: memoryview) -> None:
        ctx = current_job()
        during.append((worker.query(ctx.id), worker.progress(ctx.id)))
        for u in updates:
            ctx.progress(u)
            during.append((worker.query(ctx.id), worker.progress(ctx.id)))
        midway.set()
        assert go.wait(LONG)

    job = worker.start(cb, b"", store_response=True, callback_data=callback_data,
                       on_progress=lambda j, d: reported.append(d))
    assert midway.wait(LONG)
    expected_steps = [
        ({"a": "cd", "b": "cd", "c": "cd"}, None),
        ({"a": "cd", "b": "u1", "c": "cd", "d": "u1"}, {"b": "u1", "d": "u1"}),
        ({"a": "cd", "b": "u1", "c": "cd", "d": "u1"}, "a string"),
        ({"a": "cd", "b": "u1", "c": "u3", "d": "u3"}, {"c": "u3", "d": "u3"}),
        ({"a": "cd", "b": "u1", "c": "u3", "d": "u3"}, 42),
        ({"a": "cd", "b": "u5", "c": "u3", "d": "u3"}, {"b": "u5"}),
        ({"a": "cd", "b": "u5", "c": "u3", "d": "u3"}, ["not", "a", "dict"]),
    ]
    assert during == expected_steps
    assert reported == updates  # every update reported, dict or not
    final = {"a": "cd", "b": "u5", "c": "u3", "d": "u3"}
    assert worker.query(job) == final  # from outside while it runs
    go.set()
    assert worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == final  # after completion, before wait
    assert worker.progress(job) == ["not", "a", "dict"]
    assert callback_data == original  # the caller's dict is not modified
    worker.wait(job, LONG_MS)


def test_query_returns_a_new_dict_each_call(worker):
    job = worker.start(lambda r: current_job().progress({"k": [1]}), b"",
                       store_response=True, callback_data={"base": 0})
    worker.wait_complete(job, LONG_MS)
    first = worker.query(job)
    first["base"] = "changed"
    first["extra"] = 1
    assert worker.query(job) == {"base": 0, "k": [1]}
    assert worker.query(job) is not worker.query(job)
    worker.wait(job, LONG_MS)


def test_query_with_store_response_and_no_callback_data(worker):
    def cb(request: memoryview) -> None:
        ctx = current_job()
        ctx.progress({"x": 1})
        ctx.progress({"x": 2, "y": 2})

    job = worker.start(cb, b"", store_response=True)
    worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == {"x": 2, "y": 2}
    assert worker.progress(job) == {"x": 2, "y": 2}
    worker.wait(job, LONG_MS)


def test_query_without_store_response_returns_callback_data_only(worker):
    def cb(request: memoryview) -> None:
        ctx = current_job()
        ctx.progress({"a": "changed", "new": 1})
        ctx.progress("latest")

    job = worker.start(cb, b"", callback_data={"a": 1, "b": 2})
    worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == {"a": 1, "b": 2}
    assert worker.progress(job) == "latest"
    worker.wait(job, LONG_MS)


def test_query_with_only_on_progress_is_empty(worker):
    job = worker.start(lambda r: current_job().progress({"a": 1}), b"",
                       on_progress=lambda j, d: None)
    worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == {}
    assert worker.progress(job) == {"a": 1}
    worker.wait(job, LONG_MS)


def test_query_with_empty_callback_data(worker):
    job = worker.start(noop, b"", callback_data={})
    worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == {}
    assert worker.progress(job) is None
    worker.wait(job, LONG_MS)


def test_store_survives_a_failed_job_until_wait(worker):
    def cb(request: memoryview) -> None:
        current_job().progress({"got": "far"})
        raise RuntimeError("then failed")

    job = worker.start(cb, b"", store_response=True, callback_data={"id": 5})
    worker.wait_complete(job, LONG_MS)
    assert worker.status(job) == Status.ERROR
    assert worker.query(job) == {"id": 5, "got": "far"}
    assert worker.progress(job) == {"got": "far"}
    with pytest.raises(JobFailedError):
        worker.wait(job, LONG_MS)
    with pytest.raises(UnknownJobError):
        worker.query(job)
    with pytest.raises(UnknownJobError):
        worker.progress(job)


def test_store_of_a_queued_job_is_callback_data(worker, events):
    go = new_event(events)
    first = worker.start(lambda r: go.wait(LONG) and None, b"")
    queued = worker.start(noop, b"", store_response=True, callback_data={"q": 1})
    assert worker.query(queued) == {"q": 1}
    assert worker.progress(queued) is None
    assert worker.cancel(queued) is True
    assert worker.query(queued) == {"q": 1}
    go.set()
    worker.wait(first, LONG_MS)


# ---- lifetime: wait/take destroy the store ----------------------------------------


@pytest.mark.parametrize("destroy", ["wait", "take", "take_blob"])
def test_query_and_progress_unknown_after_the_job_is_destroyed(worker, destroy):
    job = worker.start(lambda r: current_job().progress({"p": 1}), b"",
                       store_response=True, callback_data={"c": 0},
                       on_progress=lambda j, d: None)
    assert worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == {"c": 0, "p": 1}
    getattr(worker, destroy)(job)
    with pytest.raises(UnknownJobError):
        worker.query(job)
    with pytest.raises(UnknownJobError):
        worker.progress(job)


def test_query_and_progress_unknown_ids(worker):
    for bad in (0, -1, 10 ** 12, 2 ** 70):
        with pytest.raises(UnknownJobError):
            worker.query(bad)
        with pytest.raises(UnknownJobError):
            worker.progress(bad)
    with pytest.raises(TypeError):
        worker.query("1")
    with pytest.raises(TypeError):
        worker.progress(1.0)


def _timed_out_wait(worker: Worker, job: int, how: str) -> BaseException:
    """Runs a wait that must time out; returns the exception it raised."""
    outcome: List[BaseException] = []

    def attempt() -> None:
        try:
            worker.wait(job, 0 if how == "timeout_0" else 10)
        except BaseException as exc:
            outcome.append(exc)

    if how == "other_thread":
        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(LONG)
        assert not t.is_alive()
    else:
        attempt()
    assert len(outcome) == 1
    return outcome[0]


@pytest.mark.parametrize("how", ["main_thread", "timeout_0", "other_thread"])
def test_store_survives_a_timed_out_wait(worker, events, how):
    """SPEC section 2: a wait timeout raises WaitTimeoutError and the job is
    untouched; the store lives as long as the job, so query/progress are
    unchanged after it (whichever thread waited, whatever the timeout)."""
    go = new_event(events)
    reported = new_event(events)

    def cb(request: memoryview) -> None:
        current_job().progress({"step": 1})
        reported.set()
        assert go.wait(LONG)
        current_job().progress({"step": 2})

    job = worker.start(cb, b"", store_response=True, callback_data={"a": 1})
    assert reported.wait(LONG)
    assert worker.query(job) == {"a": 1, "step": 1}
    assert isinstance(_timed_out_wait(worker, job, how), WaitTimeoutError)
    assert worker.job_known(job)
    assert worker.query(job) == {"a": 1, "step": 1}
    assert worker.progress(job) == {"step": 1}
    go.set()
    assert worker.wait_complete(job, LONG_MS)
    assert worker.query(job) == {"a": 1, "step": 2}
    assert worker.progress(job) == {"step": 2}
    worker.wait(job, LONG_MS)


def test_queries_after_close_raise_worker_closed():
    w = Worker()
    job = w.start(noop, b"", store_response=True, callback_data={"a": 1})
    w.wait_complete(job, LONG_MS)
    w.close()
    with pytest.raises(callbackworker.WorkerClosedError):
        w.query(job)
    with pytest.raises(callbackworker.WorkerClosedError):
        w.progress(job)


# ---- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, "fn", b"x", object()])
def test_on_progress_not_callable_is_type_error(worker, bad):
    with pytest.raises(TypeError):
        worker.start(noop, b"", on_progress=bad)


@pytest.mark.parametrize("bad", [1, 0, None, "yes", "", 1.0])
def test_store_response_not_bool_is_type_error(worker, bad):
    with pytest.raises(TypeError):
        worker.start(noop, b"", store_response=bad)


@pytest.mark.parametrize("bad", [[("a", 1)], "a=1", 5, (("a", 1),), frozenset()])
def test_callback_data_not_dict_is_type_error(worker, bad):
    with pytest.raises(TypeError):
        worker.start(noop, b"", callback_data=bad)


def test_bad_progress_options_on_a_route_are_type_errors(worker):
    worker.open_route("bad-opts")
    with pytest.raises(TypeError):
        worker.start(noop, b"", route="bad-opts", on_progress=1)
    with pytest.raises(TypeError):
        worker.start(noop, b"", route="bad-opts", store_response=0)
    with pytest.raises(TypeError):
        worker.start(noop, b"", route="bad-opts", callback_data=[1])


def test_bad_progress_options_start_no_job(worker):
    """A rejected start leaves nothing behind: the next job id works and the
    route has nothing queued."""
    for kwargs in ({"on_progress": 1}, {"store_response": "y"}, {"callback_data": 1}):
        with pytest.raises(TypeError):
            worker.start(noop, b"", **kwargs)
    assert worker.route_meta("default", callbackworker.RouteMetaKey.QUEUED) == 0
    job = worker.start(noop, b"fine", store_response=True)
    assert worker.wait(job, LONG_MS) == b"fine"


# ---- module-level verbs on the default worker --------------------------------------


def test_module_level_progress_and_query():
    def cb(request: memoryview) -> None:
        current_job().progress({"m": 1})
        current_job().progress("last")

    job = callbackworker.start(cb, b"", store_response=True, callback_data={"d": 0})
    assert callbackworker.wait_complete(job, LONG_MS)
    assert callbackworker.query(job) == {"d": 0, "m": 1}
    assert callbackworker.progress(job) == "last"
    callbackworker.wait(job, LONG_MS)
    with pytest.raises(UnknownJobError):
        callbackworker.query(job)
