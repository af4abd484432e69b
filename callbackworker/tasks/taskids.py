"""Task ids: 32 lowercase hex digits in the form of a version 7 UUID's hex
(RFC 9562): the millisecond the id was drawn, then random bits.

DESIGN

* Time first.  Ids drawn later sort later, so the id index of a task table
  grows at its right edge: an insert, and the settle that finds the task by
  its id, touch the few pages recently written rather than a random leaf
  of the whole index (fewer pages read and written per transaction, no
  page splits in the middle).  Nothing else reads meaning into an id: tasks
  are listed in insertion order (``seq``), and the dashboard shows an id's
  random tail, which tells tasks of one millisecond apart.
* Unique without coordination.  After the 48 bits of time come 74 random
  bits (the version and variant take the other 6), so processes and
  threads drawing in the same millisecond still never collide in practice;
  the stores' unique index on the id would refuse one that did.
* Drawn in batches.  ``os.urandom`` lets go of the interpreter lock for
  its system call, and under load getting the lock back costs more than
  the id: one call per enqueued task held the producer behind the worker's
  threads.  So ids are cut from one ``os.urandom`` call per ``BATCH`` ids
  (or per batch enqueued), all stamped with the millisecond of the draw,
  and spare ones wait in a list.
* Fork.  A child process starts without the parent's spare ids, so the two
  never hand out the same one.
"""

from __future__ import annotations

import os
import time
from typing import List

from .. import _lifecycle

__all__ = ["new_task_id", "new_task_ids"]

BATCH = 256
"""How many ids one draw makes for ``new_task_id``."""

_spare: List[str] = []


def new_task_ids(n: int) -> List[str]:
    """``n`` fresh ids (see ``new_task_id``); a batch of ``BATCH`` or more
    is drawn in one ``os.urandom`` call of its own."""
    if n >= BATCH:
        return _draw(n)
    return [new_task_id() for _ in range(n)]


def new_task_id() -> str:
    """One fresh id, in the form of ``uuid.UUID(...).hex`` for a version 7
    UUID (the RFC 4122/9562 variant), taken from the spare ones."""
    while True:
        try:
            return _spare.pop()  # atomic: threads never get the same one
        except IndexError:
            _spare.extend(_draw(BATCH))


def _draw(n: int) -> List[str]:
    """``n`` ids stamped with the current millisecond, their random bits
    from one ``os.urandom`` call."""
    raw = bytearray(os.urandom(16 * n))
    stamp = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    for i, byte in enumerate(stamp):
        raw[i::16] = bytes((byte,)) * n
    raw[6::16] = bytes((b & 0x0F) | 0x70 for b in raw[6::16])  # version 7
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # the RFC 4122 variant
    text = raw.hex()
    return [text[i:i + 32] for i in range(0, 32 * n, 32)]


_lifecycle.on_fork_in_child(_spare.clear)
