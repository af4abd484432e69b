"""An app for ``callbackworker worker --app ops_app:svc`` in the tests of
logging, metrics and the operating commands: a ``TaskService`` on the
database ``CBW_APP_DB`` names, with a task that fails and one that
succeeds."""

from __future__ import annotations

import os

from callbackworker import TaskService

svc = TaskService(os.environ["CBW_APP_DB"])


@svc.task(name="ops.explode", queue="ops")
def explode(secret: str) -> None:
    raise ValueError("the ledger is out of balance")


@svc.task(name="ops.double", queue="ops")
def double(n: int) -> int:
    return 2 * n
