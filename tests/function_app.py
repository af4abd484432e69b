"""A function-style app for ``callbackworker worker --app function_app:svc``
in the subprocess tests: a ``TaskService`` on the database ``CBW_APP_DB``
names, with tasks on two queues."""

from __future__ import annotations

import os

from callbackworker import TaskService, current_task

svc = TaskService(os.environ["CBW_APP_DB"])


@svc.task(name="add")
def add(a: int, b: int) -> int:
    task = current_task()
    if task is not None:
        task.progress({"adding": [a, b]})
    return a + b


@svc.task(name="shout", queue="text")
async def shout(text: str) -> str:
    return text.upper()
