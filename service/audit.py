"""The audit trail of privileged access: who saw unsafe content, when, and with what query.

A *privileged request* is one that presents a moderator token on the search, items, media and embed
routes (whether or not unsafe items came back, whatever its status: a malformed or oversized body
too), or the admin token on a job submission or cancel (token name ``admin``). Each leaves exactly
one record; ordinary requests and wrong tokens leave none. A record holds the time (UTC), the
token's name (never the token), method, route, response status, safety mode, the query (its text,
the image's sha256 or the item id), the ids of the unsafe items returned, the client address, and
for admin requests the job.

Records are JSON lines appended to ``AUDIT_DIR/audit.jsonl`` (default ``STATE_DIR/audit``), rotated by size to
``audit.jsonl.1`` (newest) ... ``audit.jsonl.N`` (oldest kept), and also emitted on the
``safe_retrieval.audit`` logger. The :class:`AuditTrail` middleware recognises the privileged caller
from the request's headers before anything else runs; routes (and ``service.searching``, through the
caller's ``service.deps.Caller.note``) only *note* what they did (:func:`note`). The middleware writes
the record when the response starts, so the client cannot see a response whose record is not written,
and a record that cannot be written turns the response into a 503 (fail closed: no unaudited access
to unsafe content). An action that must not happen unaudited (a job's start, a cancel) writes its
record first (:func:`record_now`): no record, no action. One action has no request of its own: a job's commit
that swaps in a model that missed its acceptance because its request said ``force`` writes one more record
(:func:`job_record`: the job, and as its query ``forced`` and the checks it missed) before it swaps; no record,
no swap.
A full disk costs 503s only while it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.journal import append_line, open_append
from service.errors import UnavailableError

ADMIN = "admin"
SCOPE_KEY = "safe_retrieval.audit"  # this request's notes, in the ASGI scope
FILE_NAME = "audit.jsonl"
FILE_MODE = 0o640  # moderators' queries: not for every user of the machine
log = logging.getLogger("safe_retrieval.audit")
service_log = logging.getLogger("safe_retrieval.service")


def now() -> str:
    """The records' time format: UTC, microseconds; strings of this form sort in time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def as_utc(when: datetime) -> str:
    """``when`` in the records' time format (a naive time is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


class AuditLog:
    """An append-only JSON-lines file rotated by size; thread-safe, one whole line per record.

    A record is one ``os.write`` of its whole line on an ``O_APPEND`` descriptor; a write that fails
    part-way (a full disk) is cut back to the last whole line, so the file never holds half a record,
    and the next write starts afresh: the log recovers by itself as soon as it can be written again.
    Only one process may write a log (one ``AUDIT_DIR`` per replica).
    """

    def __init__(self, directory: Path, *, max_bytes: int, keep: int):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        self._fd, self._size = open_append(self.path, FILE_MODE)
        return self._fd

    def _reset(self) -> None:
        """Forget the descriptor (the next write reopens the file, wherever this one stopped)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _rotate(self) -> int:
        self._reset()
        oldest = self.directory / f"{FILE_NAME}.{self.keep}"
        oldest.unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            older = self.directory / f"{FILE_NAME}.{n}"
            if older.exists():
                older.rename(self.directory / f"{FILE_NAME}.{n + 1}")
        self.path.rename(self.directory / f"{FILE_NAME}.1")
        return self._open()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (blocking; :meth:`awrite` from the event loop). OSError when it cannot be written."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode()
        with self._lock:
            try:
                fd = self._open() if self._fd is None else self._fd
                if self._size and self._size + len(data) > self.max_bytes:
                    fd = self._rotate()
                self._size = append_line(fd, data)
            except OSError:
                self._reset()
                raise
        log.info("%s", line.rstrip("\n"))

    async def awrite(self, record: dict[str, Any]) -> None:
        await asyncio.to_thread(self.write, record)

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        rotated = sorted(
            (p for p in self.directory.glob(f"{FILE_NAME}.*") if p.suffix[1:].isdigit()),
            key=lambda p: int(p.suffix[1:]), reverse=True,
        )
        return rotated + ([self.path] if self.path.exists() else [])

    def read(self, *, since: datetime | None = None, until: datetime | None = None, token: str | None = None,
             limit: int = 100) -> tuple[list[dict[str, Any]], bool]:
        """The newest ``limit`` records with ``since <= time < until`` (and of ``token``), oldest first.

        Returns ``(records, truncated)``; ``truncated`` says older matching records were left out
        (ask again with ``until`` = the first record's time). Blocking: call it from a worker thread.
        """
        # open every file under the lock (a rotation then cannot move records between our reads),
        # and read the current file only up to its size now (a line being appended is never half-read)
        with self._lock:
            handles = []
            for path in self.files():
                try:
                    handles.append((open(path, "rb"), os.path.getsize(path)))
                except FileNotFoundError:
                    continue
        low = as_utc(since).encode() if since is not None else None
        high = as_utc(until).encode() if until is not None else None
        mark = b'"token":' + json.dumps(token).encode() if token is not None else None
        newest_first: list[dict[str, Any]] = []
        try:
            # newest first, stopping at limit + 1 matches; cheap byte checks before a line is parsed
            for handle, size in reversed(handles):
                for line in reversed(handle.read(size).splitlines()):
                    when = line[9:41] if line.startswith(b'{"time":"') else None
                    if when is not None and ((low and when < low) or (high and when >= high)):
                        continue
                    if mark is not None and mark not in line:
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        service_log.warning("skipping an unreadable line in the audit log %s", handle.name)
                        continue
                    stamp = str(record.get("time", "")).encode()
                    if (low and stamp < low) or (high and stamp >= high) or (token and record.get("token") != token):
                        continue
                    newest_first.append(record)
                    if len(newest_first) > limit:
                        return newest_first[limit - 1 :: -1], True
            return newest_first[::-1], False
        finally:
            for handle, _ in handles:
                handle.close()

    def close(self) -> None:
        with self._lock:
            self._reset()


# ------------------------------------------------------------------ what the routes note
def privileged(request: Request, token_name: str) -> None:
    """Mark this request as privileged, by the token named ``token_name``: it will leave one record."""
    notes = request.scope.get(SCOPE_KEY)
    if notes is not None:
        notes["token"] = token_name


def is_privileged(request: Request) -> bool:
    return "token" in (request.scope.get(SCOPE_KEY) or {})


def note(request: Request, **fields: Any) -> None:
    """Add ``fields`` (query, safety, unsafe_ids, job) to this request's record; nothing for ordinary requests."""
    notes = request.scope.get(SCOPE_KEY)
    if notes is not None and "token" in notes:
        notes.update(fields)


async def note_query(request: Request, *, text: str | None = None, image: bytes | None = None,
                     item_id: str | None = None) -> None:
    """Note the query of a privileged request: its text, the image's sha256, or the item id."""
    if not is_privileged(request):
        return
    if text is not None:
        query: dict[str, Any] = {"text": text}
    elif image is not None:
        query = {"image_sha256": await run_in_threadpool(lambda: hashlib.sha256(image).hexdigest())}
    else:
        query = {"item_id": item_id}
    note(request, query=query)


# ------------------------------------------------------------------ the writer
REFUSED = ("the audit log cannot be written, so privileged requests are refused; free space on the disk of the audit "
           "directory (SAFE_RETRIEVAL_AUDIT_DIR, default STATE_DIR/audit) or make it writable: requests are served "
           "again as soon as it can be written")
_WRITTEN = "_written"  # in the notes: this request's record is written (never a second one)
_LOG_KEY = "safe_retrieval.audit_log"  # the AuditLog, in the ASGI scope (for record_now)


def _record(scope: Scope, notes: dict[str, Any], status: int) -> dict[str, Any]:
    route = getattr(scope.get("route"), "path", None) or notes.get("route") or scope.get("path")
    client = scope.get("client")
    record = {
        "time": now(),
        "token": notes["token"],
        "method": scope.get("method"),
        "route": route,
        "status": status,
        "safety": notes.get("safety"),
        "query": notes.get("query"),
        "unsafe_ids": list(notes.get("unsafe_ids") or []),
        "client": client[0] if client else None,
    }
    if "job" in notes:
        record["job"] = notes["job"]
    return record


def job_record(job_id: str, **what: Any) -> dict[str, Any]:
    """A record the service writes about a job on its own, with no request behind it (no method, route, status or
    client): the commit of a job whose new model missed its acceptance and was swapped in because the request said
    ``force``; ``what`` (``forced``, ``misses``) is its ``query``. The request's own record (``query.force``: true)
    was written when the job was submitted."""
    return {"time": now(), "token": ADMIN, "method": None, "route": None, "status": None, "safety": None,
            "query": what, "unsafe_ids": [], "client": None, "job": job_id}


def record_now(request: Request, status: int) -> None:
    """Write this privileged request's record now, with ``status`` (what its response will be), before an
    action that must not happen unaudited (a job's start, a cancel); the middleware then writes no second one.

    Blocking: call it from a worker thread. Raises UnavailableError (503) when the record cannot be written:
    the caller must then not act. Does nothing for an ordinary request.
    """
    notes = request.scope.get(SCOPE_KEY)
    audit: AuditLog | None = request.scope.get(_LOG_KEY)
    if notes is None or audit is None or "token" not in notes or notes.get(_WRITTEN):
        return
    try:
        audit.write(_record(request.scope, notes, status))
    except OSError:
        service_log.exception("could not write the audit record of %s %s", request.method, request.url.path)
        raise UnavailableError(REFUSED) from None
    notes[_WRITTEN] = True


#: who a request's record names, from its headers alone: ``(token name, route template)``, or None
Identify = Callable[[Scope], "tuple[str, str] | None"]


class AuditTrail:
    """ASGI middleware: one record per privileged request, written before its response starts.

    ``identify`` names the privileged caller from the request's headers before anything else runs, so a
    request refused before its route (a malformed body, one over the size limit) leaves its record too;
    routes may also mark their caller (:func:`privileged`).
    """

    def __init__(self, app: ASGIApp, audit: AuditLog, identify: Identify | None = None):
        self.app = app
        self.audit = audit
        self.identify = identify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        notes: dict[str, Any] = {}
        scope[SCOPE_KEY] = notes
        scope[_LOG_KEY] = self.audit
        found = self.identify(scope) if self.identify is not None else None
        if found is not None:
            notes["token"], notes["route"] = found
        refused = False

        async def audited(message: Message) -> None:
            nonlocal refused
            if refused:
                return  # the rest of a response replaced by the 503 below
            if message["type"] == "http.response.start" and "token" in notes and not notes.get(_WRITTEN):
                notes[_WRITTEN] = True
                try:
                    await self.audit.awrite(_record(scope, notes, message["status"]))
                except OSError:
                    service_log.exception("could not write the audit record of %s %s", scope.get("method"),
                                          scope.get("path"))
                    refused = True
                    response = JSONResponse({"error": "UnavailableError", "detail": REFUSED}, status_code=503,
                                            headers={"Retry-After": "5"})
                    await response(scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited)
        finally:
            if "token" in notes and not notes.get(_WRITTEN):  # an unhandled error: the 500 is sent outside this middleware
                notes[_WRITTEN] = True
                try:
                    await self.audit.awrite(_record(scope, notes, 500))
                except OSError:
                    service_log.exception("could not write the audit record of a failed request")
