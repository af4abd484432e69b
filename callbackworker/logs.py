"""Logging set-up for the command line: levels, text and JSON lines.

The library itself only logs, on the ``callbackworker`` logger tree
(``callbackworker.tasks.events`` for what happens to tasks); it never
configures logging.  ``configure_logging`` is what ``callbackworker
worker`` calls: one handler on the root logger, writing either readable
text or one JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Dict, Optional, TextIO

__all__ = ["configure_logging", "JsonFormatter", "TEXT_FORMAT", "LEVELS", "FORMATS",
           "TASK_FIELDS"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The text format: time, level, logger, message (a traceback follows on
its own lines)."""

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The level names ``--log-level`` accepts."""

FORMATS = ("text", "json")
"""The formats ``--log-format`` accepts."""

TASK_FIELDS = ("task_id", "queue", "task_name", "attempt", "outcome", "duration_ms",
               "recovered")
"""Record attributes a JSON line carries when the record has them (the
task events of ``callbackworker.tasks.events``)."""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line: ``time`` (UTC,
    ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, the
    ``TASK_FIELDS`` it has, and ``traceback`` when it carries one."""

    def format(self, record: logging.LogRecord) -> str:
        line: Dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
                            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in TASK_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["traceback"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


_installed: Optional[logging.Handler] = None


def configure_logging(level: str = "INFO", fmt: str = "text",
                      stream: Optional[TextIO] = None) -> logging.Handler:
    """Sends every log record at ``level`` or above (one of ``LEVELS``) to
    ``stream`` (default: stderr) in ``fmt`` (``"text"`` or ``"json"``),
    through one handler on the root logger; calling it again replaces the
    handler it installed before.  Returns that handler."""
    global _installed
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    return handler
