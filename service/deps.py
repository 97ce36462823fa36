"""Request dependencies as ``Annotated`` aliases: settings, services, the admin gate and the caller's role.

Tokens are compared with :func:`secrets.compare_digest` so their content cannot be guessed by timing.
A role whose token is not configured is switched off (403, saying which variable to set); a missing
or wrong token is 401.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ForbiddenError, UnauthorizedError
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="Bearer token (admin or moderator).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_services(request: Request):
    return request.app.state.services


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _matches(credentials: HTTPAuthorizationCredentials | None, expected: str) -> bool:
    if credentials is None or not credentials.credentials:
        return False
    return secrets.compare_digest(credentials.credentials.encode(), expected.encode())


def check_token(settings: Settings, credentials: HTTPAuthorizationCredentials | None, role: Literal["admin", "moderator"]) -> None:
    """Raise 403 when ``role`` has no token configured, 401 when the caller's token is missing or wrong."""
    expected = settings.token(role)
    variable = f"SAFE_RETRIEVAL_{role.upper()}_TOKEN"
    if expected is None:
        raise ForbiddenError(f"{role} access is disabled on this server; set {variable} to enable it")
    if not _matches(credentials, expected):
        what = "missing" if credentials is None else "wrong"
        raise UnauthorizedError(f"{role} token {what}; send 'Authorization: Bearer <{variable}>'")


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    check_token(settings, credentials, "admin")


class Caller:
    """Who is asking: an ordinary caller, or a moderator (valid moderator token)."""

    def __init__(self, settings: Settings, credentials: HTTPAuthorizationCredentials | None):
        self.settings = settings
        self.credentials = credentials
        expected = settings.token("moderator")
        self.is_moderator = expected is not None and _matches(credentials, expected)

    def require_moderator(self, why: str) -> None:
        """Raise unless the caller is a moderator; ``why`` names what needed it."""
        if not self.is_moderator:
            try:
                check_token(self.settings, self.credentials, "moderator")
            except (ForbiddenError, UnauthorizedError) as e:
                raise type(e)(f"{why} needs the moderator token: {e}") from None


def get_caller(settings: SettingsDep, credentials: Credentials) -> Caller:
    return Caller(settings, credentials)


AdminDep = Annotated[None, Depends(require_admin)]
CallerDep = Annotated[Caller, Depends(get_caller)]
