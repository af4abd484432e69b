"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

import callbackworker
from callbackworker import TaskService, Worker
from helpers import FakeClock

SOURCE_PACKAGE = Path(__file__).resolve().parents[1] / "callbackworker"
INSTALLED_ONLY_VARIABLE = "CBW_TEST_INSTALLED"


def _imported_package() -> Path:
    return Path(callbackworker.__file__).resolve().parent


def pytest_report_header(config: pytest.Config) -> str:
    """Says, at the top of every run, which ``callbackworker`` is under test."""
    where = "the source tree" if _imported_package() == SOURCE_PACKAGE else "an install"
    return f"callbackworker under test: {_imported_package()} ({where})"


def pytest_sessionstart(session: pytest.Session) -> None:
    """With ``CBW_TEST_INSTALLED=1`` (``.ci/run`` sets it) the run stops at once
    unless ``callbackworker`` was imported from an installed copy: a file
    missing from the wheel must fail the suite, not be found in the checkout."""
    if os.environ.get(INSTALLED_ONLY_VARIABLE) != "1":
        return
    if _imported_package() == SOURCE_PACKAGE:
        pytest.exit(f"{INSTALLED_ONLY_VARIABLE}=1 but callbackworker was imported from the "
                    f"source tree ({SOURCE_PACKAGE}): install it without -e and start pytest "
                    f"from outside the checkout", returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session", autouse=True)
def run_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runs the tests from a scratch directory: the interpreters that tests
    start with ``python -c`` or ``-m`` put their working directory first on
    ``sys.path``, and from the repository root they would import the source
    tree instead of the package under test."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(previous)


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A fresh Worker, closed after the test."""
    w = Worker()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL server for the session: ``$CBW_PG_DSN`` if set, else a
    throwaway cluster (``tests/pg_server.py``); the tests skip, saying why,
    when neither psycopg nor the server programs are available."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed: "
                                          "pip install 'callbackworker[postgres]'")
    if os.environ.get("CBW_PG_DSN"):
        yield os.environ["CBW_PG_DSN"]
        return
    from pg_server import PostgresCluster, find_bindir

    if sys.platform == "win32":
        pytest.skip("the throwaway PostgreSQL cluster is POSIX-only; set CBW_PG_DSN to a server")
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl, postgres) on PATH or in "
                    "/usr/lib/postgresql/*/bin; install the 'postgresql' package or set "
                    "CBW_PG_DSN")
    cluster = PostgresCluster(bindir).start()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture
def pg_schema_dsn(pg_dsn: str) -> Iterator[str]:
    """A DSN whose sessions use a new, empty schema, dropped after the test."""
    from pg_server import fresh_schema

    with fresh_schema(pg_dsn) as dsn:
        yield dsn


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock in milliseconds that tests move by hand."""
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A task database DSN, once per backend: a SQLite file, and a fresh
    schema on the PostgreSQL server (skipped when there is none)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_schema_dsn"))
    return str(tmp_path / "tasks.db")


@pytest.fixture
def service(db: str, clock: FakeClock) -> Iterator[TaskService]:
    """A ``TaskService`` on ``db`` and ``clock`` with no background thread
    (tests dispatch by hand); files may override it."""
    s = TaskService(db, clock=clock, background=False)
    try:
        yield s
    finally:
        s.close()
