"""What a task database's DSN may show: ``redact_dsn``.

Kept apart from ``postgres.py`` so that printing a DSN (the CLI's banners
and error lines) needs neither psycopg nor the PostgreSQL store.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact_dsn", "is_postgres_dsn"]

_HIDDEN = "***"

# One ``keyword = value`` pair of a libpq conninfo string: the value is
# either single-quoted or runs to the next white space; in both, a
# backslash escapes the next character.
_CONNINFO_PAIR = re.compile(r"(?P<key>[A-Za-z_]+)(?P<eq>\s*=\s*)"
                            r"(?P<value>'(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)*)")


def is_postgres_dsn(dsn: str) -> bool:
    """Whether ``dsn`` names a PostgreSQL database (a ``postgresql://`` or
    ``postgres://`` URL) rather than a SQLite file."""
    return dsn.startswith(("postgresql://", "postgres://"))


def _is_secret(key: str) -> bool:
    """``password``, ``sslpassword`` and any other ``*password`` parameter."""
    return key.strip().lower().endswith("password")


def redact_dsn(dsn: str) -> str:
    """``dsn`` with every password replaced by ``***``, fit for logs and
    output: the password of a ``postgresql://user:PASSWORD@host`` URL and
    every ``*password`` parameter (``password``, ``sslpassword``, ...) of
    its query or of a ``key=value`` conninfo string.  Anything else (a
    SQLite path) comes back as it is."""
    if is_postgres_dsn(dsn):
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                netloc = f"{userinfo.partition(':')[0]}:{_HIDDEN}@{hostport}"
        pairs = parts.query.split("&") if parts.query else []
        query = "&".join(f"{pair.partition('=')[0]}={_HIDDEN}"
                         if _is_secret(unquote(pair.partition("=")[0])) else pair
                         for pair in pairs)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if _CONNINFO_PAIR.match(dsn.lstrip()):
        return _CONNINFO_PAIR.sub(
            lambda m: m.group(0) if not _is_secret(m.group("key"))
            else f"{m.group('key')}{m.group('eq')}{_HIDDEN}", dsn)
    return dsn
