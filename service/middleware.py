"""The ASGI middlewares: the body limit, the request counter, the admin gate, and who the audit trail
names (the audit trail's writer, :class:`service.audit.AuditTrail`, lives with the audit log it writes).

``create_app`` adds them so that they run in this order: ``RequestMetrics`` (it counts what the client
gets, a 413 or the audit trail's 503 included), ``AuditTrail`` (before anything can refuse a privileged
request: every one leaves its record, a 413 decided from Content-Length too), ``BodyLimit`` (413
before anything reads a byte), CORS, ``AdminGate``.

FastAPI validates a route's body before its dependencies can refuse the caller, so an unauthenticated
request with a bad body would learn 400/422 (and cost a parse of up to the body limit) instead of 401.
The gate checks the admin token from the headers alone, before any byte of the body is read; the
routes keep their own check (and their OpenAPI security) behind it. :class:`AuditedCaller` likewise
tells a privileged request from its method, path and token alone, so the audit trail knows it before
any body is read or any route runs.
"""

from __future__ import annotations

from typing import Iterable

from fastapi import HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import audit
from service.deps import admin_matches, audited_admin, check_admin, get_caller, moderator_name, takedown_caller
from service.errors import ForbiddenError, TooLargeError, UnauthorizedError
from service.metrics import Metrics
from service.settings import Settings

ADMIN_PREFIX = "/v1/admin"
#: (method, path) of the other routes only the admin token may call: adding items
ADMIN_WRITES = {("POST", "/v1/items"), ("POST", "/v1/items/upload")}


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), or None; read as
    FastAPI's ``HTTPBearer`` reads it for the routes, so the gate and the audit trail see the routes' token."""
    for key, value in scope.get("headers") or []:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def route_path(scope: Scope) -> str:
    """The path the routes match: after the ``root_path`` the app is mounted under."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _depends_on(dependant: Dependant, call: object) -> bool:
    return dependant.call is call or any(_depends_on(d, call) for d in dependant.dependencies)


class AuditedCaller:
    """Who a privileged request's audit record names, from its method, path and bearer token alone.

    A request to a route that takes the caller (``deps.CallerDep``: search, upload, embed, items, media)
    with a moderator token is that moderator's, whatever its method or body; a request to a route behind
    ``deps.audited_admin`` (job submissions, cancels) with its method and the admin token is ``admin``'s.
    Tokens are compared as the routes compare them (constant time, every moderator token). Returns
    ``(token name, route template)`` or None.
    """

    def __init__(self, settings: Settings, routes: Iterable[BaseRoute]):
        self.settings = settings
        api = [r for r in routes if isinstance(r, APIRoute)]
        self.moderated = [r for r in api if _depends_on(r.dependant, get_caller)]
        self.admin = [r for r in api if _depends_on(r.dependant, audited_admin)]
        self.takedowns = [r for r in api if _depends_on(r.dependant, takedown_caller)]

    def __call__(self, scope: Scope) -> tuple[str, str] | None:
        token = bearer_token(scope)
        if token is None:
            return None
        path = route_path(scope)
        for route in self.takedowns:  # before the moderated routes: DELETE /v1/items/{id} shares GET's path
            if route.path_regex.match(path) and scope.get("method") in (route.methods or ()):
                name = audit.ADMIN if admin_matches(self.settings, token) else moderator_name(self.settings, token)
                return (name, route.path) if name is not None else None
        for route in self.moderated:
            if route.path_regex.match(path):
                name = moderator_name(self.settings, token)
                return (name, route.path) if name is not None else None
        for route in self.admin:
            if route.path_regex.match(path) and scope.get("method") in (route.methods or ()):
                return (audit.ADMIN, route.path) if admin_matches(self.settings, token) else None
        return None


class AdminGate:
    """401/403 for /v1/admin/* and the item uploads (``ADMIN_WRITES``) without the admin token, decided before the
    body is read."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)  # mounted under a prefix: the routes see the path after it
        admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/") or (scope.get("method"), path) in ADMIN_WRITES
        if scope["type"] == "http" and admin:
            try:
                check_admin(self.settings, bearer_token(scope))
            except (UnauthorizedError, ForbiddenError) as e:
                status = 401 if isinstance(e, UnauthorizedError) else 403
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = JSONResponse({"error": e.__class__.__name__, "detail": str(e)}, status_code=status,
                                        headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over ``max_bytes``: declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_json(send, 400, {"error": "InputError", "detail": "Content-Length is not a number"})
                return
            if size > self.max_bytes:
                await _send_json(send, 413, _too_large(self.max_bytes))
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions met while reading the body; the handler makes it JSON
                    raise HTTPException(413, _too_large(self.max_bytes)["detail"])
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> dict[str, str]:
    return {"error": TooLargeError.__name__,
            "detail": f"request body over {limit} bytes; send a smaller image (SAFE_RETRIEVAL_MAX_BODY_BYTES sets the limit)"}


async def _send_json(send: Send, status: int, body: dict) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class RequestMetrics:
    """Counts responses by route template and status (unmatched paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()
