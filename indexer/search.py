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
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from indexer.index import Index, check_model, point_fields
from indexer.store import DEFAULT_OVERSAMPLE, Match
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
class QueryReport:
    """What the safety modes saw and did with the query (the service's ``QueryReport`` validates from it).

    ``unsafe``: the artifact's rule (``training.traversal.is_unsafe``), None without a threshold or
    for a euclidean model; ``redirected``: the query was moved toward safe content, landing at
    ``distance_to_origin_after``.
    """

    unsafe: bool | None = None
    distance_to_origin: float | None = None
    threshold: float | None = None
    redirected: bool = False
    distance_to_origin_after: float | None = None

    def __getitem__(self, key: str) -> Any:
        """Read a field by name (``report["unsafe"]``), as callers of the dict it replaced do."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """Hits, best first, and the query's safety report."""

    hits: list[Hit]
    query: QueryReport

    def to_dict(self) -> dict[str, Any]:
        # "results", as the HTTP API's SearchResponse names them
        return {"query": self.query.to_dict(), "results": [h.to_dict() for h in self.hits]}


def _can_traverse(art: Artifact, threshold: float | None, target: str) -> bool:
    safe = traversal.SAFE_CLASS[target]
    has_goal = "p50" in (art.bounds.get(safe) or {})
    return has_goal and (threshold is not None or "p95" in (art.bounds.get(safe) or {}))


async def asearch(index: Index, art: Artifact, vector: Tensor, **options: Any) -> SearchResult:
    """:func:`search` from async code (same options, same result). Whether the store call blocks the
    loop or runs in a worker thread is decided here: an embedded store holds the GIL while it
    searches, so a thread would only add hand-offs."""
    if index.store.in_process:
        return search(index, art, vector, **options)
    return await asyncio.to_thread(search, index, art, vector, **options)


def search(index: Index, art: Artifact, vector: Tensor, *, query_modality: str, target: str = "image", k: int = 10,
           offset: int = 0, safety: str = "strict", tags: Sequence[str] | None = None, exact: bool = False,
           oversample: int | None = None, hnsw_ef: int | None = None,
           distance_to_origin: float | None = None) -> SearchResult:
    """Search ``index`` with one embedding ``vector (D,)`` (as ``art.encoder.encode_*`` returns it).

    ``target``: which kind of points to return (``any`` for both). ``tags``: keep points with at
    least one of these tags. ``oversample`` (lorentz): candidates per result on ``space`` before
    exact rescoring (default ``indexer.store.DEFAULT_OVERSAMPLE``). ``distance_to_origin``: the
    query's ``d0`` where it came with the embedding (the service's encoder computes it once per
    query); computed here when not given.
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
    report = QueryReport()
    if art.geometry == "lorentz":
        toward: Literal["text", "image"] = "text" if target == "text" else "image"  # "any" traverses toward images
        v, report = _apply_traversal(v, distance_to_origin, art, query_modality, toward, safety)
    elif safety == "traverse":
        raise InputError("traversal needs a lorentz (hyperbolic) model; this index is euclidean: use --safety filter or strict")
    match = Match(kinds=None if target == "any" else (target,), exclude_unsafe=safety in ("filter", "strict"),
                  tags_any=tuple(tags) if tags else None)
    q = index.schema.query(v.numpy(), k=k, offset=offset, match=match, oversample=oversample or DEFAULT_OVERSAMPLE,
                           exact=exact, hnsw_ef=hnsw_ef)
    hits = []
    for s in index.store.query(q):
        hits.append(Hit(id=s.id, score=s.score, distance=index.schema.distance(s.score), **point_fields(s.payload),
                        payload=s.payload))
    return SearchResult(hits, report)


def _apply_traversal(v: Tensor, d0: float | None, art: Artifact, modality: str, target: Literal["text", "image"],
                     safety: str) -> tuple[Tensor, QueryReport]:
    """The query's report, and ``v (D,)`` moved toward the origin when the mode asks and the query is unsafe."""
    d0s = lorentz.dist0(v[None], art.curvature) if d0 is None else torch.tensor([float(d0)])
    threshold = art.unsafe_threshold(modality)
    unsafe = traversal.is_unsafe(d0s, threshold)
    report = QueryReport(unsafe=None if unsafe is None else bool(unsafe[0]), distance_to_origin=float(d0s[0]),
                         threshold=threshold, distance_to_origin_after=float(d0s[0]))
    if safety not in ("traverse", "strict"):
        return v, report
    if not _can_traverse(art, threshold, target):
        if safety == "traverse":
            raise InputError("this artifact has no calibrated bounds, so a query cannot be traversed; "
                             "calibrate it first, or use --safety filter or off")
        return v, report  # strict without calibration: nothing to decide traversal with; the filter still applies
    moved = traversal.traverse(v[None], art.curvature, art.bounds, target=target, threshold=threshold, d0=d0s)
    report.threshold, report.redirected = moved.threshold, bool(moved.triggered[0])
    report.distance_to_origin_after = float(moved.d0_after[0])
    return moved.vectors[0], report


__all__ = ["Hit", "QueryReport", "SearchResult", "SAFETY_MODES", "TARGETS", "search"]
