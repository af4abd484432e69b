"""``Schedule``: which instants a periodic task's ticks fall on, exactly,
including daylight-saving transitions in a named time zone."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from callbackworker.tasks.schedules import EVERY_MS_MAX, EVERY_MS_MIN, Schedule
from helpers import epoch_ms as ms



def ticks(schedule: Schedule, start: str, n: int) -> "list[str]":
    """The first ``n`` ticks after ``start``, as UTC ISO text."""
    out, at = [], ms(start)
    for _ in range(n):
        at = schedule.next_tick(at)
        out.append(datetime.fromtimestamp(at / 1000, timezone.utc).isoformat())
    return out


# ---- every_ms ---------------------------------------------------------------

def test_every_ms_ticks_on_multiples_since_the_epoch() -> None:
    minute = Schedule(every_ms=60_000)
    assert minute.next_tick(ms("2026-05-01T10:00:17.250+00:00")) == ms("2026-05-01T10:01:00+00:00")
    assert minute.last_tick(ms("2026-05-01T10:00:17.250+00:00")) == ms("2026-05-01T10:00:00+00:00")


def test_every_ms_next_tick_is_strictly_after_and_last_tick_includes_now() -> None:
    five = Schedule(every_ms=5_000)
    assert five.next_tick(10_000) == 15_000
    assert five.last_tick(10_000) == 10_000
    assert five.last_tick(9_999) == 5_000


def test_start_time_does_not_shift_every_ms_ticks() -> None:
    hourly = Schedule(every_ms=3_600_000)
    assert {hourly.next_tick(ms(f"2026-05-01T10:{m:02d}:00+00:00")) for m in range(60)} \
        == {ms("2026-05-01T11:00:00+00:00")}


# ---- cron in UTC --------------------------------------------------------------

def test_cron_ticks_in_utc_by_default() -> None:
    assert ticks(Schedule(cron="0 3 * * *"), "2026-05-01T12:00:00+00:00", 2) == [
        "2026-05-02T03:00:00+00:00", "2026-05-03T03:00:00+00:00"]


def test_cron_next_tick_at_a_tick_is_the_following_one() -> None:
    quarter = Schedule(cron="*/15 * * * *")
    assert quarter.next_tick(ms("2026-05-01T10:15:00+00:00")) == ms("2026-05-01T10:30:00+00:00")
    assert quarter.last_tick(ms("2026-05-01T10:15:00+00:00")) == ms("2026-05-01T10:15:00+00:00")
    assert quarter.last_tick(ms("2026-05-01T10:14:59.999+00:00")) \
        == ms("2026-05-01T10:00:00+00:00")


def test_cron_day_of_month_and_day_of_week_match_either_as_in_cron() -> None:
    # 2026-06-01 is a Monday: the 1st of July (Wednesday) and every Friday match.
    assert ticks(Schedule(cron="0 9 1 * fri"), "2026-06-25T00:00:00+00:00", 3) == [
        "2026-06-26T09:00:00+00:00", "2026-07-01T09:00:00+00:00",
        "2026-07-03T09:00:00+00:00"]


def test_cron_whitespace_is_normalised_in_the_spec() -> None:
    assert Schedule(cron=" 0  3 * * * ").spec == "cron 0 3 * * *"
    assert Schedule(cron="0 3 * * *", tz="Europe/Berlin").spec == "cron 0 3 * * * Europe/Berlin"
    assert Schedule(every_ms=60_000).spec == "every 60000 ms"
    assert Schedule(cron="0 3  * * *") == Schedule(cron="0 3 * * *")


# ---- cron in a time zone, across daylight-saving transitions -------------------

def test_cron_in_a_time_zone_ticks_at_local_time() -> None:
    # Berlin is UTC+2 in summer.
    assert ticks(Schedule(cron="0 3 * * *", tz="Europe/Berlin"),
                 "2026-06-01T12:00:00+00:00", 1) == ["2026-06-02T01:00:00+00:00"]


def test_a_local_time_skipped_by_dst_runs_at_the_end_of_the_gap() -> None:
    # 2026-03-29: Berlin clocks go from 02:00 CET to 03:00 CEST; 02:30 does not exist.
    daily = Schedule(cron="30 2 * * *", tz="Europe/Berlin")
    assert ticks(daily, "2026-03-28T12:00:00+00:00", 3) == [
        "2026-03-29T01:00:00+00:00",   # 03:00 CEST, the first instant after the gap
        "2026-03-30T00:30:00+00:00",   # 02:30 CEST
        "2026-03-31T00:30:00+00:00"]


def test_a_local_time_repeated_by_dst_runs_at_both_instants() -> None:
    # 2026-10-25: Berlin clocks go from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    daily = Schedule(cron="30 2 * * *", tz="Europe/Berlin")
    assert ticks(daily, "2026-10-24T12:00:00+00:00", 3) == [
        "2026-10-25T00:30:00+00:00",   # 02:30 CEST
        "2026-10-25T01:30:00+00:00",   # 02:30 CET
        "2026-10-26T01:30:00+00:00"]


def test_an_hourly_cron_runs_every_real_hour_across_dst() -> None:
    # New York 2026-11-01: 01:00 EDT, 01:00 EST, 02:00 EST: three real hours.
    hourly = Schedule(cron="0 * * * *", tz="America/New_York")
    assert ticks(hourly, "2026-11-01T04:30:00+00:00", 3) == [
        "2026-11-01T05:00:00+00:00", "2026-11-01T06:00:00+00:00",
        "2026-11-01T07:00:00+00:00"]


def test_last_tick_agrees_with_next_tick_across_dst() -> None:
    daily = Schedule(cron="30 2 * * *", tz="Europe/Berlin")
    first = ms("2026-10-25T00:30:00+00:00")
    second = daily.next_tick(first)
    assert daily.last_tick(second - 1) == first
    assert daily.last_tick(second) == second


# ---- coalescing -----------------------------------------------------------------

def test_missed_ticks_coalesce_into_the_latest() -> None:
    hourly = Schedule(every_ms=3_600_000)
    last_run = ms("2026-05-01T10:00:00+00:00")
    assert hourly.due_tick(last_run, ms("2026-05-01T15:20:00+00:00")) \
        == ms("2026-05-01T15:00:00+00:00")


def test_no_tick_is_due_until_the_next_one_comes() -> None:
    hourly = Schedule(cron="0 * * * *")
    last_run = ms("2026-05-01T10:00:00+00:00")
    assert hourly.due_tick(last_run, ms("2026-05-01T10:59:59.999+00:00")) is None
    assert hourly.due_tick(last_run, ms("2026-05-01T11:00:00+00:00")) \
        == ms("2026-05-01T11:00:00+00:00")


# ---- specs that cannot run --------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of cron= .* or every_ms="),
    ({"cron": "* * * * *", "every_ms": 60_000}, "exactly one of cron="),
    ({"cron": "* * * * * *"}, "not five fields"),
    ({"cron": "@hourly"}, "not five fields"),
    ({"cron": "61 * * * *"}, "not a valid cron expression"),
    ({"cron": "*/0 * * * *"}, "not a valid cron expression"),
    ({"cron": "0 0 30 2 *"}, "matches no date"),
    ({"cron": "0 3 * * *", "tz": "Mars/Olympus_Mons"}, "unknown time zone 'Mars/Olympus_Mons'"),
    ({"cron": "0 3 * * *", "tz": "../../etc/passwd"}, "unknown time zone"),
    ({"every_ms": EVERY_MS_MIN - 1}, "every_ms must be between"),
    ({"every_ms": EVERY_MS_MAX + 1}, "every_ms must be between"),
    ({"every_ms": 60_000, "tz": "Europe/Berlin"}, "tz applies to cron schedules only"),
])
def test_a_spec_that_cannot_run_is_a_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"cron": 5}, {"every_ms": 60_000.0}, {"every_ms": True},
    {"cron": "0 3 * * *", "tz": 1},
])
def test_a_spec_of_the_wrong_type_is_a_type_error(kwargs: dict) -> None:
    with pytest.raises(TypeError):
        Schedule(**kwargs)
