"""Regression tests for defects found in review (branch ``review``).

Each test names its defect; each fails on main at f240287."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from callbackworker import TaskService
from callbackworker._webcall import REQUEST_PATIENCE_S
from callbackworker.http import create_app

TOKEN = "review-token"


def test_defect_r1_http_request_bounded_while_a_worker_of_the_service_waits_for_the_lock(
        tmp_path: Path) -> None:
    """DEFECT R1: ``bounded_patience`` bounds the retry loop, but
    ``SQLiteTaskStore._atomic``/``_query`` hold the store's ``threading.Lock``
    for the whole retry (up to ``patience_s`` = 60 s).  When the app's
    service also serves a queue, its dispatcher holds that lock while the
    database is locked elsewhere, and a request waits for it unboundedly
    instead of answering 503 after ``REQUEST_PATIENCE_S``."""
    db = tmp_path / "t.db"
    svc = TaskService(db, poll_ms=20)

    @svc.task(queue="q", name="jobs.x")
    def x() -> int:
        return 1

    task = x.enqueue()
    svc.serve(["q"])
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    release = threading.Timer(15, lambda: blocker.execute("ROLLBACK"))
    try:
        client = TestClient(create_app(svc, TOKEN))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get(f"/v1/tasks/{task}", headers=auth).status_code == 200
        blocker.execute("BEGIN IMMEDIATE")
        release.start()
        time.sleep(0.5)  # the dispatcher's next claim waits for the lock, in the store's lock
        began = time.monotonic()
        r = client.get(f"/v1/tasks/{task}", headers=auth)
        took = time.monotonic() - began
        assert r.status_code == 503 and took < REQUEST_PATIENCE_S + 3, (r.status_code, took)
    finally:
        release.cancel()
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        svc.close()


NESTED_FINALIZER_SCRIPT = r"""
import os, signal, sys, threading, time, callbackworker as cw
signal.signal(signal.SIGINT, signal.default_int_handler)
started = threading.Event()
def slow(*args):
    started.set(); time.sleep(3.0); return b"done"
class Holder:
    def __init__(self, w): self.w = w
    def __del__(self):
        self.w = None      # the worker's finalizer runs here, Ctrl-C comes during it
        len("x")           # any call in this __del__ after it
w = cw.Worker(); w.start(slow, b"x"); started.wait()
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    h = Holder(w); del w; del h
    time.sleep(2)
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_defect_r2_ctrl_c_during_a_finalizer_nested_in_a_del_is_not_dropped() -> None:
    """DEFECT R2: ``_deliver_after_finalizers`` raises at the first call
    outside the worker's own finalizer frames; when the worker was let go
    inside another finalizer (an object's ``__del__``, a weakref callback,
    another ``__del__`` of the same collection) that call is in that
    finalizer, so the KeyboardInterrupt is printed as "Exception ignored"
    and dropped."""
    proc = subprocess.run([sys.executable, "-c", NESTED_FINALIZER_SCRIPT],
                          capture_output=True, text=True, timeout=30)
    assert "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[:1] == ["KeyboardInterrupt"], (proc.stdout, proc.stderr)


def test_defect_r6_a_refused_start_on_a_route_leaves_no_phantom_job() -> None:
    """DEFECT R6: ``Executor._start_job`` undoes its ``_jobs += 1`` and
    takes the call back off the queue only for ``WorkerClosedError``.  Any
    other refusal of ``run_detached`` (the route closed:
    ``RouteClosedError``; an interrupt between the count and the start)
    leaves a phantom job counted and its call queued, and a route
    executor's ``shutdown(wait=True)`` then waits for it forever."""
    from callbackworker import Executor
    from callbackworker._default import default_worker
    from callbackworker.errors import CallbackWorkerError

    ex = Executor(max_workers=1, route="review-defect-r6")
    assert ex.submit(lambda: 1).result(timeout=5) == 1
    default_worker().close_route("review-defect-r6")
    with pytest.raises((RuntimeError, CallbackWorkerError)):
        ex.submit(lambda: 2)
    stopper = threading.Thread(target=ex.shutdown, daemon=True)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive(), "shutdown(wait=True) hangs on a job that never started"
