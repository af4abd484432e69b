"""The HTTP endpoint outside systems signal durable callbacks through.

``create_app(service_or_store, token)`` (a ``TaskService``, a
``TaskClient`` or a ``TaskStore``) returns a Starlette (ASGI) app;
``callbackworker serve`` runs it under uvicorn.  Both come with the
optional extra ``callbackworker[http]``.

Routes (every one but the dashboard's needs ``Authorization: Bearer <token>``)::

    POST /v1/callbacks/{id}/success    raw body = the result (at most 1 MiB)
    POST /v1/callbacks/{id}/failure    JSON {"error": "..."}
    POST /v1/callbacks/{id}/heartbeat  body ignored
    GET  /v1/tasks/{task_id}           JSON: every ``TaskInfo`` field by name
                                       ("status", "message", "attempt", "id",
                                       "name", "queue", "result", "progress",
                                       "traceback", "created_at_ms",
                                       "finished_at_ms")
    GET  /metrics                      Prometheus text format
                                       (``callbackworker.metrics``): the
                                       database's pending/running/suspended
                                       gauges per queue, this process's
                                       counters
    /ui/...                            the web dashboard (``callbackworker.ui``):
                                       HTML pages behind a login form that takes
                                       the same token once and sets a session
                                       cookie

Answers: 200 with a JSON body on success; 401 for a missing or wrong token
(checked with ``hmac.compare_digest`` before anything else, so an
unauthenticated caller learns nothing, not even which paths exist); 404
for a malformed or unknown callback id or task id; 409 when the callback
takes no more signals (``{"state": "succeeded" | "failed" | "timed_out" |
"closed"}``); 400 for a body that is not JSON (not UTF-8, malformed, or
nested too deeply to parse), 422 for JSON of the wrong shape or an error
text holding a NUL or a lone surrogate (no store can hold those); 413 for
a body over 1 MiB (by ``Content-Length`` and by the bytes actually
received); 503 with ``Retry-After`` when the database stays locked or
unreachable for ``REQUEST_PATIENCE_S`` (a few seconds: a request never
waits out the store's own patience, ``_webcall.py``) or the service is
closed.
Every refusal is a one-line JSON ``{"error": "..."}``.  A callback id is a
capability: the app does not log request paths.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Awaitable, Callable, Dict, Sequence, Union

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ._webcall import RETRY_AFTER_S, call_store
from .durable import MAX_RESULT_BYTES, check_callback_id, check_error
from .errors import (
    CallbackAlreadyCompletedError,
    ServiceClosedError,
    StorageBusyError,
    UnknownCallbackError,
    UnknownTaskError,
)
from .tasks.client import TaskClient
from .tasks.config import is_task_id
from .tasks.service import TaskService
from .tasks.storage import TaskStore
from .ui import create_dashboard

__all__ = ["create_app", "MAX_BODY_BYTES", "DASHBOARD_PATH"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = MAX_RESULT_BYTES
"""Largest request body accepted (1 MiB)."""

DASHBOARD_PATH = "/ui"
"""Where the web dashboard is mounted."""

_Target = Union[TaskService, TaskClient, TaskStore]


class _BearerAuth:
    """ASGI middleware: a request without the right bearer token gets 401
    before routing (so unknown paths are 401 too, never 404).  Paths under
    ``/ui`` pass: the dashboard checks its own session cookie."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = b"Bearer " + token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _is_dashboard(scope):
            given = next((value for name, value in scope["headers"]
                          if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                response = JSONResponse({"error": "missing or wrong bearer token"}, 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_dashboard(scope: Scope) -> bool:
    """Whether the request is for the dashboard, wherever the app itself is
    mounted (``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    return path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")


async def _body(request: Request) -> bytes:
    """The request body, refused with 413 past ``MAX_BODY_BYTES`` whatever
    ``Content-Length`` claims."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPException(400, "bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is limited to {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is limited to {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _client_of(target: _Target) -> TaskClient:
    """The client the endpoint works through: a service's own (its signals
    wake its dispatcher), the given one, or a client over a bare store."""
    if isinstance(target, TaskService):
        return target.client
    if isinstance(target, TaskClient):
        return target
    if isinstance(target, TaskStore):
        return TaskClient(target)
    raise TypeError(f"expected a TaskService, a TaskClient or a TaskStore, not "
                    f"{type(target).__name__}")


def create_app(service_or_store: _Target, token: str, *,
               allowed_origins: Sequence[str] = ()) -> Starlette:
    """The endpoint's ASGI app over a ``TaskService`` (signals go through
    its client, and wake its dispatcher at once when it serves the queue),
    a ``TaskClient``, or a bare ``TaskStore`` (signals are written with the
    wall clock; whichever service serves the queue notices within its
    ``poll_ms``).  ``token`` is the bearer token every request must carry
    (non-empty).  ``allowed_origins`` are the dashboard's other accepted
    origins (``callbackworker.ui.create_dashboard``)."""
    client = _client_of(service_or_store)
    if not isinstance(token, str) or not token.strip():
        raise ValueError("the HTTP endpoint needs a non-empty bearer token")

    def fail(callback_id: str, body: bytes) -> None:
        client.send_callback_failure(callback_id, _error_text(body))

    def heartbeat(callback_id: str, body: bytes) -> None:
        client.send_callback_heartbeat(callback_id)

    async def get_task(request: Request) -> Response:
        task_id = _task_id(request.path_params["task_id"])
        info = await call_store(client.get, task_id)
        return JSONResponse(info._asdict())

    metrics = _metrics_of(client)

    async def get_metrics(request: Request) -> Response:
        if metrics is None:
            return JSONResponse({"error": "metrics need prometheus_client (pip install "
                                          "'callbackworker[metrics]')"}, 501)
        body = await call_store(metrics.render)
        return Response(body, media_type=metrics_content_type())

    routes = [
        Route("/v1/callbacks/{callback_id}/success",
              _signal_endpoint("succeeded", client.send_callback_success), methods=["POST"]),
        Route("/v1/callbacks/{callback_id}/failure", _signal_endpoint("failed", fail),
              methods=["POST"]),
        Route("/v1/callbacks/{callback_id}/heartbeat", _signal_endpoint("pending", heartbeat),
              methods=["POST"]),
        Route("/v1/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/metrics", get_metrics, methods=["GET"]),
        Mount(DASHBOARD_PATH, app=create_dashboard(client, token,
                                                   allowed_origins=allowed_origins)),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_BearerAuth, token=token)],
                    exception_handlers=_EXCEPTION_HANDLERS)
    app.state.metrics = metrics  # the app keeps its metrics (and their counting) alive
    return app


def _metrics_of(client: TaskClient) -> Any:
    """A ``TaskMetrics`` over ``client``, or None without prometheus_client."""
    try:
        from .metrics import TaskMetrics
    except ImportError:
        return None
    return TaskMetrics(client)


def metrics_content_type() -> str:
    """The ``Content-Type`` of ``GET /metrics``."""
    from .metrics import CONTENT_TYPE

    return CONTENT_TYPE


def _signal_endpoint(state: str, send: Callable[[str, bytes], None]
                     ) -> Callable[[Request], Awaitable[Response]]:
    """A route that checks the callback id, reads the body (at most
    ``MAX_BODY_BYTES``) and hands both to ``send`` on a worker thread; it
    answers with the ``state`` the signal asked for."""

    async def endpoint(request: Request) -> Response:
        callback_id = check_callback_id(request.path_params["callback_id"])
        body = await _body(request)
        await call_store(send, callback_id, body)
        return JSONResponse({"callback_id": callback_id, "state": state})

    return endpoint


def _task_id(text: str) -> str:
    """A well-formed task id (``is_task_id``), or ``UnknownTaskError``."""
    if not is_task_id(text):
        raise UnknownTaskError(text)
    return text


def _error_text(body: bytes) -> str:
    """The ``error`` of a failure body ``{"error": "<text>"}``: 400 for a
    body that is not JSON (not UTF-8, malformed, or nested too deeply to
    parse), 422 for JSON of another shape or text no store can hold."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(400, 'the body must be JSON: {"error": "..."}') from None
    if not isinstance(document, dict) or not isinstance(document.get("error"), str):
        raise HTTPException(422, 'the body must be a JSON object {"error": "<text>"}')
    try:
        error = check_error(document["error"])
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if "\0" in error:
        raise HTTPException(422, "the error text must not contain NUL characters")
    try:
        error.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(422, "the error text must not contain lone surrogates "
                                 "(\\ud800-\\udfff escapes)") from None
    return error


def _answer(status: int, **fields: Any) -> Callable[[Request, Exception], Awaitable[Response]]:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None

    async def handler(request: Request, exc: Exception) -> Response:
        body: Dict[str, Any] = {"error": str(exc), **fields}
        if isinstance(exc, CallbackAlreadyCompletedError):
            body["state"] = exc.state
        return JSONResponse(body, status, headers=headers)

    return handler


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


_EXCEPTION_HANDLERS: Dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: _http_error,
    UnknownCallbackError: _answer(404),
    UnknownTaskError: _answer(404),
    CallbackAlreadyCompletedError: _answer(409),
    ValueError: _answer(422),
    TypeError: _answer(422),
    ServiceClosedError: _answer(503),
    StorageBusyError: _answer(503),
}
