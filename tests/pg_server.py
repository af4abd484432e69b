"""A throwaway PostgreSQL cluster for the tests and benchmarks.

``PostgresCluster.start()`` runs ``initdb`` into a fresh temporary
directory and ``pg_ctl start`` on a free loopback port (its Unix socket in
that directory too), so nothing outside the directory is touched;
``stop()`` shuts it down and deletes the directory.  PostgreSQL refuses to
run as root, so when the tests run as root the server runs as an
unprivileged user (``nobody``, or a ``cbwpg`` user created for it).

``find_bindir()`` looks for ``initdb``/``pg_ctl``/``postgres`` on ``PATH``,
then in Debian's ``/usr/lib/postgresql/<version>/bin`` (highest version),
then in ``$CBW_PG_BINDIR``.  Set ``CBW_PG_DSN`` to use an existing server
instead (the tests then need only the right to create schemas there).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, List, Optional
from urllib.parse import quote

_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_UNPRIVILEGED = ("nobody", "cbwpg")


def find_bindir() -> Optional[str]:
    """The directory holding PostgreSQL's server programs, or None."""
    candidates: List[str] = []
    if os.environ.get("CBW_PG_BINDIR"):
        candidates.append(os.environ["CBW_PG_BINDIR"])
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))

    def version(path: str) -> float:
        match = re.search(r"postgresql/([0-9.]+)/bin", path)
        return float(match.group(1)) if match else 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if all(shutil.which(p, path=bindir) for p in _PROGRAMS):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> Optional[str]:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in _UNPRIVILEGED:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    _UNPRIVILEGED[-1]], check=True, capture_output=True)
    return _UNPRIVILEGED[-1]


class PostgresCluster:
    """One server in a temporary directory; ``dsn`` once started.

    ``fast=True`` turns off ``fsync`` and ``synchronous_commit``: right for
    tests (nothing here must survive power loss), wrong for measuring."""

    def __init__(self, bindir: str, *, fast: bool = True) -> None:
        self.bindir = bindir
        self.fast = fast
        self.port = 0
        self.datadir = ""
        self._root = ""
        self._user = _server_user()

    @property
    def dsn(self) -> str:
        return f"postgresql://cbw@127.0.0.1:{self.port}/cbw"

    def _run(self, *argv: str) -> "subprocess.CompletedProcess[str]":
        cmd = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=self._root)

    def start(self) -> "PostgresCluster":
        self._root = tempfile.mkdtemp(prefix="cbw-pg-")
        self.datadir = os.path.join(self._root, "data")
        if self._user is not None:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(self._root, entry.pw_uid, entry.pw_gid)
        try:
            self._run("initdb", "-D", self.datadir, "-U", "cbw", "-A", "trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
            options = ["-c listen_addresses=127.0.0.1", f"-k {self._root}",
                       "-c max_connections=200"]
            if self.fast:
                options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            for _ in range(5):  # the free port may be taken before the server binds it
                self.port = _free_port()
                try:
                    self._run("pg_ctl", "-D", self.datadir, "-l", os.path.join(self._root, "log"),
                              "-w", "-t", "60", "-o", " ".join([f"-p {self.port}", *options]),
                              "start")
                    break
                except subprocess.CalledProcessError:
                    continue
            else:
                raise RuntimeError("PostgreSQL did not start:\n" + self.log_tail())
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, mode: str = "fast") -> None:
        """Stops the server and starts it again on the same port.  ``mode``
        is pg_ctl's: "fast" terminates the sessions cleanly, "immediate"
        kills the server as a crash would (it recovers at start)."""
        self._run("pg_ctl", "-D", self.datadir, "-l", os.path.join(self._root, "log"),
                  "-m", mode, "-w", "-t", "60", "restart")

    def require_password(self, password: str) -> None:
        """Gives the ``cbw`` role ``password`` and makes TCP connections
        authenticate with it (SCRAM), as a production server does; the
        Unix socket stays trusted."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(psycopg.sql.SQL("ALTER ROLE cbw PASSWORD {}").format(password))
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                    "host all all ::1/128 scram-sha-256\n")
        self._run("pg_ctl", "-D", self.datadir, "reload")
        deadline = time.monotonic() + 30
        while True:  # the reload is asynchronous: wait until it applies
            try:
                psycopg.connect(self.dsn).close()
            except psycopg.OperationalError:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("pg_hba.conf was not reloaded:\n" + self.log_tail())
            time.sleep(0.05)

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"postgresql://cbw@127.0.0.1:{self.port}/postgres",
                                     autocommit=True) as conn:
                    conn.execute("CREATE DATABASE cbw")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self._root, "log")) as f:
                return "".join(f.readlines()[-30:])
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            try:
                self._run("pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                pass
        if self._root:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = ""


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` with every session's ``search_path`` set to ``schema``, so a
    store opened on it keeps its tables there."""
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-c search_path={schema}')}"


@contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A new, empty schema on the server; yields a DSN that uses it, drops
    it (and everything in it) afterwards."""
    import psycopg

    schema = f"cbw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_search_path(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
