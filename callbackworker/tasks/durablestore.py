"""``TaskDurableStore``: the durable-operation store of a task's run.

A task handler's ``create_callback`` / ``callback_result`` / ``step``
(``callbackworker.durable``) keep their log and callbacks in the task's own
``TaskStore``, so they survive the process: a suspended task is a row in
the store, and any later process serving the queue replays it.

Step values and callback outcomes are serialized with ``pickle``: a step
may return any picklable value, as in memory.  Loading a pickle can run
code, so the task database must be trusted, like the code that reads it
(whoever can write the file can also enqueue work and read every payload).
Callback results that outside systems send (also over HTTP) are stored as
raw bytes and pickled only by the handler's own process.

One instance serves one run of one task; it caches the task's log, which
only the task's current lease holder writes.
"""

from __future__ import annotations

import pickle
from typing import Callable, List, Optional

from ..durable import CallbackRecord, DurableStore, Op
from .storage import TaskStore

__all__ = ["TaskDurableStore"]


class TaskDurableStore(DurableStore):
    """A ``DurableStore`` over ``store`` for the run of task ``task_id``;
    ``clock`` (milliseconds) measures callback limits."""

    def __init__(self, store: TaskStore, clock: Callable[[], int], task_id: str) -> None:
        self._store = store
        self._clock = clock
        self._task_id = task_id
        self._log: Optional[List[Op]] = None

    def now_ms(self) -> int:
        return int(self._clock())

    def request(self, owner: str, current: bytes) -> bytes:
        """A task's payload is stored and read-only: every run sees it."""
        return current

    def ops(self, owner: str) -> List[Op]:
        self._check_owner(owner)
        if self._log is None:
            self._log = [(kind, name, pickle.loads(value))
                         for kind, name, value in self._store.durable_ops(owner)]
        return self._log

    def record(self, owner: str, seq: int, op: Op) -> None:
        log = self.ops(owner)
        kind, name, value = op
        self._store.durable_record(owner, seq, kind, name,
                                   pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        log.append(op)

    def add_callback(self, record: CallbackRecord) -> None:
        self._check_owner(record.owner)
        self._store.durable_add_callback(record)

    def callback(self, callback_id: str) -> Optional[CallbackRecord]:
        record = self._store.durable_callback(callback_id)
        if record is not None:
            record.expire_if_due(self.now_ms())
        return record

    def signal(self, callback_id: str, state: str, result: Optional[bytes],
               error: Optional[str]) -> CallbackRecord:
        return self._store.durable_signal(callback_id, state, result, error, self.now_ms())

    def forget(self, owner: str) -> None:
        """Nothing to do: the store itself deletes a task's log and closes
        its callbacks when the task reaches a terminal status."""

    def _check_owner(self, owner: str) -> None:
        if owner != self._task_id:
            raise ValueError(f"this store serves task {self._task_id}, not {owner}")
