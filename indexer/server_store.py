"""Qdrant server backend: ``qdrant-client`` against a Qdrant server or cluster (``--qdrant-url``).

This is how users scale out (sharding, replication, several service workers on one collection).
No Qdrant server binary can be installed on our machines, so the tests run this module against
qdrant-client's local mode, ``QdrantClient(":memory:")``, which speaks the same API (collections,
named vectors, prefetch + rescoring, filters, aliases, collection metadata) with a brute-force
engine. What local mode cannot show (HNSW, gRPC, retries against a dead server) is exercised by
``connect`` only through its error path.

Each generation is one collection ``NAME@<timestamp>``; the alias ``NAME`` points at the current
one. The index record (fingerprint, geometry, curvature, bounds, thresholds, ...) lives in the
collection's own ``metadata`` (Qdrant >= 1.16), so it travels with the data and needs no reserved
point. ``ServerGenerations`` is that layout as a ``Generations`` home (``indexer.generations``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar, cast

import grpc
import httpx
import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException

from indexer.errors import IndexBusyError, IndexNotFoundError, StoreUnavailableError
from indexer.generations import GEN_RE, PIN_TTL_S, Generations, lock_message, now_iso, pin_holder
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

T = TypeVar("T")
_DISTANCE = {"euclid": qm.Distance.EUCLID, "dot": qm.Distance.DOT, "cosine": qm.Distance.COSINE}
_SCHEMA_TYPE = {"keyword": qm.PayloadSchemaType.KEYWORD, "bool": qm.PayloadSchemaType.BOOL, "float": qm.PayloadSchemaType.FLOAT}
RETRIES = 4
BACKOFF_S = 0.5
QUANTIZER_KEY = "quantizer"  # a compact collection's code range, in its metadata beside the record


def _transient(e: Exception) -> bool:
    """Connection-level failures worth retrying (the request may not have reached the server)."""
    if isinstance(e, (ResponseHandlingException, httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, grpc.RpcError):
        return e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def retry(fn: Callable[[], T], *, what: str, retries: int = RETRIES, backoff_s: float = BACKOFF_S) -> T:
    """Call ``fn``; on connection-level failures retry with exponential backoff, then raise
    ``StoreUnavailableError`` naming ``what`` (the server URL). Point ids are content hashes, so
    repeating an upsert is harmless."""
    last: Exception | None = None
    for attempt in range(retries):
        try:
            return fn()
        except Exception as e:
            if not _transient(e):
                raise
            last = e
            if attempt < retries - 1:
                time.sleep(backoff_s * 2**attempt)
    raise StoreUnavailableError(
        f"Qdrant server at {what} did not answer after {retries} attempts ({last.__class__.__name__}: {last}); "
        f"check --qdrant-url, that the server is running and reachable, and the API key"
    )


def connect(url: str, api_key: str | None = None, *, prefer_grpc: bool = True, timeout_s: int = 10,
            retries: int = RETRIES, backoff_s: float = BACKOFF_S) -> QdrantClient:
    """A client for the server at ``url`` (gRPC preferred: faster uploads), checked with bounded retries.

    ``:memory:`` gives a local-mode client (tests and demos only: brute force, one process).
    """
    if url == ":memory:":
        return QdrantClient(":memory:")
    client = QdrantClient(url=url, api_key=api_key, prefer_grpc=prefer_grpc, timeout=timeout_s, check_compatibility=False)
    retry(client.get_collections, what=url, retries=retries, backoff_s=backoff_s)
    return client


def client_url(client: QdrantClient) -> str:
    """The URL a client talks to, for error messages ("local mode" for ``:memory:``/``path=`` clients)."""
    opts = client.init_options
    return opts.get("url") or opts.get("host") or "local mode"


# -------------------------------------------------------------- collections
def collection_names(client: QdrantClient) -> list[str]:
    return [c.name for c in retry(client.get_collections, what=client_url(client)).collections]


def aliases(client: QdrantClient) -> dict[str, str]:
    """alias -> collection."""
    res = retry(client.get_aliases, what=client_url(client))
    return {a.alias_name: a.collection_name for a in res.aliases}


def switch_alias(client: QdrantClient, alias: str, collection: str) -> None:
    """Point ``alias`` at ``collection`` in one atomic request (delete + create in one action list)."""
    ops: list[Any] = []
    if alias in aliases(client):
        ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias)))
    ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=collection, alias_name=alias)))
    retry(lambda: client.update_collection_aliases(change_aliases_operations=ops), what=client_url(client))


def delete_alias(client: QdrantClient, alias: str) -> None:
    if alias in aliases(client):
        op = qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias))
        retry(lambda: client.update_collection_aliases(change_aliases_operations=[op]), what=client_url(client))


def drop_collection(client: QdrantClient, name: str) -> None:
    retry(lambda: client.delete_collection(name), what=client_url(client))


def read_metadata(client: QdrantClient, collection: str) -> dict[str, Any]:
    info = retry(lambda: client.get_collection(collection), what=client_url(client))
    return dict(info.config.metadata or {})


def write_metadata(client: QdrantClient, collection: str, meta: dict[str, Any]) -> None:
    retry(lambda: client.update_collection(collection, metadata=meta), what=client_url(client))


class ServerStore(VectorStore):
    """One collection on a Qdrant server (or in a local-mode client)."""

    def __init__(self, client: QdrantClient, collection: str, schema: Schema):
        self.client = client
        self.collection = collection
        self.schema = schema
        self.url = client_url(client)
        if schema.quantized and (saved := read_metadata(client, collection).get(QUANTIZER_KEY)):
            self.quantizer = Quantizer.from_dict(saved)

    @classmethod
    def create(cls, client: QdrantClient, collection: str, schema: Schema, *, metadata: dict | None = None,
               shard_number: int | None = None, replication_factor: int | None = None) -> "ServerStore":
        """Create the collection with the schema's vectors (``lorentz`` without a graph, on disk) and payload
        indexes; by storage mode as ``indexer.edge_store.edge_config`` lays out a shard."""
        graph_cfg = qm.HnswConfigDiff(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT,
                                      full_scan_threshold=schema.threshold_kb(FULL_SCAN_KB))
        vectors = {}
        for name, (size, dist, graph) in schema.vectors.items():
            params: dict[str, Any] = {"on_disk": True, "hnsw_config": qm.HnswConfigDiff(m=0)}
            if graph:
                params = {"hnsw_config": graph_cfg}
                if schema.quantized:
                    params["datatype"] = qm.Datatype.UINT8
                elif schema.storage == "compact":
                    params.update(on_disk=True, quantization_config=qm.ScalarQuantization(
                        scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True)))
            vectors[name] = qm.VectorParams(size=size, distance=_DISTANCE[dist], **params)
        url = client_url(client)
        # a bulk load: no graph is built while points arrive (indexing_threshold 0); optimize() turns indexing on
        optimizers = qm.OptimizersConfigDiff(indexing_threshold=0)
        retry(lambda: client.create_collection(collection, vectors_config=vectors, metadata=metadata or {},
                                               optimizers_config=optimizers, shard_number=shard_number,
                                               replication_factor=replication_factor), what=url)
        store = cls(client, collection, schema)
        for name, kind in PAYLOAD_INDEXES.items():
            store._call(functools.partial(client.create_payload_index, collection, name, field_schema=_SCHEMA_TYPE[kind]))
        return store

    def _call(self, fn: Callable[[], T]) -> T:
        with warnings.catch_warnings():  # local mode warns that payload indexes are no-ops there
            warnings.simplefilter("ignore", UserWarning)
            return retry(fn, what=self.url)

    # ------------------------------------------------------------------ writes
    def save_quantizer(self, quantizer: Quantizer) -> None:
        meta = read_metadata(self.client, self.collection)
        if saved := meta.get(QUANTIZER_KEY):  # another writer of this collection fitted it first: use theirs
            self.quantizer = Quantizer.from_dict(saved)
            return
        write_metadata(self.client, self.collection, {**meta, QUANTIZER_KEY: quantizer.to_dict()})

    def upsert(self, ids: Sequence[str], vectors: dict[str, np.ndarray], payloads: Sequence[dict]) -> None:
        if not len(ids):
            return
        stored = self.encoded(vectors)
        batch = qm.Batch(ids=list(ids), vectors={n: np.asarray(v, dtype=np.float32).tolist() for n, v in stored.items()},
                         payloads=list(payloads))
        self._call(lambda: self.client.upsert(self.collection, points=batch, wait=True))

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            sel = qm.PointIdsList(points=list(ids))
            self._call(lambda: self.client.delete(self.collection, points_selector=sel, wait=True))

    def delete_where(self, match: Match) -> None:
        sel = qm.FilterSelector(filter=_filter(match))
        self._call(lambda: self.client.delete(self.collection, points_selector=sel, wait=True))

    def optimize(self, timeout_s: float = 3600.0) -> None:
        """Turn indexing on (a new collection loads without it), then wait (bounded) until the server's background
        optimizer has built the graph and the collection is green."""
        on = qm.OptimizersConfigDiff(indexing_threshold=self.schema.threshold_kb(INDEXING_KB))
        self._call(lambda: self.client.update_collection(self.collection, optimizers_config=on))
        deadline = time.monotonic() + timeout_s
        while self._call(lambda: self.client.get_collection(self.collection)).status != qm.CollectionStatus.GREEN:
            if time.monotonic() > deadline:
                raise StoreUnavailableError(
                    f"collection {self.collection} at {self.url} was not optimized within {timeout_s:.0f} s")
            time.sleep(1.0)

    def close(self) -> None:
        """The client is shared (generations, metadata); its owner closes it."""

    # ------------------------------------------------------------------- reads
    def retrieve(self, ids: Sequence[str], *, with_vectors: bool = False,
                 fields: Sequence[str] | None = None) -> list[StoredPoint]:
        if not ids:
            return []
        recs = self._call(lambda: self.client.retrieve(self.collection, ids=list(ids), with_vectors=with_vectors,
                                                       with_payload=list(fields) if fields else True))
        # the collections hold named vectors only, so a record's vector is a dict name -> values
        return [StoredPoint(str(r.id), dict(r.payload or {}), self.readable(dict(cast(dict, r.vector))) if with_vectors
                            else None) for r in recs]

    def query(self, q: VectorQuery) -> list[Scored]:
        flt = None if q.match.empty else _filter(q.match)
        rescore = None
        if self.rescores(q):
            rescore = qm.QuantizationSearchParams(rescore=True, oversampling=float(q.oversample))
        params = qm.SearchParams(hnsw_ef=q.hnsw_ef, exact=q.exact, quantization=rescore)
        prefetch = None
        if (vector := self.prefetch_vector(q)) is not None:
            prefetch = [qm.Prefetch(query=vector.tolist(), using=q.prefetch_using, limit=q.prefetch_limit,
                                    filter=flt, params=params)]
        res = self._call(lambda: self.client.query_points(
            self.collection, query=q.vector.tolist(), using=q.using, prefetch=prefetch, query_filter=flt,
            limit=q.limit, offset=q.offset or None, with_payload=True, search_params=None if prefetch else params))
        return [Scored(str(p.id), float(p.score), dict(p.payload or {})) for p in res.points]

    def count(self, match: Match | None = None) -> int:
        flt = None if match is None or match.empty else _filter(match)
        return int(self._call(lambda: self.client.count(self.collection, count_filter=flt, exact=True)).count)

    def iter_ids(self, batch: int = 1000) -> Iterator[str]:
        offset = None
        while True:
            recs, offset = self._call(functools.partial(self.client.scroll, self.collection, limit=batch, offset=offset,
                                                        with_payload=False, with_vectors=False))
            yield from (str(r.id) for r in recs)
            if offset is None:
                return


def _filter(match: Match) -> qm.Filter:
    must: list[Any] = []
    must_not: list[Any] = []
    if match.kinds:
        must.append(qm.FieldCondition(key="kind", match=qm.MatchAny(any=list(match.kinds))))
    if match.tags_any:
        must.append(qm.FieldCondition(key="tags", match=qm.MatchAny(any=list(match.tags_any))))
    if match.uris:
        must.append(qm.FieldCondition(key="uri", match=qm.MatchAny(any=list(match.uris))))
    if match.exclude_unsafe:
        must_not.append(qm.FieldCondition(key="unsafe", match=qm.MatchValue(value=True)))
    return qm.Filter(must=must or None, must_not=must_not or None)


class ServerGenerations(Generations):
    """Server home: one collection per generation, ``NAME`` as an alias, metadata in the collection."""

    def __init__(self, name: str, client, root: Path, *, shards: int | None = None, replicas: int | None = None):
        super().__init__(name, root)
        self.client = client
        self.shards = shards
        self.replicas = replicas

    def layout(self) -> dict[str, int]:
        """Shards and replicas of a new generation: as asked, else as the current generation's (so a
        reindex by an admin job keeps the cluster layout), else the server's defaults (left out)."""
        asked = {"shard_number": self.shards, "replication_factor": self.replicas}
        inherited: dict[str, int] = {}
        if None in asked.values() and (cur := self.current()) is not None:
            with contextlib.suppress(IndexNotFoundError):
                inherited = self.read_meta(cur).get("layout") or {}
        return {k: v if v is not None else inherited[k] for k, v in asked.items() if v is not None or k in inherited}

    def generations(self) -> list[str]:
        return sorted(c for c in collection_names(self.client) if (m := GEN_RE.match(c)) and m["name"] == self.name)

    def current(self) -> str | None:
        return aliases(self.client).get(self.name)

    def read_meta(self, gen: str) -> dict[str, Any]:
        if gen not in collection_names(self.client):
            raise IndexNotFoundError(f"generation {gen} not found at {client_url(self.client)}")
        return read_metadata(self.client, gen)

    def write_meta(self, gen: str, meta: dict[str, Any]) -> None:
        write_metadata(self.client, gen, meta)

    def create_store(self, gen: str, schema: Schema, meta: dict[str, Any]) -> VectorStore:
        layout = self.layout()
        meta = {**meta, "layout": layout} if layout else meta  # recorded: the next generation inherits it
        return ServerStore.create(self.client, gen, schema, metadata=meta, **layout)

    def open_store(self, gen: str, schema: Schema) -> VectorStore:
        return ServerStore(self.client, gen, schema)

    def switch(self, gen: str) -> None:
        switch_alias(self.client, self.name, gen)

    def delete_generation(self, gen: str) -> None:
        drop_collection(self.client, gen)
        shutil.rmtree(self.dir / gen, ignore_errors=True)

    def drop_pointer(self) -> None:
        delete_alias(self.client, self.name)

    def _pin_collection(self) -> str:
        return f"{self.name}@pin-{pin_holder()}"

    def pin(self, gen: str, *, ttl_s: float = PIN_TTL_S) -> None:
        """Create or renew this process's lease on ``gen``; call again well within ``ttl_s``."""
        lease = {"generation": gen, "holder": pin_holder(), "expires": _dt.datetime.now(_dt.timezone.utc).timestamp() + ttl_s}
        name = self._pin_collection()
        if name in collection_names(self.client):
            write_metadata(self.client, name, lease)
        else:
            retry(lambda: self.client.create_collection(name, vectors_config={}, metadata=lease),
                  what=client_url(self.client))

    def unpin(self) -> None:
        if self._pin_collection() in collection_names(self.client):
            drop_collection(self.client, self._pin_collection())

    def pinned(self) -> set[str]:
        now = _dt.datetime.now(_dt.timezone.utc).timestamp()
        out: set[str] = set()
        for c in collection_names(self.client):
            if not c.startswith(f"{self.name}@pin-"):
                continue
            lease = read_metadata(self.client, c)
            if float(lease.get("expires") or 0) > now:
                if lease.get("generation") is not None:
                    out.add(lease["generation"])
            else:
                drop_collection(self.client, c)  # not renewed: its service is gone
        return {g for g in out if isinstance(g, str)}

    @contextmanager
    def lock(self, *, break_lock: bool = False) -> Iterator[None]:
        """A collection ``NAME@lock`` created for the job and deleted after it. A job killed with -9
        leaves it behind; its metadata says who held it, and ``--break-lock`` removes it."""
        lock = f"{self.name}@lock"
        if break_lock and lock in collection_names(self.client):
            drop_collection(self.client, lock)
        holder = {"holder": f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}"}
        try:
            if lock in collection_names(self.client):
                raise FileExistsError
            retry(lambda: self.client.create_collection(lock, vectors_config={}, metadata=holder),
                  what=client_url(self.client))
        except Exception as e:
            if isinstance(e, FileExistsError) or lock in collection_names(self.client):
                who = read_metadata(self.client, lock).get("holder", "unknown job")
                raise IndexBusyError(lock_message(self.name, who, "If that job is dead, re-run with --break-lock.")) from None
            raise
        try:
            yield
        finally:
            drop_collection(self.client, lock)
