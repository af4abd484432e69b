"""The int rule, the same at every public verb that takes an int.

An int argument takes an ``int`` or a member of an ``IntEnum`` / ``IntFlag``
(an int subclass), as the int it is; ``bool`` is refused with ``TypeError``
although it subclasses ``int``; anything else is ``TypeError``, and an int
out of range ``ValueError`` (SPEC section 2).  ``tests/test_bad_input.py``
holds the rest of the argument table.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterator

import pytest

import callbackworker
from callbackworker import Executor, JobMetaKey, RouteMetaKey, Worker, asyncmeta
from callbackworker._validate import check_int, check_key, check_range


class Small(enum.IntEnum):
    TWO = 2
    FIVE_SECONDS = 5000


class Flags(enum.IntFlag):
    ONE = 1
    TWO = 2


@pytest.fixture
def worker() -> Iterator[Worker]:
    with Worker() as w:
        yield w


def done_job(w: Worker) -> int:
    job = w.start(lambda request: None, b"x")
    assert w.wait_complete(job, 5000)
    return job


# Every verb argument that takes an int, called with ``value``.
INT_ARGUMENTS: "dict[str, Callable[[Worker, Any], Any]]" = {
    "Worker-concurrency": lambda w, v: Worker(concurrency=v).close(),
    "start-timeout_ms": lambda w, v: w.wait(w.start(lambda r: None, b"", v), 5000),
    "start_text-timeout_ms": lambda w, v: w.wait(w.start_text(lambda r: None, "", v), 5000),
    "start_many-timeout_ms": lambda w, v: w.start_many(lambda r: None, [b""], v),
    "wait-timeout_ms": lambda w, v: w.wait(done_job(w), v),
    "wait_complete-timeout_ms": lambda w, v: w.wait_complete(done_job(w), v),
    "open_route-concurrency": lambda w, v: w.open_route("r", concurrency=v),
    "open_route-timeout_ms": lambda w, v: w.open_route("r", timeout_ms=v),
    "open_route-max_retries": lambda w, v: w.open_route("r", max_retries=v),
    "open_route-backoff_ms": lambda w, v: w.open_route("r", backoff_ms=v),
    "open_route-delay_ms": lambda w, v: w.open_route("r", delay_ms=v),
    "wait_drained-timeout_ms": lambda w, v: w.wait_drained("default", v),
    "Executor-max_workers": lambda w, v: Executor(max_workers=v).shutdown(),
}


@pytest.mark.parametrize("value", [Small.TWO, Flags.TWO], ids=["IntEnum", "IntFlag"])
@pytest.mark.parametrize("verb", sorted(INT_ARGUMENTS))
def test_an_int_enum_member_is_taken_as_its_int(worker: Worker, verb: str, value: Any) -> None:
    INT_ARGUMENTS[verb](worker, value)


@pytest.mark.parametrize("verb", sorted(INT_ARGUMENTS))
def test_a_bool_is_a_type_error(worker: Worker, verb: str) -> None:
    with pytest.raises(TypeError, match="must be an int, not bool"):
        INT_ARGUMENTS[verb](worker, True)


def test_a_job_id_may_be_an_int_enum_member(worker: Worker) -> None:
    job = done_job(worker)
    as_member = enum.IntEnum("Ids", {"JOB": job}).JOB  # type: ignore[attr-defined]
    assert worker.job_known(as_member)
    assert worker.wait(as_member) == b"x"


def test_the_durable_time_limits_follow_the_int_rule(worker: Worker) -> None:
    def job(request: memoryview) -> bytes:
        ctx = callbackworker.current_job()
        ctx.create_callback("ok", timeout_ms=Small.FIVE_SECONDS, heartbeat_timeout_ms=Small.TWO)
        with pytest.raises(TypeError, match="timeout_ms must be an int, not bool"):
            ctx.create_callback("bool", timeout_ms=True)
        with pytest.raises(ValueError, match="heartbeat_timeout_ms must be between 0 and"):
            ctx.create_callback("negative", heartbeat_timeout_ms=-1)
        return b"checked"

    assert worker.wait(worker.start(job, b""), 5000) == b"checked"


def test_a_too_large_max_workers_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="max_workers must be between 1 and 1024, not 1025"):
        Executor(max_workers=1025)


def test_meta_keys_are_checked_by_their_own_enum(worker: Worker) -> None:
    job = done_job(worker)
    assert worker.job_meta(job, JobMetaKey.PHASE) == worker.job_meta(job, 1)
    assert worker.route_meta("default", RouteMetaKey.KNOWN) == 1
    with pytest.raises(ValueError, match=r"key must be a RouteMetaKey \(1\.\.9\), not 10"):
        worker.route_meta("default", 10)
    with pytest.raises(TypeError, match="key must be an int, not bool"):
        worker.job_meta(job, True)


def test_capability_helpers_follow_the_int_rule() -> None:
    assert asyncmeta.has_capability(Flags.ONE, 1)
    with pytest.raises(TypeError, match="mask must be an int, not bool"):
        asyncmeta.has_capability(False, 1)


@pytest.mark.parametrize("value, expected", [
    (7, 7), (Small.TWO, 2), (Flags.ONE | Flags.TWO, 3), (2**70, 2**70), (-1, -1),
])
def test_check_int_returns_a_plain_int(value: Any, expected: int) -> None:
    got = check_int(value, "n")
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, b"1"])
def test_check_int_refuses_every_non_int_and_bool(value: Any) -> None:
    with pytest.raises(TypeError, match=f"n must be an int, not {type(value).__name__}"):
        check_int(value, "n")


def test_check_range_names_the_bounds_and_the_value() -> None:
    assert check_range(Small.TWO, "n", 2, 2) == 2
    with pytest.raises(ValueError, match="n must be between 3 and 4, not 2"):
        check_range(2, "n", 3, 4)


def test_check_key_returns_the_enum_member() -> None:
    assert check_key(RouteMetaKey.STATE, JobMetaKey) is JobMetaKey.PHASE  # both are 1
    assert check_key(5, JobMetaKey) is JobMetaKey.KNOWN


def test_queue_config_takes_intenum_members_like_every_other_int_argument() -> None:
    from callbackworker import QueueConfig

    config = QueueConfig(concurrency=Small.TWO, max_retries=Small.TWO)
    assert (config.concurrency, config.max_retries) == (2, 2)
    with pytest.raises(TypeError, match="concurrency"):
        QueueConfig(concurrency=True)  # type: ignore[arg-type]
