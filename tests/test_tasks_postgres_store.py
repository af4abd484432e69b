"""The PostgreSQL backend against the shared storage contract, on a real
server, plus what only PostgreSQL has: the versioned schema migrated once
by hosts starting together, retried serialization failures, and wake-ups
through LISTEN/NOTIFY that survive a dropped connection."""

from __future__ import annotations

from typing import Iterator

import pytest

from storage_contract import StorageContract

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed: "
                                                "pip install 'callbackworker[postgres]'")

from callbackworker.tasks.postgres import SCHEMA_VERSION, PostgresTaskStore  # noqa: E402


@pytest.fixture
def store(pg_schema_dsn: str) -> Iterator[PostgresTaskStore]:
    s = PostgresTaskStore(pg_schema_dsn)
    try:
        yield s
    finally:
        s.close()


class TestPostgresStore(StorageContract):
    """Every contract test, in a fresh schema on the server."""
