"""The job queries of ``Worker``: phase, status, state, error text, the
``job_meta`` fields, the ``info`` line, and progress reports.

Each query reads one snapshot of the job from the core
(``cbw_job_info_get``) and never changes the job.  ``Worker`` inherits
these methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

from . import jobcontext as _progress
from ._native import current_table, ffi, lib, raise_for
from ._validate import check_id, check_key, may_be_job_id
from .asyncmeta import JobMetaKey, Phase
from .errors import failure_for_status
from .jobcontext import ProgressState
from .states import PHASE_TEXT, STATE_TEXT, STATUS_TEXT, State, Status

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["JobQueries"]


class JobQueries:
    """The query half of ``Worker``."""

    def _info(self: "Worker", job_id: object) -> Any:
        jid = self._job_id(job_id)
        out = ffi.new("cbw_job_info *")
        rc = lib.cbw_job_info_get(self._w, jid, out)
        if rc < 0:
            raise_for(rc, jid)
        return out

    def phase(self: "Worker", job_id: int) -> Phase:
        """``Phase.QUEUED``, ``RUNNING`` or ``COMPLETED``."""
        return Phase(self._info(job_id).phase)

    def phase_text(self: "Worker", job_id: int) -> str:
        """"queued", "running" or "completed"."""
        return PHASE_TEXT[self._info(job_id).phase]

    def status(self: "Worker", job_id: int) -> Status:
        """``Status.PENDING`` until the job completes, then how it did."""
        return Status(self._info(job_id).status)

    def status_text(self: "Worker", job_id: int) -> str:
        """"success", "pending", "error", "timeout", "shutdown" or
        "cancelled"."""
        return STATUS_TEXT[Status(self._info(job_id).status)]

    def state(self: "Worker", job_id: int) -> State:
        """Phase and status in one code (``State``)."""
        return State(self._info(job_id).state)

    def error_text(self: "Worker", job_id: int) -> str:
        """"" on success (or while the job is not completed); otherwise what
        went wrong, "ExcType: message" after a callback exception."""
        info = self._info(job_id)
        if info.error_len == 0:
            return ""
        buf = ffi.new("char[]", info.error_len + 1)
        rc = lib.cbw_job_error_text(self._w, info.id, buf, len(buf))
        if rc < 0:
            raise_for(rc, info.id)
        return ffi.string(buf).decode("utf-8", "replace")

    def job_known(self: "Worker", job_id: int) -> bool:
        """True while the job exists (not yet destroyed by wait/take)."""
        jid = check_id(job_id)
        self._check_open()
        if not may_be_job_id(jid):
            return False
        out = ffi.new("cbw_job_info *")
        rc = lib.cbw_job_info_get(self._w, jid, out)
        if rc == lib.CBW_EUNKNOWN:
            return False
        if rc < 0:
            raise_for(rc, jid)
        return True

    def job_timeout(self: "Worker", job_id: int) -> int:
        """The run-time limit the job was started with (-1 = infinite)."""
        return int(self._info(job_id).timeout_ms)

    def job_has_blob_result(self: "Worker", job_id: int) -> bool:
        """True if the job completed successfully (it has a response)."""
        return bool(self._info(job_id).has_result)

    def job_blob_result_size(self: "Worker", job_id: int) -> int:
        """The response size in bytes.  ``JobNotCompleteError`` before the
        job completes; the job's ``JobFailedError`` if it did not succeed
        (the job is not destroyed)."""
        info = self._info(job_id)
        if info.phase != Phase.COMPLETED:
            raise_for(lib.CBW_ENOTDONE, info.id)
        if not info.has_result:
            raise failure_for_status(info.id, Status(info.status), self.error_text(info.id),
                                     self._table.failures.get(info.id))
        return int(info.result_size)

    def job_meta(self: "Worker", job_id: int, key: int) -> int:
        """One field by ``JobMetaKey``.  ``KNOWN`` gives 0 for an unknown id;
        every other key raises ``UnknownJobError`` for one."""
        key = check_key(key, JobMetaKey)
        if key is JobMetaKey.KNOWN:
            return int(self.job_known(job_id))
        i = self._info(job_id)
        return int({
            JobMetaKey.PHASE: i.phase,
            JobMetaKey.STATUS: i.status,
            JobMetaKey.ROUTE: i.route,
            JobMetaKey.TIMEOUT: i.timeout_ms,
            JobMetaKey.HAS_BLOB_RESULT: i.has_result,
            JobMetaKey.BLOB_RESULT_SIZE: i.result_size,
        }[key])

    def info(self: "Worker", job_id: int) -> str:
        """One line of space-separated ``key=value`` pairs with stable keys:
        id phase status state timeout_ms route attempt result_size rc."""
        i = self._info(job_id)
        return (f"id={i.id} phase={PHASE_TEXT[i.phase]} status={STATUS_TEXT[Status(i.status)]} "
                f"state={STATE_TEXT[State(i.state)]} timeout_ms={i.timeout_ms} "
                f"route={i.route} attempt={i.attempt} result_size={i.result_size} rc={i.rc}")

    def _progress_of(self: "Worker", job_id: object) -> Optional[ProgressState]:
        jid = self._job_id(job_id)
        if not self.job_known(jid):
            raise_for(lib.CBW_EUNKNOWN, jid)
        tag = self._progress.get(jid)
        if tag is None:
            # The job's own callback may ask before start() has recorded the
            # job (an idle route starts its first job at once): its run
            # carries the tag.
            run = lib.cbw_current_run()
            if run != ffi.NULL and run.id == jid and current_table() is self._table:
                tag = run.tag or None
        return None if tag is None else _progress.STATES.get(tag)

    def progress(self: "Worker", job_id: int) -> Any:
        """The latest progress report of a job started with ``on_progress``,
        ``store_response`` or ``callback_data``; None before the first (and
        for jobs started without those options)."""
        state = self._progress_of(job_id)
        return None if state is None else state.latest

    def query(self: "Worker", job_id: int) -> Dict[str, Any]:
        """The job's response store: ``callback_data`` merged with every
        dict progress report in order (later keys win) when the job was
        started with ``store_response=True``; ``callback_data`` alone
        otherwise ({} without it).  A new dict each call."""
        state = self._progress_of(job_id)
        return {} if state is None else state.snapshot()
