"""Index generations: ``NAME@<timestamp>`` copies of an index, an atomic switch, pruning, a build lock.

A build writes a new generation and, only once it is complete and optimized, switches ``NAME`` to
it (or, with ``--no-switch``, leaves it staged for the service to switch when it accepts the job).
Readers holding an older generation keep working until they reopen; generations beyond ``--keep N``
are pruned, but never the current one nor one that a live service *pins* as the generation it
serves: once the pointer has moved twice the served generation is no longer among the newest, and
only the pin keeps it. Two homes, one interface (``Generations``): ``LocalGenerations`` here, and
``ServerGenerations`` beside the Qdrant client it needs (``indexer.server_store``).

Embedded (Qdrant Edge)::

    ROOT/NAME/
      CURRENT              the current generation's name; replaced by write-temp + os.replace (atomic)
      .lock                flock()ed by the one build/add/delete at work; the kernel drops it if that dies
      .pin-HOST-PID        the generation that serving process serves; dead once that pid is gone
      NAME@20250101T120000123456Z/
        meta.json          the index record (below); written atomically
        shard/             the EdgeShard directory
        failures.jsonl     items that could not be indexed, one JSON object per line
        progress.json      live counters of a running job

Server (Qdrant): generation = collection ``NAME@<timestamp>``, ``NAME`` = a collection alias switched
in one atomic alias request, the record = the collection's metadata, the lock = a collection
``NAME@lock`` (creating a collection that exists fails on the server, so it is a test-and-set), a
pin = a collection ``NAME@pin-HOST-PID`` whose metadata names the generation and an expiry that the
service renews (a server cannot see whether a pid on another machine lives, so a pin is a lease);
failures and progress files go to ``ROOT/NAME/NAME@<timestamp>/`` on the machine that runs the job.

The record (``meta.json`` / collection metadata): ``name, generation, state ("building" |
"complete"), fingerprint, geometry, curvature, dim, bounds, thresholds, sources, created_at,
completed_at, points``.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import socket
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import AbstractSet, Any, Iterator

from indexer.edge_store import EdgeStore
from indexer.errors import IndexBusyError, IndexNotFoundError
from indexer.store import Schema, VectorStore
from training.errors import InputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GEN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})@(?P<ts>\d{8}T\d{12}Z)$")
CURRENT = "CURRENT"
LOCK = ".lock"
META = "meta.json"
SHARD = "shard"
FAILURES = "failures.jsonl"
PROGRESS = "progress.json"
DEFAULT_KEEP = 2
PIN_PREFIX = ".pin-"
PIN_TTL_S = 600.0  # a server pin not renewed for this long belongs to a dead service


def pin_holder() -> str:
    """This process's pin name: host and pid (letters, digits, ``.``, ``_``, ``-`` only)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (/proc, clock ticks since boot): with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def check_name(name: str) -> str:
    """Validate an index name (letters, digits, ``._-``; it becomes a directory and a collection alias)."""
    if not NAME_RE.match(name or ""):
        raise InputError(f"invalid index name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    return name


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_generation_name(name: str, taken: AbstractSet[str] = frozenset()) -> str:
    """``NAME@<UTC timestamp to the microsecond>``: names sort in creation order."""
    t = _dt.datetime.now(_dt.timezone.utc)
    while True:
        gen = f"{name}@{t.strftime('%Y%m%dT%H%M%S%f')}Z"
        if gen not in taken:
            return gen
        t += _dt.timedelta(microseconds=1)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def lock_message(name: str, holder: str, hint: str) -> str:
    return f"index {name} is being built by another job ({holder}); wait for it to finish. {hint}"


class Generations(ABC):
    """The generations of one index NAME in one home (a local root or a Qdrant server)."""

    def __init__(self, name: str, root: Path):
        self.name = check_name(name)
        self.root = Path(root)
        self.dir = self.root / name  # local files: embedded shards, or failures/progress for the server

    # ---------------------------------------------------------------- abstract
    @abstractmethod
    def generations(self) -> list[str]:
        """All generation names of this index, oldest first."""

    @abstractmethod
    def current(self) -> str | None:
        """The generation ``NAME`` points at, or None before the first switch."""

    @abstractmethod
    def read_meta(self, gen: str) -> dict[str, Any]: ...

    @abstractmethod
    def write_meta(self, gen: str, meta: dict[str, Any]) -> None: ...

    @abstractmethod
    def create_store(self, gen: str, schema: Schema, meta: dict[str, Any]) -> VectorStore:
        """Create generation ``gen`` with an empty store and its record."""

    @abstractmethod
    def open_store(self, gen: str, schema: Schema) -> VectorStore: ...

    @abstractmethod
    def switch(self, gen: str) -> None:
        """Atomically make ``gen`` the current generation."""

    @abstractmethod
    def delete_generation(self, gen: str) -> None: ...

    @abstractmethod
    def lock(self, *, break_lock: bool = False) -> Any:
        """Context manager: the build lock of NAME; raises ``IndexBusyError`` at once when held."""

    @abstractmethod
    def drop_pointer(self) -> None:
        """Remove ``NAME`` itself (called by ``drop`` after every generation is gone)."""

    @abstractmethod
    def pin(self, gen: str) -> None:
        """Record that this process serves ``gen`` (replacing its earlier pin): ``prune`` will keep it."""

    @abstractmethod
    def unpin(self) -> None:
        """Remove this process's pin (it serves nothing from this index any more)."""

    @abstractmethod
    def pinned(self) -> set[str]:
        """Generations pinned by live serving processes; pins of dead ones are removed."""

    # -------------------------------------------------------------- concrete
    def exists(self) -> bool:
        return bool(self.generations())

    def require_current(self) -> str:
        gen = self.current()
        if gen is None:
            hint = "it has no complete generation yet" if self.exists() else "it does not exist"
            raise IndexNotFoundError(f"index {self.name} cannot be opened: {hint}; "
                                     f"build it with 'safe-retrieval index build --name {self.name} ...'")
        return gen

    def new_name(self) -> str:
        return new_generation_name(self.name, set(self.generations()))

    def job_dir(self, gen: str) -> Path:
        """Local directory for a generation's failures.jsonl and progress.json."""
        d = self.dir / gen
        d.mkdir(parents=True, exist_ok=True)
        return d

    def failures_path(self, gen: str, rank: str = "") -> Path:
        """``failures.jsonl`` (``failures.rank1.jsonl`` etc. for the ranks of a torchrun job)."""
        return self.job_dir(gen) / FAILURES.replace(".", f"{rank}.", 1)

    def progress_path(self, gen: str, rank: str = "") -> Path:
        return self.job_dir(gen) / PROGRESS.replace(".", f"{rank}.", 1)

    def prune(self, keep: int = DEFAULT_KEEP, *, protect: AbstractSet[str] = frozenset()) -> list[str]:
        """Delete complete generations beyond the ``keep`` newest, and abandoned partial ones.

        The current generation, every generation a live service pins and ``protect`` are never
        deleted. Call under the lock.
        """
        if keep < 1:
            raise InputError("--keep must be at least 1 (the current generation)")
        cur = self.current()
        gens = self.generations()
        complete = [g for g in gens if self._state(g) == "complete"]
        keep_set = set(complete[-keep:]) | {cur} | set(protect) | self.pinned()
        gone = [g for g in gens if g not in keep_set]
        for g in gone:
            self.delete_generation(g)
        return gone

    def _state(self, gen: str) -> str | None:
        try:
            return self.read_meta(gen).get("state")
        except (IndexNotFoundError, FileNotFoundError, json.JSONDecodeError):
            return None

    def describe(self) -> list[dict[str, Any]]:
        """One summary per generation (for ``index list`` / ``index info``), oldest first."""
        cur = self.current()
        out = []
        for g in self.generations():
            try:
                meta = self.read_meta(g)
            except (IndexNotFoundError, FileNotFoundError, json.JSONDecodeError):
                meta = {"state": "unreadable"}
            out.append({"generation": g, "current": g == cur, **{k: meta.get(k) for k in
                        ("state", "points", "fingerprint", "geometry", "created_at", "completed_at")}})
        return out

    def drop(self) -> list[str]:
        """Delete every generation and the pointer. Call under the lock."""
        gens = self.generations()
        self.drop_pointer()
        for g in gens:
            self.delete_generation(g)
        return gens


class LocalGenerations(Generations):
    """Embedded home: generation directories with Qdrant Edge shards, a pointer file, an flock."""

    def __init__(self, name: str, root: Path, **edge_config):
        super().__init__(name, root)
        self.edge_config = edge_config  # passed to EdgeStore.create (tests lower the HNSW threshold)

    def generations(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if GEN_RE.match(p.name) and (p / META).is_file())

    def current(self) -> str | None:
        try:
            gen = (self.dir / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return gen if (self.dir / gen / META).is_file() else None

    def read_meta(self, gen: str) -> dict[str, Any]:
        path = self.dir / gen / META
        if not path.is_file():
            raise IndexNotFoundError(f"generation {gen} not found under {self.dir}")
        return json.loads(path.read_text())

    def write_meta(self, gen: str, meta: dict[str, Any]) -> None:
        write_json_atomic(self.dir / gen / META, meta)

    def create_store(self, gen: str, schema: Schema, meta: dict[str, Any]) -> VectorStore:
        d = self.dir / gen
        d.mkdir(parents=True, exist_ok=False)
        store = EdgeStore.create(d / SHARD, schema, **self.edge_config)
        self.write_meta(gen, meta)  # written last: a directory without meta.json is not a generation
        return store

    def open_store(self, gen: str, schema: Schema) -> VectorStore:
        return EdgeStore.open(self.dir / gen / SHARD, schema)

    def copy_generation(self, src: str, dst: str) -> None:
        """Copy ``src`` into a new generation directory ``dst`` (copy-on-write for ``add``/``delete``:
        the generation being served is never written to). The copy's record is written last."""
        tmp = self.dir / f".{dst}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.dir / src / SHARD, tmp / SHARD)
        os.replace(tmp, self.dir / dst)

    def switch(self, gen: str) -> None:
        if not (self.dir / gen / META).is_file():
            raise IndexNotFoundError(f"cannot switch {self.name} to {gen}: no such generation")
        tmp = self.dir / f".{CURRENT}.{os.getpid()}.tmp"
        tmp.write_text(gen + "\n")
        os.replace(tmp, self.dir / CURRENT)

    def delete_generation(self, gen: str) -> None:
        # move aside first so a half-deleted directory never looks like a generation
        d = self.dir / gen
        if d.exists():
            trash = self.dir / f".{gen}.deleting"
            os.replace(d, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def drop_pointer(self) -> None:
        (self.dir / CURRENT).unlink(missing_ok=True)

    def pin(self, gen: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / f"{PIN_PREFIX}{pin_holder()}", {
            "generation": gen, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": proc_start(os.getpid()),
        })

    def unpin(self) -> None:
        (self.dir / f"{PIN_PREFIX}{pin_holder()}").unlink(missing_ok=True)

    def pinned(self) -> set[str]:
        out: set[str] = set()
        for path in self.dir.glob(f"{PIN_PREFIX}*") if self.dir.is_dir() else ():
            try:
                pin = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written, or unreadable: never a reason to delete data
            if pin.get("host") != socket.gethostname():
                out.add(pin.get("generation"))  # another machine's process: its liveness is unknown, keep
            elif pin.get("pid_start") and proc_start(int(pin.get("pid", 0))) == pin["pid_start"]:
                out.add(pin.get("generation"))
            else:
                path.unlink(missing_ok=True)  # that process is gone
        return {g for g in out if isinstance(g, str)}

    def prune(self, keep: int = DEFAULT_KEEP, *, protect: AbstractSet[str] = frozenset()) -> list[str]:
        """As ``Generations.prune``, plus leftovers of killed jobs: half-copied or half-deleted directories,
        and generation directories without a record (a job stopped while it created the store, before
        ``meta.json``: such a directory is no generation, nothing can resume it, and under the lock no
        job is creating one)."""
        gone = super().prune(keep, protect=protect)
        for p in self.dir.glob(".*"):
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".deleting")):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            if GEN_RE.match(p.name) and p.is_dir() and not (p / META).exists() and p.name not in protect:
                self.delete_generation(p.name)
        return gone

    def drop(self) -> list[str]:
        gens = super().drop()
        for p in self.dir.glob(".*"):
            if p.name != LOCK:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return gens

    @contextmanager
    def lock(self, *, break_lock: bool = False) -> Iterator[None]:
        """flock on ``ROOT/NAME/.lock``: non-blocking, so a second job fails at once. ``break_lock``
        is accepted for symmetry with the server lock: a dead holder's flock is already gone."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
                raise IndexBusyError(lock_message(self.name, holder, f"(lock file {self.dir / LOCK})")) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
