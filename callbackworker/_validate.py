"""Argument checks for every public verb: one rule per kind of argument.

The int rule: an argument that must be an int takes an ``int`` or any
subclass of it but ``bool``, so ``IntEnum`` and ``IntFlag`` members count
as the ints they are, while ``True`` (never a count, an id or a key) is a
caller's mistake.  A non-int raises ``TypeError``; an int out of range
raises ``ValueError``; a check returns a plain ``int``.  Each message is one
line naming the argument, what it must be, and what it was.

The bounds that are the C core's (the longest timeout, the longest route
name) are read from it, never repeated.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Type, TypeVar

from ._native import lib

__all__ = [
    "TIMEOUT_MAX", "ROUTE_NAME_MAX", "JOB_ID_MAX", "CONCURRENCY_MAX", "DURABLE_NAME_MAX", "check_int",
    "check_range", "check_bool", "check_callable", "check_timeout", "check_count",
    "check_concurrency", "check_id", "may_be_job_id", "check_key", "is_buffer", "check_route_name", "check_durable_name",
]

TIMEOUT_MAX = int(lib.CBW_TIMEOUT_MAX)
"""The longest timeout, in ms; also the bound of the core's other 32-bit counts."""

ROUTE_NAME_MAX = int(lib.CBW_ROUTE_NAME_MAX)
"""The longest route name, in UTF-8 bytes."""

JOB_ID_MAX = (1 << 63) - 1
"""The largest job id the core can issue (ids are 1..2**63-1)."""

CONCURRENCY_MAX = 1024
"""The most threads one route (or one task queue) may run."""

DURABLE_NAME_MAX = 128
"""The longest name of a durable callback or step, in UTF-8 bytes."""

E = TypeVar("E", bound=IntEnum)


def check_int(value: object, name: str) -> int:
    """``value`` as a plain int by the int rule; TypeError otherwise."""
    if type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)  # an int subclass such as an IntEnum member
    raise TypeError(f"{name} must be an int, not {type(value).__name__}")


def check_range(value: object, name: str, low: int, high: int) -> int:
    """An int in ``low..high``."""
    value = check_int(value, name)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")
    return value


def check_count(value: object, name: str) -> int:
    """A non-negative int that fits the core's 32-bit fields (a number of
    ms, of retries...)."""
    return check_range(value, name, 0, TIMEOUT_MAX)


def check_concurrency(value: object, name: str = "concurrency") -> int:
    """A number of threads: 1..1024."""
    return check_range(value, name, 1, CONCURRENCY_MAX)


def check_timeout(value: object, name: str = "timeout_ms") -> int:
    """-1 (no limit) or 0..``TIMEOUT_MAX`` ms."""
    value = check_int(value, name)
    if value != -1 and not 0 <= value <= TIMEOUT_MAX:
        raise ValueError(f"{name} must be -1 (infinite) or 0..{TIMEOUT_MAX}, not {value}")
    return value


def check_id(job_id: object) -> int:
    """A job id argument: any int (one that was never issued is the
    caller's to report as unknown)."""
    return check_int(job_id, "job_id")


def may_be_job_id(job_id: int) -> bool:
    """Whether the core could have issued the int ``job_id``."""
    return 0 < job_id <= JOB_ID_MAX


def check_key(key: object, keys: Type[E]) -> E:
    """A member of the IntEnum ``keys``, given as one of its values."""
    key = check_int(key, "key")
    low, high = min(keys), max(keys)
    if not low <= key <= high:
        raise ValueError(f"key must be a {keys.__name__} ({low}..{high}), not {key}")
    return keys(key)


def check_bool(value: object, name: str) -> bool:
    """A flag: ``True`` or ``False`` only."""
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def check_callable(value: object, name: str) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, not {type(value).__name__}")


def is_buffer(obj: object) -> bool:
    """Whether ``obj`` is bytes-like (supports the buffer protocol)."""
    try:
        memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def check_route_name(name: object) -> bytes:
    """A route name: 1..``ROUTE_NAME_MAX`` UTF-8 bytes without NUL; returns
    the bytes."""
    if not isinstance(name, str):
        raise TypeError(f"route name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 0 < len(raw) <= ROUTE_NAME_MAX or "\0" in name:
        raise ValueError(f"route name must be 1..{ROUTE_NAME_MAX} UTF-8 bytes without NUL")
    return raw


def check_durable_name(name: object) -> str:
    """The name of a durable operation (a callback, a step): 1..
    ``DURABLE_NAME_MAX`` UTF-8 bytes."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if not 0 < len(name.encode("utf-8")) <= DURABLE_NAME_MAX:
        raise ValueError(f"name must be 1..{DURABLE_NAME_MAX} UTF-8 bytes")
    return name

