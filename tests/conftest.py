"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from callbackworker import Worker
from helpers import FakeClock


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
