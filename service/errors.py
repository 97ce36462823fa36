"""Errors the HTTP layer adds to the project's hierarchy, and the status code of every error class.

The handlers in ``service.handlers`` turn any :class:`SafeRetrievalError` into a JSON body
``{"error": CLASS, "detail": MESSAGE}`` with the status below; nothing else reaches a client, so no
response carries a stack trace.
"""

from __future__ import annotations

from indexer.errors import IndexBusyError, IndexNotFoundError, ModelMismatchError, StoreFullError, StoreUnavailableError
from training.errors import (
    ArchitectureError,
    ArtifactError,
    CheckpointError,
    DataError,
    ImageError,
    InputError,
    SafeRetrievalError,
)


class NotFoundError(InputError):
    """An item, job or file that does not exist (404)."""


class UnauthorizedError(SafeRetrievalError):
    """A token is needed and was missing or wrong (401)."""


class ForbiddenError(SafeRetrievalError):
    """The action is switched off on this server, e.g. no token is configured for it (403)."""


class ConflictError(SafeRetrievalError):
    """Another job is running (409); ``job_id`` names it."""

    def __init__(self, message: str, job_id: str | None = None):
        super().__init__(message)
        self.job_id = job_id


class UnavailableError(SafeRetrievalError):
    """The model or the vector store is not ready (503, with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


class TooLargeError(InputError):
    """The request body is over the configured limit (413)."""


class StorageFullError(SafeRetrievalError):
    """A write the service could not make durable (a full disk, a read-only state volume): nothing was written (507)."""


class UnprocessableError(InputError):
    """A well-formed request the server cannot act on: a concept the dataset does not know, a method the
    served model's geometry does not allow (422, as a body that fails validation)."""


# Most specific first: the first class an error is an instance of decides its status.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (NotFoundError, 404),
    (IndexNotFoundError, 404),
    (TooLargeError, 413),
    (UnprocessableError, 422),
    (ImageError, 400),
    (ArchitectureError, 400),
    (InputError, 400),
    (DataError, 400),
    (UnauthorizedError, 401),
    (ForbiddenError, 403),
    (ConflictError, 409),
    (ModelMismatchError, 409),
    (IndexBusyError, 409),
    (UnavailableError, 503),
    (StorageFullError, 507),
    (StoreFullError, 507),
    (StoreUnavailableError, 503),
    (ArtifactError, 500),
    (CheckpointError, 500),
    (SafeRetrievalError, 500),
)


def status_for(error: BaseException) -> int:
    """HTTP status of ``error`` (500 for anything unexpected)."""
    for cls, code in STATUS:
        if isinstance(error, cls):
            return code
    return 500
