"""The exception handlers: every error becomes a JSON body ``{error, detail}`` with its status, never a trace.

Project errors map to 4xx/5xx by :func:`service.errors.status_for` (503 with ``Retry-After``, 401 with
``WWW-Authenticate``); validation errors list where and why without echoing the input; anything
unexpected is a 500 whose details go to the server log only.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ConflictError, status_for
from training.errors import SafeRetrievalError

log = logging.getLogger("safe_retrieval.service")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (the 503 handler reads ``app.state.settings`` for Retry-After)."""
    app.add_exception_handler(SafeRetrievalError, _on_project_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)


def _error_response(status: int, name: str, detail: Any, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": name, "detail": detail, **extra}, status_code=status, headers=headers)


async def _on_project_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    headers = None
    extra: dict[str, Any] = {}
    if status == 503:
        headers = {"Retry-After": str(max(1, round(getattr(exc, "retry_after", 0) or request.app.state.settings.store_retry_s)))}
    if isinstance(exc, ConflictError) and exc.job_id:
        extra["job_id"] = exc.job_id
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return _error_response(status, exc.__class__.__name__, str(exc), headers, **extra)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError), "install() registers this handler for that class only"
    # no "input"/"ctx": they can echo megabytes of the request back
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return _error_response(422, "ValidationError", errors)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    name = "TooLargeError" if exc.status_code == 413 else "HTTPError"
    return _error_response(exc.status_code, name, exc.detail, dict(exc.headers) if exc.headers else None)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(500, "InternalError", "internal error; the server log has the details")
