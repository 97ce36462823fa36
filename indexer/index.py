"""An index as readers see it: where indexes live, opening a generation, and the record's checks.

The read path's one home, shared by search (``indexer.search``) and the jobs that write
generations (``indexer.builder``); neither of those imports the other.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.errors import ModelMismatchError, StorageModeError
from indexer.generations import Generations, LocalGenerations
from indexer.store import SPACE, VECTOR, Schema, VectorStore
from training.errors import InputError

if TYPE_CHECKING:  # artifacts load torch and open_clip; the record's checks only read their fingerprint
    from training.artifact import Artifact

DEFAULT_ROOT = Path("runs/indexes")
ROOT_ENV = "SAFE_RETRIEVAL_INDEX_ROOT"


def default_root() -> Path:
    """Where embedded indexes live: ``$SAFE_RETRIEVAL_INDEX_ROOT`` or ``runs/indexes``."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def generations_for(name: str, *, root: Path | None = None, url: str | None = None, api_key: str | None = None,
                    client=None, shards: int | None = None, replicas: int | None = None,
                    **edge_config) -> Generations:
    """The generations of index ``name``: on a Qdrant server (``url`` or an injected ``client``), else embedded under ``root``.

    ``shards`` and ``replicas`` lay out new generations' collections across a Qdrant cluster's nodes.
    """
    root = Path(root) if root is not None else default_root()
    if client is None and not url:
        if shards is not None or replicas is not None:
            raise InputError("--shards and --replicas lay out a Qdrant server's collections; the embedded store is one "
                             "shard on this machine. Add --qdrant-url, or leave them out")
        return LocalGenerations(name, root, **edge_config)
    # qdrant-client takes a second to load: embedded indexes never need it
    from indexer import server_store

    if client is None:
        assert url, "the embedded store took the case without a url above"
        client = server_store.connect(url, api_key)
    return server_store.ServerGenerations(name, client, root, shards=shards, replicas=replicas)


def schema_of(meta: dict[str, Any]) -> Schema:
    """The store schema a generation's record describes (a record without ``storage`` predates it: fast)."""
    return Schema(meta["geometry"], int(meta["dim"]), float(meta.get("curvature") or 0.0), meta.get("storage") or "fast")


def check_fingerprint(meta: dict[str, Any], art: "Artifact") -> None:
    """Refuse to mix models in one index."""
    if meta.get("fingerprint") != art.fingerprint:
        raise ModelMismatchError(
            f"index {meta.get('name')} (generation {meta.get('generation')}) was built with model {meta.get('fingerprint')}, "
            f"not {art.fingerprint}; reindex with this model ('safe-retrieval index build --name {meta.get('name')} --model ...')"
        )


def point_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """The fields every point shows: ``kind, uri, caption, tags, unsafe`` from its payload."""
    return {"kind": payload.get("kind"), "uri": payload.get("uri"), "caption": payload.get("caption"),
            "tags": list(payload.get("tags") or []), "unsafe": payload.get("unsafe")}


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
        out = {"id": p.id, **point_fields(p.payload), "payload": p.payload}
        if with_vector:
            out["vector"] = list((p.vectors or {}).get(SPACE if self.schema.geometry == "lorentz" else VECTOR, []))
        return out

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


def check_model(index: Index, art: "Artifact") -> None:
    """Raise ``ModelMismatchError`` ("... reindex with this model") unless ``art`` built ``index``."""
    check_fingerprint(index.meta, art)


def check_storage_mode(index: Index, expected: str | None) -> None:
    """Raise ``StorageModeError`` unless ``index`` was built with the storage mode ``expected`` (None: any).

    A server sized for compact generations (a quarter of the memory) must not start serving a fast one.
    """
    if expected is not None and index.schema.storage != expected:
        raise StorageModeError(
            f"index {index.name} (generation {index.generation}) was built with --storage {index.schema.storage}, and this "
            f"service expects {expected} (SAFE_RETRIEVAL_INDEX_STORAGE); rebuild it with 'safe-retrieval index build "
            f"--name {index.name} --storage {expected} ...', or set SAFE_RETRIEVAL_INDEX_STORAGE={index.schema.storage}")


__all__ = ["DEFAULT_ROOT", "ROOT_ENV", "Index", "check_fingerprint", "check_model", "check_storage_mode", "default_root",
           "generations_for", "open_index", "point_fields", "schema_of"]
