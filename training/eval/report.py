"""What every evaluation report does alike: name its rows, check and load the artifacts one at a time, write files.

A report's rows are labelled by the artifact directories' names (``a``, or ``a#1`` and ``a#2`` when two
share a name) unless the caller gives labels; a printed row also names the method that made the
artifact (``ga (after)``). Artifacts are checked (their config read) before any embedding work, so a
wrong path fails at once, and loaded one at a time, so a comparison of ten ViT-L models holds one.
Every file goes through a temporary sibling and a rename: a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from training.errors import InputError

T = TypeVar("T")


def labels(paths: Sequence[Path]) -> list[str]:
    """Row labels: each artifact directory's name, numbered where names repeat."""
    names = [Path(p).name or str(p) for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def row_label(name: str, method: str | None) -> str:
    """How a printed table names a row: ``method (name)``, or the name alone when they agree or nothing made it."""
    return f"{method} ({name})" if method and method != name else name


def check_models(models: Sequence[Path], names: Sequence[str] | None, *, hint: str) -> list[dict[str, Any]]:
    """Every artifact's config (a wrong path fails here, before any work), after checking there is one label per model.

    ``hint`` says how to name the artifacts when none is given.
    """
    # loaded here: the CLI imports this module only to run an evaluation
    from training import artifact

    if not models:
        raise InputError(hint)
    if names is not None and len(names) != len(models):
        raise InputError(f"{len(names)} labels for {len(models)} models; give one label per model")
    return [artifact.read_config(p) for p in models]


def for_each_artifact(models: Sequence[Path], names: Sequence[str], measure: Callable[[str, Path, Any], T], *,
                      device: str = "auto") -> list[T]:
    """``measure(name, path, loaded artifact)`` for every model in turn, one model in memory at a time."""
    import torch

    from training import artifact

    out = []
    for name, path in zip(names, models, strict=True):
        art = artifact.load(path, device=device)
        out.append(measure(name, path, art))
        del art
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary sibling of ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is as readable as any other output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))
