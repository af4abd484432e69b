"""Faults at the task store's edge (issue: nothing lost, one clear error).

Text a store cannot hold must never cost another task its outcome: each
backend runs the same tests (the ``db`` fixture), with a fake clock and
``background=False`` passes so nothing depends on timing.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from callbackworker import QueueConfig, TaskService
from callbackworker.tasks.storage import MAX_MESSAGE_CHARS, Outcome, storable_text

from helpers import FakeClock

SURROGATE = b"caf\xe9".decode("utf-8", "surrogateescape")


@pytest.fixture
def service(db: str, clock: FakeClock) -> Iterator[TaskService]:
    s = TaskService(db, clock=clock, background=False, prefetch=16)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("bad", [SURROGATE, "nul\x00inside", "\udcff" * 3 + "\x00"])
def test_one_unstorable_message_costs_no_other_task_its_outcome(service: TaskService,
                                                                bad: str) -> None:
    def handler(payload: memoryview) -> str:
        return bad if bytes(payload) == b"7" else "fine"

    service.create_queue("q", QueueConfig(concurrency=4), handler=handler)
    ids = [service.enqueue("q", b"%d" % i) for i in range(21)]
    for _ in range(4):
        service._dispatch_once()
    infos = [service.get(i) for i in ids]
    assert [i.status for i in infos] == ["completed"] * 21
    assert infos[7].message == storable_text(bad)
    assert "\x00" not in infos[7].message


def test_an_unstorable_error_text_fails_only_its_task(service: TaskService) -> None:
    def handler(payload: memoryview) -> str:
        if bytes(payload) == b"3":
            raise OSError(f"cannot open {SURROGATE}\x00")
        return "fine"

    service.create_queue("q", QueueConfig(concurrency=2), handler=handler)
    ids = [service.enqueue("q", b"%d" % i) for i in range(8)]
    for _ in range(3):
        service._dispatch_once()
    statuses = [service.get(i).status for i in ids]
    assert statuses == ["completed"] * 3 + ["failed"] + ["completed"] * 4
    assert service.get(ids[3]).message.startswith("OSError: cannot open caf\\udce9\\x00")


def test_a_huge_message_is_capped_with_a_marker(service: TaskService) -> None:
    service.create_queue("q", handler=lambda p: "x" * (50 * 1024 * 1024))
    tid = service.enqueue("q", b"")
    service._dispatch_once()
    info = service.get(tid)
    assert info.status == "completed"
    assert info.message.startswith("x" * 100)
    assert info.message.endswith(f"... [{50 * 1024 * 1024 - MAX_MESSAGE_CHARS} more characters cut]")


def test_storable_text_leaves_ordinary_text_alone() -> None:
    text = "naïve ✓ 日本"
    assert storable_text(text) is text


def test_outcomes_carry_storable_text() -> None:
    o = Outcome("t", "tok", "complete", "a\x00b" + SURROGATE, 0)
    assert o.message == "a\\x00bcaf\\udce9"
    o.message.encode("utf-8")
