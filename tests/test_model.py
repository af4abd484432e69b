"""Model-based test: a real ``Worker`` against a plain-Python model of SPEC §2-3.

Hypothesis drives a ``RuleBasedStateMachine`` that starts jobs (``start``,
``start_text``, ``start_many``) on the default route and on named routes,
releases, cancels, waits for, takes and queries them, opens and closes
routes, and finally may close the worker.  Every answer the worker gives is
compared with what the model predicts from SPEC §2 (jobs) and the routes part
of §3 (``open_route``, ``close_route``, ``wait_drained``, ``route_meta``,
``route_info``).

Determinism: every route has concurrency 1, so the model knows which job each
route's thread runs (the head of the route's FIFO once the previous job has
completed).  A job is either free (its callback runs straight through) or
gated: its callback blocks on a per-job ``threading.Event`` that a rule
releases explicitly.  After every rule that can make a job run, ``settle``
brings the worker to a stable point: it waits (``wait_complete``) for every
job the model says is running and free, in FIFO order, until each route is
either idle or blocked in a gated job whose callback has signalled that it
started.  States are only ever compared at such stable points, so "queued"
and "running" are never a race.  Every callback records which job it ran,
and the per-route order must be the model's FIFO order.

Every blocking call has a finite timeout (``close``, which has none, runs in
a thread that is joined with one), so a bug fails the test instead of hanging
it.  Each example gets its own ``Worker``; nothing is shared between examples.

Size: ``CBW_MODEL_EXAMPLES`` examples (default 300) of up to
``CBW_MODEL_STEPS`` steps (default 50): about 12,000 steps, 10 s on two cores.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
)

import callbackworker
from callbackworker import (
    CallbackWorkerError,
    JobCancelledError,
    JobFailedError,
    JobMetaKey,
    JobNotCompleteError,
    JobTimeoutError,
    Phase,
    RouteClosedError,
    RouteMetaKey,
    RouteState,
    ShutdownError,
    State,
    Status,
    UnknownJobError,
    UnknownRouteError,
    WaitTimeoutError,
    Worker,
    WorkerClosedError,
)

EXAMPLES = int(os.environ.get("CBW_MODEL_EXAMPLES", "300"))
STEPS = int(os.environ.get("CBW_MODEL_STEPS", "50"))

LONG_MS = 10_000          # "must complete": never reached when all is well
LONG_S = LONG_MS / 1000
SLICE_MS = 100            # how often a long wait checks that nothing ran out of turn
GATE_S = 60.0             # a gate nobody releases fails its job instead of hanging
BLOCKED_SLACK_S = 0.02    # lets a waiter thread get from Worker.wait into the core
MAX_ROUTES = 5            # the default route plus four named ones
PACKAGE_DIR = os.path.dirname(callbackworker.__file__)

PHASE_TEXT = {Phase.QUEUED: "queued", Phase.RUNNING: "running", Phase.COMPLETED: "completed"}
STATUS_TEXT = {
    Status.OK: "success",
    Status.PENDING: "pending",
    Status.ERROR: "error",
    Status.TIMEOUT: "timeout",
    Status.SHUTDOWN: "shutdown",
    Status.CANCELLED: "cancelled",
}
COMPLETED_STATE = {
    Status.OK: State.SUCCEEDED,
    Status.ERROR: State.FAILED,
    Status.TIMEOUT: State.TIMED_OUT,
    Status.CANCELLED: State.CANCELLED,
    Status.SHUTDOWN: State.SHUT_DOWN,
}
FAILURE_CLASS = {
    Status.ERROR: JobFailedError,
    Status.TIMEOUT: JobTimeoutError,
    Status.CANCELLED: JobCancelledError,
    Status.SHUTDOWN: ShutdownError,
}

# Run-time limits far beyond any test step: no job ever times out here.
TIMEOUTS = (-1, 600_000, 3_600_000, 2_147_483_647)
BEHAVIOURS = ("echo", "upper", "longer", "raise", "int")
REQUEST_KINDS = ("bytes", "bytearray", "memoryview")
ROUTE_KEYS = (
    RouteMetaKey.STATE,
    RouteMetaKey.TIMEOUT,
    RouteMetaKey.PENDING,
    RouteMetaKey.QUEUED,
    RouteMetaKey.RUNNING,
    RouteMetaKey.DRAINED,
    RouteMetaKey.KNOWN,
    RouteMetaKey.CLOSE_ACCEPTED,
)
GATED = st.sampled_from([False, False, True])  # a third of the jobs wait for a release
ROUTE_NAME_CHARS = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))


# ---------------------------------------------------------------- callbacks


class Gate:
    """Holds one job's callback until a rule releases it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()


def expected_response(behaviour: str, request: bytes) -> Optional[bytes]:
    """The response a free or released callback produces; None = it fails."""
    if behaviour == "upper":
        return request.upper()
    if behaviour == "longer":
        return request + request + b"+"
    if behaviour == "raise":
        return None
    return request  # echo, int


class JobCallback:
    """The callback of one ``start*`` call.

    Records ``(token, request)`` in the machine's run log when it starts,
    blocks on the request's gate if it has one, then behaves: ``echo``
    returns None, ``upper`` upper-cases the view in place, ``longer`` returns
    a longer bytes object, ``raise`` raises ValueError, ``int`` returns
    ``rc``.  Requests of one ``start_many`` call are distinct, so
    ``(token, request)`` names exactly one job.
    """

    def __init__(self, token: int, behaviour: str, rc: int,
                 log: List[Tuple[int, bytes]], gates: Dict[bytes, Gate]) -> None:
        self.token = token
        self.behaviour = behaviour
        self.rc = rc
        self.log = log
        self.gates = gates

    def __repr__(self) -> str:
        return f"<JobCallback {self.token} {self.behaviour}>"

    def error_message(self) -> str:
        return f"boom {self.token}"

    def __call__(self, request: memoryview) -> Any:
        key = bytes(request)
        self.log.append((self.token, key))
        gate = self.gates.get(key)
        if gate is None:
            return self._behave(request, key)
        gate.started.set()
        try:
            if not gate.release.wait(GATE_S):
                raise RuntimeError("gate never released")
            return self._behave(request, key)
        finally:
            gate.finished.set()

    def _behave(self, request: memoryview, key: bytes) -> Any:
        if self.behaviour == "upper":
            request[:] = key.upper()
            return None
        if self.behaviour == "longer":
            return expected_response("longer", key)
        if self.behaviour == "raise":
            raise ValueError(self.error_message())
        if self.behaviour == "int":
            return self.rc
        return None


def as_request(data: bytes, kind: str) -> Tuple[Any, Optional[bytearray]]:
    """``data`` as the bytes-like ``kind``, plus the mutable buffer behind it
    (if any) so that the test can scribble on it after ``start``."""
    if kind == "bytes":
        return data, None
    buf = bytearray(data)
    return (buf if kind == "bytearray" else memoryview(buf)), buf


# ---------------------------------------------------------------- the model


@dataclass(eq=False)
class RouteModel:
    name: str
    id: int
    timeout_ms: int
    closed: bool = False
    queue: Deque["JobModel"] = field(default_factory=deque)
    running: Optional["JobModel"] = None
    ran: List[int] = field(default_factory=list)  # job ids in the order they started

    def drained(self) -> bool:
        return self.running is None and not self.queue

    def meta(self, key: RouteMetaKey) -> int:
        return {
            RouteMetaKey.STATE: int(RouteState.CLOSED if self.closed else RouteState.OPEN),
            RouteMetaKey.TIMEOUT: self.timeout_ms,
            RouteMetaKey.PENDING: len(self.queue),
            RouteMetaKey.QUEUED: len(self.queue),
            RouteMetaKey.RUNNING: int(self.running is not None),
            RouteMetaKey.DRAINED: int(self.drained()),
            RouteMetaKey.KNOWN: 1,
            RouteMetaKey.CLOSE_ACCEPTED: int(self.closed),
        }[key]


@dataclass(eq=False)
class JobModel:
    id: int
    route: RouteModel
    timeout_ms: int
    request: bytes
    callback: JobCallback
    gate: Optional[Gate]
    phase: Phase = Phase.QUEUED
    status: Status = Status.PENDING
    destroyed: bool = False

    @property
    def completed(self) -> bool:
        return self.phase == Phase.COMPLETED

    @property
    def succeeded(self) -> bool:
        return self.completed and self.status == Status.OK

    @property
    def blocked(self) -> bool:
        """Gated and not released: its callback cannot finish on its own."""
        return self.gate is not None and not self.gate.release.is_set()

    def state(self) -> State:
        if self.phase == Phase.QUEUED:
            return State.QUEUED
        if self.phase == Phase.RUNNING:
            return State.RUNNING
        return COMPLETED_STATE[self.status]

    def response(self) -> bytes:
        result = expected_response(self.callback.behaviour, self.request)
        assert result is not None
        return result

    def result_size(self) -> int:
        return len(self.response()) if self.succeeded else 0

    def complete(self, status: Status) -> None:
        self.phase = Phase.COMPLETED
        self.status = status

    def run_to_completion(self) -> None:
        ok = expected_response(self.callback.behaviour, self.request) is not None
        self.complete(Status.OK if ok else Status.ERROR)


def check_failure(err: BaseException, job: JobModel) -> None:
    """``err`` is the ``JobFailedError`` a failed ``job`` must raise."""
    assert type(err) is FAILURE_CLASS[job.status], (err, job.status)
    assert err.job_id == job.id
    assert err.status == job.status
    assert err.error_text
    if job.status == Status.ERROR:
        assert err.error_text == f"ValueError: {job.callback.error_message()}"
        assert isinstance(err.__cause__, ValueError)
        assert str(err.__cause__) == job.callback.error_message()
        assert err.__cause__.__traceback__ is not None


def raises(exc_type: type, call: Callable[[], Any]) -> BaseException:
    try:
        value = call()
    except exc_type as exc:
        return exc
    raise AssertionError(f"expected {exc_type.__name__}, got {value!r}")


class Background:
    """Runs ``call()`` in a daemon thread and keeps what it returned or raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join(self, timeout_s: float = LONG_S) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "a background call did not return in time"

    def wait_until_inside_package(self) -> None:
        """Until the thread runs callbackworker's own code (a blocking verb
        there is about to block in, or blocked in, the core), plus a little
        slack for it to get into the core."""
        deadline = time.monotonic() + LONG_S
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(self.thread.ident)  # type: ignore[arg-type]
            if frame is not None and os.path.dirname(frame.f_code.co_filename) == PACKAGE_DIR:
                time.sleep(BLOCKED_SLACK_S)
                return
            if not self.thread.is_alive():
                return
            time.sleep(0.001)
        raise AssertionError("the thread never called into callbackworker")


def close_worker(worker: Worker) -> None:
    closer = Background(worker.close)
    closer.join()
    assert closer.error is None, closer.error
    assert closer.result == 0


# Job verbs that take only a job id, by the name printed in failing sequences.
ID_VERBS: Dict[str, Callable[[Worker, int], Any]] = {
    "phase": lambda w, j: w.phase(j),
    "phase_text": lambda w, j: w.phase_text(j),
    "status": lambda w, j: w.status(j),
    "status_text": lambda w, j: w.status_text(j),
    "state": lambda w, j: w.state(j),
    "error_text": lambda w, j: w.error_text(j),
    "job_known": lambda w, j: w.job_known(j),
    "job_timeout": lambda w, j: w.job_timeout(j),
    "job_has_blob_result": lambda w, j: w.job_has_blob_result(j),
    "job_blob_result_size": lambda w, j: w.job_blob_result_size(j),
    "info": lambda w, j: w.info(j),
    "cancel": lambda w, j: w.cancel(j),
    "wait": lambda w, j: w.wait(j, 0),
    "wait_complete": lambda w, j: w.wait_complete(j, 0),
    "take": lambda w, j: w.take(j),
    "take_blob": lambda w, j: w.take_blob(j),
    **{f"job_meta({key.name})": (lambda w, j, key=key: w.job_meta(j, key))
       for key in JobMetaKey},
}
QUERY_VERBS = ("phase", "phase_text", "status", "status_text", "state", "error_text",
               "job_known", "job_timeout", "job_has_blob_result", "job_blob_result_size",
               "info")
ROUTE_VERBS: Dict[str, Callable[[Worker, str], Any]] = {
    "start": lambda w, r: w.start(noop, b"x", route=r),
    "start_text": lambda w, r: w.start_text(noop, "x", route=r),
    "start_many": lambda w, r: w.start_many(noop, [b"x"], route=r),
    "open_route": lambda w, r: w.open_route(r + "-new"),
    "close_route": lambda w, r: w.close_route(r),
    "wait_drained": lambda w, r: w.wait_drained(r, 0),
    "route_info": lambda w, r: w.route_info(r),
    **{f"route_meta({key.name})": (lambda w, r, key=key: w.route_meta(r, key))
       for key in RouteMetaKey},
}


def noop(request: memoryview) -> None:
    return None


# ---------------------------------------------------------------- the machine


class WorkerModel(RuleBasedStateMachine):
    """One Worker, one model; every rule acts on both and compares."""

    jobs = Bundle("jobs")
    routes = Bundle("routes")

    def __init__(self) -> None:
        super().__init__()
        self.worker = Worker()
        self.log: List[Tuple[int, bytes]] = []  # appended by callbacks, on C threads
        self.route_models: Dict[str, RouteModel] = {"default": RouteModel("default", 1, -1)}
        self.job_models: Dict[int, JobModel] = {}
        self.by_run_key: Dict[Tuple[int, bytes], JobModel] = {}
        self.gates: List[Gate] = []
        self.tokens = itertools.count(1)
        self.route_numbers = itertools.count(1)
        self.closed = False
        self.closer: Optional[Background] = None  # set while close() runs

    # ---- helpers ----------------------------------------------------

    def job(self, job_id: int) -> JobModel:
        return self.job_models[job_id]

    def route_model(self, route: Optional[str]) -> RouteModel:
        return self.route_models["default" if route is None else route]

    def new_callback(self, behaviour: str, rc: int,
                     gated: Dict[bytes, bool]) -> JobCallback:
        gates = {}
        for request, is_gated in gated.items():
            if is_gated:
                gates[request] = Gate()
                self.gates.append(gates[request])
        return JobCallback(next(self.tokens), behaviour, rc, self.log, gates)

    def record_job(self, job_id: int, route: RouteModel, timeout: Optional[int],
                   request: bytes, callback: JobCallback) -> None:
        assert isinstance(job_id, int) and job_id > 0, job_id
        assert job_id not in self.job_models, f"job id {job_id} issued twice"
        job = JobModel(job_id, route, route.timeout_ms if timeout is None else timeout,
                       request, callback, callback.gates.get(request))
        self.job_models[job_id] = job
        self.by_run_key[(callback.token, request)] = job
        route.queue.append(job)

    def check_started(self, job_id: int) -> None:
        """A new job has the route and run-time limit its start asked for
        (``info`` shows both, and everything else)."""
        job = self.job(job_id)
        self.check_info(job, self.worker.info(job_id))

    def start_kwargs(self, timeout: Optional[int], route: Optional[str]) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout_ms"] = timeout
        if route is not None:
            kwargs["route"] = route
        return kwargs

    def settle(self) -> None:
        """Runs the worker to a stable point, in step with the model: on each
        route, every free job the model says runs next is waited for, until
        the route is idle or its running job is blocked on its gate."""
        for route in self.route_models.values():
            while True:
                job = route.running
                if job is not None:
                    if job.blocked:
                        assert job.gate is not None
                        self.await_worker(lambda: job.gate.started.wait(SLICE_MS / 1000),
                                          f"job {job.id}, head of route {route.name!r}, "
                                          "never started")
                        break
                    self.await_worker(lambda: self.worker.wait_complete(job.id, SLICE_MS),
                                      f"job {job.id} on route {route.name!r} did not complete")
                    job.run_to_completion()
                    route.running = None
                if not route.queue:
                    break
                route.running = route.queue.popleft()
                route.running.phase = Phase.RUNNING
                route.ran.append(route.running.id)
        self.check_fifo_order()

    def await_worker(self, attempt: Callable[[], bool], failure: str) -> None:
        """Repeats ``attempt`` (which blocks up to SLICE_MS) until it returns
        True, for at most LONG_MS; between attempts, fails at once if a
        callback started that the model did not start."""
        deadline = time.monotonic() + LONG_S
        while not attempt():
            self.check_fifo_order(prefix=True)
            assert time.monotonic() < deadline, failure

    def unknown_id_verb(self, job_id: int, verb: str) -> None:
        """Every job verb on an id the worker does not know."""
        call = ID_VERBS[verb]
        if verb == "job_known":
            assert call(self.worker, job_id) is False
        elif verb == "job_meta(KNOWN)":
            assert call(self.worker, job_id) == 0
        else:
            raises(UnknownJobError, lambda: call(self.worker, job_id))

    def check_destroyed(self, job: JobModel, verb: str) -> None:
        """After ``verb`` destroyed ``job``: the same call, and the job, are unknown."""
        self.unknown_id_verb(job.id, verb)
        assert self.worker.job_known(job.id) is False

    def take_completed(self, job: JobModel, call: Callable[[], bytes], verb: str) -> None:
        """``wait``/``take``/``take_blob`` on a completed job: the response,
        or the job's failure; the job is destroyed either way."""
        if job.succeeded:
            response = call()
            assert type(response) is bytes
            assert response == job.response()
        else:
            check_failure(raises(JobFailedError, call), job)
        job.destroyed = True
        self.check_destroyed(job, verb)

    def check_untouched(self, job: JobModel) -> None:
        assert self.worker.phase(job.id) == job.phase
        assert self.worker.job_known(job.id) is True

    # ---- starting jobs ----------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(target=jobs, route=st.none() | routes, behaviour=st.sampled_from(BEHAVIOURS),
          gated=GATED, data=st.binary(max_size=300),
          kind=st.sampled_from(REQUEST_KINDS),
          timeout=st.none() | st.sampled_from(TIMEOUTS),
          rc=st.integers(-(2 ** 63), 2 ** 63 - 1))
    def start(self, route: Optional[str], behaviour: str, gated: bool, data: bytes,
              kind: str, timeout: Optional[int], rc: int) -> Any:
        model = self.route_model(route)
        callback = self.new_callback(behaviour, rc, {data: gated})
        request, buf = as_request(data, kind)
        kwargs = self.start_kwargs(timeout, route)
        if model.closed:
            raises(RouteClosedError, lambda: self.worker.start(callback, request, **kwargs))
            return multiple()
        job_id = self.worker.start(callback, request, **kwargs)
        if buf is not None:
            buf[:] = b"\xee" * len(buf)  # the job has its own copy
        self.record_job(job_id, model, timeout, data, callback)
        self.settle()
        self.check_started(job_id)
        return job_id

    @precondition(lambda self: not self.closed)
    @rule(target=jobs, route=st.none() | routes, behaviour=st.sampled_from(BEHAVIOURS),
          gated=GATED, text=st.text(max_size=100),
          timeout=st.none() | st.sampled_from(TIMEOUTS),
          rc=st.integers(-(2 ** 63), 2 ** 63 - 1))
    def start_text(self, route: Optional[str], behaviour: str, gated: bool, text: str,
                   timeout: Optional[int], rc: int) -> Any:
        model = self.route_model(route)
        data = text.encode("utf-8")
        callback = self.new_callback(behaviour, rc, {data: gated})
        kwargs = self.start_kwargs(timeout, route)
        if model.closed:
            raises(RouteClosedError, lambda: self.worker.start_text(callback, text, **kwargs))
            return multiple()
        job_id = self.worker.start_text(callback, text, **kwargs)
        self.record_job(job_id, model, timeout, data, callback)
        self.settle()
        self.check_started(job_id)
        return job_id

    @precondition(lambda self: not self.closed)
    @rule(target=jobs, route=st.none() | routes, behaviour=st.sampled_from(BEHAVIOURS),
          gate_mask=st.integers(0, 63),
          datas=st.lists(st.binary(max_size=40), unique=True, max_size=6),
          kind=st.sampled_from(REQUEST_KINDS),
          timeout=st.none() | st.sampled_from(TIMEOUTS),
          rc=st.integers(-(2 ** 63), 2 ** 63 - 1))
    def start_many(self, route: Optional[str], behaviour: str, gate_mask: int,
                   datas: List[bytes], kind: str, timeout: Optional[int], rc: int) -> Any:
        model = self.route_model(route)
        callback = self.new_callback(
            behaviour, rc, {d: bool(gate_mask >> i & 1) for i, d in enumerate(datas)})
        pairs = [as_request(d, kind) for d in datas]
        requests = [request for request, _ in pairs]
        kwargs = self.start_kwargs(timeout, route)
        if model.closed and not datas:
            # Zero starts: nothing to refuse, or refused all the same.
            try:
                assert self.worker.start_many(callback, requests, **kwargs) == []
            except RouteClosedError:
                pass
            return multiple()
        if model.closed:
            raises(RouteClosedError,
                   lambda: self.worker.start_many(callback, requests, **kwargs))
            return multiple()
        job_ids = self.worker.start_many(callback, requests, **kwargs)
        assert type(job_ids) is list and len(job_ids) == len(datas), job_ids
        for _, buf in pairs:
            if buf is not None:
                buf[:] = b"\xee" * len(buf)
        for job_id, data in zip(job_ids, datas):
            self.record_job(job_id, model, timeout, data, callback)
        assert job_ids == sorted(job_ids), "start_many ids are not in order"
        self.settle()
        for job_id in job_ids:
            self.check_started(job_id)
        return multiple(*job_ids)

    # ---- running jobs -----------------------------------------------

    def blocked_jobs(self) -> List[int]:
        return sorted(j.id for j in self.job_models.values()
                      if not j.completed and j.blocked)

    @precondition(lambda self: not self.closed and self.blocked_jobs())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Lets a gated job run to completion (now if it is running, when its
        turn comes if it is queued); FIFO order must hold."""
        job = self.job(data.draw(st.sampled_from(self.blocked_jobs()), label="job"))
        assert job.gate is not None
        job.gate.release.set()
        self.settle()

    def blocked_routes(self) -> List[str]:
        return [name for name, r in self.route_models.items()
                if r.running is not None and r.running.blocked]

    @precondition(lambda self: not self.closed and self.blocked_routes())
    @rule(data=st.data())
    def finish_running(self, data: st.DataObject) -> None:
        """Lets the job a route is blocked in run to completion; the next
        job of that route then starts."""
        route = self.route_models[data.draw(st.sampled_from(self.blocked_routes()),
                                            label="route")]
        assert route.running is not None and route.running.gate is not None
        route.running.gate.release.set()
        self.settle()

    @precondition(lambda self: not self.closed)
    @rule(job_id=jobs)
    def cancel(self, job_id: int) -> None:
        """True (and CANCELLED) for a queued job, False for a running or
        completed one, UnknownJobError for a destroyed one."""
        self.check_cancel(job_id)

    def check_cancel(self, job_id: int) -> None:
        job = self.job(job_id)
        if job.destroyed:
            raises(UnknownJobError, lambda: self.worker.cancel(job_id))
            return
        was_queued = job.phase == Phase.QUEUED
        assert self.worker.cancel(job_id) is was_queued
        if was_queued:
            job.route.queue.remove(job)
            job.complete(Status.CANCELLED)
        self.check_fifo_order()

    def queued_jobs(self) -> List[int]:
        return sorted(j.id for j in self.job_models.values() if j.phase == Phase.QUEUED)

    @precondition(lambda self: not self.closed and self.queued_jobs())
    @rule(data=st.data())
    def cancel_queued(self, data: st.DataObject) -> None:
        """``cancel`` on a job queued behind a blocked one: True, CANCELLED."""
        self.check_cancel(data.draw(st.sampled_from(self.queued_jobs()), label="job"))

    # ---- waiting and taking -----------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(job_id=jobs, timeout=st.sampled_from([0, 1, -1, LONG_MS]))
    def wait(self, job_id: int, timeout: int) -> None:
        job = self.job(job_id)
        if job.destroyed:
            raises(UnknownJobError, lambda: self.worker.wait(job_id, timeout))
        elif not job.completed:
            short = timeout if timeout in (0, 1) else 0
            raises(WaitTimeoutError, lambda: self.worker.wait(job_id, short))
            self.check_untouched(job)
        else:
            self.take_completed(job, lambda: self.worker.wait(job_id, timeout), "wait")

    def collectable_jobs(self) -> List[int]:
        return sorted(j.id for j in self.job_models.values() if j.completed and not j.destroyed)

    @precondition(lambda self: not self.closed and self.collectable_jobs())
    @rule(data=st.data(), verb=st.sampled_from(["wait", "take", "take_blob"]))
    def collect(self, data: st.DataObject, verb: str) -> None:
        """``wait``/``take``/``take_blob`` on a completed job: its response
        or its failure, then UnknownJobError."""
        job = self.job(data.draw(st.sampled_from(self.collectable_jobs()), label="job"))
        call = getattr(self.worker, verb)
        self.take_completed(job, lambda: call(job.id), verb)

    @precondition(lambda self: not self.closed)
    @rule(job_id=jobs, timeout=st.sampled_from([0, 1, -1, LONG_MS]))
    def wait_complete(self, job_id: int, timeout: int) -> None:
        job = self.job(job_id)
        if job.destroyed:
            raises(UnknownJobError, lambda: self.worker.wait_complete(job_id, timeout))
        elif not job.completed:
            short = timeout if timeout in (0, 1) else 0
            assert self.worker.wait_complete(job_id, short) is False
            self.check_untouched(job)
        else:
            assert self.worker.wait_complete(job_id, timeout) is True
            self.check_untouched(job)

    @precondition(lambda self: not self.closed)
    @rule(job_id=jobs, verb=st.sampled_from(["take", "take_blob"]))
    def take(self, job_id: int, verb: str) -> None:
        job = self.job(job_id)
        call = getattr(self.worker, verb)
        if job.destroyed:
            raises(UnknownJobError, lambda: call(job_id))
        elif not job.completed:
            raises(JobNotCompleteError, lambda: call(job_id))
            self.check_untouched(job)
        else:
            self.take_completed(job, lambda: call(job_id), verb)

    # ---- queries ----------------------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(job_id=jobs, verb=st.sampled_from(QUERY_VERBS))
    def query(self, job_id: int, verb: str) -> None:
        job = self.job(job_id)
        if job.destroyed:
            self.unknown_id_verb(job_id, verb)
            return
        w = self.worker
        if verb == "phase":
            value = w.phase(job_id)
            assert isinstance(value, Phase) and value == job.phase
        elif verb == "phase_text":
            assert w.phase_text(job_id) == PHASE_TEXT[job.phase]
        elif verb == "status":
            value = w.status(job_id)
            assert isinstance(value, Status) and value == job.status
        elif verb == "status_text":
            assert w.status_text(job_id) == STATUS_TEXT[job.status]
        elif verb == "state":
            value = w.state(job_id)
            assert isinstance(value, State) and value == job.state()
        elif verb == "error_text":
            self.check_error_text(job, w.error_text(job_id))
        elif verb == "job_known":
            assert w.job_known(job_id) is True
        elif verb == "job_timeout":
            assert w.job_timeout(job_id) == job.timeout_ms
        elif verb == "job_has_blob_result":
            assert w.job_has_blob_result(job_id) is job.succeeded
        elif verb == "job_blob_result_size":
            self.check_result_size(job)
        else:
            self.check_info(job, w.info(job_id))

    def check_error_text(self, job: JobModel, text: str) -> None:
        assert type(text) is str
        if not job.completed or job.status == Status.OK:
            assert text == ""
        elif job.status == Status.ERROR:
            assert text == f"ValueError: {job.callback.error_message()}"
        else:
            assert text, f"no error text for a job with status {job.status!r}"

    def check_result_size(self, job: JobModel) -> None:
        call = lambda: self.worker.job_blob_result_size(job.id)  # noqa: E731
        if job.succeeded:
            assert call() == len(job.response())
        elif not job.completed:
            raises(JobNotCompleteError, call)
        else:
            err = raises(CallbackWorkerError, call)
            assert not isinstance(err, (JobNotCompleteError, UnknownJobError)), err
        self.check_untouched(job)

    def check_info(self, job: JobModel, line: str) -> None:
        assert type(line) is str and "\n" not in line
        pairs = line.split()
        assert all("=" in p for p in pairs), line
        info = dict(p.split("=", 1) for p in pairs)
        assert info["id"] == str(job.id), line
        assert info["phase"] == PHASE_TEXT[job.phase], line
        assert info["status"] == STATUS_TEXT[job.status], line
        assert info["state"] in (job.state().name.lower(), str(int(job.state()))), line
        assert info["timeout_ms"] == str(job.timeout_ms), line
        assert info["route"] in (str(job.route.id), job.route.name), line
        assert info["result_size"] == str(job.result_size()), line
        if job.succeeded and job.callback.behaviour == "int":
            # "An int ... is recorded (Info)".
            if "rc" in info:  # recorded saturated to 32 bits
                assert info["rc"] == str(min(max(job.callback.rc, -2**31), 2**31 - 1)), line
            else:
                assert str(min(max(job.callback.rc, -2**31), 2**31 - 1)) in info.values(), line

    @precondition(lambda self: not self.closed)
    @rule(job_id=jobs, key=st.sampled_from(list(JobMetaKey)))
    def job_meta(self, job_id: int, key: JobMetaKey) -> None:
        job = self.job(job_id)
        if job.destroyed:
            self.unknown_id_verb(job_id, f"job_meta({key.name})")
            return
        expected = {
            JobMetaKey.PHASE: int(job.phase),
            JobMetaKey.STATUS: int(job.status),
            JobMetaKey.ROUTE: job.route.id,
            JobMetaKey.TIMEOUT: job.timeout_ms,
            JobMetaKey.KNOWN: 1,
            JobMetaKey.HAS_BLOB_RESULT: int(job.succeeded),
            JobMetaKey.BLOB_RESULT_SIZE: job.result_size(),
        }[key]
        value = self.worker.job_meta(job_id, key)
        assert type(value) is int and value == expected, (key, value, expected)

    @precondition(lambda self: not self.closed)
    @rule(which=st.sampled_from(["next", "far", "zero", "negative", "int64-max", "2**63",
                                 "2**64"]),
          offset=st.integers(1, 10 ** 6), verb=st.sampled_from(sorted(ID_VERBS)))
    def unknown_id(self, which: str, offset: int, verb: str) -> None:
        """Ids this worker never issued."""
        issued = max(self.job_models, default=0)
        job_id = {
            "next": issued + 1,
            "far": issued + offset,
            "zero": 0,
            "negative": -offset,
            "int64-max": 2 ** 63 - 1,
            "2**63": 2 ** 63,
            "2**64": 2 ** 64,
        }[which]
        self.unknown_id_verb(job_id, verb)

    # ---- routes -----------------------------------------------------

    @initialize(target=routes)
    def default_route(self) -> str:
        return "default"

    @precondition(lambda self: not self.closed and len(self.route_models) < MAX_ROUTES)
    @rule(target=routes, suffix=st.text(ROUTE_NAME_CHARS, max_size=8),
          timeout=st.none() | st.sampled_from(TIMEOUTS))
    def open_route(self, suffix: str, timeout: Optional[int]) -> str:
        name = f"route-{next(self.route_numbers)}-{suffix}"
        assert self.worker.route_meta(name, RouteMetaKey.KNOWN) == 0
        route_id = (self.worker.open_route(name) if timeout is None
                    else self.worker.open_route(name, concurrency=1, timeout_ms=timeout))
        assert type(route_id) is int and route_id > 0
        assert route_id not in {r.id for r in self.route_models.values()}
        self.route_models[name] = RouteModel(name, route_id, -1 if timeout is None else timeout)
        return name

    @precondition(lambda self: not self.closed)
    @rule(route=routes)
    def close_route(self, route: str) -> None:
        """Stops the route accepting jobs; its queued jobs still run."""
        model = self.route_model(route)
        assert self.worker.close_route(route) is (not model.closed)
        model.closed = True

    @precondition(lambda self: not self.closed)
    @rule(route=routes, key=st.sampled_from(ROUTE_KEYS))
    def route_meta(self, route: str, key: RouteMetaKey) -> None:
        value = self.worker.route_meta(route, key)
        expected = self.route_model(route).meta(key)
        assert type(value) is int and value == expected, (route, key, value, expected)

    @precondition(lambda self: not self.closed)
    @rule(route=routes, timeout=st.sampled_from([0, 1, -1, LONG_MS]))
    def wait_drained(self, route: str, timeout: int) -> None:
        drained = self.route_model(route).drained()
        if not drained and timeout not in (0, 1):
            timeout = 0
        assert self.worker.wait_drained(route, timeout) is drained

    @precondition(lambda self: not self.closed)
    @rule(route=routes)
    def route_info(self, route: str) -> None:
        line = self.worker.route_info(route)
        assert type(line) is str and line and "\n" not in line
        assert all("=" in p for p in line.split()), line

    @precondition(lambda self: not self.closed)
    @rule(suffix=st.text(ROUTE_NAME_CHARS, max_size=8),
          verb=st.sampled_from(["start", "route_meta", "close_route", "route_info",
                                "wait_drained"]),
          key=st.sampled_from(list(RouteMetaKey)))
    def unknown_route(self, suffix: str, verb: str, key: RouteMetaKey) -> None:
        name = f"unknown-{suffix}"
        w = self.worker
        if verb == "route_meta" and key == RouteMetaKey.KNOWN:
            assert w.route_meta(name, key) == 0
            return
        call = {
            "start": lambda: w.start(noop, b"x", route=name),
            "route_meta": lambda: w.route_meta(name, key),
            "close_route": lambda: w.close_route(name),
            "route_info": lambda: w.route_info(name),
            "wait_drained": lambda: w.wait_drained(name, 0),
        }[verb]
        raises(UnknownRouteError, call)

    # ---- closing the worker -----------------------------------------

    @precondition(lambda self: not self.closed)
    @rule(roll=st.integers(0, 3))
    def close(self, roll: int) -> None:
        """Queued jobs complete with SHUTDOWN, blocked waiters wake with
        ShutdownError, running callbacks finish, all threads are joined
        before ``close`` returns, and no queued job ever runs.

        Closes only when ``roll`` is 0: hypothesis has no rule weights, and
        most steps should run on an open worker."""
        if roll:
            return
        pending = sorted((j for j in self.job_models.values()
                          if not j.destroyed and not j.completed), key=lambda j: j.id)
        waiters = [(job, Background(lambda j=job.id: self.worker.wait(j, LONG_MS)))
                   for job in pending]
        for _, waiter in waiters:
            waiter.wait_until_inside_package()
        running = [r.running for r in self.route_models.values() if r.running is not None]
        closer = self.closer = Background(self.worker.close)
        for job, waiter in waiters:
            waiter.join()
            err = waiter.error
            assert isinstance(err, ShutdownError), f"waiter of job {job.id} got {err!r}"
            assert err.status == Status.SHUTDOWN
        if running:
            assert closer.thread.is_alive(), "close() returned while a callback still ran"
        for job in running:
            assert job.gate is not None and job.gate.started.is_set()
            job.gate.release.set()
        closer.join()
        assert closer.error is None, closer.error
        assert closer.result == 0
        for job in running:
            assert job.gate is not None and job.gate.finished.is_set(), \
                f"close() returned before job {job.id}'s callback did"
            job.run_to_completion()
        for route in self.route_models.values():
            for job in route.queue:
                job.complete(Status.SHUTDOWN)
            route.queue.clear()
            route.running = None
        self.closed = True
        assert self.worker.close() == 0
        self.check_fifo_order()

    @precondition(lambda self: self.closed)
    @rule(job_id=jobs, verb=st.sampled_from(sorted(ID_VERBS)))
    def job_verb_after_close(self, job_id: int, verb: str) -> None:
        raises(WorkerClosedError, lambda: ID_VERBS[verb](self.worker, job_id))

    @precondition(lambda self: self.closed)
    @rule(job_id=st.integers(-5, 10 ** 6), verb=st.sampled_from(sorted(ID_VERBS)))
    def any_id_after_close(self, job_id: int, verb: str) -> None:
        raises(WorkerClosedError, lambda: ID_VERBS[verb](self.worker, job_id))

    @precondition(lambda self: self.closed)
    @rule(route=routes, verb=st.sampled_from(sorted(ROUTE_VERBS)))
    def route_verb_after_close(self, route: str, verb: str) -> None:
        raises(WorkerClosedError, lambda: ROUTE_VERBS[verb](self.worker, route))

    @precondition(lambda self: self.closed)
    @rule()
    def close_again(self) -> None:
        assert self.worker.close() == 0

    # ---- run order and teardown ------------------------------------

    def check_fifo_order(self, prefix: bool = False) -> None:
        """Per route, the callbacks that started are exactly the jobs the
        model started, in FIFO order: none ran early, twice, concurrently
        with its predecessor, or after being cancelled or shut down.  With
        ``prefix``, the model's last job may not have started yet."""
        started: Dict[str, List[int]] = {name: [] for name in self.route_models}
        for key in list(self.log):
            job = self.by_run_key.get(key)
            assert job is not None, f"a callback ran for a job never started: {key!r}"
            started[job.route.name].append(job.id)
        for name, route in self.route_models.items():
            expected = route.ran[:len(started[name])] if prefix else route.ran
            assert started[name] == expected, (name, started[name], route.ran)

    def teardown(self) -> None:
        for gate in self.gates:
            gate.release.set()
        if self.closer is not None:
            self.closer.join()  # a check inside the close rule failed
        elif not self.closed:
            close_worker(self.worker)


WorkerModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWorkerAgainstModel = WorkerModel.TestCase
