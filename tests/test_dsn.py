"""``redact_dsn``: what a DSN may show in logs, banners and error lines."""

from __future__ import annotations

import pytest

from callbackworker.tasks.dsn import is_postgres_dsn, redact_dsn
from callbackworker.tasks.postgres import redact_dsn as reexported


@pytest.mark.parametrize("dsn, shown", [
    ("postgresql://app:s3cret@db:5432/tasks", "postgresql://app:***@db:5432/tasks"),
    ("postgresql://:s3cret@db/tasks", "postgresql://:***@db/tasks"),
    ("postgresql://app:p@ss@db/tasks", "postgresql://app:***@db/tasks"),
    ("postgres://db/tasks?password=s3cret&sslmode=require",
     "postgres://db/tasks?password=***&sslmode=require"),
    ("postgresql://db/tasks?sslmode=verify-full&sslpassword=keypass",
     "postgresql://db/tasks?sslmode=verify-full&sslpassword=***"),
    ("postgresql://db/tasks?PassWord=a&ssl%70assword=b",
     "postgresql://db/tasks?PassWord=***&ssl%70assword=***"),
    ("postgresql://app@db/tasks?passfile=/home/app/.pgpass",
     "postgresql://app@db/tasks?passfile=/home/app/.pgpass"),
])
def test_redact_dsn_hides_every_password_of_a_url(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


@pytest.mark.parametrize("dsn, shown", [
    ("host=db user=app password=s3cret dbname=tasks",
     "host=db user=app password=*** dbname=tasks"),
    ("host=db sslpassword = 'key pass' user=app", "host=db sslpassword = *** user=app"),
    (r"password='it\'s secret' host=db", "password=*** host=db"),
    (r"password=back\ slash host=db", "password=*** host=db"),
])
def test_redact_dsn_hides_every_password_of_a_conninfo_string(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


@pytest.mark.parametrize("path", ["tasks.db", "/var/lib/app/password.db", "C:\\data\\tasks.db"])
def test_redact_dsn_leaves_a_sqlite_path_alone(path: str) -> None:
    assert redact_dsn(path) == path
    assert not is_postgres_dsn(path)


def test_redact_dsn_is_still_importable_from_the_postgres_module() -> None:
    assert reexported is redact_dsn
