"""Whole indexing jobs: ``build`` a new generation, ``add`` to or ``delete`` from the current one.

Every job holds the index's build lock from start to end (a second job fails at once), writes only
into a generation that is not being served, and switches ``NAME`` only when that generation is
complete and optimized (invariant 5):

- ``build`` resumes a partial generation left by an interrupted build of the same model and the
  same inputs, or starts a new one; then pipeline -> ``optimize()`` -> record -> switch -> prune.
- ``add``/``delete`` on the embedded backend copy the current generation's shard into a new
  generation, change the copy and switch (Edge allows one handle per directory and the service holds
  the current one). On a Qdrant server they change the current collection in place, as Qdrant is
  built for concurrent readers and writers.
- ``switch=False`` (``--no-switch``, what the service's admin jobs use) stops after the record:
  the generation is left complete but *staged*, neither switched to nor pruned around, and
  ``staged(gen)`` has named it as soon as it was chosen. The service switches the pointer when it
  accepts the job, together with the served model, or deletes the generation when the job is
  cancelled. Against a Qdrant server ``add``/``delete`` refuse ``switch=False`` (see ``_writable_copy``).
- Scale-out (server only): under ``torchrun`` each rank (``RANK``/``WORLD_SIZE``) indexes a disjoint
  shard of the items into the same collection; rank 0 takes the lock, picks the generation and, after
  a barrier, optimizes, records and switches once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from indexer.generations import Generations, LocalGenerations, now_iso
from indexer.index import check_fingerprint, schema_of
from indexer.sources import Item, shard
from indexer.store import DEFAULT_STORAGE, Match, Schema, VectorStore, check_storage
from training.data.roots import DataRoots
from training.errors import InputError

if TYPE_CHECKING:  # torch and open_clip load only once a job has its lock: a busy index fails fast
    from indexer.pipeline import Summary
    from training.artifact import Artifact

DEFAULT_BATCH = 64

INDEX_FORMAT = "safe-retrieval-index"
INDEX_FORMAT_VERSION = 2  # 2: an item its source labels unsafe is flagged unsafe whatever the model says


def schema_for(art: "Artifact", storage: str = DEFAULT_STORAGE) -> Schema:
    return Schema(art.geometry, art.encoder.arch.embed_dim, art.curvature if art.geometry == "lorentz" else 0.0, storage)


def storage_for(gens: Generations, storage: str | None) -> str:
    """The storage mode of a new generation: as asked, else the current generation's (so an admin job's reindex keeps
    it), else the default."""
    if storage is not None:
        return check_storage(storage)
    cur = gens.current()
    return str(gens.read_meta(cur).get("storage") or "fast") if cur is not None else DEFAULT_STORAGE


def sources_signature(spec: dict[str, Any]) -> str:
    """A hash of a job's input options: a partial generation is resumed only by the same inputs."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def index_record(art: "Artifact", *, name: str, generation: str, sources: str, storage: str = DEFAULT_STORAGE,
                 extra: dict | None = None) -> dict[str, Any]:
    """The record a generation carries: what built it (so search can refuse another model), and how it is stored."""
    return {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "name": name,
        "generation": generation,
        "state": "building",
        "fingerprint": art.fingerprint,
        "model_path": str(art.path) if art.path else None,
        "geometry": art.geometry,
        "curvature": art.curvature if art.geometry == "lorentz" else None,
        "dim": art.encoder.arch.embed_dim,
        "storage": storage,
        "bounds": art.bounds,
        "thresholds": {m: art.unsafe_threshold(m) for m in ("text", "image")},
        "sources": sources,
        "created_at": now_iso(),
        "completed_at": None,
        "points": 0,
        **(extra or {}),
    }


@dataclass
class JobResult:
    """What a job produced: the generation it wrote, its counters, what it pruned."""

    name: str
    generation: str
    summary: "Summary"
    points: int
    resumed: bool = False
    pruned: list[str] = field(default_factory=list)
    removed: int = 0
    failures: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "points": self.points, "resumed": self.resumed,
                "pruned": self.pruned, "removed": self.removed, "failures": self.failures, **self.summary.to_dict()}


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class _Dist:
    """The few collective steps a scale-out build needs (gloo: CPU tensors, objects)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        if world > 1:
            # torch loads only in a scale-out job, after its checks
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.dist = dist

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


def _finish(gens: Generations, store: VectorStore, gen: str, meta: dict[str, Any], summary: "Summary") -> int:
    """Optimize, count, record complete; the caller switches."""
    store.optimize()
    points = store.count()
    store.close()
    meta.update(state="complete", completed_at=now_iso(), points=points,
                last_job={k: v for k, v in summary.to_dict().items()})
    gens.write_meta(gen, meta)
    return points


def _resumable(gens: Generations, art: "Artifact", sources: str, storage: str) -> str | None:
    for g in reversed(gens.generations()):
        try:
            m = gens.read_meta(g)
        except Exception:
            continue
        if m.get("state") == "building" and m.get("fingerprint") == art.fingerprint and m.get("sources") == sources \
                and m.get("storage", "fast") == storage and not m.get("parent"):
            return g
    return None


def build(gens: Generations, model: "Artifact | Path", items: Sequence[Item], *, sources: str = "",
          media_root: Path | None = None, batch_size: int = DEFAULT_BATCH, workers: int = 2, keep: int = 2,
          progress: bool = True, break_lock: bool = False, device: str = "auto", max_pixels: int | None = None,
          max_file_bytes: int | None = None, roots: DataRoots = DataRoots(), switch: bool = True,
          staged: "Callable[[str], None] | None" = None, blocked: frozenset[str] = frozenset(),
          storage: str | None = None) -> JobResult:
    """Index ``items`` into a new (or resumed) generation of ``gens.name`` and switch to it.

    ``storage`` is the new generation's mode (``indexer.store.STORAGE_MODES``): as asked, else the current
    generation's, else compact; it is recorded in the generation's record.

    With ``roots``, an image file outside them is a recorded failure (``indexer.pipeline``); so is one over
    ``max_pixels`` or ``max_file_bytes`` (default ``training.images.MAX_FILE_BYTES``, checked before reading).

    ``model`` is an artifact or its directory (loaded only once the lock is held, so a busy index
    fails before any model is loaded). ``switch=False`` leaves the complete generation staged (no
    switch, no prune); ``staged`` is called with the generation's name once it is chosen. Content whose id is in
    ``blocked`` (the takedown list) is a recorded failure, never a point.
    """
    rank, world = dist_env()
    if world > 1 and isinstance(gens, LocalGenerations):
        raise InputError("a torchrun build needs a Qdrant server (--qdrant-url): Qdrant Edge allows one writer per directory")
    storage = storage_for(gens, storage)
    if world > 1 and storage == "compact":
        raise InputError("a torchrun build writes --storage fast: the ranks of a compact build would each fit their own "
                         "code range for the first points they write. Add --storage fast, or build with one process")
    d = _Dist(rank, world)
    with ExitStack() as stack:
        if rank == 0:
            stack.enter_context(gens.lock(break_lock=break_lock))
        # torch loads once the lock is held: a busy index fails fast
        from indexer.pipeline import Job

        art = _load(model, device)
        schema = schema_for(art, storage)
        resumed = False
        if rank == 0:
            gen = _resumable(gens, art, sources, storage)
            resumed = gen is not None
            if gen is None:
                gen = gens.new_name()
                record = index_record(art, name=gens.name, generation=gen, sources=sources, storage=storage)
                gens.create_store(gen, schema, record).close()
        gen = d.broadcast(gen if rank == 0 else None)
        if rank == 0 and staged is not None:
            staged(gen)
        store = gens.open_store(gen, schema)
        suffix = "" if world == 1 else f".rank{rank}"
        failures = gens.failures_path(gen, suffix)
        job = Job(art, store, media_root=media_root, batch_size=batch_size, workers=workers, failures_path=failures,
                  progress_path=gens.progress_path(gen, suffix), progress=progress,
                  desc=f"{gen}" + (f" rank {rank}/{world}" if world > 1 else ""), roots=roots, blocked=blocked,
                  **_limits(max_pixels, max_file_bytes))
        try:
            summary = job.run(shard(items, rank, world) if world > 1 else items)
        except BaseException:
            store.close()  # flush what was written: a re-run resumes from it
            raise
        total = _sum(d.gather(summary))
        if rank != 0:
            store.close()
            d.gather(None)  # wait for rank 0 to switch
            return JobResult(gens.name, gen, summary, points=-1, resumed=resumed, failures=str(failures))
        meta = gens.read_meta(gen)
        points = _finish(gens, store, gen, meta, total)
        pruned = _switch_and_prune(gens, gen, keep) if switch else []
        d.gather(None)
        return JobResult(gens.name, gen, total, points, resumed=resumed, pruned=pruned, failures=str(failures))


def _switch_and_prune(gens: Generations, gen: str, keep: int) -> list[str]:
    if gens.current() != gen:
        gens.switch(gen)
    return gens.prune(keep, protect={gen})


def _limits(max_pixels: int | None, max_file_bytes: int | None) -> dict[str, int]:
    """The Job's per-image limits that were given (the others keep the pipeline's defaults)."""
    given = {"max_pixels": max_pixels, "max_bytes": max_file_bytes}
    return {k: v for k, v in given.items() if v is not None}


def _sum(parts: list["Summary"]) -> "Summary":
    # torch-bound module: loaded by the job already, not at import
    from indexer.pipeline import Summary

    return Summary(indexed=sum(p.indexed for p in parts), skipped=sum(p.skipped for p in parts),
                   failed=sum(p.failed for p in parts), elapsed_s=max(p.elapsed_s for p in parts))


def _load(model: "Artifact | Path | str", device: str) -> "Artifact":
    """``model`` itself, or the artifact in that directory."""
    if not isinstance(model, (str, Path)):
        return model
    # torch and open_clip load once the lock is held: a busy index fails fast
    from training import artifact

    return artifact.load(model, device=device)


def _check_stageable(gens: Generations, switch: bool) -> None:
    """Refuse ``switch=False`` for an incremental job on a Qdrant server.

    On a Qdrant server an incremental job changes the served collection in place, so it cannot be
    staged: ``switch=False`` is refused there rather than met with a copy. A copy would stream every
    vector and payload of the collection through this process (scroll + upsert: the whole index's
    size in traffic, for what is often a handful of items), and Qdrant offers no server-side clone;
    a full ``build`` stages a new collection at the same cost and is the honest way to do it.
    """
    if not switch and not isinstance(gens, LocalGenerations):
        raise InputError(
            f"index {gens.name} lives on a Qdrant server, where adding or deleting changes the served collection "
            f"in place and cannot be staged; rebuild it instead (a reindex without 'incremental'), or run "
            f"'safe-retrieval index add/delete' outside the service")


def _writable_copy(gens: Generations, cur: str, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The generation an incremental job writes to: a fresh copy (embedded) or the current one (server)."""
    if not isinstance(gens, LocalGenerations):
        return cur, meta
    new = gens.new_name()
    gens.copy_generation(cur, new)
    meta = {**meta, "generation": new, "state": "building", "parent": cur, "created_at": now_iso(), "completed_at": None}
    gens.write_meta(new, meta)
    return new, meta


def add(gens: Generations, model: "Artifact | Path", items: Sequence[Item], *, media_root: Path | None = None,
        batch_size: int = DEFAULT_BATCH, workers: int = 2, keep: int = 2, progress: bool = True,
        break_lock: bool = False, device: str = "auto", max_pixels: int | None = None, max_file_bytes: int | None = None,
        roots: DataRoots = DataRoots(), switch: bool = True, staged: "Callable[[str], None] | None" = None,
        blocked: frozenset[str] = frozenset()) -> JobResult:
    """Add ``items`` to the current generation (same model only); stored items are skipped.

    ``roots``, ``switch``, ``staged`` and ``blocked`` as for ``build`` (``switch=False`` on the embedded backend only).
    """
    _check_stageable(gens, switch)
    with gens.lock(break_lock=break_lock):
        cur = gens.require_current()
        meta = gens.read_meta(cur)
        art = _load(model, device)
        check_fingerprint(meta, art)
        # torch loads once the lock is held: a busy index fails fast
        from indexer.pipeline import Job

        gen, meta = _writable_copy(gens, cur, meta)
        if staged is not None and gen != cur:
            staged(gen)
        store = gens.open_store(gen, schema_of(meta))
        failures = gens.failures_path(gen)
        job = Job(art, store, media_root=media_root, batch_size=batch_size, workers=workers, failures_path=failures,
                  progress_path=gens.progress_path(gen), progress=progress, desc=f"add to {gen}", roots=roots,
                  blocked=blocked, **_limits(max_pixels, max_file_bytes))
        try:
            summary = job.run(items)
        except BaseException:
            store.close()
            raise
        points = _finish(gens, store, gen, meta, summary)
        pruned = _switch_and_prune(gens, gen, keep) if switch else []
        return JobResult(gens.name, gen, summary, points, pruned=pruned, failures=str(failures))


def delete(gens: Generations, *, ids: Sequence[str] = (), uris: Sequence[str] = (), keep: int = 2,
           break_lock: bool = False, switch: bool = True, staged: "Callable[[str], None] | None" = None) -> JobResult:
    """Delete points by id and/or by ``uri`` payload from the current generation (``switch``/``staged`` as for ``add``)."""
    if not ids and not uris:
        raise InputError("nothing to delete: give --id and/or --uri")
    _check_stageable(gens, switch)
    with gens.lock(break_lock=break_lock):
        cur = gens.require_current()
        meta = gens.read_meta(cur)
        gen, meta = _writable_copy(gens, cur, meta)
        if staged is not None and gen != cur:
            staged(gen)
        store = gens.open_store(gen, schema_of(meta))
        # torch loads once the lock is held: a busy index fails fast
        from indexer.pipeline import Summary

        t0 = _dt.datetime.now()
        before = store.count()
        store.delete(list(ids))
        if uris:
            store.delete_where(Match(uris=tuple(uris)))
        summary = Summary(elapsed_s=(_dt.datetime.now() - t0).total_seconds())
        points = _finish(gens, store, gen, meta, summary)
        pruned = _switch_and_prune(gens, gen, keep) if switch else []
        return JobResult(gens.name, gen, summary, points, pruned=pruned, removed=before - points)
