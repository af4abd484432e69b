"""``callbackworker schedules``: the stored schedules, their specs and next
runs; ``--remove`` for a schedule no code registers any more (on each
backend)."""

from __future__ import annotations

from pathlib import Path

from callbackworker import TaskService
from helpers import FakeClock, epoch_ms as ms
from test_tasks_cli import cli



def _database(db: str, now: int) -> None:
    """Schedules "beat" (every minute) and "nightly" (03:00 Berlin) served
    once at ``now``."""
    with TaskService(db, clock=FakeClock(now), background=False) as svc:
        svc.periodic(every_ms=60_000, name="beat")(lambda: None)
        svc.periodic(cron="0 3 * * *", tz="Europe/Berlin", name="nightly", queue="night")(
            lambda: None)
        svc.serve()


def test_schedules_lists_names_specs_and_next_runs(db: str) -> None:
    _database(db, ms("2099-05-01T10:00:30+00:00"))
    out = cli("schedules", "--db", db)
    assert out.returncode == 0, out.stderr
    header, beat, nightly = out.stdout.splitlines()
    assert header.split() == ["name", "spec", "queue", "task", "last", "tick", "(UTC)", "next",
                              "run", "(UTC)"]
    assert beat.split() == ["beat", "every", "60000", "ms", "default", "beat", "2099-05-01",
                            "10:00:00", "2099-05-01", "10:01:00"]
    assert nightly.split() == ["nightly", "cron", "0", "3", "*", "*", "*", "Europe/Berlin",
                               "night", "nightly", "2099-05-01", "01:00:00", "2099-05-02",
                               "01:00:00"]


def test_a_schedule_no_service_ran_for_a_while_is_marked_overdue(db: str) -> None:
    _database(db, ms("2020-01-01T00:00:00+00:00"))
    out = cli("schedules", "--db", db)
    assert [line.split()[-1] for line in out.stdout.splitlines()[1:]] == ["overdue"] * 2


def test_remove_deletes_a_schedule(db: str) -> None:
    _database(db, ms("2099-05-01T10:00:30+00:00"))
    out = cli("schedules", "--db", db, "--remove", "beat")
    assert (out.returncode, out.stdout.strip()) == (0, "removed schedule 'beat'")
    assert [line.split()[0] for line in cli("schedules", "--db", db).stdout.splitlines()] \
        == ["name", "nightly"]
    out = cli("schedules", "--db", db, "--remove", "beat")
    assert out.returncode == 1 and "no schedule named 'beat'" in out.stderr


def test_schedules_refuses_a_database_that_does_not_exist(tmp_path: Path) -> None:
    out = cli("schedules", "--db", str(tmp_path / "missing.db"))
    assert out.returncode == 1 and "no task database at" in out.stderr
    assert not (tmp_path / "missing.db").exists()


def test_schedules_escapes_control_characters_read_from_the_database(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    with TaskService(db, background=False) as svc:
        svc.periodic(every_ms=60_000, name="evil\x1b[2J")(lambda: None)
        svc.serve()
    out = cli("schedules", "--db", db)
    assert "\x1b" not in out.stdout and "evil\\x1b[2J" in out.stdout
