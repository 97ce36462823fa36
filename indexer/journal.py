"""The journal of online changes to a collection: items added and taken down through the API, one JSON line each.

It is what makes an acknowledged write durable (invariant 8): the service appends a change here, fsync'd, before
it touches the store and before it answers, and replays the whole journal onto every generation it serves (at
start-up, and onto a job's staged generation at its commit), so a change survives a restart, a reindex, a retrain
and a forget. Replaying is idempotent (adds are upserts of content-addressed ids, takedowns are deletes), so a
change that reached the journal but not the store before a ``kill -9`` is applied once at the next start.

The takedowns in it are also the **takedown list**: ``index build|add --takedowns JOURNAL`` skip listed content (a
recorded failure), and the service refuses a new upload of it. Ids are the content ids of ``indexer.store``
(``sha256`` of the bytes or the text), so a listed image is recognised whatever its file name.

Lines are written whole: one ``os.write`` of the line on an ``O_APPEND`` descriptor, then ``fsync``; a write or
fsync that fails (a full disk) cuts the file back to its size before, so a change is in the journal whole or not at
all, and an incomplete last line (a crash mid-write, never acknowledged) is cut off when the journal is opened.
One process writes a journal (the service that runs jobs).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("safe_retrieval.journal")

ADD, TAKEDOWN = "add", "takedown"
FILE_MODE = 0o640


def whole_lines(fd: int) -> int:
    """The size of the file open at ``fd`` after cutting off an incomplete last line (a write a crash
    interrupted: never acknowledged, so never a record)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    os.ftruncate(fd, end)
    log.warning("cut an incomplete last line (%d bytes) off an append-only file (a write a crash interrupted)", size - end)
    return end


def append_line(fd: int, data: bytes, *, sync: bool = False) -> int:
    """Append ``data`` at the end of the file open at ``fd`` (``O_APPEND``), then ``fsync`` when ``sync``, and
    return the new size; or raise OSError having cut the file back to its size before: a short write or a failed
    fsync (a full disk) leaves no half line and no line the caller was told failed."""
    before = os.fstat(fd).st_size
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:])
        if sync:
            os.fsync(fd)
    except OSError:
        if written:
            with contextlib.suppress(OSError):  # if this fails too, the next open cuts the half line off
                os.ftruncate(fd, before)
        raise
    return before + written


def open_append(path: Path, mode: int = FILE_MODE, *, durable_name: bool = False) -> tuple[int, int]:
    """Open (creating it, and its folder) ``path`` for appending whole lines: ``(descriptor, size)``, the size after
    cutting off an incomplete last line. With ``durable_name`` a file this call creates has its directory entry
    fsync'd, so its name survives a crash as its lines do."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        size = whole_lines(fd)
        if new and durable_name:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError:
        os.close(fd)
        raise
    return fd, size


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class Journal:
    """The journal file of one collection, with the state it describes kept in memory.

    ``adds``: id -> the add entry of each item added online and not taken down since; ``takedowns``: id -> the
    takedown entry of each id taken down (the takedown list). Thread-safe.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.seq = 0
        self.adds: dict[str, dict[str, Any]] = {}
        self.takedowns: dict[str, dict[str, Any]] = {}
        for entry in read_entries(self.path):
            self._apply(entry)
        if self.path.exists():
            try:
                self._open()  # cuts an incomplete last line now, not at the next write
            except OSError as e:
                log.warning("the journal %s cannot be opened for writing (%s); writes will fail until it can", path, e)

    def _apply(self, entry: dict[str, Any]) -> None:
        self.seq = max(self.seq, int(entry.get("seq") or 0))
        pid = str(entry.get("id"))
        if entry.get("op") == ADD and pid not in self.takedowns:
            self.adds[pid] = entry
        elif entry.get("op") == TAKEDOWN:
            self.adds.pop(pid, None)
            self.takedowns.setdefault(pid, entry)

    def append(self, op: str, **fields: Any) -> dict[str, Any]:
        """Write one change (fsync'd) and apply it to the in-memory state; OSError when it could not be written
        (then nothing is written and nothing changes)."""
        with self._lock:
            entry = {"seq": self.seq + 1, "at": _now(), "op": op, **fields}
            data = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            try:
                fd = self._open() if self._fd is None else self._fd
                append_line(fd, data, sync=True)
            except OSError:
                self._reset()
                raise
            self._apply(entry)
            return entry

    def _open(self) -> int:
        self._fd, _ = open_append(self.path, durable_name=True)
        return self._fd

    def _reset(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._reset()


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The journal's entries in order; a missing file is an empty journal, an unreadable line is skipped (logged)
    and an incomplete last line (a crash mid-write) is not an entry."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines[:-1], 1):  # the part after the last newline was never a whole line
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            log.warning("skipping unreadable line %d of the journal %s", n, path)
            continue
        if isinstance(entry, dict) and entry.get("op") in (ADD, TAKEDOWN) and entry.get("id"):
            out.append(entry)
    return out


def taken_down(path: Path | None) -> frozenset[str]:
    """The ids on the takedown list of the journal at ``path`` (none without one)."""
    if path is None:
        return frozenset()
    return frozenset(str(e["id"]) for e in read_entries(path) if e["op"] == TAKEDOWN)
