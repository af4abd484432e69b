"""A periodic app for ``callbackworker worker --app periodic_app:svc`` in
the multi-process test: a ``TaskService`` on the database ``CBW_APP_DB``
names, with one schedule ticking every second."""

from __future__ import annotations

import os

from callbackworker import TaskService

svc = TaskService(os.environ["CBW_APP_DB"], poll_ms=50)


@svc.periodic(every_ms=1000, name="beat")
def beat() -> None:
    """Does nothing: the test reads the ticks enqueued."""
