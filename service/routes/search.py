"""``/v1/search``, ``/v1/search/upload`` and ``/v1/embed``: encode a query, search with a safety mode.

Access rule (invariant 6): callers without the moderator token never receive an item flagged
unsafe. ``safety=off`` needs the token; ``traverse`` for them also drops unsafe items (it becomes
``strict``), and a last check removes any flagged hit that still got through.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
import uuid
from typing import Annotated, Any

import torch

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from service import audit
from service.deps import TOKEN_OPTIONAL, Caller, CallerDep
from service.errors import NotFoundError, UnavailableError
from service.schemas import (
    MAX_K,
    MAX_OFFSET,
    EmbedRequest,
    EmbedResponse,
    QueryReport,
    Safety,
    SearchFilter,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    Tag,
    Target,
)
from service.state import ServedPair
from training.errors import ImageError, InputError
from training.images import preprocess_bytes

router = APIRouter(prefix="/v1", tags=["search"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad image or base64, or an option the model cannot honour."},
    401: {"description": "safety=off without (or with a wrong) moderator token."},
    403: {"description": "safety=off but no moderator token is configured."},
    404: {"description": "item_id not found."},
    413: {"description": "Body over the size limit."},
    503: {"description": "Model or store not ready; retry after Retry-After seconds."},
}


# ------------------------------------------------------------------ query preparation (worker threads)
def decode_base64(text: str) -> bytes:
    """Base64 (optionally a ``data:...;base64,`` URI) -> bytes; InputError (400) when malformed."""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise InputError("image data URI is not base64-encoded; send base64 image bytes")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"image is not valid base64 ({e}); send the file's bytes base64-encoded") from e
    if not data:
        raise ImageError("image is empty; send the bytes of a JPEG, PNG or WebP file")
    return data


def prepare_image(pair: ServedPair, data: bytes, max_pixels: int, max_aspect: float):
    """Decode (pixel and aspect limits, truncation check) and preprocess: bytes -> ``(3, H, W)`` tensor and a cache key."""
    pixels = preprocess_bytes(data, pair.artifact.encoder.transform, name="image", max_pixels=max_pixels,
                              max_aspect=max_aspect)
    return pixels, hashlib.sha256(data).hexdigest()


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


def item_query(pair: ServedPair, item_id: str) -> tuple[torch.Tensor, str]:
    """The stored vector ``(D,)`` and kind of an indexed item, to search with (more like this)."""
    record = pair.index.retrieve(parse_item_id(item_id), True)
    vector = item_vector(record) if record is not None else None
    if vector is None:
        raise NotFoundError(f"no item {item_id!r} in index {pair.info.get('name')}")
    return torch.tensor(vector, dtype=torch.float32), record.get("kind") or "image"


# ------------------------------------------------------------------ the search itself
async def encode_query(request: Request, pair: ServedPair, *, text: str | None = None, image: bytes | None = None):
    """Embed a text or image query with the pair's model through the batcher: ``(Encoded, modality)``."""
    services = request.app.state.services
    if text is not None:
        return await services.batcher.encode(pair.artifact, "text", text, key=text), "text"
    t0 = time.perf_counter()
    settings = services.settings
    pixels, digest = await run_in_threadpool(prepare_image, pair, image, settings.max_image_pixels,
                                             settings.max_image_aspect)
    services.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t0)
    return await services.batcher.encode(pair.artifact, "image", pixels, key=digest), "image"


async def run_search(
    request: Request,
    caller: Caller,
    opts: SearchOptions,
    *,
    text: str | None = None,
    image: bytes | None = None,
    item_id: str | None = None,
) -> dict[str, Any]:
    from indexer.errors import IndexNotFoundError, StoreUnavailableError
    from indexer.search import search as index_search

    services = request.app.state.services
    metrics = services.metrics
    if opts.safety == "off":
        caller.require_moderator("safety=off")
    await audit.note_query(request, text=text, image=image, item_id=item_id)
    audit.note(request, safety=opts.safety)
    t0 = time.perf_counter()
    with services.state.lease() as pair:
        try:
            if item_id is not None:
                vector, modality = await run_in_threadpool(item_query, pair, item_id)
            else:
                encoded, modality = await encode_query(request, pair, text=text, image=image)
                vector = encoded.vector
            t1 = time.perf_counter()
            # ordinary callers never see unsafe items: their `traverse` also filters
            mode = "strict" if opts.safety == "traverse" and not caller.is_moderator else opts.safety
            tags = list(opts.filter.tags) if opts.filter and opts.filter.tags else None
            def run() -> Any:
                return index_search(pair.index, pair.artifact, vector, query_modality=modality, target=opts.target,
                                    k=opts.k, offset=opts.offset, safety=mode, tags=tags)

            # an embedded store holds the GIL while it searches: a worker thread would only add hand-offs
            result = run() if pair.index.store.in_process else await run_in_threadpool(run)
        except (StoreUnavailableError, IndexNotFoundError) as e:
            raise UnavailableError(f"the vector store is not answering: {e}", services.settings.store_retry_s) from e
        t2 = time.perf_counter()
        hits = [h for h in result.hits if caller.is_moderator or h.unsafe is not True]
        audit.note(request, unsafe_ids=[h.id for h in hits if h.unsafe is True])
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


@router.post("/search", response_model=SearchResponse, responses=ERRORS, summary="Search by text, image or item",
             openapi_extra=TOKEN_OPTIONAL)
async def search(body: SearchRequest, request: Request, caller: CallerDep) -> dict[str, Any]:
    """Exactly one of ``text``, ``image`` (base64) or ``item_id``; results come with the query's safety report."""
    image = await run_in_threadpool(decode_base64, body.image) if body.image is not None else None
    return await run_search(request, caller, body, text=body.text, image=image, item_id=body.item_id)


@router.post("/search/upload", response_model=SearchResponse, responses=ERRORS, summary="Search by an uploaded image",
             openapi_extra=TOKEN_OPTIONAL)
async def search_upload(
    request: Request,
    caller: CallerDep,
    image: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, ...).")],
    target: Annotated[Target, Form()] = "image",
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
    offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
    safety: Annotated[Safety, Form()] = "strict",
    tags: Annotated[list[Tag] | None, Form(max_length=32, description="Keep items with one of these tags.")] = None,
) -> dict[str, Any]:
    """Multipart form: ``image`` file plus the same options as ``/v1/search`` as form fields."""
    data = await image.read()
    if not data:
        raise ImageError("the uploaded image is empty; choose a JPEG, PNG or WebP file")
    opts = SearchOptions(target=target, k=k, offset=offset, safety=safety, filter=SearchFilter(tags=tags) if tags else None)
    return await run_search(request, caller, opts, image=data)


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS, summary="Embed a text or image",
             openapi_extra=TOKEN_OPTIONAL)
async def embed(body: EmbedRequest, request: Request, caller: CallerDep) -> dict[str, Any]:
    """The query's embedding and safety report: geometry, curvature, vector, distance to the origin, unsafe.

    No token is needed; a moderator's token makes the request privileged (audited) like their searches.
    """
    services = request.app.state.services
    image = await run_in_threadpool(decode_base64, body.image) if body.image is not None else None
    await audit.note_query(request, text=body.text, image=image)
    with services.state.lease() as pair:
        encoded, modality = await encode_query(request, pair, text=body.text, image=image)
        art = pair.artifact
        threshold = art.unsafe_threshold(modality) if art.geometry == "lorentz" else None
    d0 = encoded.distance_to_origin
    return {
        "geometry": art.geometry,
        "curvature": art.curvature if art.geometry == "lorentz" else None,
        "vector": await run_in_threadpool(encoded.vector.tolist),
        "distance_to_origin": d0,
        "unsafe": None if threshold is None or d0 is None else bool(d0 > threshold),
    }

