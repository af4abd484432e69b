"""Cross-process wake-ups for a SQLite task database: ``WakeChannel``.

DESIGN

* Why datagram sockets.  SQLite has no notifications, and processes that
  share a database file share nothing else but its directory.  Each
  process that wants to be woken binds one UNIX datagram socket in a
  directory next to the file (``<database>.wake/``, or, when that path is
  too long for a socket address, about 100 bytes,
  ``/tmp/callbackworker-wake-<digest of the file's real path>/``); a
  process that
  commits work sends one small datagram to every socket there.  A blocked
  ``recv`` costs no CPU, a send is one system call per listener and never
  blocks (a full receive buffer already holds a wake-up), and the same
  calls work on Linux and macOS.  A FIFO admits one reader per pipe and
  blocks writers without one; inotify is Linux only and says nothing about
  which queue changed.
* Messages.  ``b"w" + queue`` (work may be due in that queue; an empty
  name: in any queue) and ``b"d"`` (tasks finished: result waiters read
  again).  The listener drains every datagram waiting, then makes one call
  per distinct message, so a burst of enqueues costs one wake-up.
* Stale sockets.  A socket left by a process that died refuses datagrams
  (``ECONNREFUSED``); the sender deletes it.  A process never sends to
  itself: its own commits wake it directly.
* Ownership.  The directory is made 0700.  One found already there is
  used only if it is a real directory (not a symbolic link) owned by this
  process's user and writable by nobody else: another local user who made
  it first (``/tmp`` is everyone's) could otherwise read the wake-ups or
  plant sockets in it.  Anything else is refused with one warning per
  directory and process, and polling takes over.
* Fallback.  The channel is best effort: where the directory cannot be
  made or is refused (above), for an in-memory database, or where the
  platform has no UNIX sockets, ``WakeChannel.open`` returns None
  and the store's users find work and results by polling, as they always
  also do.
* Threads.  One daemon listener thread per channel, started by ``listen``
  and stopped by ``close`` (which sends the thread a datagram of its own).
  Sends come from whatever thread committed; the directory listing is
  cached, its directory checked for changes at most every ``_RELIST_S``
  (a listener that just started may miss the wake-ups of that moment;
  polling covers it).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat
import threading
import time
import uuid
from typing import Callable, List, Optional, Set, Tuple

__all__ = ["WakeChannel", "WORK", "FINISHED"]

log = logging.getLogger(__name__)

WORK = b"w"
"""Prefix of a wake-up for work: the queue's UTF-8 name follows."""
FINISHED = b"d"
"""A wake-up for result waiters: tasks were finished."""

_STOP = b"\x00stop"
_MAX_DATAGRAM = 1024
_MAX_SOCKET_PATH = 100  # sun_path holds 104 bytes on macOS, 108 on Linux
_RELIST_S = 0.05  # how long a listing is trusted: a new listener may miss that much
_NAME_BYTES = 34  # "/<pid>-<12 hex digits>" with room to spare


_warned: Set[str] = set()
_warned_lock = threading.Lock()


def _unsafe(directory: str) -> Optional[str]:
    """Why the existing ``directory`` must not hold wake-up sockets, or None
    when it is a real directory of this user that no one else may write."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"is owned by user id {st.st_uid}, not by this process's ({os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _warn_once(directory: str, message: str) -> None:
    """Logs ``message`` as a warning the first time ``directory`` is
    refused in this process."""
    with _warned_lock:
        if directory in _warned:
            return
        _warned.add(directory)
    log.warning("%s", message)


class WakeChannel:
    """The wake-up sockets of one database file; see the module notes.
    ``open`` makes one, or returns None when the platform or the path
    rules it out."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._lock = threading.Lock()
        self._peers: List[str] = []
        self._seen: Optional[Tuple[int, int]] = None  # the directory's (mtime_ns, inode)
        self._fresh_until = 0.0  # monotonic; the listing is not checked again before
        self._own: Optional[str] = None
        self._socket: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._callback: Optional[Callable[[Set[bytes]], None]] = None

    @classmethod
    def open(cls, database: str) -> Optional["WakeChannel"]:
        """The channel of the SQLite file ``database``, or None (polling
        only) for an in-memory database, a platform without UNIX sockets,
        or a directory that cannot be created.  Every process on the file
        picks the same directory: it depends on the file's real path only."""
        if database in ("", ":memory:") or not hasattr(socket, "AF_UNIX"):
            return None
        directory = cls.directory_for(database)
        try:  # the leaf only: a mistyped path must not grow directories
            os.mkdir(directory, 0o700)
        except FileExistsError:
            refusal = _unsafe(directory)
            if refusal is not None:
                _warn_once(directory, f"{directory}: {refusal}: no wake-ups through it, polling "
                                      f"only (remove it, or make it a 0700 directory of this "
                                      f"user)")
                return None
        except OSError as exc:
            log.debug("%s: no wake-up channel (%s); polling only", directory, exc)
            return None
        return cls(directory)

    @staticmethod
    def directory_for(database: str) -> str:
        """Where the sockets of the SQLite file ``database`` live."""
        real = os.path.realpath(database)
        directory = real + ".wake"
        if len(os.fsencode(directory)) + _NAME_BYTES > _MAX_SOCKET_PATH:
            digest = hashlib.blake2b(os.fsencode(real), digest_size=10).hexdigest()
            directory = f"/tmp/callbackworker-wake-{digest}"
        return directory

    # ---- sending ---------------------------------------------------------

    def notify(self, message: bytes) -> None:
        """Sends ``message`` to every other listener of the database; never
        blocks and never raises."""
        for path in self._listeners():
            try:
                self._sender.sendto(message, path)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    self._forget(path)  # its process is gone
                # EAGAIN / ENOBUFS: its buffer is full of wake-ups already

    def _listeners(self) -> List[str]:
        now = time.monotonic()
        with self._lock:
            if now < self._fresh_until:
                return self._peers
        try:
            st = os.stat(self.directory)
        except OSError:
            return []
        seen = (st.st_mtime_ns, st.st_ino)
        with self._lock:
            self._fresh_until = now + _RELIST_S
            if seen != self._seen:
                try:
                    names = os.listdir(self.directory)
                except OSError:
                    names = []
                self._peers = [os.path.join(self.directory, n) for n in names
                               if os.path.join(self.directory, n) != self._own]
                self._seen = seen
            return self._peers

    def _forget(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
        with self._lock:
            self._seen = None
            self._fresh_until = 0.0

    # ---- listening -------------------------------------------------------

    def listen(self, callback: Optional[Callable[[Set[bytes]], None]]) -> bool:
        """Calls ``callback(messages)`` from a thread of its own with the
        distinct messages of each burst (None: stops listening).  Returns
        False if no socket could be bound (then only polling helps)."""
        with self._lock:
            self._callback = callback
            if callback is None or self._thread is not None:
                return callback is None or self._thread is not None
            path = os.path.join(self.directory, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                log.debug("%s: cannot bind a wake-up socket (%s); polling only", path, exc)
                return False
            self._own, self._socket, self._seen, self._fresh_until = path, sock, None, 0.0
            self._thread = threading.Thread(target=self._receive, args=(sock,), daemon=True,
                                            name="callbackworker-wake")
            self._thread.start()
            return True

    def _receive(self, sock: socket.socket) -> None:
        while True:
            sock.setblocking(True)
            messages = {sock.recv(_MAX_DATAGRAM)}
            sock.setblocking(False)
            try:
                while True:
                    messages.add(sock.recv(_MAX_DATAGRAM))
            except BlockingIOError:
                pass
            if _STOP in messages:
                return
            callback = self._callback
            if callback is not None:
                try:
                    callback(messages)
                except Exception:
                    log.exception("a wake-up callback failed")

    def close(self) -> None:
        """Stops the listener, removes its socket and closes the sender."""
        with self._lock:
            thread, sock, own = self._thread, self._socket, self._own
            self._thread = self._socket = self._own = None
            self._callback = None
        if thread is not None and sock is not None and own is not None:
            for _ in range(500):  # a full buffer drains as the thread reads
                try:
                    self._sender.sendto(_STOP, own)
                    break
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break
            thread.join(5)
            sock.close()
            try:
                os.unlink(own)
            except OSError:
                pass
        self._sender.close()
