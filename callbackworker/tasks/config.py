"""The vocabulary of task queues: a queue's policy, a task's state, the
limits, and the checks every entry point applies to its arguments.

DESIGN

* Records.  ``QueueConfig`` (a queue's policy, validated when built),
  ``TaskInfo`` (what ``get`` answers) and ``TaskContext`` (what a running
  handler may ask through ``current_task()``) are plain immutable values;
  nothing here holds state or threads.
* Limits.  A payload is at most ``MAX_PAYLOAD`` bytes, a queue name at
  most ``MAX_QUEUE_NAME`` UTF-8 bytes; retry delays double from
  ``backoff_ms`` and are capped at ``MAX_BACKOFF_MS``.
* Checks.  The client and the runtime call the ``check_*`` functions
  before touching the store, so a bad argument is a ``TypeError`` or
  ``ValueError`` naming it, never a database error.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from .._validate import CONCURRENCY_MAX
from .._validate import check_range as check_int  # the package's one int rule
from .progress import report_progress

__all__ = ["QueueConfig", "TaskInfo", "TaskContext", "Handler", "MAX_PAYLOAD", "MAX_QUEUE_NAME",
           "MAX_BACKOFF_MS", "retry_delay_ms", "config_to_json", "config_from_json"]

Handler = Callable[[memoryview], Optional[str]]
"""``handler(payload) -> message``: a read-only view of the task's payload;
the returned ``str`` (or None, stored as ``""``) becomes the task's message."""

MAX_PAYLOAD = 1 << 20
"""Largest payload, in bytes (1 MiB)."""

MAX_QUEUE_NAME = 128
"""Longest queue name, in UTF-8 bytes."""

MAX_BACKOFF_MS = 3_600_000
"""Retry delays are capped at one hour."""

RETENTION_MIN_MS = 60_000
RETENTION_MAX_MS = 604_800_000
INTERVAL_MAX_MS = RETENTION_MAX_MS
"""The longest lease, backoff or delay between starts (one week)."""
TIMEOUT_MAX_MS = 2**31 - 1
RETRIES_MAX = 2**31 - 1


def wall_clock_ms() -> int:
    """The default clock of the task queues: wall-clock milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class QueueConfig:
    """A queue's policy, with the reference's defaults and bounds.

    * ``concurrency`` (1..1024, default 1): handlers of this queue running
      at once in this service.
    * ``max_retries`` (>= 0, default 0): attempts after the first failure.
    * ``backoff_ms`` (0..604_800_000, default 1000): the delay before retry
      n is ``backoff_ms << (n - 1)``, capped at one hour.
    * ``delay_ms`` (0..604_800_000, default 0): minimum gap between
      consecutive starts in the queue, across every process on the database.
    * ``retention_ms`` (60_000..604_800_000, default one hour): how long
      completed and cancelled tasks are kept.
    * ``timeout_ms`` (-1 or 0..2_147_483_647, default -1: none): the
      run-time limit of one attempt.  An attempt past it is interrupted, as
      ``Worker`` timeouts interrupt a callback, and counts as a failed
      attempt (retried under the policy).  A task's own ``timeout_ms``
      (``TaskService.task``) overrides it.
    * ``failed_retention_ms`` (60_000..604_800_000, default one week): how
      long failed tasks are kept, so their tracebacks can be read and the
      tasks retried (``retry_task``) well after they failed.
    """

    concurrency: int = 1
    max_retries: int = 0
    backoff_ms: int = 1000
    delay_ms: int = 0
    retention_ms: int = 3_600_000
    timeout_ms: int = -1
    failed_retention_ms: int = 604_800_000

    def __post_init__(self) -> None:
        check_int(self.concurrency, "concurrency", 1, CONCURRENCY_MAX)
        check_int(self.max_retries, "max_retries", 0, RETRIES_MAX)
        check_int(self.backoff_ms, "backoff_ms", 0, INTERVAL_MAX_MS)
        check_int(self.delay_ms, "delay_ms", 0, INTERVAL_MAX_MS)
        check_int(self.retention_ms, "retention_ms", RETENTION_MIN_MS, RETENTION_MAX_MS)
        check_int(self.timeout_ms, "timeout_ms", -1, TIMEOUT_MAX_MS)
        check_int(self.failed_retention_ms, "failed_retention_ms", RETENTION_MIN_MS,
                  RETENTION_MAX_MS)


class TaskInfo(NamedTuple):
    """A task's state: ``status`` ("pending", "running", "suspended" (a
    durable handler waits for an external callback), "completed", "failed",
    "cancelled"), ``message`` (a raw handler's result, or the error text
    ``"ExcType: message"`` of the last failed attempt) and ``attempt``
    (1-based, counted when the task is claimed; 0 before its first run);
    then ``id``, ``name`` (the registered task's; None for a raw payload),
    ``queue``, ``result`` (a function's JSON-decoded return value; None
    until completed), ``progress`` (the latest ``current_task().progress``,
    decoded), ``traceback`` (the last failed attempt's, None if none
    failed), ``created_at_ms`` and ``finished_at_ms`` (None until
    finished)."""

    status: str
    message: str
    attempt: int
    id: str = ""
    name: Optional[str] = None
    queue: str = ""
    result: Any = None
    progress: Any = None
    traceback: Optional[str] = None
    created_at_ms: int = 0
    finished_at_ms: Optional[int] = None


class TaskContext(NamedTuple):
    """What a running handler may ask about its task (``current_task()``),
    and ``progress(value)`` to report how far it got."""

    id: str
    queue: str
    attempt: int

    def progress(self, value: Any) -> None:
        """Records ``value`` (anything JSON can encode, else ``TypeError``)
        as the task's progress, read with ``get(task_id).progress``.  Writes
        are throttled (at most one every ``PROGRESS_EVERY_MS``); the last
        value is always written before the attempt's outcome.  Only from
        the thread running the task."""
        report_progress(self.id, value)


def config_to_json(config: QueueConfig) -> str:
    """``config`` as the JSON text a store keeps (``declare_queue``)."""
    return json.dumps(dataclasses.asdict(config), separators=(",", ":"), sort_keys=True)


def config_from_json(text: str) -> QueueConfig:
    """The ``QueueConfig`` that ``config_to_json`` wrote; fields this
    version does not know (written by a newer one) are ignored."""
    fields = {f.name for f in dataclasses.fields(QueueConfig)}
    return QueueConfig(**{k: v for k, v in json.loads(text).items() if k in fields})


def retry_delay_ms(backoff_ms: int, attempt: int) -> int:
    """The delay before retrying after failed attempt ``attempt`` (1-based):
    ``backoff_ms << (attempt - 1)``, at most one hour."""
    return min(backoff_ms << min(attempt - 1, 62), MAX_BACKOFF_MS)


def check_queue_name(name: object) -> str:
    """``name`` if it is a valid queue name: a str of 1..``MAX_QUEUE_NAME``
    UTF-8 bytes of printable text (no NUL, control characters, line
    separators or bidirectional overrides: names are shown on terminals
    and in logs)."""
    if not isinstance(name, str):
        raise TypeError(f"queue name must be a str, not {type(name).__name__}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_QUEUE_NAME:
        raise ValueError(f"queue name must be 1..{MAX_QUEUE_NAME} UTF-8 bytes, not {size} bytes")
    if not name.isprintable():
        raise ValueError(f"queue name {name!r} holds unprintable characters: a name is shown "
                         f"on terminals and in logs, so it must be printable text")
    return name


def check_payload(payload: object) -> bytes:
    """The bytes of a bytes-like ``payload`` of at most ``MAX_PAYLOAD``
    bytes (``payload`` itself when it is ``bytes``)."""
    if isinstance(payload, str):
        raise TypeError("payload must be bytes-like, not str (encode it first)")
    try:
        view = memoryview(payload)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}") from None
    if view.nbytes > MAX_PAYLOAD:
        raise ValueError(f"payload is {view.nbytes} bytes; the limit is {MAX_PAYLOAD} (1 MiB)")
    return payload if type(payload) is bytes else view.tobytes()


_TASK_ID = re.compile(r"[0-9a-f]{32}")


def is_task_id(text: str) -> bool:
    """Whether ``text`` looks like the ids ``enqueue`` makes (32 lowercase
    hex digits).  Endpoints that take an id from outside check it first,
    so a malformed one (a NUL, say, which PostgreSQL cannot even compare)
    never reaches the store."""
    return _TASK_ID.fullmatch(text) is not None


def check_task_id(task_id: object) -> str:
    """``task_id`` if it is a str (any str: an unknown one is the store's
    answer to give)."""
    if not isinstance(task_id, str):
        raise TypeError(f"task id must be a str, not {type(task_id).__name__}")
    return task_id
