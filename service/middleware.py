"""ASGI middleware that must act before a route reads the request: the admin gate.

FastAPI validates a route's body before its dependencies can refuse the caller, so an unauthenticated
request with a bad body would learn 400/422 (and cost a parse of up to the body limit) instead of 401.
The gate checks the admin token from the headers alone, before any byte of the body is read; the
routes keep their own check (and their OpenAPI security) behind it.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import check_admin
from service.errors import ForbiddenError, UnauthorizedError
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
