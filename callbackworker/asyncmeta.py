"""The asyncmeta vocabulary: the numbers every async backend agrees on.

This module only defines constants and bitmask tests; it starts no thread and
does no I/O.  It covers six concepts:

* ``Phase``: a job's life cycle, in order QUEUED 0, RUNNING 1, COMPLETED 2.
* ``STATUS_PENDING``: the status code of a job that has not finished (1).
* ``Capability``: one feature a backend may support, a distinct power of two.
  The twelve bits together make 4095.
* ``Profile``: a ready-made union of capability bits, e.g.
  ``Profile.BLOB_JOB == Profile.JOB_INSPECT | BLOB_TAKE | BLOB_RESULT_META``.
* ``RouteState``: whether a route accepts new jobs (CLOSED 0, OPEN 1).
* ``JobMetaKey`` / ``RouteMetaKey``: the field keys of ``job_meta`` and
  ``route_meta`` queries.  Keys start at 1; 0 is never a valid key.

A backend reports the capabilities it supports as one integer mask; the
helpers below answer yes/no questions about such a mask.  They accept any
``int`` (including members of the enums here), reject every other type with
``TypeError``, and compute the plain bit test for any value, negative or
beyond the twelve defined bits.

The C core defines the same numbers in ``csrc/cbw_asyncmeta.h``;
``tests/test_asyncmeta.py`` proves both agree.
"""

from enum import IntEnum, IntFlag

from ._validate import check_int

__all__ = [
    "STATUS_PENDING",
    "Capability",
    "JobMetaKey",
    "Phase",
    "Profile",
    "RouteMetaKey",
    "RouteState",
    "has_all_capabilities",
    "has_capability",
    "supports_blob_job",
    "supports_job_inspect",
    "supports_route_control",
    "supports_route_service",
]


class Phase(IntEnum):
    """Where a job is in its life cycle; the values follow its order."""

    QUEUED = 0
    RUNNING = 1
    COMPLETED = 2


STATUS_PENDING = 1
"""The status code of a job that has not finished its work yet."""


class Capability(IntFlag):
    """One feature a backend may support; combine bits with ``|``."""

    WAIT_COMPLETE = 1
    WAIT_DRAINED = 2
    JOB_META = 4
    ROUTE_META = 8
    PHASE_TEXT = 16
    STATUS_TEXT = 32
    JOB_INFO = 64
    ROUTE_INFO = 128
    ROUTE_CLOSE = 256
    BLOB_TAKE = 512
    BLOB_RESULT_META = 1024
    KNOWN = 2048


class Profile(IntFlag):
    """A ready-made package of capability bits a caller can require at once.

    Every member is a union of several bits, so ``list(Profile)`` may skip
    them; use ``Profile.__members__`` to enumerate the profiles.
    """

    JOB_INSPECT = int(
        Capability.WAIT_COMPLETE
        | Capability.JOB_META
        | Capability.PHASE_TEXT
        | Capability.STATUS_TEXT
        | Capability.JOB_INFO
        | Capability.KNOWN
    )
    BLOB_JOB = int(JOB_INSPECT | Capability.BLOB_TAKE | Capability.BLOB_RESULT_META)
    ROUTE_CONTROL = int(
        Capability.WAIT_DRAINED
        | Capability.ROUTE_META
        | Capability.ROUTE_INFO
        | Capability.ROUTE_CLOSE
        | Capability.KNOWN
    )
    ROUTE_SERVICE = int(BLOB_JOB | ROUTE_CONTROL)


class RouteState(IntEnum):
    """Whether a route accepts new jobs."""

    CLOSED = 0
    OPEN = 1


class JobMetaKey(IntEnum):
    """Field keys of a job meta query."""

    PHASE = 1
    STATUS = 2
    ROUTE = 3
    TIMEOUT = 4
    KNOWN = 5
    HAS_BLOB_RESULT = 6
    BLOB_RESULT_SIZE = 7


class RouteMetaKey(IntEnum):
    """Field keys of a route meta query."""

    STATE = 1
    TIMEOUT = 2
    PENDING = 3
    QUEUED = 4
    RUNNING = 5
    DRAINED = 6
    KNOWN = 7
    CLOSE_ACCEPTED = 8
    CLOSED_QUEUED = 9


def _covers(mask: int, required: int) -> bool:
    return (mask & required) == required


def has_all_capabilities(mask: int, required: int) -> bool:
    """Return whether ``mask`` holds every bit of ``required``.

    This is ``(mask & required) == required``; a ``required`` of 0 is always
    held.  Raises TypeError if either argument is not an int.
    """
    return _covers(check_int(mask, "mask"), check_int(required, "required"))


def has_capability(mask: int, capability: int) -> bool:
    """Return whether ``mask`` shares at least one bit with ``capability``.

    This is ``(mask & capability) != 0``; with a single ``Capability`` bit it
    answers whether the backend supports that one feature.  Raises TypeError
    if either argument is not an int.
    """
    checked_mask = check_int(mask, "mask")
    return (checked_mask & check_int(capability, "capability")) != 0


def supports_job_inspect(mask: int) -> bool:
    """Return whether ``mask`` holds the whole ``Profile.JOB_INSPECT``.

    Raises TypeError if ``mask`` is not an int.
    """
    return _covers(check_int(mask, "mask"), Profile.JOB_INSPECT)


def supports_blob_job(mask: int) -> bool:
    """Return whether ``mask`` holds the whole ``Profile.BLOB_JOB``.

    Raises TypeError if ``mask`` is not an int.
    """
    return _covers(check_int(mask, "mask"), Profile.BLOB_JOB)


def supports_route_control(mask: int) -> bool:
    """Return whether ``mask`` holds the whole ``Profile.ROUTE_CONTROL``.

    Raises TypeError if ``mask`` is not an int.
    """
    return _covers(check_int(mask, "mask"), Profile.ROUTE_CONTROL)


def supports_route_service(mask: int) -> bool:
    """Return whether ``mask`` holds every capability (``Profile.ROUTE_SERVICE``).

    Raises TypeError if ``mask`` is not an int.
    """
    return _covers(check_int(mask, "mask"), Profile.ROUTE_SERVICE)
