"""Faults at the task store's edge (issue: nothing lost, one clear error).

Text a store cannot hold must never cost another task its outcome: each
backend runs the same tests (the ``db`` fixture), with a fake clock and
``background=False`` passes so nothing depends on timing.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Sequence

import pytest

from callbackworker import QueueConfig, StorageBusyError, TaskService
from callbackworker.tasks import owners
from callbackworker.tasks.client import open_store
from callbackworker.tasks.committer import UNSTORABLE, GroupCommitter, is_data_error
from callbackworker.tasks.storage import MAX_MESSAGE_CHARS, Outcome, TaskStore, storable_text

from helpers import FakeClock, wait_for

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


# ---- the group committer: nothing dropped while the process lives ---------


class FlakyStore:
    """Wraps a store: its next ``fail`` settles raise ``error`` first."""

    def __init__(self, store: TaskStore, error: Exception, fail: int) -> None:
        self._store = store
        self.error = error
        self.fail = fail
        self.calls: List[int] = []

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        self.calls.append(len(outcomes))
        if self.fail > 0:
            self.fail -= 1
            raise self.error
        return self._store.settle(outcomes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


class RefusesOne:
    """Wraps a store: any batch holding task ``culprit``'s outcome with a
    message other than the committer's fixed one fails as data."""

    def __init__(self, store: TaskStore, culprit: str) -> None:
        self._store = store
        self.culprit = culprit

    def settle(self, outcomes: Sequence[Outcome]) -> List[bool]:
        if any(o.task_id == self.culprit and o.message != UNSTORABLE for o in outcomes):
            raise sqlite3.DataError("refused")
        return self._store.settle(outcomes)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def claimed_outcomes(store: TaskStore, n: int) -> List[Outcome]:
    store.ensure_queue("q")
    store.enqueue_many("q", [(f"t{i}", b"") for i in range(n)], now=0)
    claimed = store.claim("q", owner="me", limit=n, now=0, lease_ms=60_000)
    return [Outcome(c.id, c.token, "complete", f"done {c.id}", 1) for c in claimed]


@pytest.mark.parametrize("error", [StorageBusyError("locked"), sqlite3.OperationalError("gone"),
                                   ConnectionError("reset")])
def test_a_transient_commit_failure_is_tried_again_until_it_succeeds(
        tmp_path: Path, error: Exception) -> None:
    store = open_store(str(tmp_path / "t.db"), "normal")
    flaky = FlakyStore(store, error, fail=3)
    committer = GroupCommitter(flaky, lambda: None, lambda: 2)  # type: ignore[arg-type]
    committer.MAX_PAUSE_S = 0.01
    outcomes = claimed_outcomes(store, 5)
    for o in outcomes:
        committer.put(o)
    committer.flush()
    committer.close()
    assert [store.get(o.task_id).status for o in outcomes] == ["completed"] * 5  # type: ignore[union-attr]
    assert len(flaky.calls) >= 4
    store.close()


def test_a_batch_refused_as_data_fails_only_the_culprit(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "t.db"), "normal")
    outcomes = claimed_outcomes(store, 6)
    committer = GroupCommitter(RefusesOne(store, "t3"), lambda: None,  # type: ignore[arg-type]
                               lambda: 2)
    for o in outcomes:
        committer.put(o)
    committer.flush()
    committer.close()
    records = {o.task_id: store.get(o.task_id) for o in outcomes}
    assert {t: r.status for t, r in records.items()} == {  # type: ignore[union-attr]
        "t0": "completed", "t1": "completed", "t2": "completed", "t3": "failed",
        "t4": "completed", "t5": "completed"}
    assert records["t3"].message == UNSTORABLE  # type: ignore[union-attr]
    store.close()


def test_close_gives_up_on_a_store_that_never_answers(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "t.db"), "normal")
    flaky = FlakyStore(store, StorageBusyError("locked"), fail=10**9)
    committer = GroupCommitter(flaky, lambda: None, lambda: 2)  # type: ignore[arg-type]
    committer.MAX_PAUSE_S = 0.01
    committer.CLOSE_PATIENCE_S = 0.2
    outcomes = claimed_outcomes(store, 2)
    for o in outcomes:
        committer.put(o)
    committer.close()  # returns: the tasks are left to lease expiry
    assert [store.get(o.task_id).status for o in outcomes] == ["running"] * 2  # type: ignore[union-attr]
    store.close()


@pytest.mark.parametrize("exc, data", [
    (sqlite3.DataError("x"), True), (sqlite3.IntegrityError("x"), True),
    (sqlite3.ProgrammingError("x"), True), (ValueError("x"), True),
    (sqlite3.OperationalError("database is locked"), False), (StorageBusyError("x"), False),
    (OSError("x"), False), (ConnectionError("x"), False),
])
def test_data_errors_are_told_from_passing_ones(exc: Exception, data: bool) -> None:
    assert is_data_error(exc) is data


def test_a_claim_the_service_never_learned_of_is_not_renewed(db: str, clock: FakeClock) -> None:
    """A claim committed whose answer was lost (a connection dropped after
    the commit) holds a task under this service's name: the service must
    not keep its lease alive, so recovery takes it back."""
    with TaskService(db, clock=clock, background=False, lease_ms=1000) as service:
        service.create_queue("q", QueueConfig(max_retries=1), handler=lambda p: "ran")
        tid = service.enqueue("q", b"")
        service._store.claim("q", owner=service._runtime._owner, limit=1,  # noqa: SLF001
                             now=clock(), lease_ms=1000)
        service._dispatch_once()
        assert service.get(tid).status == "running"
        clock.advance(1000)
        service._dispatch_once()  # renews nothing of it; recovers it
        service._dispatch_once()  # runs it
        assert (service.get(tid).status, service.get(tid).message) == ("completed", "ran")


# ---- a predecessor killed with -9 but not yet reaped ----------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_predecessor_is_dead() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        wait_for(lambda: _state(pid) == b"Z")
        assert owners.owner_is_dead(f"{owners.HOST}/{pid}/x")
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_live_process_with_parentheses_in_its_name_is_alive(tmp_path: Path) -> None:
    tricky = tmp_path / "py) Z ("  # its /proc stat reads "pid (py) Z () S ..."
    tricky.symlink_to(sys.executable)
    child = subprocess.Popen([str(tricky), "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert not owners.owner_is_dead(f"{owners.HOST}/{child.pid}/x")
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def _state(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:][:1]


# ---- new database files are private ----------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_new_database_and_its_wal_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    old = os.umask(0o022)
    try:
        with TaskService(str(path)) as service:
            service.create_queue("q", handler=lambda p: None)
            service.enqueue("q", b"")
            modes = {name: os.stat(tmp_path / name).st_mode & 0o777
                     for name in ("new.db", "new.db-wal", "new.db-shm")}
    finally:
        os.umask(old)
    assert modes == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    TaskService(str(path)).close()
    os.chmod(path, 0o640)
    TaskService(str(path)).close()
    assert os.stat(path).st_mode & 0o777 == 0o640
