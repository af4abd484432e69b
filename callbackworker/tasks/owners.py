"""Who holds a task's lease, and whether that holder provably died.

DESIGN

* Identity.  A service leases the tasks it claims under an owner string
  ``host/pid/nonce``.  ``host`` is the host name and, on Linux, a digest of
  the kernel's boot id and the pid namespace (``HOST``); the nonce tells
  apart two services of one process.
* Dead-owner probe.  ``owner_is_dead`` answers True only for an owner of
  this very host (same boot, same pid namespace) whose process is gone.
  With a shared database (PostgreSQL, or a file on a shared volume) two
  machines or containers may share a host name; pids of one mean nothing
  to the other, so neither judges the other's workers dead.  Everything
  else is left to lease expiry.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import uuid

__all__ = ["HOST", "new_owner", "owner_is_dead"]


def _host_identity() -> str:
    """This host as lease owners name it: the host name and, on Linux, a
    digest of the kernel's boot id and this pid namespace."""
    name = socket.gethostname()
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return name
    digest = hashlib.blake2b(f"{boot}:{pid_namespace}".encode(), digest_size=6).hexdigest()
    return f"{name}#{digest}"


HOST = _host_identity()
"""This host as lease owners name it (computed once, at import)."""


def new_owner() -> str:
    """A fresh owner identity for a service of this process."""
    return f"{HOST}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


def owner_is_dead(owner: str) -> bool:
    """True only when ``owner`` provably no longer runs: a service of this
    host whose process is gone.  Anything else (another host, a live or
    reused pid, Windows, where probing a pid is not harmless) is left to
    lease expiry."""
    host, _, rest = owner.rpartition("/")[0].partition("/")
    if host != HOST or sys.platform == "win32":
        return False
    try:
        pid = int(rest)
    except ValueError:
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """True when ``pid`` has exited but its parent has not reaped it yet (a
    process killed with -9 looks alive to ``kill(pid, 0)`` until then).
    Linux only: elsewhere a zombie waits for its lease to expire."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"
