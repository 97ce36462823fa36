"""The vector-store interface and the collection schema both backends share.

Geometry decides the schema (invariant 2), and only here:

- ``lorentz`` models store two named vectors per point. ``space`` holds the space components
  ``x (D,)`` with Euclid distance and an HNSW graph. ``lorentz`` holds ``[x, t(x)] (D+1,)`` with
  Dot distance and *no* HNSW graph (``m=0``), with ``t(x) = sqrt(1/c + |x|^2)``. A query ``q``
  prefetches ``k * oversample`` candidates on ``space`` and rescores them on ``lorentz`` with
  ``[q, -t(q)]``. That dot product equals the Lorentz inner product ``<q, x>_L``, so the final
  order is exactly the geodesic order among the candidates. A graph on ``lorentz`` would be built
  from stored-vs-stored dot products, a different geometry from the query's, and measured recall@10
  was 0.30-0.43 (``serving_anchors.md`` §2.6), so ``lorentz`` is only ever scanned.
- ``euclidean`` models store one ``vector`` (D,) with Cosine distance and HNSW.

Two storage modes (``Schema.storage``, recorded in each generation's record; benchmarks/RESULTS.md, "A million
items"):

- ``compact`` (the default): ``space`` is stored as one byte per dimension, ``round((x - lo) / step)`` with one
  ``lo`` and ``step`` for the whole collection (:class:`Quantizer`, fitted on the first points written and kept
  with the store), in memory with its graph. The float originals are not kept twice: ``lorentz`` holds them
  exactly, on disk, and is read only for the prefetched candidates, whose exact rescoring gives the final
  order. A ``euclidean`` ``vector`` keeps its originals on disk and an int8 copy in memory (the engine's own
  scalar quantization), rescored from the originals.
- ``fast``: float32 ``space``/``vector`` in memory (what every index was before), four times the memory.

Payload indexes: ``kind`` (keyword), ``unsafe`` (bool), ``d0`` (float), ``tags`` (keyword).
Point ids are UUID strings derived from content (``content_id``), so re-running a build is idempotent.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from training.errors import InputError

SPACE = "space"
LORENTZ = "lorentz"
VECTOR = "vector"
#: payload field -> index type (names shared by both backends)
PAYLOAD_INDEXES: dict[str, str] = {"kind": "keyword", "unsafe": "bool", "d0": "float", "tags": "keyword"}
KINDS = ("image", "text")
#: HNSW of `space`/`vector`: Qdrant's m=16, but ef_construct 400 instead of 100. On clustered
#: hyperboloid points (benchmarks/search.py, 50k x 512) ef_construct=100 left the graph's own
#: recall@80 at 0.97 whatever the search ef; 400 lifts it to 0.999 (and the search ef defaults to it).
HNSW_M = 16
HNSW_EF_CONSTRUCT = 400
#: candidates fetched per wanted result on ``space`` before exact rescoring: 8 gave recall@10 0.9935 at
#: 1,000,000 x 768, 16 gives 0.995 (benchmarks/RESULTS.md, "A million items")
DEFAULT_OVERSAMPLE = 16
#: Qdrant's thresholds, in KB of vectors: below FULL_SCAN_KB of matching vectors a filtered search scans instead of
#: walking the graph; a segment under INDEXING_KB gets no graph from ``optimize()``
FULL_SCAN_KB, INDEXING_KB = 10_000, 10_000
STORAGE_MODES = ("compact", "fast")
DEFAULT_STORAGE = "compact"
#: the share of the first points' values the quantizer's range spans, and the margin added on each side
QUANTILE, MARGIN = 0.999, 0.1


def content_id(data: bytes | str) -> str:
    """Deterministic point id: the first 128 bits of ``sha256(content)`` as a UUID string.

    Images hash their file bytes, texts their UTF-8 encoding, so the same content always gets the
    same id whatever its path or the order of the input.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return _uuid(hashlib.sha256(raw).hexdigest())


def _uuid(hexdigest: str) -> str:
    h = hexdigest[:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@dataclass(frozen=True)
class Schema:
    """How points of one index are stored: geometry, embedding size, curvature (lorentz)."""

    geometry: str
    dim: int
    curvature: float = 0.0
    storage: str = "fast"

    def __post_init__(self) -> None:
        if self.geometry not in ("lorentz", "euclidean"):
            raise ValueError(f"unknown geometry {self.geometry!r}")
        if self.geometry == "lorentz" and not self.curvature > 0:
            raise ValueError("a lorentz schema needs a curvature > 0")
        check_storage(self.storage)

    @property
    def quantized(self) -> bool:
        """``space`` holds one-byte codes (:class:`Quantizer`) and ``lorentz`` the originals."""
        return self.storage == "compact" and self.geometry == "lorentz"

    def threshold_kb(self, kb: int) -> int:
        """A Qdrant threshold of ``kb`` KB of float32 vectors, for this schema's graph vector: a quarter for one-byte
        codes, so that the same number of points decides. Unscaled, a filtered search on a compact store of 100,000
        x 128 scanned every match (16-18 ms) where the float32 store walked the graph (0.8 ms)."""
        return max(kb // 4, 1) if self.quantized else kb

    @property
    def vectors(self) -> dict[str, tuple[int, str, bool]]:
        """Named vectors: name -> (size, distance, has an HNSW graph)."""
        if self.geometry == "lorentz":
            return {SPACE: (self.dim, "euclid", True), LORENTZ: (self.dim + 1, "dot", False)}
        return {VECTOR: (self.dim, "cosine", True)}

    @property
    def score_vector(self) -> str:
        """The vector whose scores are returned: ``lorentz`` or ``vector``."""
        return LORENTZ if self.geometry == "lorentz" else VECTOR

    def point_vectors(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Stored vectors of ``x (N, D)``: lorentz ``{space: (N, D), lorentz: (N, D+1)}``, else ``{vector: (N, D)}``."""
        x = np.asarray(x, dtype=np.float32)
        if self.geometry == "euclidean":
            return {VECTOR: x}
        t = self.time(x)
        return {SPACE: x, LORENTZ: np.concatenate([x, t[:, None]], axis=1).astype(np.float32)}

    def time(self, x: np.ndarray) -> np.ndarray:
        """Time components ``t(x) (N,)``, computed in float64."""
        x64 = np.asarray(x, dtype=np.float64)
        return np.sqrt(1.0 / self.curvature + (x64 * x64).sum(-1))

    def query(
        self,
        q: np.ndarray,
        *,
        k: int,
        offset: int = 0,
        match: "Match | None" = None,
        oversample: int = DEFAULT_OVERSAMPLE,
        exact: bool = False,
        hnsw_ef: int | None = None,
    ) -> "VectorQuery":
        """The store query for one embedding ``q (D,)``: prefetch + rescore, or one exact scan."""
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} dimensions, the index {self.dim}")
        match = match or Match()
        if self.geometry == "euclidean":
            return VectorQuery(q, VECTOR, k, offset, match=match, exact=exact, hnsw_ef=hnsw_ef,
                               oversample=max(int(oversample), 1))
        rescore = np.append(q, -self.time(q[None])[0]).astype(np.float32)
        if exact:
            return VectorQuery(rescore, LORENTZ, k, offset, match=match, exact=True)
        limit = max((k + offset) * max(int(oversample), 1), k + offset)
        return VectorQuery(rescore, LORENTZ, k, offset, match=match, prefetch=q, prefetch_using=SPACE,
                           prefetch_limit=limit, hnsw_ef=hnsw_ef)

    def distance(self, score: float) -> float:
        """Score -> distance: geodesic ``acosh(-c s)/sqrt(c)`` (lorentz) or ``1 - cos`` (euclidean)."""
        if self.geometry == "euclidean":
            return 1.0 - float(score)
        c = self.curvature
        return math.acosh(max(-c * float(score), 1.0)) / math.sqrt(c)

    def to_dict(self) -> dict[str, Any]:
        return {"geometry": self.geometry, "dim": self.dim, "curvature": self.curvature, "storage": self.storage}


def check_storage(storage: str) -> str:
    if storage not in STORAGE_MODES:
        raise InputError(f"unknown storage mode {storage!r}: use one of {', '.join(STORAGE_MODES)} (compact keeps one "
                         "byte per dimension in memory and the originals on disk; fast keeps float32 in memory)")
    return storage


@dataclass(frozen=True)
class Quantizer:
    """One byte per dimension for ``space``: ``code = clip(round((x - lo) / step), 0, 255)``.

    One ``lo`` and ``step`` for every dimension, so the Euclidean distance between codes is the distance
    between the vectors divided by ``step``, up to rounding: the graph and the prefetch rank candidates as
    the float vectors would, and the exact rescoring on ``lorentz`` corrects the rest. Values outside the
    range are clipped (their point is still found, ranked by its exact rescoring once it is a candidate).
    """

    lo: float
    step: float

    @classmethod
    def fit(cls, x: np.ndarray) -> "Quantizer":
        """The range of the central ``QUANTILE`` of ``x``'s values, widened by ``MARGIN`` on each side."""
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        if not len(v) or not np.isfinite(v).all():
            raise ValueError("a quantizer needs finite values to fit")
        lo, hi = np.quantile(v, [(1 - QUANTILE) / 2, (1 + QUANTILE) / 2]) if len(v) > 1 else (v[0], v[0])
        pad = max(hi - lo, abs(hi) + abs(lo), 1e-6) * MARGIN
        return cls(float(lo - pad), float((hi - lo + 2 * pad) / 255.0))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes ``0..255`` of ``x``, as float32 (what the engines take for uint8 vectors)."""
        return np.clip(np.rint((np.asarray(x, dtype=np.float64) - self.lo) / self.step), 0, 255).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return {"lo": self.lo, "step": self.step}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Quantizer":
        return cls(float(d["lo"]), float(d["step"]))


@dataclass(frozen=True)
class Match:
    """A payload filter both backends translate: every set field must hold."""

    kinds: tuple[str, ...] | None = None  # kind is one of these
    exclude_unsafe: bool = False  # drop points whose `unsafe` is true (null passes: no rule, no flag)
    tags_any: tuple[str, ...] | None = None  # at least one tag in common
    uris: tuple[str, ...] | None = None  # uri is one of these

    @property
    def empty(self) -> bool:
        return not (self.kinds or self.exclude_unsafe or self.tags_any or self.uris)


@dataclass(frozen=True)
class VectorQuery:
    """A backend-neutral query: optional prefetch on one vector, final scoring on another."""

    vector: np.ndarray
    using: str
    limit: int
    offset: int = 0
    match: Match = field(default_factory=Match)
    prefetch: np.ndarray | None = None
    prefetch_using: str | None = None
    prefetch_limit: int = 0
    exact: bool = False
    hnsw_ef: int | None = None
    #: a compact euclidean store: candidates per result taken from the int8 copy and rescored from the originals
    oversample: int = 1


@dataclass
class Scored:
    """One search result: id, engine score (higher is nearer) and payload."""

    id: str
    score: float
    payload: dict[str, Any]


@dataclass
class StoredPoint:
    """One stored point: id, payload and (when asked for) its named vectors."""

    id: str
    payload: dict[str, Any]
    vectors: dict[str, list[float]] | None = None


class VectorStore(ABC):
    """One collection (one index generation) in some Qdrant engine."""

    schema: Schema
    #: Queries run in this process and hold the GIL throughout (Qdrant Edge), so a caller on an event
    #: loop gains nothing from a worker thread and pays two thread hand-offs (benchmarks/RESULTS.md).
    in_process: bool = False
    #: ``space``'s codes (compact lorentz stores): fitted on the first points written, then kept by the backend
    quantizer: Quantizer | None = None

    def encoded(self, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``vectors`` as stored: a compact store's ``space`` as codes (fitting and keeping the quantizer first)."""
        if not self.schema.quantized:
            return vectors
        if self.quantizer is None:
            self.quantizer = Quantizer.fit(vectors[SPACE])
            self.save_quantizer(self.quantizer)
        return {**vectors, SPACE: self.quantizer.encode(vectors[SPACE])}

    def rescores(self, q: VectorQuery) -> bool:
        """Whether ``q`` searches an int8 copy that the engine rescores from the originals (compact euclidean)."""
        return self.schema.storage == "compact" and not self.schema.quantized and not q.exact

    def prefetch_vector(self, q: VectorQuery) -> np.ndarray | None:
        """The prefetch of ``q`` in the stored vectors' terms (codes on a compact ``space``)."""
        if q.prefetch is None or q.prefetch_using != SPACE or not self.schema.quantized or self.quantizer is None:
            return q.prefetch
        return self.quantizer.encode(q.prefetch)

    def readable(self, vectors: dict[str, list[float]]) -> dict[str, list[float]]:
        """Stored vectors as the encoder gave them: a compact store's ``space`` is read from the exact ``lorentz``."""
        if not self.schema.quantized or LORENTZ not in vectors:
            return vectors
        return {**vectors, SPACE: list(vectors[LORENTZ][: self.schema.dim])}

    def save_quantizer(self, quantizer: Quantizer) -> None:
        """Keep ``quantizer`` with the collection (before any point encoded by it is written)."""
        raise NotImplementedError(f"{type(self).__name__} has no compact storage")

    def footprint(self) -> dict[str, Any]:
        """What the collection holds on disk (``disk_bytes``, None where the engine does not say) and how."""
        return {"storage": self.schema.storage, "disk_bytes": None}

    @abstractmethod
    def upsert(self, ids: Sequence[str], vectors: dict[str, np.ndarray], payloads: Sequence[dict]) -> None:
        """Insert or replace points: ``vectors[name]`` is ``(N, size)`` in the order of ``ids``."""

    @abstractmethod
    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = False,
                 fields: Sequence[str] | None = None) -> list[StoredPoint]:
        """The stored points among ``ids`` (missing ones are left out); ``fields`` limits the payload."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id (unknown ids are ignored)."""

    @abstractmethod
    def delete_where(self, match: Match) -> None:
        """Delete every point the filter matches."""

    @abstractmethod
    def query(self, q: VectorQuery) -> list[Scored]:
        """Run a query; results best first."""

    @abstractmethod
    def count(self, match: Match | None = None) -> int:
        """Exact number of points (matching the filter)."""

    @abstractmethod
    def iter_ids(self, batch: int = 1000) -> Iterator[str]:
        """Every point id, in the engine's order."""

    @abstractmethod
    def optimize(self) -> None:
        """Build the HNSW graph and merge segments; indexing jobs call it once at the end."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the collection."""

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
