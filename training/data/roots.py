"""Data roots: the directories a job may read files from, checked on real paths when a file is opened.

An operator's own CLI run names no roots and reads whatever it is told (``DataRoots()`` confines
nothing). The service's jobs always pass its ``SAFE_RETRIEVAL_DATA_ROOTS`` (``--data-root``), so a
manifest row with an absolute or ``../`` path, a symlink inside an image folder or a ViSU layout
pointing elsewhere can make a job neither read a file outside them nor store such a path.

The check that counts is made on the file actually opened (``/proc/self/fd``), not on the name
listed earlier: a symlink swapped between listing and reading is caught too.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from training.errors import InputError, OutsideRootsError

_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open


def real_path(path: str | Path, *, what: str = "path") -> Path:
    """``path`` with every symlink and ``..`` resolved (it need not exist); InputError when the OS refuses the name."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop
        raise InputError(f"{what} {str(path)[:200]!r} cannot be resolved ({_why(e)}); give a plain existing path") from e


def _why(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


@dataclass(frozen=True)
class DataRoots:
    """The real paths of the allowed directories; empty means no confinement."""

    dirs: tuple[Path, ...] = ()

    @classmethod
    def of(cls, paths: Iterable[str | Path] | None) -> "DataRoots":
        """Roots from option values; each must be an existing directory."""
        dirs = []
        for p in paths or ():
            real = real_path(p, what="data root")
            if not real.is_dir():
                raise InputError(f"data root {p} is not a directory; give existing directories to --data-root")
            dirs.append(real)
        return cls(tuple(dirs))

    def __bool__(self) -> bool:
        return bool(self.dirs)

    def contains(self, real: Path) -> bool:
        """Whether a real (already resolved) path lies in a root; always true without roots."""
        return not self.dirs or any(real == d or real.is_relative_to(d) for d in self.dirs)

    def outside(self, path: str | Path, *, what: str = "file") -> OutsideRootsError:
        return OutsideRootsError(
            f"{what} {path} lies outside the data roots ({', '.join(map(str, self.dirs))}) once symlinks and '..' "
            "are resolved; move or copy it under a data root")

    def check(self, path: str | Path, *, what: str = "path") -> Path:
        """The real path of ``path``, refused (OutsideRootsError) unless it lies under a root."""
        real = real_path(path, what=what)
        if not self.contains(real):
            raise self.outside(path, what=what)
        return real

    def read(self, path: str | Path, *, what: str = "file") -> tuple[bytes, Path]:
        """The bytes of the regular file ``path`` and the real path of what was opened (errors as :meth:`open`)."""
        f, real, _ = self.open(path, what=what)
        with f:
            return f.read(), real

    def open(self, path: str | Path, *, what: str = "file") -> tuple[BinaryIO, Path, int]:
        """The regular file ``path`` opened for reading (the caller closes it), its real path and its size.

        Raises OutsideRootsError when the opened file lies outside the roots, and OSError (with
        ``filename``) when it cannot be opened or is not a regular file (a directory, a FIFO, a device).
        """
        try:
            fd = os.open(path, _FLAGS)
        except ValueError as e:  # a NUL byte in a manifest row
            raise OSError(errno.EINVAL, "the name contains a NUL byte", str(path)) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
                raise OSError(code, "is a directory" if code == errno.EISDIR else "not a regular file", str(path))
            real = _opened(fd, path)
            if not self.contains(real):
                raise self.outside(path, what=what)
            f = os.fdopen(fd, "rb", closefd=True)
            fd = -1
            return f, real, st.st_size
        finally:
            if fd >= 0:
                os.close(fd)


def _opened(fd: int, path: str | Path) -> Path:
    """The real path of an open file: the kernel's own record on Linux, else the resolved name."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path(os.path.realpath(path))
