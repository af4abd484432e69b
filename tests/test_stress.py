"""Concurrency stress: many Python threads using one Worker at once.

Several threads concurrently start jobs (start, start_text, start_many, on
the default route of a ``Worker(concurrency=2)`` and on a second route),
cancel them, wait for them with random timeouts, ``wait_complete`` + ``take``
them and query them, all picking jobs at random from one shared pool, so
that threads also race each other for the same job.  Afterwards every job
must be accounted for exactly once: each id ends either returned by
wait/take (with the response its request calls for) or cancelled and then
consumed as cancelled; none is lost, none is returned twice, every callback
that was not cancelled ran exactly once, and cancelled ones never ran.

Duration: ``CBW_SOAK_SECONDS`` (default 5) for the default test.  The
``soak`` variant (``pytest -m soak``) runs longer (``CBW_SOAK_SECONDS``, or
60 s when unset) with more threads, and is skipped unless selected with
``-m soak``.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest

from callbackworker import (
    JobCancelledError,
    JobFailedError,
    JobMetaKey,
    JobNotCompleteError,
    JobTimeoutError,
    Phase,
    RouteMetaKey,
    Status,
    UnknownJobError,
    WaitTimeoutError,
    Worker,
)

DEFAULT_SECONDS = float(os.environ.get("CBW_SOAK_SECONDS", "5"))
_rounds = itertools.count(1)  # keeps payloads unique across runs in one process
SIDE = "side"
PHASES = {"queued": 0, "running": 1, "completed": 2}

# ---- callbacks: the response each kind of job must produce ------------------------

_runs: Counter = Counter()
_runs_lock = threading.Lock()


def _ran(request: memoryview) -> bytes:
    payload = bytes(request)
    with _runs_lock:
        _runs[payload] += 1
    return payload


def cb_upper(request: memoryview) -> None:
    payload = _ran(request)
    request[:] = payload.upper()  # in-place edit becomes the response


def cb_reverse(request: memoryview) -> bytes:
    return _ran(request)[::-1] + b"!"  # a longer replacement response


def cb_same(request: memoryview) -> int:
    _ran(request)
    return 7  # an int is recorded and otherwise ignored


def cb_fail(request: memoryview) -> None:
    raise ValueError(_ran(request).decode())


def cb_sleep(request: memoryview) -> bytes:
    payload = _ran(request)
    time.sleep(0.002)
    return payload + b"+"


def cb_spin(request: memoryview) -> None:
    _ran(request)
    n = 0
    while True:  # interrupted by its run-time limit
        n += 1


def _child(request: memoryview) -> bytes:
    return bytes(request)[::-1]


def _make_nested(worker: Worker):
    def cb_nested(request: memoryview) -> bytes:
        payload = _ran(request)
        child = worker.start(_child, payload, route=SIDE)
        return worker.wait(child) + b"<"  # another route: waiting is fine
    return cb_nested


CALLBACKS = {
    "upper": cb_upper,
    "reverse": cb_reverse,
    "same": cb_same,
    "fail": cb_fail,
    "sleep": cb_sleep,
    "spin": cb_spin,
}

# relative frequencies
KIND_WEIGHTS = {"upper": 5, "reverse": 5, "same": 3, "fail": 2, "sleep": 2, "spin": 0.2,
                "nested": 0.5}


def expected_response(kind: str, payload: bytes) -> Optional[bytes]:
    return {
        "upper": payload.upper(),
        "reverse": payload[::-1] + b"!",
        "same": payload,
        "sleep": payload + b"+",
        "nested": payload[::-1] + b"<",
    }.get(kind)


# ---- the ledger ------------------------------------------------------------------


@dataclass
class Job:
    payload: bytes
    kind: str
    route: int
    timeout_ms: int


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: Dict[int, Job] = field(default_factory=dict)
    pool: List[int] = field(default_factory=list)
    where: Dict[int, int] = field(default_factory=dict)
    consumed: Dict[int, Tuple[str, Any]] = field(default_factory=dict)
    cancelled: Set[int] = field(default_factory=set)
    unknown_seen: Set[int] = field(default_factory=set)
    problems: List[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)

    def add(self, job_id: int, job: Job) -> None:
        with self.lock:
            if job_id in self.jobs or job_id <= 0:
                self.problems.append(f"start returned id {job_id} twice or non-positive")
                return
            self.jobs[job_id] = job
            self.where[job_id] = len(self.pool)
            self.pool.append(job_id)

    def pick(self, rng: random.Random) -> Optional[int]:
        with self.lock:
            return rng.choice(self.pool) if self.pool else None

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pool)

    def consume(self, job_id: int, outcome: Tuple[str, Any]) -> None:
        with self.lock:
            if job_id in self.consumed:
                self.problems.append(
                    f"job {job_id} returned twice: {self.consumed[job_id]!r} then {outcome!r}")
                return
            self.consumed[job_id] = outcome
            i = self.where.pop(job_id, None)
            if i is None:
                self.problems.append(f"job {job_id} consumed but never recorded as started")
                return
            last = self.pool.pop()
            if last != job_id:
                self.pool[i] = last
                self.where[last] = i

    def note_cancelled(self, job_id: int) -> None:
        with self.lock:
            if job_id in self.cancelled:
                self.problems.append(f"cancel({job_id}) returned True twice")
            self.cancelled.add(job_id)

    def note_unknown(self, job_id: int) -> None:
        with self.lock:
            self.unknown_seen.add(job_id)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def _outcome_of_failure(exc: JobFailedError) -> Tuple[str, Any]:
    return ("failed", exc)


# ---- one stress thread ------------------------------------------------------------


class Hammer:
    def __init__(self, worker: Worker, ledger: Ledger, routes: Dict[Optional[str], int],
                 index: int, seed: int, until: float, max_pool: int) -> None:
        self.w = worker
        self.ledger = ledger
        self.routes = routes
        self.k = index
        self.rng = random.Random(seed * 1000 + index)
        self.until = until
        self.max_pool = max_pool
        self.seq = 0
        self.tag = next(_rounds)
        self.last_phase: Dict[int, int] = {}
        self.kinds = list(KIND_WEIGHTS)
        self.weights = [KIND_WEIGHTS[k] for k in self.kinds]
        self.nested = _make_nested(worker)

    # -- helpers
    def _payload(self, kind: str) -> bytes:
        self.seq += 1
        return f"r{self.tag}-t{self.k}-n{self.seq}-{kind}".encode()

    def _kind(self) -> str:
        return self.rng.choices(self.kinds, self.weights)[0]

    def _timeout(self) -> int:
        return self.rng.choice([0, 0, 1, 5, 20, 50, 200, -1])

    def _callback(self, kind: str) -> Any:
        return self.nested if kind == "nested" else CALLBACKS[kind]

    # -- operations
    def op_start(self) -> None:
        kind = self._kind()
        route = None if kind == "nested" else self.rng.choice([None, None, SIDE])
        timeout_ms = 30 if kind == "spin" else -1
        how = self.rng.random()
        if how < 0.15 and kind != "spin":
            kinds_payloads = [self._payload(kind) for _ in range(self.rng.randint(2, 8))]
            ids = self.w.start_many(self._callback(kind), kinds_payloads, route=route)
            if len(ids) != len(kinds_payloads):
                self.ledger.problem(f"start_many returned {len(ids)} ids for {len(kinds_payloads)}")
            for jid, payload in zip(ids, kinds_payloads):
                self.ledger.add(jid, Job(payload, kind, self.routes[route], timeout_ms))
            self.ledger.ops["start_many"] += 1
            return
        payload = self._payload(kind)
        if how < 0.3:
            jid = self.w.start_text(self._callback(kind), payload.decode(), timeout_ms, route=route)
        else:
            jid = self.w.start(self._callback(kind), payload, timeout_ms, route=route)
        self.ledger.add(jid, Job(payload, kind, self.routes[route], timeout_ms))
        self.ledger.ops["start"] += 1

    def _consume_wait(self, jid: int, call: Any) -> None:
        try:
            data = call()
        except WaitTimeoutError:
            self.ledger.ops["wait_timeout"] += 1
            return
        except UnknownJobError:
            self.ledger.note_unknown(jid)
            return
        except JobFailedError as exc:
            self.ledger.consume(jid, _outcome_of_failure(exc))
            return
        self.ledger.consume(jid, ("ok", data))

    def op_wait(self) -> None:
        jid = self.ledger.pick(self.rng)
        if jid is None:
            return
        t = self._timeout()
        self._consume_wait(jid, lambda: self.w.wait(jid, t))
        self.ledger.ops["wait"] += 1

    def op_wait_complete_take(self) -> None:
        jid = self.ledger.pick(self.rng)
        if jid is None:
            return
        try:
            done = self.w.wait_complete(jid, self._timeout())
        except UnknownJobError:
            self.ledger.note_unknown(jid)
            return
        self.ledger.ops["wait_complete"] += 1
        if not done:
            # take on a job that is not complete: JobNotCompleteError, or it
            # may just have completed, or another thread took it
            try:
                data = self.w.take(jid)
            except JobNotCompleteError:
                return
            except UnknownJobError:
                self.ledger.note_unknown(jid)
                return
            except JobFailedError as exc:
                self.ledger.consume(jid, _outcome_of_failure(exc))
                return
            self.ledger.consume(jid, ("ok", data))
            return

        def take() -> bytes:
            try:
                return self.w.take(jid)
            except JobNotCompleteError:
                self.ledger.problem(f"take({jid}) after wait_complete returned True: not complete")
                raise WaitTimeoutError("not complete") from None

        self._consume_wait(jid, take)

    def op_cancel(self) -> None:
        jid = self.ledger.pick(self.rng)
        if jid is None:
            return
        try:
            if self.w.cancel(jid):
                self.ledger.note_cancelled(jid)
        except UnknownJobError:
            self.ledger.note_unknown(jid)
        self.ledger.ops["cancel"] += 1

    def op_query(self) -> None:
        jid = self.ledger.pick(self.rng)
        if jid is None:
            return
        job = self.ledger.jobs[jid]
        try:
            info = dict(p.split("=", 1) for p in self.w.info(jid).split())
            phase = self.w.phase(jid)
            status = self.w.status(jid)
            route = self.w.job_meta(jid, JobMetaKey.ROUTE)
            timeout_ms = self.w.job_timeout(jid)
            known = self.w.job_meta(jid, JobMetaKey.KNOWN)
        except UnknownJobError:
            self.ledger.note_unknown(jid)
            return
        self.ledger.ops["query"] += 1
        bad = []
        if int(info["id"]) != jid:
            bad.append(f"info id {info['id']}")
        if int(info["route"]) != job.route or route != job.route:
            bad.append(f"route {info['route']}/{route}, expected {job.route}")
        if int(info["timeout_ms"]) != job.timeout_ms or timeout_ms != job.timeout_ms:
            bad.append(f"timeout {info['timeout_ms']}/{timeout_ms}, expected {job.timeout_ms}")
        if known == 0:
            # another thread consumed it meanwhile: it must show up as consumed
            self.ledger.note_unknown(jid)
        elif known != 1:
            bad.append(f"KNOWN meta {known}")
        # one info line is one snapshot: phase and status agree
        p = PHASES.get(info["phase"])
        if p is None:
            bad.append(f"phase text {info['phase']!r}")
        elif (info["phase"] == "completed") != (info["status"] != "pending"):
            bad.append(f"info: phase {info['phase']} with status {info['status']}")
        # separate calls are later observations: the job only moves forward
        if p is not None and int(phase) < p:
            bad.append(f"phase() {phase!r} after info phase {info['phase']}")
        if phase == Phase.COMPLETED and status == Status.PENDING:
            bad.append("status() pending after phase() completed")
        if info["status"] != "pending" and status == Status.PENDING:
            bad.append(f"status() pending after info status {info['status']}")
        # this thread's own observations of one job happen in order, so the
        # phases it sees never go backwards
        seen = int(phase)
        if seen < self.last_phase.get(jid, 0):
            bad.append(f"phase went back to {seen} after {self.last_phase[jid]}")
        self.last_phase[jid] = seen
        if status == Status.OK and job.kind in ("fail", "spin"):
            bad.append(f"a {job.kind} job reported success")
        if status == Status.ERROR and job.kind != "fail":
            bad.append(f"a {job.kind} job reported an error")
        if bad:
            self.ledger.problem(f"job {jid} ({job.kind}): " + "; ".join(bad))

    def run(self) -> None:
        ops = [(self.op_start, 4), (self.op_wait, 3), (self.op_wait_complete_take, 2),
               (self.op_cancel, 1.5), (self.op_query, 3)]
        funcs = [f for f, _ in ops]
        weights = [wt for _, wt in ops]
        try:
            while time.monotonic() < self.until:
                if self.ledger.outstanding() > self.max_pool:
                    op = self.rng.choice([self.op_wait, self.op_wait_complete_take])
                else:
                    op = self.rng.choices(funcs, weights)[0]
                op()
        except BaseException as exc:  # noqa: BLE001 - reported
            import traceback
            self.ledger.problem(f"thread {self.k}: {type(exc).__name__}: {exc}\n"
                                f"{traceback.format_exc()}")


# ---- the checks ---------------------------------------------------------------------


def _check_outcome(jid: int, job: Job, outcome: Tuple[str, Any], cancelled: bool,
                   runs: int) -> Optional[str]:
    kind, value = outcome
    if cancelled:
        if not (kind == "failed" and isinstance(value, JobCancelledError)
                and value.status == Status.CANCELLED):
            return f"cancel() returned True but the job ended {outcome!r}"
        if runs != 0:
            return f"cancelled job's callback ran {runs} times"
        return None
    if kind == "failed" and isinstance(value, JobCancelledError):
        return "consumed as cancelled although no cancel() returned True"
    if runs != 1:
        return f"callback ran {runs} times; the job ended {outcome!r}"
    if job.kind == "fail":
        if not (kind == "failed" and type(value) is JobFailedError and value.status == Status.ERROR):
            return f"expected the ValueError failure, got {outcome!r}"
        cause = value.__cause__
        if not isinstance(cause, ValueError) or str(cause) != job.payload.decode():
            return f"wrong cause {cause!r}"
        if not value.error_text.startswith("ValueError: "):
            return f"wrong error text {value.error_text!r}"
        if value.job_id != jid:
            return f"error for job {value.job_id}"
        return None
    if job.kind == "spin":
        if not (kind == "failed" and isinstance(value, JobTimeoutError)
                and value.status == Status.TIMEOUT):
            return f"expected a timeout, got {outcome!r}"
        return None
    want = expected_response(job.kind, job.payload)
    if kind != "ok" or value != want:
        return f"response {outcome!r}, expected {want!r}"
    return None


def run_stress(seconds: float, threads: int = 6, concurrency: int = 2, seed: int = 1,
               max_pool: int = 300) -> Ledger:
    ledger = Ledger()
    w = Worker(concurrency=concurrency)
    try:
        side = w.open_route(SIDE, concurrency=1)
        routes: Dict[Optional[str], int] = {None: 1, SIDE: side}
        until = time.monotonic() + seconds
        hammers = [Hammer(w, ledger, routes, i, seed, until, max_pool) for i in range(threads)]
        workers = [threading.Thread(target=h.run, name=f"hammer-{i}", daemon=True)
                   for i, h in enumerate(hammers)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(seconds + 60)
            assert not t.is_alive(), f"{t.name} hung"

        # consume whatever is left
        for jid in list(ledger.pool):
            try:
                data = w.wait(jid, 60_000)
            except JobFailedError as exc:
                ledger.consume(jid, _outcome_of_failure(exc))
            except BaseException as exc:  # noqa: BLE001 - reported
                ledger.problem(f"final wait({jid}): {type(exc).__name__}: {exc}")
            else:
                ledger.consume(jid, ("ok", data))

        assert ledger.problems == [], "\n".join(ledger.problems[:20])
        started = set(ledger.jobs)
        assert set(ledger.consumed) == started, (
            f"lost: {sorted(started - set(ledger.consumed))[:20]}, "
            f"extra: {sorted(set(ledger.consumed) - started)[:20]}")
        assert ledger.pool == []
        stray_unknown = ledger.unknown_seen - set(ledger.consumed)
        assert not stray_unknown, f"UnknownJobError for jobs never consumed: {sorted(stray_unknown)[:20]}"
        with _runs_lock:
            runs = dict(_runs)
        errors = []
        for jid, job in ledger.jobs.items():
            err = _check_outcome(jid, job, ledger.consumed[jid], jid in ledger.cancelled,
                                 runs.get(job.payload, 0))
            if err:
                errors.append(f"job {jid} ({job.kind}, {job.payload!r}): {err}")
        assert errors == [], "\n".join(errors[:20])
        # no job is left behind in the core
        unknown_now = [jid for jid in started if w.job_known(jid)]
        assert unknown_now == [], f"consumed jobs still known: {unknown_now[:20]}"
        for name in ("default", SIDE):
            assert w.wait_drained(name, 10_000) is True
            assert w.route_meta(name, RouteMetaKey.QUEUED) == 0
            assert w.route_meta(name, RouteMetaKey.RUNNING) == 0
        table = getattr(w, "_table", None)
        failures = getattr(table, "failures", None)
        if failures is not None:
            assert len(failures) == 0, f"{len(failures)} callback exceptions never released"
        # it still works
        assert w.wait(w.start(cb_upper, b"after-stress"), 10_000) == b"AFTER-STRESS"
        assert w.wait(w.start(cb_upper, b"after-side", route=SIDE), 10_000) == b"AFTER-SIDE"
    finally:
        w.close()
    return ledger


def _summary(ledger: Ledger) -> str:
    return (f"{len(ledger.jobs)} jobs, {len(ledger.cancelled)} cancelled, "
            f"ops {dict(ledger.ops)}")


def test_stress_start_cancel_wait_take_query_from_six_threads() -> None:
    t0 = time.monotonic()
    ledger = run_stress(DEFAULT_SECONDS, threads=6, concurrency=2, seed=1)
    elapsed = time.monotonic() - t0
    print(_summary(ledger), f"{elapsed:.1f}s")
    assert len(ledger.jobs) >= 100, _summary(ledger)
    assert ledger.ops["wait"] > 0 and ledger.ops["cancel"] > 0 and ledger.ops["query"] > 0
    assert ledger.ops["wait_complete"] > 0
    assert len(ledger.cancelled) > 0, _summary(ledger)


def test_stress_many_short_rounds_with_fresh_workers() -> None:
    """Creation and close under load: several short rounds, each on a new
    worker, with different seeds (interleavings)."""
    rounds = 4
    per_round = max(0.25, min(DEFAULT_SECONDS / 5, 1.0))
    total = 0
    for seed in range(2, 2 + rounds):
        ledger = run_stress(per_round, threads=4, concurrency=1 + seed % 2, seed=seed,
                            max_pool=50)
        total += len(ledger.jobs)
    assert total >= 40


def test_one_callback_shared_by_four_starting_threads() -> None:
    """Four threads start and wait for jobs that all use the same callable,
    while its jobs keep finishing: every job must run that callable (no job
    may fail because the worker lost track of its callback)."""
    seconds = max(0.5, min(DEFAULT_SECONDS / 3, 2.0))
    with Worker() as w:
        failures: List[str] = []
        done = [0] * 4

        def echo(request: memoryview) -> bytes:
            return bytes(request)[::-1]

        def loop(k: int) -> None:
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                n += 1
                payload = b"%d:%d" % (k, n)
                jid = w.start(echo, payload)
                try:
                    got = w.wait(jid, 30_000)
                except JobFailedError as exc:
                    failures.append(f"job {jid} ended {Status(exc.status).name}: "
                                    f"{exc.error_text!r}")
                    continue
                if got != payload[::-1]:
                    failures.append(f"job {jid}: {got!r}")
                done[k] += 1

        threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
            assert not t.is_alive()
        assert failures == [], (f"{len(failures)} of {len(failures) + sum(done)} jobs failed:\n"
                                + "\n".join(failures[:10]))
        assert sum(done) > 0


@pytest.mark.soak
def test_soak(request: pytest.FixtureRequest) -> None:
    markexpr = request.config.getoption("markexpr", "") or ""
    if "soak" not in markexpr:
        pytest.skip("long soak run: select it with `-m soak` "
                    "(duration CBW_SOAK_SECONDS, default 60)")
    seconds = float(os.environ.get("CBW_SOAK_SECONDS", "60"))
    ledger = run_stress(seconds, threads=8, concurrency=3, seed=int(time.time()) % 1000,
                        max_pool=1000)
    print(_summary(ledger))
    assert len(ledger.jobs) >= 100
