"""Task ids: 32 lowercase hex digits, random (the form of ``uuid4().hex``).

DESIGN

* Drawn in batches.  ``os.urandom`` lets go of the interpreter lock for
  its system call, and under load getting the lock back costs more than
  the id: one call per enqueued task held the producer behind the worker's
  threads.  So ids are cut from one ``os.urandom`` call per
  ``BATCH`` ids (or per batch enqueued), and spare ones wait in a list.
* Fork.  A child process starts without the parent's spare ids, so the two
  never hand out the same one.
"""

from __future__ import annotations

import os
from typing import List

from .. import _lifecycle

__all__ = ["new_task_id", "new_task_ids"]

BATCH = 256
"""How many ids one draw makes for ``new_task_id``."""

_spare: List[str] = []


def new_task_ids(n: int) -> List[str]:
    """``n`` fresh random ids (see ``new_task_id``); a batch of ``BATCH``
    or more is drawn in one ``os.urandom`` call of its own."""
    if n >= BATCH:
        return _draw(n)
    return [new_task_id() for _ in range(n)]


def new_task_id() -> str:
    """One fresh random id, as ``uuid4().hex`` would give (version 4, the
    RFC 4122 variant), taken from the spare ones."""
    while True:
        try:
            return _spare.pop()  # atomic: threads never get the same one
        except IndexError:
            _spare.extend(_draw(BATCH))


def _draw(n: int) -> List[str]:
    """``n`` random ids from one ``os.urandom`` call."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # the RFC 4122 variant
    text = raw.hex()
    return [text[i:i + 32] for i in range(0, 32 * n, 32)]


_lifecycle.on_fork_in_child(_spare.clear)
