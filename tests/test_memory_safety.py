"""A callback's request view never outlives the memory it shows.

The request a callback gets is a memoryview straight over the job's memory
(ffibuild/bridge.c).  A callback may keep a slice of it past its return: the
job then fails (its response could still change under the caller) and its
memory is kept for good, so the slice keeps reading the request.  These
tests hold that for every place the request can live: a retried attempt's
and a durable replay's own buffer, a suspension, and a bridge that runs out
of memory while it settles the escape.

Each test checks what the kept slice reads; a slice reading freed memory
usually reads something else, and under AddressSanitizer always reports
heap-use-after-free: tests/test_sanitized_extension.py runs this module
against the sanitized extension.
"""

from __future__ import annotations

import threading
from typing import Any, List

import pytest

import callbackworker
from callbackworker import JobFailedError, State, Status, Worker
from callbackworker import _native

from helpers import wait_for

WAIT_MS = 10_000
# Longer than the allocator's bookkeeping in a freed block, so a slice of
# freed memory never reads the request by chance.
REQUEST = b"the request, kept by the callback"
LONGER = b"a response longer than the request it replaces" * 4
KEPT_MESSAGE = "kept a view of its request"


def test_a_kept_slice_of_a_retried_request_reads_that_request() -> None:
    kept: List[memoryview] = []

    def flaky(request: memoryview) -> bytes:
        if callbackworker.current_job().attempt == 1:
            raise ValueError("the first attempt fails")
        kept.append(request[:])
        return LONGER

    with Worker() as w:
        w.open_route("again", max_retries=1, backoff_ms=0)
        jid = w.start(flaky, REQUEST, route="again")
        with pytest.raises(JobFailedError, match=KEPT_MESSAGE) as info:
            w.wait(jid, WAIT_MS)
    assert type(info.value.__cause__) is BufferError
    assert bytes(kept[0]) == REQUEST


def test_a_kept_slice_of_a_replayed_request_reads_that_request() -> None:
    kept: List[memoryview] = []
    callback_ids: List[str] = []

    def durable(request: memoryview) -> bytes:
        ctx = callbackworker.current_job()
        handle = ctx.create_callback("approval")
        callback_ids.append(handle.callback_id)
        approval = ctx.callback_result(handle)  # suspends on the first run
        kept.append(request[:])
        return approval + LONGER

    with Worker() as w:
        jid = w.start(durable, REQUEST)
        wait_for(lambda: w.state(jid) == State.SUSPENDED)
        w.send_callback_success(callback_ids[0], b"yes")
        with pytest.raises(JobFailedError, match=KEPT_MESSAGE):
            w.wait(jid, WAIT_MS)
    assert bytes(kept[0]) == REQUEST


def test_a_suspending_job_that_keeps_a_view_fails_and_says_why() -> None:
    kept: List[memoryview] = []

    def durable(request: memoryview) -> bytes:
        ctx = callbackworker.current_job()
        kept.append(request[:])
        return ctx.callback_result(ctx.create_callback("approval"))

    with Worker() as w:
        jid = w.start(durable, REQUEST)
        assert w.wait_complete(jid, WAIT_MS) is True
        assert w.status(jid) == Status.ERROR
        assert "so the job could not suspend" in w.error_text(jid)
        with pytest.raises(JobFailedError, match=KEPT_MESSAGE) as info:
            w.wait(jid, WAIT_MS)
        assert type(info.value.__cause__) is BufferError
        assert w.wait(w.start(lambda r: b"still open", b""), WAIT_MS) == b"still open"
    assert bytes(kept[0]) == REQUEST


def test_a_kept_view_stays_valid_when_settling_it_runs_out_of_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(self: Any, *args: Any) -> int:
        raise MemoryError

    monkeypatch.setattr(_native.CallbackTable, "escaped", no_memory)
    kept: List[memoryview] = []
    with Worker() as w:
        jid = w.start(lambda request: kept.append(request[:]), REQUEST)
        with pytest.raises(JobFailedError) as info:
            w.wait(jid, WAIT_MS)
    assert info.value.error_text == "MemoryError: no memory to settle the callback's outcome"
    assert bytes(kept[0]) == REQUEST


def test_the_request_memory_gives_no_buffer_once_the_callback_returned() -> None:
    exporters: List[Any] = []
    with Worker() as w:
        assert w.wait(w.start(lambda r: exporters.append(r.obj), REQUEST), WAIT_MS) == REQUEST
        # The next job's request is not reachable through the old exporter.
        assert w.wait(w.start(lambda r: bytes(r).upper(), b"next"), WAIT_MS) == b"NEXT"
    with pytest.raises(BufferError, match="no longer available"):
        memoryview(exporters[0])


def test_a_view_kept_by_another_thread_during_the_call_fails_the_job() -> None:
    taken = threading.Event()
    kept: List[memoryview] = []

    def share(request: memoryview) -> None:
        def take() -> None:
            kept.append(request[1:])
            taken.set()

        threading.Thread(target=take).start()
        assert taken.wait(WAIT_MS / 1000)

    with Worker() as w:
        with pytest.raises(JobFailedError, match=KEPT_MESSAGE):
            w.wait(w.start(share, REQUEST), WAIT_MS)
    assert bytes(kept[0]) == REQUEST[1:]
