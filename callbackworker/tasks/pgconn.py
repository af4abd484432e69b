"""Connections of the PostgreSQL task store: a small pool for statements,
a listener thread for ``NOTIFY``, and which failures are transient.

A borrowed connection that broke, or is left inside a transaction, is
closed instead of being returned to the pool.  The listener owns one
connection of its own and reconnects with backoff when it drops.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Any, Callable, List, Optional, Set

from .storage import Waker

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    psycopg = None  # type: ignore[assignment]
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None

__all__ = ["CHANNEL", "Pool", "Listener", "is_transient", "require_psycopg"]

log = logging.getLogger(__name__)

CHANNEL = "callbackworker_tasks"
"""The ``NOTIFY`` channel; the payload is the queue's name."""

_LISTEN_PING_S = 10.0  # an idle listener checks its connection this often
_RECONNECT_PAUSE_MAX_S = 5.0

# Class 08: connection exceptions; 57P01..57P03: the server is shutting
# down, crashed, or cannot take connections yet.  40001/40P01: the
# statement lost a serialization conflict or a deadlock.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03"}


def require_psycopg() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError("the PostgreSQL task store needs psycopg 3: "
                          "pip install 'callbackworker[postgres]'") from _IMPORT_ERROR


def is_transient(exc: BaseException, conn: Optional["psycopg.Connection[Any]"]) -> bool:
    """True for failures that a retry, possibly on a new connection, may
    get past."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08"):
        return True
    if conn is None:  # could not connect
        return isinstance(exc, psycopg.OperationalError)
    return bool(conn.broken or conn.closed)


class Pool:
    """At most ``size`` connections, opened on demand and reused; a
    borrower waits for a free one.  Broken connections are dropped."""

    def __init__(self, connect: Callable[[], "psycopg.Connection[Any]"], size: int) -> None:
        self._connect = connect
        self._size = size
        self._cond = threading.Condition()
        self._idle: List["psycopg.Connection[Any]"] = []
        self._open = 0
        self._closed = False

    def acquire(self) -> "psycopg.Connection[Any]":
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the task store is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._size:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def release(self, conn: "psycopg.Connection[Any]") -> None:
        usable = not (conn.broken or conn.closed) and \
            conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with self._cond:
            if usable and not self._closed:
                self._idle.append(conn)
                conn = None  # type: ignore[assignment]
            else:
                self._open -= 1
            self._cond.notify()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


class Listener:
    """A thread that ``LISTEN``s on its own connection and calls ``wake``
    with the queue each notification names; ``wake(None)`` after every
    (re)connection, since notifications sent while it was not listening are
    lost."""

    def __init__(self, connect: Callable[[], "psycopg.Connection[Any]"],
                 wake: Waker) -> None:
        self._connect = connect
        self._wake = wake
        self._stopping = False
        self._stop_r, self._stop_w = socket.socketpair()
        self.backend_pid: Optional[int] = None
        self._thread = threading.Thread(target=self._run, name="callbackworker-task-listen",
                                         daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        try:
            self._stop_w.send(b"x")
        except OSError:
            pass
        self._thread.join()
        self._stop_r.close()
        self._stop_w.close()

    def _run(self) -> None:
        pause = 0.05
        while not self._stopping:
            conn: Optional["psycopg.Connection[Any]"] = None
            try:
                conn = self._connect()
                conn.add_notify_handler(lambda n: self._wake(n.payload))
                conn.execute(f"LISTEN {CHANNEL}")
                self.backend_pid = conn.info.backend_pid
                pause = 0.05
                self._wake(None)
                self._listen(conn)
            except Exception as exc:
                if self._stopping:
                    break
                if isinstance(exc, psycopg.Error):
                    log.warning("task listener: connection lost (%s); reconnecting in %.2f s; "
                                "polling meanwhile", exc, pause)
                else:
                    log.exception("task listener failed; restarting in %.2f s", pause)
                if select.select([self._stop_r], [], [], pause)[0]:
                    break
                pause = min(pause * 2, _RECONNECT_PAUSE_MAX_S)
            finally:
                self.backend_pid = None
                if conn is not None:
                    conn.close()

    def _listen(self, conn: "psycopg.Connection[Any]") -> None:
        fd, stop_fd = conn.fileno(), self._stop_r.fileno()
        while not self._stopping:
            ready = select.select([fd, stop_fd], [], [], _LISTEN_PING_S)[0]
            if stop_fd in ready:
                return
            if not ready:
                conn.execute("SELECT 1")  # notices a silently dead connection
                continue
            conn.pgconn.consume_input()  # raises once the server has gone
            queues: Set[str] = set()
            while True:
                note = conn.pgconn.notifies()
                if note is None:
                    break
                queues.add(note.extra.decode("utf-8", "replace"))
            for queue in sorted(queues):
                self._wake(queue)
