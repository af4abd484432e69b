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
