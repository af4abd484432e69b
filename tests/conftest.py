"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

from callbackworker import Worker


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
