"""Request dependencies as ``Annotated`` aliases: settings, services, the admin gate and the caller's role.

Routes take what they need from these (``ServicesDep``, ``SettingsDep``, ``CallerDep``); only this
module reads ``app.state``.

Tokens are compared in constant time: each is hashed to a fixed length and compared with
:func:`secrets.compare_digest`, and every configured moderator token is checked (no early exit), so
timing tells neither a token's content nor which moderator matched. A role whose token is not
configured is switched off (403, saying which variable to set); a missing or wrong token is 401.
Error messages never name a moderator.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import audit
from service.errors import ForbiddenError, UnauthorizedError
from service.settings import Settings
from service.state import Services

_bearer = HTTPBearer(auto_error=False, description="Bearer token (admin or moderator).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
# OpenAPI: a route that works with or without a token (the empty requirement is "anonymous")
TOKEN_OPTIONAL: dict[str, Any] = {"security": [{}]}


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_services(request: Request) -> Services:
    return request.app.state.services


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _matches(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return secrets.compare_digest(_digest(given), _digest(expected))


def moderator_name(settings: Settings, given: str | None) -> str | None:
    """The name of the moderator whose token is ``given``, or None; every token is compared."""
    if not given:
        return None
    digest = _digest(given)
    found = None
    for name, token in settings.moderators().items():
        hit = secrets.compare_digest(digest, _digest(token))
        found = name if hit else found
    return found


def admin_matches(settings: Settings, given: str | None) -> bool:
    """Whether ``given`` is the configured admin token (constant time); False while none is configured."""
    expected = settings.token("admin")
    return expected is not None and _matches(given, expected)


def check_admin(settings: Settings, given: str | None) -> None:
    """Raise 403 when no admin token is configured, 401 when ``given`` is missing or wrong."""
    expected = settings.token("admin")
    if expected is None:
        raise ForbiddenError("admin access is disabled on this server; set SAFE_RETRIEVAL_ADMIN_TOKEN to enable it")
    if not _matches(given, expected):
        what = "missing" if given is None else "wrong"
        raise UnauthorizedError(f"admin token {what}; send 'Authorization: Bearer <SAFE_RETRIEVAL_ADMIN_TOKEN>'")


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    check_admin(settings, credentials.credentials if credentials else None)


def audited_admin(request: Request, _: Annotated[None, Depends(require_admin)]) -> None:
    """The admin gate of routes that change things (job submissions, cancels): one audit record each."""
    audit.privileged(request, audit.ADMIN)


def takedown_caller(request: Request, settings: SettingsDep, credentials: Credentials) -> str:
    """Who takes an item down: ``admin`` (the admin token) or the moderator whose token it is; 401 for any other
    token or none, 403 when neither role is configured. The request leaves one audit record in that name."""
    given = credentials.credentials if credentials else None
    name = audit.ADMIN if admin_matches(settings, given) else moderator_name(settings, given)
    if name is None:
        if settings.token("admin") is None and not settings.moderators():
            raise ForbiddenError("taking items down needs the admin or a moderator token, and neither is configured on "
                                 "this server; set SAFE_RETRIEVAL_ADMIN_TOKEN or SAFE_RETRIEVAL_MODERATOR_TOKEN")
        what = "missing" if given is None else "wrong"
        raise UnauthorizedError(f"taking an item down needs the admin or a moderator token: token {what}; send "
                                "'Authorization: Bearer <token>'")
    audit.privileged(request, name)
    return name


TakedownCallerDep = Annotated[str, Depends(takedown_caller)]


class Caller:
    """Who is asking: an ordinary caller, or a named moderator (a valid moderator token).

    It also carries the request's audit notes (:meth:`note`, :meth:`note_query`), so code past the
    route records what a privileged request did without holding the request; for ordinary callers
    (and without a request) noting does nothing.
    """

    def __init__(self, settings: Settings, credentials: HTTPAuthorizationCredentials | None,
                 request: Request | None = None):
        self.settings = settings
        self.given = credentials.credentials if credentials else None
        self.moderator = moderator_name(settings, self.given)
        self.request = request

    @property
    def is_moderator(self) -> bool:
        return self.moderator is not None

    def require_moderator(self, why: str) -> None:
        """Raise unless the caller is a moderator; ``why`` names what needed it."""
        if self.is_moderator:
            return
        if not self.settings.moderators():
            raise ForbiddenError(f"{why} needs a moderator token, and moderator access is disabled on this server; "
                                 "set SAFE_RETRIEVAL_MODERATOR_TOKEN (or _TOKENS / _TOKENS_FILE) to enable it")
        what = "missing" if self.given is None else "wrong"
        raise UnauthorizedError(f"{why} needs the moderator token: moderator token {what}; "
                                "send 'Authorization: Bearer <your moderator token>'")

    def note(self, **fields: Any) -> None:
        """Add ``fields`` (safety, unsafe_ids, ...) to this request's audit record."""
        if self.request is not None:
            audit.note(self.request, **fields)

    async def note_query(self, *, text: str | None = None, image: bytes | None = None,
                         item_id: str | None = None) -> None:
        """Note this request's query (its text, the image's sha256, or the item id) in its audit record."""
        if self.request is not None:
            await audit.note_query(self.request, text=text, image=image, item_id=item_id)


def get_caller(request: Request, settings: SettingsDep, credentials: Credentials) -> Caller:
    caller = Caller(settings, credentials, request)
    if caller.moderator is not None:
        audit.privileged(request, caller.moderator)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]
