"""Job statuses and unified states, with their text forms.

``Status`` is what ``status()`` returns: ``PENDING`` until the job completes,
then how it completed.  ``State`` folds phase and status into one code, as the
reference's ``State`` verb does.  The numbers are the C core's
(``csrc/cbw_asyncmeta.h``); a test proves both agree.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status", "State", "STATUS_TEXT", "STATE_TEXT", "PHASE_TEXT"]


class Status(IntEnum):
    """How a job is doing: pending, or how it completed."""

    OK = 0
    PENDING = 1
    ERROR = 2
    TIMEOUT = 3
    SHUTDOWN = 4
    CANCELLED = 5


class State(IntEnum):
    """Phase and completion status in one code."""

    QUEUED = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    TIMED_OUT = 4
    CANCELLED = 5
    SHUT_DOWN = 6
    SUSPENDED = 7


PHASE_TEXT = ("queued", "running", "completed")

STATUS_TEXT = {
    Status.OK: "success",
    Status.PENDING: "pending",
    Status.ERROR: "error",
    Status.TIMEOUT: "timeout",
    Status.SHUTDOWN: "shutdown",
    Status.CANCELLED: "cancelled",
}

STATE_TEXT = {state: state.name.lower() for state in State}
