"""The ASGI middlewares: the body limit, the request counter and the admin gate (the audit trail's
writer, :class:`service.audit.AuditTrail`, lives with the audit log it writes).

``create_app`` adds them so that they run in this order: ``BodyLimit`` (413 before anything reads a
byte), ``RequestMetrics``, CORS, ``AdminGate``, ``AuditTrail`` (innermost: it reads the matched route).

FastAPI validates a route's body before its dependencies can refuse the caller, so an unauthenticated
request with a bad body would learn 400/422 (and cost a parse of up to the body limit) instead of 401.
The gate checks the admin token from the headers alone, before any byte of the body is read; the
routes keep their own check (and their OpenAPI security) behind it.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import check_admin
from service.errors import ForbiddenError, TooLargeError, UnauthorizedError
from service.metrics import Metrics
from service.settings import Settings

ADMIN_PREFIX = "/v1/admin"


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), or None."""
    for key, value in scope.get("headers") or []:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class AdminGate:
    """401/403 for /v1/admin/* without the admin token, decided before the body is read."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix: the routes see the path after it
            path = path[len(root):]
        if scope["type"] == "http" and (path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")):
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
