"""A search (and an embedding) from the routes' point of view: one call from a parsed request to its answer.

``search`` leases the served pair, encodes the query with that pair's model (through the batcher),
applies the moderator policy, calls ``indexer.search`` through the index's async method, filters the
hits once more and records the metrics and the audit notes. The routes only turn HTTP into these
calls. Access rule (invariant 6): callers without the moderator token never receive an item flagged
unsafe: ``safety=off`` needs the token; ``traverse`` for them also drops unsafe items (it becomes
``strict``), and a last check removes any flagged hit that still got through.

A store that does not answer (or an index that vanished) is a 503 with ``Retry-After``, decided
here (:func:`store_errors`) for the search, items and media routes alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from typing import Any, Iterator

import torch
from starlette.concurrency import run_in_threadpool

from indexer.errors import IndexNotFoundError, StoreUnavailableError
from indexer.search import asearch
from service.admission import TRIM_ABOVE_BYTES, return_freed_memory
from service.batching import Encoded
from service.deps import Caller
from service.errors import NotFoundError, UnavailableError
from service.schemas import QueryReport, SearchOptions
from service.state import ServedPair, Services
from training.images import preprocess_bytes, read_header
from training.traversal import is_unsafe


@contextlib.contextmanager
def store_errors(services: Services) -> Iterator[None]:
    """Turn "the store is down / the index is gone" into a 503 that says when to retry."""
    try:
        yield
    except (StoreUnavailableError, IndexNotFoundError) as e:
        raise UnavailableError(f"the vector store is not answering: {e}", services.settings.store_retry_s) from e


# ------------------------------------------------------------------ items
def parse_item_id(item_id: str) -> str:
    """Item ids are UUIDs; anything else cannot exist (404 without asking the store)."""
    try:
        return str(uuid.UUID(item_id))
    except ValueError:
        raise NotFoundError(f"no item {item_id!r}; ids are the UUIDs returned in search results") from None


def item_vector(record: dict[str, Any]) -> list[float] | None:
    """The query vector stored for an item: space components (lorentz) or the unit vector (euclidean)."""
    vector = record.get("vector")
    if isinstance(vector, dict):
        vector = vector.get("space", vector.get("vector"))
    return vector


async def fetch_item(services: Services, pair: ServedPair, caller: Caller, item_id: str, *,
                     with_vector: bool) -> dict[str, Any]:
    """One indexed item's record from the pair's index; 404 when there is none, 503 when the store is down.

    To a caller without the moderator token an item flagged unsafe does not exist: the same store call,
    then the same 404 with the same body as an absent id, so an id derived from a guessed caption or
    image cannot confirm that unsafe content is indexed. A moderator's fetch notes the item as unsafe.
    """
    key = parse_item_id(item_id)
    with store_errors(services):
        record = await pair.index.aretrieve(key, with_vector)
    unsafe = record is not None and (record.get("payload") or {}).get("unsafe") is True
    if record is None or (unsafe and not caller.is_moderator):
        raise NotFoundError(f"no item {item_id!r} in index {pair.info.get('name')}")
    if unsafe:
        caller.note(unsafe_ids=[str(record.get("id", item_id))])
    return record


# ------------------------------------------------------------------ encoding
def input_side(pair: ServedPair) -> int:
    """The side of the pair's model input in pixels (what preprocessing resizes the short side to)."""
    size = pair.artifact.encoder.arch.preprocess["size"]
    return max(size) if isinstance(size, (list, tuple)) else int(size)


def prepare_image(pair: ServedPair, data: bytes, max_pixels: int, max_aspect: float,
                  cost: int = 0) -> tuple[torch.Tensor, str]:
    """Decode (pixel and aspect limits, truncation check) and preprocess: bytes -> ``(3, H, W)`` tensor and a cache key.

    After a decode of ``cost`` >= ``TRIM_ABOVE_BYTES`` the freed heap goes back to the OS, on this worker thread.
    """
    try:
        pixels = preprocess_bytes(data, pair.artifact.encoder.transform, name="image", max_pixels=max_pixels,
                                  max_aspect=max_aspect)
    finally:
        if cost >= TRIM_ABOVE_BYTES:
            return_freed_memory()
    return pixels, hashlib.sha256(data).hexdigest()


async def encode_query(services: Services, pair: ServedPair, *, text: str | None = None,
                       image: bytes | None = None) -> tuple[Encoded, str]:
    """Embed a text or image query with the pair's model through the batcher: ``(Encoded, modality)``.

    An image's header is read first (pixel and aspect limits); what decoding it will take is then
    reserved in the image memory budget (:mod:`service.admission`: a short wait, then 503) and only
    then is it decoded. Texts pass neither the budget nor the threadpool.
    """
    if text is not None:
        return await services.batcher.encode(pair.artifact, "text", text, key=text), "text"
    assert image is not None, "a query is a text or an image"
    t0 = time.perf_counter()
    settings = services.settings
    header = await run_in_threadpool(read_header, image, name="image", max_pixels=settings.max_image_pixels,
                                     max_aspect=settings.max_image_aspect)
    cost = header.cost(input_side(pair))
    async with services.image_budget.admit(cost):
        t1 = time.perf_counter()
        pixels, digest = await run_in_threadpool(prepare_image, pair, image, settings.max_image_pixels,
                                                 settings.max_image_aspect, cost)
    services.metrics.stage_seconds.labels("admission").observe(t1 - t0)  # the header and the wait for room
    services.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t1)
    return await services.batcher.encode(pair.artifact, "image", pixels, key=digest), "image"


# ------------------------------------------------------------------ the search
async def search(
    services: Services,
    caller: Caller,
    opts: SearchOptions,
    *,
    text: str | None = None,
    image: bytes | None = None,
    item_id: str | None = None,
) -> dict[str, Any]:
    """Search with exactly one of ``text``, ``image`` (bytes) or ``item_id``: the ``SearchResponse`` body."""
    metrics = services.metrics
    if opts.safety == "off":
        caller.require_moderator("safety=off")
    await caller.note_query(text=text, image=image, item_id=item_id)
    caller.note(safety=opts.safety)
    t0 = time.perf_counter()
    with services.state.lease() as pair:
        with store_errors(services):
            if item_id is not None:
                record = await fetch_item(services, pair, caller, item_id, with_vector=True)
                stored = item_vector(record)
                if stored is None:
                    raise NotFoundError(f"no item {item_id!r} in index {pair.info.get('name')}")
                vector, modality = torch.tensor(stored, dtype=torch.float32), record.get("kind") or "image"
                d0 = None  # the search computes it from the stored vector
            else:
                encoded, modality = await encode_query(services, pair, text=text, image=image)
                vector, d0 = encoded.vector, encoded.distance_to_origin
            t1 = time.perf_counter()
            # ordinary callers never see unsafe items: their `traverse` also filters
            mode = "strict" if opts.safety == "traverse" and not caller.is_moderator else opts.safety
            tags = list(opts.filter.tags) if opts.filter and opts.filter.tags else None
            result = await asearch(pair.index, pair.artifact, vector, query_modality=modality, target=opts.target,
                                   k=opts.k, offset=opts.offset, safety=mode, tags=tags, distance_to_origin=d0)
        t2 = time.perf_counter()
        hits = [h for h in result.hits if caller.is_moderator or h.unsafe is not True]
        caller.note(unsafe_ids=[h.id for h in hits if h.unsafe is True])
        query = result.query
        ref = pair.ref
    metrics.stage_seconds.labels("encode").observe(t1 - t0)
    metrics.stage_seconds.labels("search").observe(t2 - t1)
    metrics.stage_seconds.labels("total").observe(t2 - t0)
    metrics.queries.labels(opts.safety, modality).inc()
    if query.unsafe:
        metrics.unsafe_queries.inc()
    if query.redirected:
        metrics.redirected_queries.inc()
    return {
        "results": [
            {"id": h.id, "kind": h.kind, "score": h.score, "distance": h.distance, "uri": h.uri, "caption": h.caption,
             "tags": list(h.tags or []), "unsafe": h.unsafe}
            for h in hits
        ],
        "query": QueryReport.model_validate(query),
        "index": ref,
        "timings_ms": {"encode": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3, "total": (time.perf_counter() - t0) * 1e3},
    }


async def embed(services: Services, caller: Caller, *, text: str | None = None,
                image: bytes | None = None) -> dict[str, Any]:
    """The query's embedding and safety report: the ``EmbedResponse`` body."""
    await caller.note_query(text=text, image=image)
    with services.state.lease() as pair:
        encoded, modality = await encode_query(services, pair, text=text, image=image)
        art = pair.artifact
        threshold = art.unsafe_threshold(modality) if art.geometry == "lorentz" else None
    d0 = encoded.distance_to_origin
    unsafe = is_unsafe(d0, threshold) if d0 is not None else None
    return {
        "geometry": art.geometry,
        "curvature": art.curvature if art.geometry == "lorentz" else None,
        "vector": await run_in_threadpool(encoded.vector.tolist),
        "distance_to_origin": d0,
        "unsafe": None if unsafe is None else bool(unsafe),
    }
