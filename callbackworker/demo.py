"""``callbackworker demo``: a short guided tour of the Worker API, tasks as
functions, raw task queues, route retries and a durable callback, printed as
it runs (the README's first command)."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from typing import Callable, List

from .asyncmeta import JobMetaKey, Profile, RouteMetaKey, supports_blob_job
from .errors import (
    CallbackAlreadyCompletedError,
    JobFailedError,
    JobTimeoutError,
    Retry,
    TaskFailedError,
)
from .jobcontext import current_job
from .states import State
from .tasks import QueueConfig, TaskService, current_task
from .worker import Worker

def _say(title: str) -> None:
    print(f"\n== {title}")


def _echo(request: memoryview) -> int:
    """The reference's Echo callback: leaves the request as the response."""
    return 1


def _shout(request: memoryview) -> None:
    request[:] = bytes(request).upper()


def _fail(request: memoryview) -> None:
    raise ValueError(f"cannot handle {bytes(request)!r}")


def demo(args: argparse.Namespace) -> int:
    """Runs the tour (tests/test_tasks_cli.py checks what it prints).  The
    tour's task failures are deliberate and printed by the tour itself, so
    their log records (with tracebacks) are kept off stderr."""
    logging.getLogger("callbackworker.tasks.events").setLevel(logging.CRITICAL)
    with Worker() as w:
        _say("capabilities")
        mask = w.capabilities()
        print(f"capabilities() = {mask}  supports blob-job profile "
              f"({int(Profile.BLOB_JOB)}): {supports_blob_job(mask)}")

        _say("start + wait (one step; wait destroys the job)")
        job = w.start(_echo, bytes([65, 66, 67]), 5000)
        resp = w.wait(job, 5000)
        print(f"start(Echo, [65, 66, 67], 5000) -> job {job}")
        print(f"wait(job) -> {list(resp)} (length {len(resp)}); job_known -> {w.job_known(job)}")

        _say("start_text + wait_complete + take (two steps)")
        job = w.start_text(_shout, "hello", 5000)
        print(f"wait_complete(job) -> {w.wait_complete(job, 5000)}")
        print(f"phase_text={w.phase_text(job)} status_text={w.status_text(job)} "
              f"state={w.state(job).name} job_blob_result_size={w.job_blob_result_size(job)}")
        print(f"job_meta(TIMEOUT) -> {w.job_meta(job, JobMetaKey.TIMEOUT)}")
        print(f"info(job) -> {w.info(job)}")
        print(f"take(job) -> {w.take(job)!r}")

        _say("cancel (only queued jobs can be cancelled)")
        gate = threading.Event()
        blocker = w.start(lambda r: gate.wait(), b"", 5000)
        queued = w.start(_echo, b"later", 5000)
        print(f"cancel(queued job) -> {w.cancel(queued)}; status_text -> {w.status_text(queued)}")
        gate.set()
        w.wait_complete(blocker, 5000)
        print(f"cancel(completed job) -> {w.cancel(blocker)}")
        w.take(blocker)

        _say("a timeout (the callback's run-time limit)")
        job = w.start(_spin_forever, b"", 100)
        started = time.monotonic()
        try:
            w.wait(job)
        except JobTimeoutError as exc:
            print(f"wait(job) raised JobTimeoutError after "
                  f"{(time.monotonic() - started) * 1000:.0f} ms: {exc.error_text}")

        _say("a failure (the callback raises)")
        job = w.start(_fail, b"bad input", 5000)
        w.wait_complete(job, 5000)
        print(f"status_text={w.status_text(job)} error_text={w.error_text(job)!r}")
        try:
            w.take(job)
        except JobFailedError as exc:
            print(f"take(job) raised {type(exc).__name__}; __cause__ = {exc.__cause__!r}")

        _say("close (queued jobs are shut down)")
        gate = threading.Event()
        w.start(lambda r: gate.wait(0.2), b"", 5000)
        pending = [w.start(_echo, b"x") for _ in range(3)]
        print(f"{len(pending)} jobs queued; close() -> {w.close()}")
    _demo_retries()
    _demo_durable()
    _demo_functions()
    _demo_tasks()
    print("\ndemo finished")
    return 0


def _settle(predicate: Callable[[], bool]) -> None:
    """Waits (briefly) for a worker thread to reach a state."""
    deadline = time.monotonic() + 10
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)


def _demo_retries() -> None:
    """Route retries with exponential backoff, on a manual clock."""
    _say("routes: retries with exponential backoff (on a manual clock)")
    attempts: List[int] = []

    def flaky(request: memoryview) -> bytes:
        attempts.append(current_job().attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return b"done on attempt %d" % attempts[-1]

    with Worker(manual_clock=True) as w:
        w.open_route("flaky", max_retries=2, backoff_ms=1000)
        job = w.start(flaky, b"", route="flaky")
        print("open_route('flaky', max_retries=2, backoff_ms=1000); start(flaky)")
        for backoff in (1000, 2000):
            _settle(lambda: w.route_meta("flaky", RouteMetaKey.PENDING) == 1
                    and w.route_meta("flaky", RouteMetaKey.QUEUED) == 0
                    and len(attempts) == backoff // 1000)
            print(f"attempt {attempts[-1]} failed: state -> {w.state(job).name}, "
                  f"retry in {backoff} ms; advance_clock({backoff})")
            w.advance_clock(backoff)
        print(f"wait(job) -> {w.wait(job, 5000)!r}")


def _demo_durable() -> None:
    """A job that suspends until an outside system signals it."""
    _say("durable external callback (the job suspends until signalled)")
    ids: List[str] = []

    def approve(request: memoryview) -> bytes:
        job = current_job()
        handle = job.create_callback("approval")
        ids.append(handle.callback_id)
        return b"approved by " + job.callback_result(handle)

    with Worker() as w:
        job = w.start(approve, b"order-17")
        _settle(lambda: w.state(job) == State.SUSPENDED)
        print(f"state(job) -> {w.state(job).name} (its thread is free for other jobs)")
        w.send_callback_success(ids[-1], b"ada")
        print(f"send_callback_success(id, b'ada'); wait(job) -> {w.wait(job, 5000)!r}")
        try:
            w.send_callback_success(ids[-1], b"ada")
        except CallbackAlreadyCompletedError as exc:
            print(f"a second success raises {type(exc).__name__}")


def _demo_functions() -> None:
    """Tasks as functions: the persistent queues as most code uses them."""
    _say("tasks as functions (TaskService on a temporary SQLite file)")
    with tempfile.TemporaryDirectory() as tmp, \
            TaskService(os.path.join(tmp, "functions.db")) as svc:
        @svc.task(name="add")
        def add(a: int, b: int) -> int:
            task = current_task()
            if task is not None:
                task.progress({"adding": [a, b]})
            return a + b

        @svc.task(name="flaky", max_retries=2)
        def flaky(word: str) -> str:
            task = current_task()
            assert task is not None
            if task.attempt == 1:
                raise Retry(delay_ms=0)
            return f"{word} on attempt {task.attempt}"

        @svc.task(name="broken")
        def broken() -> None:
            raise ValueError("no such record")

        print(f"@svc.task add; add(2, 3) runs inline -> {add(2, 3)}")
        ids = [add.enqueue(2, 3), flaky.enqueue("done"), broken.enqueue()]
        print("add.enqueue(2, 3), flaky.enqueue('done'), broken.enqueue() -> 3 task ids "
              "(JSON arguments, queue created on first use)")
        svc.serve()
        print(f"serve(); result(add) -> {svc.result(ids[0], timeout_ms=10_000)!r}; "
              f"get(add).progress -> {svc.get(ids[0]).progress}")
        print(f"result(flaky) -> {svc.result(ids[1], timeout_ms=10_000)!r} "
              "(it raised Retry once)")
        try:
            svc.result(ids[2], timeout_ms=10_000)
        except TaskFailedError as exc:
            print(f"result(broken) raised TaskFailedError: {exc.message} "
                  f"(traceback stored: {exc.traceback is not None})")
        try:
            add.enqueue({1, 2}, 3)
        except TypeError as exc:
            print(f"add.enqueue({{1, 2}}, 3) raised TypeError: {exc}")


def _greet(payload: memoryview) -> str:
    name = bytes(payload).decode()
    if name == "nobody":
        raise LookupError("no one to greet")
    return f"hello, {name}"


def _demo_tasks() -> None:
    """Raw byte handlers, the layer under the functions, on a temporary
    SQLite file."""
    _say("raw byte handlers, the layer under the functions (TaskService, temporary file)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "demo.db")
        with TaskService(path) as tasks:
            tasks.create_queue("greet", QueueConfig(max_retries=1, backoff_ms=0), handler=_greet)
            ids = tasks.enqueue_many("greet", [b"ada", b"nobody"])
            print("enqueue_many(greet, [b'ada', b'nobody']) -> 2 task ids")
            while any(tasks.get(i).status in ("pending", "running") for i in ids):
                time.sleep(0.01)
            for task_id in ids:
                info = tasks.get(task_id)
                print(f"get(task) -> status={info.status!r} message={info.message!r} "
                      f"attempt={info.attempt}")
        with TaskService(path) as reopened:
            print(f"after close and reopen: get(first task).status -> "
                  f"{reopened.get(ids[0]).status!r}")


def _spin_forever(request: memoryview) -> None:
    while True:
        pass
