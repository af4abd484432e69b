"""The web dashboard: server-rendered pages over a ``TaskClient``.

``create_dashboard(client, token)`` returns a Starlette app that
``callbackworker.http.create_app`` mounts under ``/ui/`` (so ``serve``
has it).  Paths, relative to where it is mounted::

    GET  /                    queues: counts per status, completions in the
                              last minute and hour, the latest failures
    GET  /tasks               tasks newest first; ?queue= &status= &name=
                              filter, ?before= pages (failed ones show
                              their tracebacks)
    GET  /tasks/{id}          one task: status, attempts, progress, result,
                              error and traceback, durable callbacks
    POST /tasks/{id}/retry    a failed or cancelled task is pending again
    POST /tasks/{id}/cancel   a pending or suspended task is cancelled
    GET  /login, POST /login  the bearer token, posted once
    POST /logout
    GET  /static/dashboard.css

Every path but the login page and the stylesheet needs a session
(``callbackworker.uisession``), unknown paths too, so that nobody learns
which paths exist before logging in: without one, a GET is redirected to
the login page and anything else refused.  Log out revokes the session on
the server.  A POST must also carry its session's CSRF token in the hidden
``csrf`` field and come from this site: its ``Origin`` header (which
browsers send with every form POST) must be the request's own origin
(scheme, host and port, as the ``Host`` header names them) or one of the
``allowed_origins`` (the address a browser uses when a proxy in front
rewrites ``Host``).  The cookie is ``HttpOnly`` and ``SameSite=Strict``
(``Secure`` too over HTTPS).  Templates are Jinja2 with autoescaping, so
task names, messages, tracebacks and queue names show as text whatever
they contain; pages forbid framing and any script (Content-Security-Policy).

The templates and the stylesheet are package data: nothing is fetched
from elsewhere at run time.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from importlib import resources
from typing import (Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Sequence,
                    Tuple)

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ._webcall import RETRY_AFTER_S, call_store
from .errors import ServiceClosedError, StorageBusyError, TaskError, UnknownTaskError
from .tasks.client import TaskClient
from .tasks.config import TaskInfo, is_task_id
from .tasks.status import TaskStatus
from .uisession import SESSION_MAX_AGE_S, Session, SessionSigner

__all__ = ["create_dashboard", "normalize_origin", "COOKIE_NAME", "PAGE_SIZE",
           "THROUGHPUT_SCAN"]

COOKIE_NAME = "cbw_session"
"""The session cookie's name."""

PAGE_SIZE = 50
"""Tasks per page of the task list."""

THROUGHPUT_SCAN = 1000
"""At most this many of a queue's newest completed tasks are read to count
its recent completions; past it the page says "at least"."""

MAX_FORM_BYTES = 16 * 1024
"""Largest form body the dashboard reads."""

STATUSES: Tuple[str, ...] = tuple(status.value for status in TaskStatus)

_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_NOTICES = {"retried": "The task is pending again.", "cancelled": "The task was cancelled."}

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("callbackworker", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class QueueRow(NamedTuple):
    """One queue's line on the overview."""

    name: str
    counts: Dict[str, int]
    last_minute: int
    last_hour: int
    exact: bool


_PUBLIC_PATHS = frozenset({"/login", "/static/dashboard.css"})
"""The paths, relative to the mount, that need no session."""

_SESSION_ENDED = "Your session has ended: log in again."


def create_dashboard(client: TaskClient, token: str, *,
                     clock: Optional[Callable[[], int]] = None,
                     max_age_s: int = SESSION_MAX_AGE_S,
                     allowed_origins: Sequence[str] = ()) -> Starlette:
    """The dashboard's ASGI app over ``client``; ``token`` is what the login
    form must be given.  ``clock`` (wall-clock milliseconds by default)
    dates sessions and measures recent throughput; ``max_age_s`` is how
    long a login lasts.  ``allowed_origins`` (``scheme://host[:port]``
    each) are accepted as a POST's ``Origin`` besides the request's own:
    give the address browsers use when a proxy in front rewrites ``Host``.
    ``ValueError`` for an origin of another form."""
    now_ms: Callable[[], int] = clock or (lambda: int(time.time() * 1000))
    signer = SessionSigner(token, now_ms, max_age_s)
    origins = frozenset(normalize_origin(origin) for origin in allowed_origins)

    def page(view: Callable[[Request, Session], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = signer.check(request.cookies.get(COOKIE_NAME))
            if session is None:
                return RedirectResponse(_base(request) + "/login", 303)
            return await view(request, session)

        return endpoint

    def action(view: Callable[[Request, Session], Awaitable[Response]]
               ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = signer.check(request.cookies.get(COOKIE_NAME))
            if session is None:
                return _error_page(request, 403, _SESSION_ENDED)
            refusal = _cross_site(request, origins)
            if refusal is not None:
                return _error_page(request, 403, refusal)
            form = await _form(request)
            if not signer.csrf_matches(session, form.get("csrf", "")):
                return _error_page(request, 403, "This form has expired: reload the page "
                                                 "and try again.")
            return await view(request, session)

        return endpoint

    async def login_form(request: Request) -> Response:
        if signer.check(request.cookies.get(COOKIE_NAME)) is not None:
            return RedirectResponse(_base(request) + "/", 303)
        return _render(request, "login.html", {"error": None})

    async def login(request: Request) -> Response:
        refusal = _cross_site(request, origins)
        if refusal is not None:
            return _error_page(request, 403, refusal)
        form = await _form(request)
        if not signer.token_matches(form.get("token", "")):
            return _render(request, "login.html", {"error": "That is not the token."}, 401)
        response = RedirectResponse(_base(request) + "/", 303)
        response.set_cookie(COOKIE_NAME, signer.issue(), max_age=signer.max_age_s,
                            path=_base(request) + "/", secure=request.url.scheme == "https",
                            httponly=True, samesite="strict")
        return response

    async def logout(request: Request, session: Session) -> Response:
        signer.revoke(session)  # the cookie is refused from now on, wherever it was copied
        response = RedirectResponse(_base(request) + "/login", 303)
        response.delete_cookie(COOKIE_NAME, path=_base(request) + "/",
                               secure=request.url.scheme == "https", httponly=True,
                               samesite="strict")
        return response

    async def overview(request: Request, session: Session) -> Response:
        rows, failed = await call_store(_overview, client, now_ms())
        return _render(request, "overview.html",
                       {"session": session, "rows": rows, "failed": failed})

    async def task_list(request: Request, session: Session) -> Response:
        filters = {key: request.query_params.get(key) or None
                   for key in ("queue", "status", "name")}
        if filters["status"] is not None and filters["status"] not in STATUSES:
            return _error_page(request, 400, f"There is no status {filters['status']!r}.",
                               session)
        before = request.query_params.get("before") or None
        if before is not None and not is_task_id(before):
            return _error_page(request, 404, "That page does not exist: start again from "
                                             "the first.", session)
        try:
            tasks = await call_store(lambda: client.list_tasks(
                limit=PAGE_SIZE, before_id=before, **filters))
        except UnknownTaskError:
            return _error_page(request, 404, "That page no longer exists: start again "
                                             "from the first.", session)
        except (TypeError, ValueError) as exc:
            return _error_page(request, 400, f"Those filters cannot match a task: {exc}",
                               session)
        return _render(request, "tasks.html", {
            "session": session, "tasks": tasks, "filters": filters,
            "next_page": _tasks_url(request, before=tasks[-1].id, **filters)
            if len(tasks) == PAGE_SIZE else None})

    async def task_page(request: Request, session: Session) -> Response:
        return await _task_page(request, session, client, notice=_NOTICES.get(
            request.query_params.get("done", "")))

    def task_action(verb: Callable[[str], Any], done: str
                    ) -> Callable[[Request, Session], Awaitable[Response]]:
        async def view(request: Request, session: Session) -> Response:
            task_id = request.path_params["task_id"]
            if not is_task_id(task_id):
                return _error_page(request, 404, "There is no such task.", session)
            try:
                await call_store(verb, task_id)
            except UnknownTaskError:
                return _error_page(request, 404, "There is no such task.", session)
            except (StorageBusyError, ServiceClosedError):
                raise  # the database cannot answer: 503 (_unavailable), not a conflict
            except TaskError as exc:
                return await _task_page(request, session, client, error=str(exc), status=409)
            return RedirectResponse(_task_url(request, task_id) + "?done=" + done, 303)

        return view

    routes = [
        Route("/", page(overview), methods=["GET"]),
        Route("/tasks", page(task_list), methods=["GET"]),
        Route("/tasks/{task_id}", page(task_page), methods=["GET"]),
        Route("/tasks/{task_id}/retry", action(task_action(client.retry_task, "retried")),
              methods=["POST"]),
        Route("/tasks/{task_id}/cancel", action(task_action(client.cancel, "cancelled")),
              methods=["POST"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", action(logout), methods=["POST"]),
        Route("/static/dashboard.css", _stylesheet, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_SessionGate, signer=signer)],
                     exception_handlers={ServiceClosedError: _unavailable,
                                         StorageBusyError: _unavailable})


class _SessionGate:
    """ASGI middleware: a request for any path but ``_PUBLIC_PATHS``
    without a valid session is answered before routing (a GET or HEAD is
    redirected to the login page, anything else refused with 403), so an
    unknown path says nothing before login either."""

    def __init__(self, app: ASGIApp, signer: SessionSigner) -> None:
        self.app = app
        self._signer = signer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope) not in _PUBLIC_PATHS:
            request = Request(scope, receive)
            if self._signer.check(request.cookies.get(COOKIE_NAME)) is None:
                response: Response
                if request.method in ("GET", "HEAD"):
                    response = RedirectResponse(_base(request) + "/login", 303)
                else:
                    response = _error_page(request, 403, _SESSION_ENDED)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The request's path below where the dashboard is mounted."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _overview(client: TaskClient, now: int) -> Tuple[List[QueueRow], List[TaskInfo]]:
    """The overview's queue rows and latest failures, read on a worker
    thread."""
    rows = []
    for name, counts in sorted(client.counts().items()):
        minute, hour, exact = _recent_completions(client, name, now)
        rows.append(QueueRow(name, {s: counts.get(s, 0) for s in STATUSES}, minute, hour, exact))
    return rows, client.list_tasks(status=TaskStatus.FAILED.value, limit=10)


def _recent_completions(client: TaskClient, queue: str, now: int) -> Tuple[int, int, bool]:
    """How many of ``queue``'s tasks completed in the last minute and hour
    (by ``finished_at_ms``), and whether that is exact: at most
    ``THROUGHPUT_SCAN`` of its newest completed tasks are read."""
    minute = hour = read = 0
    before: Optional[str] = None
    while read < THROUGHPUT_SCAN:
        limit = min(500, THROUGHPUT_SCAN - read)
        batch = client.list_tasks(queue=queue, status=TaskStatus.COMPLETED.value,
                                  limit=limit, before_id=before)
        for info in batch:
            finished = info.finished_at_ms or 0
            hour += finished >= now - 3_600_000
            minute += finished >= now - 60_000
        read += len(batch)
        if len(batch) < limit:
            return minute, hour, True
        before = batch[-1].id
    return minute, hour, False


async def _task_page(request: Request, session: Session, client: TaskClient, *,
                     notice: Optional[str] = None, error: Optional[str] = None,
                     status: int = 200) -> Response:
    task_id = request.path_params["task_id"]
    if not is_task_id(task_id):
        return _error_page(request, 404, "There is no such task.", session)
    try:
        info, callbacks = await call_store(
            lambda: (client.get(task_id), client.callbacks(task_id)))
    except UnknownTaskError:
        return _error_page(request, 404, "There is no such task (it may have been swept "
                                         "after its retention time).", session)
    return _render(request, "task.html", {
        "session": session, "task": info, "callbacks": callbacks, "notice": notice,
        "error": error}, status)


def _base(request: Request) -> str:
    """Where the dashboard is mounted (``/ui``, or deeper inside another
    app)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _task_url(request: Request, task_id: str) -> str:
    return f"{_base(request)}/tasks/{urllib.parse.quote(task_id, safe='')}"


def _tasks_url(request: Request, **filters: Optional[str]) -> str:
    query = urllib.parse.urlencode({k: v for k, v in filters.items() if v})
    return f"{_base(request)}/tasks" + (f"?{query}" if query else "")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str:
    """``origin`` (``scheme://host[:port]``, http or https, nothing after)
    as browsers send it in ``Origin``: lower case, the scheme's default port
    left out.  ``ValueError`` for anything else."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname
            or parts.username is not None or parts.password is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"an allowed origin must look like https://host or "
                         f"https://host:port, not {origin!r}")
    return _origin(parts.scheme, parts.hostname, port)


def _origin(scheme: str, host: str, port: Optional[int]) -> str:
    scheme, host = scheme.lower(), host.lower()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    shown_port = "" if port is None or port == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{host}{shown_port}"


def _own_origin(request: Request) -> Optional[str]:
    """The origin the request was sent to: its scheme, and the host and
    port its ``Host`` header names; None without a usable ``Host``."""
    host = request.headers.get("host")
    if not host:
        return None
    try:
        return normalize_origin(f"{request.url.scheme}://{host}")
    except ValueError:
        return None


def _cross_site(request: Request, allowed: "frozenset[str]") -> Optional[str]:
    """Why a POST is refused as coming from another site, or None: its
    ``Origin`` must be present and be the request's own origin (scheme,
    host and port) or one of ``allowed``."""
    given = request.headers.get("origin")
    own = _own_origin(request)
    try:
        origin = normalize_origin(given) if given else None
    except ValueError:
        origin = None
    if origin is not None and (origin == own or origin in allowed):
        return None
    expected = " or ".join(([own] if own else []) + sorted(allowed - {own}))
    return (f"This form was not sent from this dashboard's own page: it came from "
            f"{given or 'an unnamed origin'}, not {expected or 'this address'}. If a proxy "
            f"in front of the dashboard changes its address, start serve with "
            f"--allowed-origin set to the address the browser shows.")


async def _form(request: Request) -> Dict[str, str]:
    """The POSTed urlencoded form's fields (the first value of each); at
    most ``MAX_FORM_BYTES`` of it are read."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields: Dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(body.decode("utf-8", "replace")):
        fields.setdefault(key, value)
    return fields


def _render(request: Request, template: str, context: Dict[str, Any],
            status: int = 200) -> HTMLResponse:
    base = _base(request)
    context = {
        "base": base,
        "session": None,
        "statuses": STATUSES,
        "task_url": lambda task_id: _task_url(request, task_id),
        "tasks_url": lambda **filters: _tasks_url(request, **filters),
        **context,
    }
    html = _templates.get_template(template).render(context)
    return HTMLResponse(html, status, headers=_HEADERS)


def _error_page(request: Request, status: int, message: str,
                session: Optional[Session] = None) -> HTMLResponse:
    return _render(request, "error.html", {"session": session, "message": message,
                                           "status": status}, status)


async def _unavailable(request: Request, exc: Exception) -> Response:
    page = _error_page(request, 503, f"The task database cannot answer now ({exc}); "
                                     "reload in a moment.")
    page.headers["Retry-After"] = str(RETRY_AFTER_S)
    return page


async def _stylesheet(request: Request) -> Response:
    css = resources.files("callbackworker").joinpath("templates/dashboard.css").read_text("utf-8")
    return Response(css, media_type="text/css",
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


def _when(ms: Optional[int]) -> str:
    if ms is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d} UTC"


def _duration(start: Optional[int], end: Optional[int]) -> str:
    if start is None or end is None:
        return "—"
    seconds = max(0, end - start) / 1000
    if seconds < 60:
        return f"{seconds:.3f} s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=repr)


def _first_line(text: Optional[str]) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


def _shown_bytes(data: Optional[bytes]) -> str:
    if data is None:
        return "—"
    return data[:2000].decode("utf-8", "replace") + (" …" if len(data) > 2000 else "")


_templates.filters.update(when=_when, pretty=_pretty, first_line=_first_line,
                          shown_bytes=_shown_bytes)
_templates.globals.update(duration=_duration)
