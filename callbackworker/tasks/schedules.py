"""When the ticks of a periodic task fall: ``Schedule``.

DESIGN

* A schedule's ticks are a pure function of its spec: every service that
  registers the same spec computes the same instants, to the millisecond,
  whatever its clock or start time.  A tick's time is therefore its
  identity, and the store deduplicates a tick's enqueue by it (see
  ``TaskStore.claim_tick``): the store, not this module, makes a tick run
  once however many services compute it.
* ``every_ms`` ticks are the multiples of ``every_ms`` since the Unix epoch
  (``every_ms=60_000`` ticks on each whole UTC minute), so a start time
  never shifts them.
* ``cron`` is a standard five-field expression (minute, hour, day of month,
  month, day of week), parsed and evaluated by the ``croniter`` library, in
  UTC or in the IANA time zone ``tz`` (through ``zoneinfo``).  Daylight-
  saving transitions are croniter's: a local time skipped when clocks go
  forward runs at the first instant after the gap (``30 2 * * *`` in
  Europe/Berlin runs at 03:00 CEST that day), and a local time repeated
  when clocks go back runs at both of its instants (02:30 CEST, then
  02:30 CET); fields that match every hour run every real hour, so the
  repeated hour runs twice.
* Missed ticks coalesce: ``due_tick`` gives only the latest tick at or
  before ``now`` that is newer than the last one run, so after downtime a
  schedule runs once, not once per missed tick.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Optional

from croniter import CroniterBadDateError, CroniterError, croniter

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Schedule", "EVERY_MS_MIN", "EVERY_MS_MAX"]

EVERY_MS_MIN = 1_000
"""The shortest ``every_ms``: one second."""

EVERY_MS_MAX = 366 * 86_400_000
"""The longest ``every_ms``: 366 days (use ``cron`` for calendar periods)."""

_CRON_FIELDS = 5


def _zone(tz: object) -> tzinfo:
    """The ``tzinfo`` named ``tz`` (an IANA name), or a ValueError that says
    which name was not found."""
    if not isinstance(tz, str):
        raise TypeError(f"tz must be an IANA time zone name (str), not {type(tz).__name__}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {tz!r}: give an IANA name such as "
                         f"'Europe/Berlin'") from None


@dataclass(frozen=True)
class Schedule:
    """When a periodic task is due: exactly one of ``cron`` (a five-field
    cron expression, in UTC unless ``tz`` names an IANA time zone) or
    ``every_ms`` (an interval, ``EVERY_MS_MIN`` .. ``EVERY_MS_MAX``,
    ticking on its multiples since the Unix epoch).  Times are epoch
    milliseconds.  Raises ``TypeError`` / ``ValueError`` for a spec that
    cannot run, with a message saying what to change."""

    cron: Optional[str] = None
    every_ms: Optional[int] = None
    tz: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_ms is None):
            raise ValueError("give exactly one of cron= (a five-field cron expression) "
                             "or every_ms= (an interval in milliseconds)")
        if self.every_ms is not None:
            self._check_every()
        else:
            self._check_cron()

    def _check_every(self) -> None:
        every = self.every_ms
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every_ms must be an int, not {type(every).__name__}")
        if not EVERY_MS_MIN <= every <= EVERY_MS_MAX:
            raise ValueError(f"every_ms must be between {EVERY_MS_MIN} and {EVERY_MS_MAX} "
                             f"(one second to 366 days), not {every}")
        if self.tz is not None:
            raise ValueError("tz applies to cron schedules only; every_ms ticks are "
                             "fixed intervals of real time")

    def _check_cron(self) -> None:
        cron = self.cron
        if not isinstance(cron, str):
            raise TypeError(f"cron must be a str, not {type(cron).__name__}")
        fields = cron.split()
        if len(fields) != _CRON_FIELDS:
            raise ValueError(f"cron {cron!r} is not five fields; give minute hour "
                             f"day-of-month month day-of-week (e.g. '0 3 * * *')")
        object.__setattr__(self, "cron", " ".join(fields))
        if self.tz is not None:
            _zone(self.tz)
        try:
            self.next_tick(0)
        except CroniterBadDateError:
            raise ValueError(f"cron {self.cron!r} matches no date; check its day-of-month "
                             f"and month fields") from None
        except CroniterError as exc:
            raise ValueError(f"cron {self.cron!r} is not a valid cron expression: "
                             f"{exc}") from None

    @property
    def spec(self) -> str:
        """The schedule as one line of text, the same for equal schedules:
        ``"every 60000 ms"``, ``"cron 0 3 * * *"`` or
        ``"cron 0 3 * * * Europe/Berlin"``."""
        if self.every_ms is not None:
            return f"every {self.every_ms} ms"
        return f"cron {self.cron}" + (f" {self.tz}" if self.tz else "")

    def _cron_from(self, at_ms: int) -> croniter:
        zone = _zone(self.tz) if self.tz else timezone.utc
        return croniter(self.cron, datetime.fromtimestamp(at_ms / 1000, zone))

    def next_tick(self, after_ms: int) -> int:
        """The first tick strictly after ``after_ms``."""
        if self.every_ms is not None:
            return (after_ms // self.every_ms + 1) * self.every_ms
        return round(self._cron_from(after_ms).get_next(float) * 1000)

    def last_tick(self, at_ms: int) -> int:
        """The latest tick at or before ``at_ms``."""
        if self.every_ms is not None:
            return at_ms // self.every_ms * self.every_ms
        # croniter looks strictly before its start; ticks fall on whole
        # seconds, so one millisecond later includes a tick at ``at_ms``.
        return round(self._cron_from(at_ms + 1).get_prev(float) * 1000)

    def due_tick(self, last_run_ms: int, now_ms: int) -> Optional[int]:
        """The tick to run at ``now_ms`` when the last tick run was
        ``last_run_ms``: the latest tick at or before ``now_ms`` if it is
        newer, else None.  Every tick missed in between coalesces into that
        one run."""
        tick = self.last_tick(now_ms)
        return tick if tick > last_run_ms else None
