"""The project's one exception hierarchy.

Every error carries a message that says what went wrong *and what to do next*. The CLI prints
`str(error)` without a traceback; the HTTP layer maps the class to a status code.
"""

from __future__ import annotations


class SafeRetrievalError(Exception):
    """Base class: an expected failure with a user-facing message."""

    exit_code = 2


class InputError(SafeRetrievalError):
    """The caller passed something unusable (empty text, bad option, unknown name)."""


class ImageError(InputError):
    """A file is not a decodable image, is truncated, or exceeds the pixel limit."""


class ArchitectureError(InputError):
    """An architecture name or config that neither open_clip nor our presets know."""


class ArtifactError(SafeRetrievalError):
    """An artifact directory is missing, incomplete, corrupt, or not an artifact at all."""


class CheckpointError(SafeRetrievalError):
    """A checkpoint's tensors do not fit the model (missing/unexpected keys, wrong shapes)."""


class DataError(SafeRetrievalError):
    """A dataset is missing, malformed, or a split ended up empty."""


class OutsideRootsError(InputError):
    """A file a job would read lies outside the allowed data roots once symlinks and ``..`` are resolved."""


class TrainingInterrupted(SafeRetrievalError):
    """SIGTERM/SIGINT arrived; the checkpoint was saved and the run can be resumed."""

    exit_code = 130


class OutOfMemory(SafeRetrievalError):
    """The accelerator ran out of memory."""

    exit_code = 3


def key_summary(keys: list[str] | set[str], limit: int = 5) -> str:
    """First few keys of a list, for error messages: 'a, b, c (+12 more)'."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
