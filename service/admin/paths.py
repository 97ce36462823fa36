"""Paths in admin requests, confined to the data roots, and the command-line arguments that carry them into a job.

Every path a request names is checked here before a job exists (:func:`resolve_under_roots`); the files a job then
finds inside (manifest rows, symlinks, a ViSU layout) are confined by the job itself: every command gets
``--data-root`` for each root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ForbiddenError
from service.schemas import IndexSource
from training.errors import InputError

if TYPE_CHECKING:
    from training.data.roots import DataRoots


def resolve_under_roots(text: str, roots: list[Path], *, what: str = "path") -> Path:
    """A path from a request, refused unless it lies under one of ``roots`` (no ``..``, no symlink escape).

    Relative paths are taken relative to the first root under which they exist (else the first root).
    A name the OS refuses (a component over 255 bytes, a symlink loop) is an InputError (400), not a crash.
    The files a job then finds inside (manifest rows, symlinks in a folder, a ViSU layout) are confined
    by the job itself: every command gets ``--data-root`` for each root.
    """
    if not roots:
        raise ForbiddenError("no data roots are configured; set SAFE_RETRIEVAL_DATA_ROOTS to allow job paths")
    shown = repr(text if len(text) <= 200 else text[:200] + "...")
    if "\x00" in text:
        raise InputError(f"{what} contains a NUL byte")
    raw = Path(text)
    if ".." in raw.parts:
        raise InputError(f"{what} {shown} contains '..'; give a path under the data roots")
    try:
        resolved_roots = [r.resolve() for r in roots]
        if raw.is_absolute():
            candidates = [raw.resolve()]
        else:
            candidates = [(root / raw).resolve() for root in resolved_roots]
            existing = [c for c in candidates if c.exists()]
            candidates = existing[:1] or candidates[:1]
        path = candidates[0]
        inside = any(path == root or path.is_relative_to(root) for root in resolved_roots)
        exists = inside and path.exists()
    except (OSError, RuntimeError) as e:  # ENAMETOOLONG from stat, "Symlink loop" from resolve
        why = e.strerror if isinstance(e, OSError) and e.strerror else "a symlink loop" if isinstance(e, RuntimeError) else e
        raise InputError(f"{what} {shown} cannot be used ({why}); give a plain path under the data roots") from e
    if not inside:
        allowed = ", ".join(str(r) for r in resolved_roots)
        raise InputError(f"{what} {shown} is outside the data roots ({allowed})")
    if not exists:
        raise InputError(f"{what} {shown} does not exist under the data roots")
    return path


def data_root_args(roots: list[Path]) -> list[str]:
    """``--data-root`` for each root: the job reads no file outside them, whatever a manifest or symlink says.

    A configured root that does not exist holds no file, so leaving it out confines as much; at least one
    exists, as every job path was found under one.
    """
    return [arg for root in roots if os.path.isdir(root) for arg in ("--data-root", str(root))]


def confined(roots: list[Path]) -> "DataRoots":
    """The existing ``roots`` as the training code's confinement (a configured root that does not exist holds no file)."""
    from training.data.roots import DataRoots as Roots

    return Roots.of([r for r in roots if os.path.isdir(r)])




def store_args(*, qdrant_url: str | None, index_root: Path) -> list[str]:
    """Where ``index build`` writes: the Qdrant server, or the embedded store's root.

    The server's API key travels in the environment (``SAFE_RETRIEVAL_QDRANT_API_KEY``), never on
    a command line that job records and ``ps`` would show.
    """
    return ["--qdrant-url", qdrant_url] if qdrant_url else ["--root", str(index_root)]


def source_args(source: IndexSource, roots: list[Path], default_media_root: Path | None) -> list[str]:
    """``index build`` arguments for a source, every path checked against the data roots."""
    args: list[str] = []
    if source.images is not None:
        args += ["--images", str(resolve_under_roots(source.images, roots, what="source.images"))]
    elif source.manifest is not None:
        args += ["--manifest", str(resolve_under_roots(source.manifest, roots, what="source.manifest"))]
    else:
        assert source.visu is not None and source.split is not None  # IndexSource's validator: exactly one source
        args += ["--visu", str(resolve_under_roots(source.visu, roots, what="source.visu")), "--split", source.split]
    if source.captions:
        args.append("--captions-as-text")
    if source.texts is not None:
        args += ["--texts", str(resolve_under_roots(source.texts, roots, what="source.texts"))]
    if source.media_root is not None:
        args += ["--media-root", str(resolve_under_roots(source.media_root, roots, what="source.media_root"))]
    elif default_media_root is not None:
        args += ["--media-root", str(default_media_root)]
    return args + data_root_args(roots)
