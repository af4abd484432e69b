"""The asyncio waits of ``Worker`` (``wait_complete_async``, ``wait_async``).

Nothing polls: the coroutine registers a completion watcher with the job's
table, the core reports the completion from whichever thread completes the
job, and the watcher wakes the event loop with ``call_soon_threadsafe``.
``Worker`` inherits these methods; they use its argument checks and its
``wait``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._native import lib, raise_for

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["AsyncWaits"]


def _resolve(done: "asyncio.Future[None]") -> None:
    if not done.done():
        done.set_result(None)


class AsyncWaits:
    """The asyncio half of ``Worker``'s waits."""

    async def wait_complete_async(self: "Worker", job_id: int, timeout_ms: int = -1) -> bool:
        """``wait_complete`` for asyncio: True once the job has completed,
        False if ``timeout_ms`` passed first.  The core reports the
        completion and the event loop is woken with ``call_soon_threadsafe``;
        nothing polls.  Never destroys the job."""
        jid, timeout_ms = self._job_and_timeout(job_id, timeout_ms)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def notify() -> None:  # called on whichever thread completed the job
            loop.call_soon_threadsafe(_resolve, done)

        try:
            if self._table.watch(self._w, jid, notify):
                return True
            if timeout_ms < 0:
                await done
            else:
                await asyncio.wait_for(done, timeout_ms / 1000)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._table.unwatch(jid, notify)

    async def wait_async(self: "Worker", job_id: int, timeout_ms: int = -1) -> bytes:
        """``wait`` for asyncio: the job's response once it has completed
        (the job is destroyed; a failed job raises its ``JobFailedError``);
        ``WaitTimeoutError`` if ``timeout_ms`` passes first."""
        if not await self.wait_complete_async(job_id, timeout_ms):
            raise_for(int(lib.CBW_ETIMEDOUT), job_id)
        return self.wait(job_id, 0)
