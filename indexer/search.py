"""One search, shared by the CLI and the service: safety modes, exact hyperbolic ranking, geodesic distances.

Safety modes (the query's report says what happened):

- ``off``: plain nearest neighbours.
- ``traverse`` (lorentz only): an unsafe query (``d0`` above the artifact's threshold for the
  query's modality) slides along its geodesic toward the origin, to where safe content of the
  target modality lives (``training.traversal``), then searches.
- ``filter``: points whose ``unsafe`` payload is true are excluded by a payload *pre*-filter (on the
  prefetch too), so k results still come back. Points without a flag (no calibrated rule) pass.
- ``strict`` (default): traverse + filter. With an artifact that has no threshold and no bounds,
  traversal cannot be decided and is skipped (the report says ``unsafe: None``); the filter still holds.

For lorentz indexes the store prefetches ``k * oversample`` candidates on ``space`` and rescores
them exactly on ``lorentz``; ``exact=True`` scans every point instead. Scores come back as Lorentz
inner products and are turned into geodesic distances (euclidean: cosine similarity, ``1 - cos``).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from indexer.builder import check_fingerprint, generations_for, schema_of
from indexer.generations import Generations
from indexer.store import DEFAULT_OVERSAMPLE, SPACE, VECTOR, Match, Schema, VectorStore
from training import lorentz, traversal
from training.artifact import Artifact
from training.errors import InputError

SAFETY_MODES = ("strict", "traverse", "filter", "off")
TARGETS = ("image", "text", "any")
MAX_K_PER_SEARCH = 1000  # the most results one search() returns (CLI, benchmarks); the HTTP API allows fewer


@dataclass
class Hit:
    """One result. ``score``: engine score (Lorentz inner product, or cosine), higher is nearer;
    ``distance``: geodesic distance (lorentz) or ``1 - cos`` (euclidean), lower is nearer."""

    id: str
    kind: str
    score: float
    distance: float
    uri: str | None
    caption: str | None
    tags: list[str]
    unsafe: bool | None
    payload: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """Hits, best first, and the query's safety report
    ``{unsafe, distance_to_origin, threshold, redirected, distance_to_origin_after}``."""

    hits: list[Hit]
    query: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "hits": [h.to_dict() for h in self.hits]}


class Index:
    """An opened index generation: its record and its store. Close it (or use ``with``) when done."""

    def __init__(self, gens: Generations, generation: str, meta: dict[str, Any], store: VectorStore):
        self.gens, self.generation, self.meta, self.store = gens, generation, meta, store
        self.name = gens.name
        self.schema: Schema = store.schema

    @property
    def info(self) -> dict[str, Any]:
        m = self.meta
        return {"name": self.name, "generation": self.generation, "fingerprint": m.get("fingerprint"),
                "geometry": m.get("geometry"), "curvature": m.get("curvature"), "bounds": m.get("bounds") or {},
                "thresholds": m.get("thresholds") or {}, "points": self.store.count()}

    def retrieve(self, id: str, with_vector: bool = False) -> dict[str, Any] | None:
        """One point by id: ``{id, kind, uri, caption, tags, unsafe, payload[, vector]}`` or None.

        ``vector`` is the embedding as the encoder gave it (space components, or the unit vector).
        """
        try:
            pid = str(uuid.UUID(str(id)))
        except ValueError:
            raise InputError(f"{id!r} is not a point id (ids are UUIDs, as returned by search)") from None
        found = self.store.retrieve([pid], with_vectors=with_vector)
        if not found:
            return None
        p = found[0]
        out = {"id": p.id, **_fields(p.payload), "payload": p.payload}
        if with_vector:
            out["vector"] = list(p.vectors.get(SPACE if self.schema.geometry == "lorentz" else VECTOR, []))
        return out

    # -- from an event loop: whether the store call blocks the loop or runs in a worker thread is decided here
    async def asearch(self, art: Artifact, vector: Tensor, **options: Any) -> "SearchResult":
        """:func:`search` on this index from async code (same options, same result)."""
        if self.store.in_process:  # an embedded store holds the GIL while it searches: a thread only adds hand-offs
            return search(self, art, vector, **options)
        return await asyncio.to_thread(search, self, art, vector, **options)

    async def aretrieve(self, id: str, with_vector: bool = False) -> dict[str, Any] | None:
        """:meth:`retrieve` from async code, in a worker thread (a probe can then time out on it)."""
        return await asyncio.to_thread(self.retrieve, id, with_vector)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_index(name: str, *, root: Path | None = None, url: str | None = None, api_key: str | None = None,
               client=None, generation: str | None = None) -> Index:
    """Open the current generation of index ``name`` (or a given ``generation``).

    Embedded (default): under ``root`` (default ``$SAFE_RETRIEVAL_INDEX_ROOT`` or ``runs/indexes``).
    Server: ``url`` (+ ``api_key``), or an existing qdrant-client ``client``.
    """
    gens = generations_for(name, root=root, url=url, api_key=api_key, client=client)
    gen = generation or gens.require_current()
    meta = gens.read_meta(gen)
    return Index(gens, gen, meta, gens.open_store(gen, schema_of(meta)))


def check_model(index: Index, art: Artifact) -> None:
    """Raise ``ModelMismatchError`` ("... reindex with this model") unless ``art`` built ``index``."""
    check_fingerprint(index.meta, art)


def _fields(payload: dict[str, Any]) -> dict[str, Any]:
    return {"kind": payload.get("kind"), "uri": payload.get("uri"), "caption": payload.get("caption"),
            "tags": list(payload.get("tags") or []), "unsafe": payload.get("unsafe")}


def _can_traverse(art: Artifact, threshold: float | None, target: str) -> bool:
    safe = traversal.SAFE_CLASS[target]
    has_goal = "p50" in (art.bounds.get(safe) or {})
    return has_goal and (threshold is not None or "p95" in (art.bounds.get(safe) or {}))


def search(index: Index, art: Artifact, vector: Tensor, *, query_modality: str, target: str = "image", k: int = 10,
           offset: int = 0, safety: str = "strict", tags: Sequence[str] | None = None, exact: bool = False,
           oversample: int | None = None, hnsw_ef: int | None = None) -> SearchResult:
    """Search ``index`` with one embedding ``vector (D,)`` (as ``art.encoder.encode_*`` returns it).

    ``target``: which kind of points to return (``any`` for both). ``tags``: keep points with at
    least one of these tags. ``oversample`` (lorentz): candidates per result on ``space`` before
    exact rescoring (default ``indexer.store.DEFAULT_OVERSAMPLE``).
    """
    if safety not in SAFETY_MODES:
        raise InputError(f"unknown safety mode {safety!r}; use one of {', '.join(SAFETY_MODES)}")
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if query_modality not in ("text", "image"):
        raise InputError(f"query_modality must be text or image, not {query_modality!r}")
    if not 1 <= k <= MAX_K_PER_SEARCH or offset < 0:
        raise InputError(f"k must be in 1..{MAX_K_PER_SEARCH} and offset >= 0 (got k={k}, offset={offset})")
    check_model(index, art)
    v = torch.as_tensor(vector).detach().float().cpu().reshape(-1)
    if v.shape[0] != index.schema.dim:
        raise InputError(f"the query vector has {v.shape[0]} dimensions but index {index.name} holds {index.schema.dim}")
    report: dict[str, Any] = {"unsafe": None, "distance_to_origin": None, "threshold": None, "redirected": False,
                              "distance_to_origin_after": None}
    if art.geometry == "lorentz":
        v = _apply_traversal(v, art, query_modality, "image" if target == "any" else target, safety, report)
    elif safety == "traverse":
        raise InputError("traversal needs a lorentz (hyperbolic) model; this index is euclidean: use --safety filter or strict")
    match = Match(kinds=None if target == "any" else (target,), exclude_unsafe=safety in ("filter", "strict"),
                  tags_any=tuple(tags) if tags else None)
    q = index.schema.query(v.numpy(), k=k, offset=offset, match=match, oversample=oversample or DEFAULT_OVERSAMPLE,
                           exact=exact, hnsw_ef=hnsw_ef)
    hits = []
    for s in index.store.query(q):
        hits.append(Hit(id=s.id, score=s.score, distance=index.schema.distance(s.score), **_fields(s.payload), payload=s.payload))
    return SearchResult(hits, report)


def _apply_traversal(v: Tensor, art: Artifact, modality: str, target: str, safety: str, report: dict[str, Any]) -> Tensor:
    """Fill the query report; move ``v (D,)`` toward the origin when the mode asks and the query is unsafe."""
    d0 = float(lorentz.dist0(v, art.curvature))
    threshold = art.unsafe_threshold(modality)
    report.update(distance_to_origin=d0, distance_to_origin_after=d0, threshold=threshold,
                  unsafe=None if threshold is None else d0 > threshold)
    if safety not in ("traverse", "strict"):
        return v
    if not _can_traverse(art, threshold, target):
        if safety == "traverse":
            raise InputError("this artifact has no calibrated bounds, so a query cannot be traversed; "
                             "calibrate it first, or use --safety filter or off")
        return v  # strict without calibration: nothing to decide traversal with; the filter still applies
    moved = traversal.traverse(v[None], art.curvature, art.bounds, target=target, threshold=threshold)
    report.update(threshold=moved.threshold, redirected=bool(moved.triggered[0]),
                  distance_to_origin_after=float(moved.d0_after[0]))
    return moved.vectors[0]


__all__ = ["Hit", "Index", "SearchResult", "SAFETY_MODES", "TARGETS", "check_model", "open_index", "search"]
