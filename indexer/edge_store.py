"""Qdrant Edge backend (the embedded default): one ``EdgeShard`` in one directory per index generation.

Edge is the Qdrant engine in-process (segments, WAL, HNSW, payload indexes), pinned at
``qdrant-edge-py==0.9.0``; its API is beta, so every call to it lives in this module. Three things
shape the code:

- Edge has no background optimizer. HNSW graphs are built only by ``optimize()``, which the
  indexing job calls once at the end; until then search is an exact brute-force scan.
- One open handle per directory: a second ``EdgeShard.load`` fails on the WAL lock. We turn that
  into ``IndexBusyError`` naming the directory.
- In 0.9.0 ``MatchValue(value=True)`` is extracted as the integer 1 (``bool`` subclasses ``int``),
  so it never matches a bool payload field. ``numpy.bool_`` is not an ``int`` and reaches the bool
  branch, so filters on ``unsafe`` pass ``np.bool_`` (tested in tests/indexer/test_store.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import qdrant_edge as qe

from indexer.errors import IndexBusyError, StoreFullError, StoreUnavailableError
from indexer.store import (
    FULL_SCAN_KB,
    HNSW_EF_CONSTRUCT,
    HNSW_M,
    INDEXING_KB,
    PAYLOAD_INDEXES,
    Match,
    Quantizer,
    Schema,
    Scored,
    StoredPoint,
    VectorQuery,
    VectorStore,
)

_DISTANCE = {"euclid": qe.Distance.Euclid, "dot": qe.Distance.Dot, "cosine": qe.Distance.Cosine}
_SCHEMA_TYPE = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "bool": qe.PayloadSchemaType.Bool,
    "float": qe.PayloadSchemaType.Float,
}
#: points written between flushes: the WAL keeps every operation since the last flush, so a bulk load without one
#: held the whole collection twice on disk (6 GB of WAL at 1,000,000 x 768; benchmarks/RESULTS.md, "A million items")
FLUSH_POINTS = 20_000
QUANTIZER_FILE = "quantizer.json"  # a compact shard's code range, inside the shard so a copy carries it
#: free disk a shard keeps beyond what a write needs (the WAL preallocates 32 MB segments). The engine writes through
#: memory maps, and a full disk there is a SIGBUS that kills the process (seen on a 3 MB tmpfs), not an error: so
#: every write checks the room first and refuses with StoreFullError
RESERVE_BYTES = 128 * 2**20


def edge_config(schema: Schema, *, indexing_threshold_kb: int | None = None, hnsw_m: int = HNSW_M,
                ef_construct: int = HNSW_EF_CONSTRUCT) -> qe.EdgeConfig:
    """The shard config for ``schema``: HNSW on ``space``/``vector``, a graphless ``lorentz``; by storage mode,
    ``space`` as one-byte codes (compact lorentz), ``vector`` on disk with an int8 copy in memory (compact
    euclidean), or float32 in memory (fast).

    ``indexing_threshold_kb`` is the segment size above which ``optimize()`` builds a graph
    (Qdrant's default, 10 MB, when None); below it a segment stays a brute-force scan. Both thresholds count
    float32 vectors (``Schema.threshold_kb``).
    """
    vectors = {}
    for name, (size, distance, graph) in schema.vectors.items():
        if graph and schema.storage == "fast":
            vectors[name] = qe.EdgeVectorParams(size=size, distance=_DISTANCE[distance])
        elif graph and schema.quantized:
            vectors[name] = qe.EdgeVectorParams(size=size, distance=_DISTANCE[distance],
                                                datatype=qe.VectorStorageDatatype.Uint8)
        elif graph:
            int8 = qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
            vectors[name] = qe.EdgeVectorParams(size=size, distance=_DISTANCE[distance], memory=qe.Memory.Cold,
                                                quantization_config=int8)
        else:
            # m=0: no graph; the vector is only read for candidates (rescoring) or scanned (exact), so it lives on
            # disk, memory-mapped: only the candidates' pages are read (Cached: 2.35 against 2.98 ms median at
            # 100,000 x 768 and oversample 16 for Cold's reads, for 146 MB more resident after 750 queries)
            vectors[name] = qe.EdgeVectorParams(
                size=size, distance=_DISTANCE[distance], memory=qe.Memory.Cached,
                hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=FULL_SCAN_KB),
            )
    optimizers = qe.EdgeOptimizersConfig(indexing_threshold=schema.threshold_kb(indexing_threshold_kb or INDEXING_KB))
    full_scan = schema.threshold_kb(FULL_SCAN_KB)
    return qe.EdgeConfig(
        vectors=vectors,
        hnsw_config=qe.HnswIndexConfig(m=hnsw_m, ef_construct=ef_construct, full_scan_threshold=full_scan),
        optimizers=optimizers,
    )


def _busy_or_raise(e: Exception, path: Path) -> None:
    msg = str(e)
    if "WouldBlock" in msg:
        raise IndexBusyError(
            f"{path} is open in another process (a running build or the service); Qdrant Edge allows one "
            f"handle per directory. Stop that process, or use a Qdrant server (--qdrant-url) for shared access"
        ) from e
    raise StoreUnavailableError(f"Qdrant Edge could not open {path}: {msg}") from e


class EdgeStore(VectorStore):
    """One Qdrant Edge shard directory holding one index generation."""

    in_process = True

    def __init__(self, shard: qe.EdgeShard, schema: Schema, path: Path):
        self.shard = shard
        self.schema = schema
        self.path = path
        qfile = path / QUANTIZER_FILE
        self.quantizer = Quantizer.from_dict(json.loads(qfile.read_text())) if qfile.is_file() else None
        self._unflushed = 0

    @classmethod
    def create(cls, path: str | Path, schema: Schema, **config) -> "EdgeStore":
        """Create a shard in ``path`` (must hold no segments) with the schema's vectors and payload indexes."""
        path = Path(path)
        check_room(path, 0, "creating an index shard")
        try:
            shard = qe.EdgeShard.create(str(path), edge_config(schema, **config))
        except Exception as e:  # the binding raises plain Exception
            _busy_or_raise(e, path)
        for name, kind in PAYLOAD_INDEXES.items():
            shard.update(qe.UpdateOperation.create_field_index(name, _SCHEMA_TYPE[kind]))
        return cls(shard, schema, path)

    @classmethod
    def open(cls, path: str | Path, schema: Schema) -> "EdgeStore":
        """Open an existing shard (replaying its WAL, so points upserted before a kill -9 are kept)."""
        path = Path(path)
        try:
            shard = qe.EdgeShard.load(str(path))
        except Exception as e:
            _busy_or_raise(e, path)
        store = cls(shard, schema, path)
        if schema.quantized and store.quantizer is None and store.count():
            store.close()
            raise StoreUnavailableError(f"{path} is a compact shard with points but no {QUANTIZER_FILE} (the range its "
                                        "codes were written with): it cannot be searched or written; rebuild the index")
        return store

    # ------------------------------------------------------------------ writes
    def save_quantizer(self, quantizer: Quantizer) -> None:
        tmp = self.path / f".{QUANTIZER_FILE}.tmp"
        with open(tmp, "w") as f:
            json.dump(quantizer.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / QUANTIZER_FILE)

    def upsert(self, ids: Sequence[str], vectors: dict[str, np.ndarray], payloads: Sequence[dict]) -> None:
        if not len(ids):
            return
        # the WAL, then the segment: twice the float32 rows and their payloads
        check_room(self.path, 2 * sum(np.asarray(v).size * 4 for v in vectors.values()) + 1024 * len(ids),
                   f"writing {len(ids)} points")
        lists = {name: np.asarray(v, dtype=np.float32).tolist() for name, v in self.encoded(vectors).items()}
        points = [
            qe.Point(id=pid, vector={name: rows[i] for name, rows in lists.items()}, payload=payloads[i])
            for i, pid in enumerate(ids)
        ]
        self.shard.update(qe.UpdateOperation.upsert_points(points))
        self._unflushed += len(points)
        if self._unflushed >= FLUSH_POINTS:
            self.shard.flush()  # lets the WAL drop what is now in the segments
            self._unflushed = 0

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self.shard.update(qe.UpdateOperation.delete_points(list(ids)))

    def delete_where(self, match: Match) -> None:
        self.shard.update(qe.UpdateOperation.delete_points_by_filter(_filter(match)))

    def optimize(self) -> None:
        check_room(self.path, disk_bytes(self.path), "optimizing (the new segment is written beside the old one)")
        self.shard.optimize()
        self.shard.flush()

    def close(self) -> None:
        if self.shard is not None:
            self.shard.flush()
            self.shard.close()
            # typed as open for the store's whole useful life; None only marks it closed for close() to skip
            self.shard = None  # type: ignore[assignment]

    # ------------------------------------------------------------------- reads
    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = False,
                 fields: Sequence[str] | None = None) -> list[StoredPoint]:
        if not ids:
            return []
        recs = self.shard.retrieve(point_ids=list(ids), with_payload=list(fields) if fields else True,
                                   with_vector=with_vectors)
        return [StoredPoint(str(r.id), dict(r.payload or {}), self.readable(_vectors(r.vector)) if with_vectors else None)
                for r in recs]

    def query(self, q: VectorQuery) -> list[Scored]:
        flt = None if q.match.empty else _filter(q.match)
        rescore = None
        if self.rescores(q):
            rescore = qe.QuantizationSearchParams(rescore=True, oversampling=float(q.oversample))
        params = qe.SearchParams(hnsw_ef=q.hnsw_ef, exact=q.exact, quantization=rescore)
        prefetches = None
        prefetch = self.prefetch_vector(q)
        if prefetch is not None:
            # the filter goes on the prefetch too, so candidates are already safe and k results come back
            prefetches = [qe.Prefetch(limit=q.prefetch_limit, filter=flt, params=params,
                                      query=qe.Query.Nearest(prefetch.tolist(), using=q.prefetch_using))]
        req = qe.QueryRequest(limit=q.limit, offset=q.offset or None, prefetches=prefetches, filter=flt,
                              query=qe.Query.Nearest(q.vector.tolist(), using=q.using), with_payload=True,
                              params=params if prefetches is None else None)
        return [Scored(str(p.id), float(p.score), dict(p.payload or {})) for p in self.shard.query(req)]

    def count(self, match: Match | None = None) -> int:
        flt = None if match is None or match.empty else _filter(match)
        return int(self.shard.count(qe.CountRequest(exact=True, filter=flt)))

    def iter_ids(self, batch: int = 1000) -> Iterator[str]:
        offset = None
        while True:
            recs, offset = self.shard.scroll(qe.ScrollRequest(offset=offset, limit=batch, with_payload=False))
            yield from (str(r.id) for r in recs)
            if offset is None:
                return

    def footprint(self) -> dict[str, Any]:
        return {**super().footprint(), "disk_bytes": disk_bytes(self.path)}

    def indexed_vectors(self) -> int:
        """Vectors covered by an HNSW graph (0 until ``optimize()`` has built one)."""
        return int(self.shard.info().indexed_vectors_count)


def check_room(path: Path, need: int, what: str) -> None:
    """Raise ``StoreFullError`` unless the disk holding ``path`` has ``need`` bytes free beyond ``RESERVE_BYTES``."""
    where = next((p for p in (path, *path.parents) if p.exists()), path)
    free = shutil.disk_usage(where).free
    if free < need + RESERVE_BYTES:
        raise StoreFullError(
            f"{what} needs about {(need + RESERVE_BYTES) / 2**20:.0f} MB free on the disk of {path}, and it has "
            f"{free / 2**20:.0f} MB, so it was not started. Free space there (old generations: 'index list', 'index "
            "drop'), or put the index on a larger disk (--root / SAFE_RETRIEVAL_INDEX_ROOT); a build run again resumes "
            "where it stopped")


def disk_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks: Qdrant preallocates and punches holes)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # a segment the optimizer just replaced
                pass
    return total


def _vectors(v) -> dict[str, list[float]]:
    return {name: list(vals) for name, vals in (v or {}).items()}


def _filter(match: Match) -> qe.Filter:
    must: list[qe.ConditionType] = []
    must_not: list[qe.ConditionType] = []
    if match.kinds:
        must.append(qe.FieldCondition(key="kind", match=qe.MatchAny(any=list(match.kinds))))
    if match.tags_any:
        must.append(qe.FieldCondition(key="tags", match=qe.MatchAny(any=list(match.tags_any))))
    if match.uris:
        must.append(qe.FieldCondition(key="uri", match=qe.MatchAny(any=list(match.uris))))
    if match.exclude_unsafe:
        # the stub says bool, but only np.bool_ reaches the binding's bool branch (see the module docstring)
        must_not.append(qe.FieldCondition(key="unsafe", match=qe.MatchValue(value=np.bool_(True))))  # type: ignore[arg-type]
    return qe.Filter(must=must or None, must_not=must_not or None)

