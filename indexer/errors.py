"""The indexer's errors: subclasses of the project's one hierarchy (``training.errors``).

The service maps them by class: ``IndexNotFoundError`` -> 404, ``ModelMismatchError`` (and ``StorageModeError``) -> 409,
``IndexBusyError`` -> 409, ``StoreUnavailableError`` -> 503 (``StoreFullError`` -> 507).
"""

from __future__ import annotations

from training.errors import InputError, SafeRetrievalError


class IndexNotFoundError(InputError):
    """No index (or no complete generation) of that name exists."""


class ModelMismatchError(SafeRetrievalError):
    """The index was built with a different model than the one asked to search it."""


class StorageModeError(ModelMismatchError):
    """The index was built with another storage mode than the one the reader was configured to expect."""


class IndexBusyError(SafeRetrievalError):
    """Another build holds the index's lock, or another process holds its embedded shard open."""


class StoreUnavailableError(SafeRetrievalError):
    """The Qdrant server did not answer after bounded retries, or the store refused an operation."""


class StoreFullError(StoreUnavailableError):
    """The disk holding an embedded shard has too little room for a write: refused before the engine tries it."""


class JobInterrupted(SafeRetrievalError):
    """Ctrl-C during an indexing job: partial work is kept for a resume."""

    exit_code = 130
