"""The operating commands of ``callbackworker``: ``tasks``, ``retry`` and
``purge``, and the ``worker`` options for logs, throughput and metrics.

``cli.py`` builds the parser and runs commands; it adds these through
``add_commands`` and ``add_worker_options``.  Every command reports an
expected failure as one line (``cli.CommandError`` and ``cli._report``)
and escapes text read from the database (``cli.printable``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence

from .cli import EXIT_USAGE, CommandError, _add_db, _open_service, printable
from .logs import FORMATS, LEVELS
from .tasks import TaskInfo, TaskService
from .tasks.client import LIST_LIMIT_MAX
from .tasks.storage import STATUSES
from .tasks.status import TERMINAL

__all__ = ["add_commands", "add_worker_options", "worker_service_options",
           "check_metrics_port", "start_metrics", "task_table"]

MESSAGE_WIDTH = 60
"""Characters of a task's message the ``tasks`` table shows."""


# ---- worker options ----------------------------------------------------

def add_worker_options(p: argparse.ArgumentParser) -> None:
    """The ``worker`` options for logs, throughput and metrics."""
    p.add_argument("--log-level", choices=LEVELS, default="INFO", type=str.upper,
                   help="the least severe log records printed on stderr: INFO shows each "
                        "completed task, WARNING and ERROR each retried and failed one with "
                        "its traceback (default: INFO)")
    p.add_argument("--log-format", choices=FORMATS, default="text",
                   help="text, or json: one object per line (time, level, logger, message, "
                        "task fields, traceback) for log shippers (default: text)")
    p.add_argument("--prefetch", type=int, metavar="N",
                   help="tasks each queue claims beyond its free slots, for throughput "
                        "(default: what the queue finishes in 20 ms at its recent rate, "
                        "at least its concurrency, at most 1000; 0 claims only free "
                        "slots; not with a TaskService app)")
    p.add_argument("--poll-ms", type=int, metavar="MS",
                   help="how long work written by another process may wait to be noticed "
                        "(default: 200; not with a TaskService app)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics "
                        "(needs callbackworker[metrics]; 0 picks a free port)")


def worker_service_options(args: argparse.Namespace, own_service: bool) -> Dict[str, Any]:
    """The ``TaskService`` options ``--prefetch`` and ``--poll-ms`` ask for;
    a usage ``CommandError`` when the app opened its own service
    (``own_service``), which they cannot change."""
    given = {name: value for name, value in (("prefetch", args.prefetch),
                                             ("poll_ms", args.poll_ms)) if value is not None}
    if given and own_service:
        flags = " and ".join("--" + name.replace("_", "-") for name in given)
        raise CommandError(f"{flags} cannot be used with {args.app}: that TaskService was "
                           "opened with its own options (give them to TaskService(...))",
                           EXIT_USAGE)
    return given


def check_metrics_port(port: Optional[int]) -> None:
    """A usage ``CommandError`` when ``--metrics-port`` is out of range or
    the metrics extra is missing; the worker checks it before anything
    else, so a mistake never follows a "serving" banner."""
    if port is None:
        return
    if not 0 <= port <= 65535:
        raise CommandError(f"--metrics-port must be 0..65535, not {port}", EXIT_USAGE)
    try:
        from . import metrics  # noqa: F401
    except ImportError as exc:
        raise CommandError(f"--metrics-port needs the metrics extra "
                           f"(pip install 'callbackworker[metrics]'): {exc}", EXIT_USAGE) from None


def start_metrics(service: TaskService, port: Optional[int]) -> Any:
    """Serves ``service``'s metrics on 127.0.0.1:``port`` when a port is
    given (checked by ``check_metrics_port``); returns the server
    (``server_port`` is where it listens, ``shutdown()`` stops it), or
    None.  A ``CommandError`` when the port cannot be bound."""
    if port is None:
        return None
    check_metrics_port(port)
    from .metrics import TaskMetrics

    metrics = TaskMetrics(service)
    try:
        server, _ = metrics.serve(port)
    except OSError as exc:
        raise CommandError(f"cannot serve metrics on 127.0.0.1 port {port}: "
                           f"{exc.strerror or exc}") from None
    server.metrics = metrics  # the server keeps the metrics (and their counting) alive
    return server


# ---- tasks, retry, purge -----------------------------------------------

def _time(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str, width: int) -> str:
    """``text``'s first line, escaped, cut to ``width`` characters."""
    line = printable(text.strip().splitlines()[0] if text.strip() else "")
    return line if len(line) <= width else line[:width - 3] + "..."


def task_table(infos: Sequence[TaskInfo]) -> List[str]:
    """The lines of the ``tasks`` table: a header, then one line per task
    (id, status, attempt, queue, name, created and finished in UTC, the
    message's first line), every text escaped."""
    header = ("id", "status", "attempt", "queue", "name", "created (UTC)", "finished (UTC)",
              "message")
    rows = [(printable(t.id), t.status, str(t.attempt), printable(t.queue),
             printable(t.name) if t.name is not None else "-", _time(t.created_at_ms),
             _time(t.finished_at_ms), _short(t.message, MESSAGE_WIDTH)) for t in infos]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i == 2 else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


def list_tasks(args: argparse.Namespace) -> int:
    """Prints a page of tasks, newest first; says on stderr how to get the
    next page when this one is full."""
    with _open_service(args, TaskService, must_exist=True) as service:
        infos = service.list_tasks(queue=args.queue, status=args.status, name=args.name,
                                   limit=args.limit, before_id=args.before)
    if not infos:
        print("no tasks", file=sys.stderr)
        return 0
    print("\n".join(task_table(infos)))
    if len(infos) == args.limit:
        print(f"more tasks may follow: add --before {printable(infos[-1].id)}", file=sys.stderr)
    return 0


def retry(args: argparse.Namespace) -> int:
    with _open_service(args, TaskService, must_exist=True) as service:
        service.retry_task(args.id)
    print(f"task {printable(args.id)} is pending again")
    return 0


def purge(args: argparse.Namespace) -> int:
    """Deletes the queue's tasks of one finished status in batches, saying
    on stderr how many are gone after each batch past the first."""
    batches = 0

    def report(deleted: int) -> None:
        nonlocal batches
        batches += 1
        if batches > 1:
            print(f"purging: {deleted} {args.status} tasks deleted so far", file=sys.stderr,
                  flush=True)

    with _open_service(args, TaskService, must_exist=True) as service:
        deleted = service.purge(args.queue, status=args.status, on_batch=report)
    print(f"purged {deleted} {args.status} task(s) from queue {printable(args.queue)}")
    return 0


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= LIST_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"must be 1..{LIST_LIMIT_MAX}, not {value}")
    return value


def add_commands(sub: Any) -> None:
    """Adds ``tasks``, ``retry`` and ``purge`` to the subcommands."""
    p = sub.add_parser("tasks", help="list tasks, newest first, filtered",
                       description="A table of tasks, newest first: id, status, attempt, "
                                   "queue, task name, when created and finished (UTC) and the "
                                   "first line of the message. Pages: pass the last id shown "
                                   "as --before.")
    _add_db(p)
    p.add_argument("--queue", help="only this queue's tasks")
    p.add_argument("--status", choices=STATUSES, help="only tasks in this status")
    p.add_argument("--name", help="only calls of this task function")
    p.add_argument("--limit", type=_limit, default=50, metavar="N",
                   help=f"at most N tasks (1..{LIST_LIMIT_MAX}; default: 50)")
    p.add_argument("--before", metavar="ID", help="only tasks enqueued before this one")
    p.set_defaults(func=list_tasks)

    p = sub.add_parser("retry", help="run a failed or cancelled task again",
                       description="Makes a failed or cancelled task pending again, due now, "
                                   "with a fresh count of attempts.")
    _add_db(p)
    p.add_argument("id", help="the task's id")
    p.set_defaults(func=retry)

    finished = [s.value for s in TERMINAL]
    p = sub.add_parser("purge", help="delete a queue's finished tasks of one status",
                       description="Deletes the queue's completed, failed or cancelled tasks "
                                   "(one status), in batches, reporting progress on stderr.")
    _add_db(p)
    p.add_argument("queue", help="the queue's name")
    p.add_argument("--status", required=True, choices=finished,
                   help="which finished tasks to delete")
    p.set_defaults(func=purge)
