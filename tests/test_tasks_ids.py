"""Task ids (``callbackworker.tasks.taskids``): the form of a version 7
UUID's hex, ordered by the millisecond they were drawn, never repeated, not
shared with a forked child."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from callbackworker.tasks.taskids import BATCH, new_task_id, new_task_ids


@pytest.mark.parametrize("n", [1, 3, BATCH, BATCH + 1])
def test_ids_have_the_form_of_uuid7_hex(n: int) -> None:
    ids = new_task_ids(n)
    assert len(ids) == n
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (task_id, 7, uuid.RFC_4122)


def test_ids_start_with_the_millisecond_they_were_drawn() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_task_ids(BATCH)
    after = time.time_ns() // 1_000_000
    assert all(before <= int(task_id[:12], 16) <= after for task_id in ids)


def test_ids_drawn_in_a_later_millisecond_sort_after_earlier_ones() -> None:
    earlier = new_task_ids(BATCH)
    time.sleep(0.002)
    later = new_task_ids(BATCH)
    assert max(earlier) < min(later)


def test_ids_are_never_repeated() -> None:
    ids = [new_task_id() for _ in range(3 * BATCH)] + new_task_ids(2 * BATCH)
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    new_task_id()  # leaves spare ids in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, "".join(new_task_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(new_task_id() for _ in range(8))
    assert len(child) == len(parent) == 256 and child != parent
