"""The ``callbackworker`` command (also ``python -m callbackworker``).

Subcommands:
  demo     a short guided tour of the Worker API, tasks as functions and raw queues
  bench    throughput and latency against ThreadPoolExecutor and a bare loop
  worker   serve the persistent queues an app module defines
  enqueue  add a task to a persistent queue; prints its id
  task     show a task's status, message and attempt
  queues   a table of task counts per queue and status
  schedules  the periodic schedules in the database, their specs and next runs
  serve    the HTTP endpoint outside systems signal durable callbacks through,
           with metrics and the web dashboard
  tasks    list tasks, newest first, filtered (cli_tasks.py)
  retry    run a failed or cancelled task again (cli_tasks.py)
  purge    delete a queue's finished tasks of one status (cli_tasks.py)

The task commands report an ordinary failure as one line on stderr,
``callbackworker COMMAND: what went wrong`` (a database password shown as
``***``), and exit with 1 (``EXIT_FAILURE``: it failed at run time), 2
(``EXIT_USAGE``: wrong arguments) or, for ``worker`` only, 3
(``EXIT_ABANDONED``: it exited with handlers still running); Ctrl-C ends
them with 130 (``EXIT_INTERRUPTED``).  They never write a control
character read from the database to the terminal (``printable``).
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, List, Optional, Sequence, TypeVar

from .errors import TaskError
from .logs import configure_logging
from .shutdown import WatchedService, WorkerShutdown
from .tasks import QueueConfig, TaskService
from .tasks.dsn import is_postgres_dsn, redact_dsn
from .tasks.storage import STATUSES

S = TypeVar("S", bound=TaskService)


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return demo(args)


def bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


# ---- persistent task queues -------------------------------------------

EXIT_FAILURE = 1
"""Exit status of a command that failed at run time: the database cannot be
opened or used, the port is taken, the task or queue is unknown."""

EXIT_USAGE = 2
"""Exit status of a command given wrong arguments (argparse's own status
too): an ``--app`` that cannot be imported (or raises while imported), an
app with no queue to serve, a port out of range, a bearer token missing or
too short."""

EXIT_ABANDONED = 3
"""Exit status of a ``worker`` that stopped with handlers still running (a
second SIGINT/SIGTERM, or ``--shutdown-timeout`` passed): their tasks run
again once their leases expire."""

EXIT_INTERRUPTED = 130
"""Exit status of a command interrupted by Ctrl-C (128 + SIGINT, as shells
report it); ``worker`` and ``serve`` stop gracefully on SIGINT instead."""


class CommandError(Exception):
    """A failure a command reports as one line on stderr before exiting
    with ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: every character ``repr``
    would escape (control characters, line separators, bidirectional
    overrides, lone surrogates) becomes a backslash escape, so text read
    from a database cannot move the cursor, recolour or hide output."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                   f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in text)


def _one_line(text: str) -> str:
    """``text`` (a possibly multi-line error message) as one printable line."""
    return printable(" ".join(line.strip() for line in text.splitlines() if line.strip()))


def _database_errors() -> "tuple[type[BaseException], ...]":
    """The database drivers' exception classes (psycopg's only once a
    PostgreSQL store has imported it)."""
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error,) + ((psycopg.Error,) if psycopg is not None else ())


def _open_service(args: argparse.Namespace, factory: Callable[..., S], *,
                  must_exist: bool = False, **options: Any) -> S:
    """``factory(--db, **options)`` (a ``TaskService``); a ``CommandError``
    naming the database (its password hidden) when it cannot be opened.
    With ``must_exist``, a SQLite file that does not exist is refused
    instead of being created (for the commands that only read)."""
    db: str = args.db
    shown = redact_dsn(db)
    if not is_postgres_dsn(db):
        if os.path.isdir(db):
            raise CommandError(f"--db {shown} is a directory, not a task database file")
        if must_exist and not os.path.exists(db):
            raise CommandError(f"no task database at {shown}: check --db ({args.command} "
                               f"only reads, so it does not create one)")
    cannot_open = (ImportError, OSError, RuntimeError) + _database_errors()
    try:
        return factory(db, **options)
    except cannot_open as exc:
        reason = str(exc)
        if reason.startswith(f"{db}: "):
            reason = reason[len(db) + 2:]
        raise CommandError(f"cannot open the task database {shown}: {reason}") from exc


def _describe(args: argparse.Namespace, exc: Exception) -> Optional["tuple[str, int]"]:
    """The line and exit status that report ``exc``, or None for an
    exception no command expects (a bug: it keeps its traceback)."""
    if isinstance(exc, CommandError):
        return str(exc), exc.status
    db = getattr(args, "db", None)
    if isinstance(exc, _database_errors()) and db is not None:
        return f"task database {redact_dsn(db)}: {exc}", EXIT_FAILURE
    if isinstance(exc, (TaskError, ValueError, TypeError)):
        return str(exc), EXIT_FAILURE
    return None


def _report(args: argparse.Namespace, exc: Exception) -> int:
    """Writes the one line on stderr that reports ``exc`` (a password in
    the DSN never shows) and returns the exit status; re-raises an
    exception no command expects."""
    described = _describe(args, exc)
    if described is None:
        raise exc
    message, status = described
    db = getattr(args, "db", None)
    if db is not None and redact_dsn(db) != db:
        message = message.replace(db, redact_dsn(db))
    print(f"callbackworker {args.command}: {_one_line(message)}", file=sys.stderr, flush=True)
    return status


def _load_app(spec: str) -> Any:
    """The object ``--app module:attr`` names; a ``CommandError`` (usage)
    when the module cannot be imported, raises while being imported, or
    lacks the attribute: one line naming the module and the exception."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"--app must look like module:attribute, not {spec!r}", EXIT_USAGE)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"--app {spec}: cannot import {module_name}: {exc}",
                           EXIT_USAGE) from exc
    except Exception as exc:  # the app's own code failed while being imported
        raise CommandError(f"--app {spec}: importing {module_name} raised "
                           f"{type(exc).__name__}: {exc}", EXIT_USAGE) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"--app {spec}: {module_name} has no attribute {attr}",
                               EXIT_USAGE)
        obj = getattr(obj, part)
    return obj


def setup_app(service: TaskService, app: Any) -> List[str]:
    """Creates the queues ``app`` describes; returns their names.

    ``app`` is either a callable taking the ``TaskService`` (it calls
    ``create_queue`` itself), or a dict mapping each queue name to its
    handler, or to a dict with a ``"handler"`` and any ``QueueConfig``
    fields (``{"emails": {"handler": send, "concurrency": 4}}``).
    """
    if isinstance(app, dict):
        for name, spec in app.items():
            if callable(spec):
                service.create_queue(name, handler=spec)
            elif isinstance(spec, dict) and "handler" in spec:
                options = {k: v for k, v in spec.items() if k != "handler"}
                service.create_queue(name, QueueConfig(**options), handler=spec["handler"])
            else:
                raise TypeError(f"queue {name!r}: expected a handler or a dict with a "
                                f"'handler', not {type(spec).__name__}")
        return list(app)
    if callable(app):
        before = set(service.served_queues())
        app(service)
        return sorted(set(service.served_queues()) - before)
    raise TypeError(f"the app must be a callable taking a TaskService or a dict of queues, "
                    f"not {type(app).__name__}")


def worker(args: argparse.Namespace) -> int:
    """Serves the app's queues until SIGINT or SIGTERM, then shuts down
    gracefully (running tasks finish; claimed ones go back to pending).  A
    second signal, or ``--shutdown-timeout`` passing, exits at once with
    ``EXIT_ABANDONED``, leaving the running tasks to lease recovery."""
    if args.shutdown_timeout is not None and not args.shutdown_timeout >= 0:
        raise CommandError(f"--shutdown-timeout must be a number of seconds >= 0, "
                           f"not {args.shutdown_timeout}", EXIT_USAGE)
    from .cli_tasks import check_metrics_port, start_metrics, worker_service_options

    check_metrics_port(args.metrics_port)
    shutdown = WorkerShutdown(args.lease_ms, args.shutdown_timeout, EXIT_ABANDONED)
    configure_logging(args.log_level, args.log_format)
    shutdown.install()  # before the app's import, which may be slow
    app = _load_app(args.app)
    options = worker_service_options(args, isinstance(app, TaskService))
    if isinstance(app, TaskService):  # its own database, and its registered tasks
        if args.db is not None:
            raise CommandError(f"--db cannot be used with {args.app}: that TaskService was "
                               "opened on its own database", EXIT_USAGE)
        service: TaskService = app
        shown = "its own database"
    else:
        args.db = args.db or default_db()
        service = _open_service(args, WatchedService, durability=args.durability,
                                lease_ms=args.lease_ms, **options)
        shown = redact_dsn(args.db)
    try:
        if isinstance(service, WatchedService):
            shutdown.watch(service)
        if service is app:
            service.serve()
            names = service.served_queues()
        else:
            names = setup_app(service, app)
        if not names:
            raise CommandError(f"--app {args.app} defines no queue to serve: register a task "
                               "on the TaskService, or give a callable that creates queues or "
                               "a dict of queues", EXIT_USAGE)
        metrics_server = start_metrics(service, args.metrics_port)
        print(f"serving {len(names)} queue(s) on {shown}: "
              f"{', '.join(printable(n) for n in names)}", flush=True)
        if metrics_server is not None:
            print(f"metrics on http://127.0.0.1:{metrics_server.server_port}/metrics",
                  flush=True)
    except BaseException:
        service.close()
        raise
    while not shutdown.requested.wait(0.5):  # timed: an untimed wait misses Ctrl-C on Windows
        pass
    print("stopping: waiting for running tasks (a second SIGINT or SIGTERM exits at once)",
          file=sys.stderr, flush=True)
    if metrics_server is not None:
        metrics_server.shutdown()
    shutdown.close(service)
    print("stopped", file=sys.stderr, flush=True)
    return 0


def enqueue(args: argparse.Namespace) -> int:
    payload = sys.stdin.buffer.read() if args.payload == "-" else os.fsencode(args.payload)
    with _open_service(args, TaskService) as service:
        print(service.enqueue(args.queue, payload))
    return 0


def task(args: argparse.Namespace) -> int:
    with _open_service(args, TaskService, must_exist=True) as service:
        info = service.get(args.id)
    print(f"status:  {info.status}\nattempt: {info.attempt}\nmessage: {printable(info.message)}")
    if info.name is not None:  # a function's call: its name and what it returned
        print(f"name:    {printable(info.name)}")
        if info.status == "completed":
            print(f"result:  {json.dumps(info.result)}")
    if info.progress is not None:
        print(f"progress: {json.dumps(info.progress)}")
    if info.traceback is not None and info.status == "failed":
        print("traceback:\n" + "\n".join(printable(line)
                                           for line in info.traceback.rstrip().splitlines()))
    return 0


def queues(args: argparse.Namespace) -> int:
    with _open_service(args, TaskService, must_exist=True) as service:
        counts = {printable(name): row for name, row in service.counts().items()}
    width = max([5, *(len(name) for name in counts)])
    print(f"{'queue':<{width}} " + " ".join(f"{s:>9}" for s in STATUSES))
    for name, row in counts.items():
        print(f"{name:<{width}} " + " ".join(f"{row[s]:>9}" for s in STATUSES))
    return 0


OVERDUE_MS = 60_000
"""How late a schedule's next run must be for ``schedules`` to call it
overdue: no service has run it (all stopped, or no code registers it any
more)."""


def _utc(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def schedules(args: argparse.Namespace) -> int:
    """Lists the stored periodic schedules, or removes one (``--remove``)."""
    with _open_service(args, TaskService, must_exist=True) as service:
        if args.remove is not None:
            if not service.client.remove_schedule(args.remove):
                raise CommandError(f"no schedule named {printable(args.remove)!r}: "
                                   "`callbackworker schedules` lists them")
            print(f"removed schedule {printable(args.remove)!r}")
            return 0
        rows = service.client.stored_schedules()
    now = int(time.time() * 1000)
    table = [("name", "spec", "queue", "task", "last tick (UTC)", "next run (UTC)")]
    for r in rows:
        late = " overdue" if r.next_run_at < now - OVERDUE_MS else ""
        table.append((printable(r.name), printable(r.spec), printable(r.queue),
                      printable(r.task), _utc(r.last_tick), _utc(r.next_run_at) + late))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


TOKEN_ENV = "CALLBACKWORKER_TOKEN"

MIN_TOKEN_CHARS = 32
"""``serve`` refuses a shorter bearer token: it is the endpoint's only secret."""


def _read_token(token_file: Optional[str]) -> str:
    """The bearer token: the file's content (stripped) if given, else the
    environment variable; a ``CommandError`` (usage) without one or with
    one shorter than ``MIN_TOKEN_CHARS``."""
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read --token-file: {exc}", EXIT_USAGE) from None
        source = token_file
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
    if not token:
        raise CommandError(f"refusing to start without a bearer token: {source} is empty or "
                           f"unset (give --token-file FILE or set {TOKEN_ENV})", EXIT_USAGE)
    if len(token) < MIN_TOKEN_CHARS:
        raise CommandError(f"refusing a bearer token of {len(token)} characters from {source}: "
                           f"use at least {MIN_TOKEN_CHARS} (e.g. openssl rand -hex 32)",
                           EXIT_USAGE)
    return token


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, so ``serve`` says
    "serving" only once connections are accepted; a ``CommandError`` when
    the address cannot be bound.  Warns on stderr when the address is not
    a loopback one."""
    if not 0 <= port <= 65535:
        raise CommandError(f"--port must be 0..65535, not {port}", EXIT_USAGE)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            if os.name != "nt":  # on Windows, SO_REUSEADDR would let two servers share a port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise CommandError(f"cannot listen on {host} port {port}: "
                           f"{exc.strerror or exc}") from None
    if not ipaddress.ip_address(str(address[0]).partition("%")[0]).is_loopback:
        print(f"callbackworker serve: warning: listening on {address[0]}, not a loopback "
              f"address: the bearer token and callback ids cross the network in clear "
              f"unless TLS is terminated in front of this port", file=sys.stderr, flush=True)
    return sock


def serve(args: argparse.Namespace) -> int:
    """Serves the callback endpoint until SIGINT or SIGTERM (uvicorn's
    graceful shutdown: requests in flight finish)."""
    token = _read_token(args.token_file)
    try:
        import uvicorn

        from .http import create_app
        from .ui import normalize_origin
    except ImportError as exc:
        raise CommandError(f"serve needs the http extra "
                           f"(pip install 'callbackworker[http]'): {exc}") from None
    try:
        origins = [normalize_origin(origin) for origin in args.allowed_origin]
    except ValueError as exc:
        raise CommandError(f"--allowed-origin: {exc}", EXIT_USAGE) from None
    with _open_service(args, TaskService) as service, _listen(args.host, args.port) as sock:
        config = uvicorn.Config(create_app(service, token, allowed_origins=origins),
                                lifespan="off", access_log=False, log_level="info")
        server = uvicorn.Server(config)

        def request_stop(signum: int, frame: object) -> None:
            server.should_exit = True

        # uvicorn handles SIGINT/SIGTERM while it runs (graceful shutdown),
        # then re-raises the signal into these handlers: the service closes
        # and the command exits 0 instead of dying by the signal.
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        host, port = sock.getsockname()[:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"serving callbacks for {redact_dsn(args.db)} on http://{shown_host}:{port}",
              flush=True)
        print(f"dashboard: http://{shown_host}:{port}/ui/ (log in with the bearer token)",
              flush=True)
        server.run(sockets=[sock])
    print("stopped", file=sys.stderr, flush=True)
    return 0


DB_ENV = "CALLBACKWORKER_DB"
"""The environment variable naming the task database every ``--db``
defaults to."""


def default_db() -> str:
    """``$CALLBACKWORKER_DB`` if set and not empty, else
    ``callbackworker.db``."""
    return os.environ.get(DB_ENV) or "callbackworker.db"


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=default_db(), metavar="PATH|URL",
                   help="the task database: a SQLite file, or a postgresql:// URL "
                        f"(default: ${DB_ENV}, else callbackworker.db)")


def _add_task_commands(sub: Any) -> None:
    p = sub.add_parser("worker", help="serve the persistent queues an app module defines",
                       description="Imports module:attr and serves its queues until SIGINT or "
                                   "SIGTERM, then shuts down gracefully. attr is a TaskService "
                                   "(every task registered with @svc.task is served, on that "
                                   "service's own database), a callable taking a TaskService "
                                   "(it creates the queues) or a dict "
                                   "{queue: handler | {'handler': fn, <QueueConfig fields>}}.")
    p.add_argument("--db", default=None, metavar="PATH|URL",
                   help="the task database: a SQLite file, or a postgresql:// URL "
                        f"(default: ${DB_ENV}, else callbackworker.db; not with a "
                        "TaskService app)")
    p.add_argument("--app", required=True, metavar="MODULE:ATTR",
                   help="what defines the tasks, e.g. myapp.tasks:svc")
    p.add_argument("--durability", choices=["normal", "full"], default="normal",
                   help="normal survives a killed process; full also power loss")
    p.add_argument("--lease-ms", type=int, default=30_000, metavar="MS",
                   help="how long a claimed task stays leased without renewal: a dead "
                        "worker's tasks run again elsewhere this long after it died "
                        "(default: 30000)")
    p.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="how long the graceful stop may wait for running handlers before "
                        f"the worker exits anyway (status {EXIT_ABANDONED}), leaving their "
                        "tasks to lease recovery (default: no limit; a second SIGINT or "
                        "SIGTERM also exits at once)")
    from .cli_tasks import add_commands, add_worker_options

    add_worker_options(p)
    p.set_defaults(func=worker)

    p = sub.add_parser("enqueue", help="add a task to a persistent queue; prints its id",
                       description="Adds one task and prints its id once it is committed.")
    _add_db(p)
    p.add_argument("queue", help="the queue's name")
    p.add_argument("payload", help="the payload (its UTF-8 bytes), or - to read bytes from stdin")
    p.set_defaults(func=enqueue)

    p = sub.add_parser("task", help="show a task's status, message and attempt",
                       description="Prints the task's status, attempt and message; for a "
                                   "task function also its name and result (JSON), and its "
                                   "latest progress (JSON) and the traceback of a failed task "
                                   "when there is one.")
    _add_db(p)
    p.add_argument("id", help="the task id enqueue printed")
    p.set_defaults(func=task)

    p = sub.add_parser("queues", help="task counts per queue and status",
                       description="A table: pending/running/suspended/completed/failed/cancelled "
                                   "per queue.")
    _add_db(p)
    p.set_defaults(func=queues)

    p = sub.add_parser("schedules", help="the periodic schedules, their specs and next runs",
                       description="A table of the periodic schedules stored in the database: "
                                   "name, spec, queue, task, last tick (the last one "
                                   "enqueued, or the one before the schedule was registered) "
                                   "and next run (UTC). A next run "
                                   f"more than {OVERDUE_MS // 1000} s past is marked overdue: no "
                                   "service is running that schedule (none is up, or no code "
                                   "registers it any more; --remove deletes it).")
    _add_db(p)
    p.add_argument("--remove", metavar="NAME",
                   help="delete the schedule NAME (one no code registers any more)")
    p.set_defaults(func=schedules)

    p = sub.add_parser("serve", help="HTTP endpoint for callback signals, and the dashboard",
                       description="Serves POST /v1/callbacks/{id}/success|failure|heartbeat, "
                                   "GET /v1/tasks/{id} and GET /metrics over the task database, "
                                   f"with bearer-token auth (--token-file, or ${TOKEN_ENV}), and "
                                   "the web dashboard under /ui/ (log in with the same token), "
                                   "until SIGINT or SIGTERM. Needs callbackworker[http].")
    _add_db(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"file holding the bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="an address browsers reach the dashboard at, as scheme://host[:port] "
                        "(e.g. https://jobs.example.com), accepted as its forms' Origin besides "
                        "the request's own; give it when a proxy in front rewrites the Host "
                        "header or terminates TLS (repeatable)")
    p.set_defaults(func=serve)
    add_commands(sub)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbackworker",
        description="A C-accelerated job runner for Python.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="a short tour: start/wait, take, cancel, a timeout, a failure, "
                                    "retries, a durable callback, tasks as functions, a raw "
                                    "persistent queue",
                       description="A short tour of the Worker API; prints each step.")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="benchmarks against ThreadPoolExecutor and a bare loop",
                       description="Runs the benchmarks side by side with their baselines in "
                                   "one process and prints medians and ratios.")
    from .bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=bench)
    _add_task_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns its exit status.  A task command reports
    an expected failure as one line on stderr (``_report``) and exits with
    ``EXIT_FAILURE`` or ``EXIT_USAGE``; a closed stdout (``... | head -1``)
    ends it quietly with ``EXIT_FAILURE``, Ctrl-C with ``EXIT_INTERRUPTED``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.command in ("demo", "bench"):
        return func(args)
    try:
        status = func(args)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return status
    except BrokenPipeError:
        # Whoever reads stdout stopped reading: nothing to report, and the
        # flush at exit must not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"callbackworker {args.command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _report(args, exc)


__all__: List[str] = ["main", "printable", "CommandError", "EXIT_FAILURE", "EXIT_USAGE",
                       "EXIT_ABANDONED", "EXIT_INTERRUPTED"]

if __name__ == "__main__":
    sys.exit(main())
