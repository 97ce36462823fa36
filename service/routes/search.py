"""``/v1/search``, ``/v1/search/upload`` and ``/v1/embed``: parse the request, hand it to :mod:`service.searching`.

Access rule (invariant 6): callers without the moderator token never receive an item flagged
unsafe; :func:`service.searching.search` enforces it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from service import searching
from service.deps import TOKEN_OPTIONAL, CallerDep, ServicesDep
from service.schemas import (
    INTEGER_NOTE,
    MAX_K_PER_REQUEST,
    MAX_OFFSET,
    EmbedRequest,
    EmbedResponse,
    IntText,
    Safety,
    SearchFilter,
    SearchOptions,
    SearchRequest,
    SearchResponse,
    Tag,
    Target,
)
from training.errors import ImageError, InputError

router = APIRouter(prefix="/v1", tags=["search"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad image or base64, or an option the model cannot honour."},
    401: {"description": "safety=off without (or with a wrong) moderator token."},
    403: {"description": "safety=off but no moderator token is configured."},
    404: {"description": "item_id not found."},
    413: {"description": "Body over the size limit."},
    503: {"description": "Model or store not ready; retry after Retry-After seconds."},
}


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


@router.post("/search", response_model=SearchResponse, responses=ERRORS, summary="Search by text, image or item",
             openapi_extra=TOKEN_OPTIONAL)
async def search(body: SearchRequest, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """Exactly one of ``text``, ``image`` (base64) or ``item_id``; results come with the query's safety report."""
    image = await run_in_threadpool(decode_base64, body.image) if body.image is not None else None
    return await searching.search(services, caller, body, text=body.text, image=image, item_id=body.item_id)


@router.post("/search/upload", response_model=SearchResponse, responses=ERRORS, summary="Search by an uploaded image",
             openapi_extra=TOKEN_OPTIONAL)
async def search_upload(
    services: ServicesDep,
    caller: CallerDep,
    image: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, ...).")],
    target: Annotated[Target, Form()] = "image",
    k: Annotated[IntText, Form(ge=1, le=MAX_K_PER_REQUEST, description=f"Number of results. {INTEGER_NOTE}")] = 10,
    offset: Annotated[IntText, Form(ge=0, le=MAX_OFFSET, description=f"Results to skip. {INTEGER_NOTE}")] = 0,
    safety: Annotated[Safety, Form()] = "strict",
    tags: Annotated[list[Tag] | None, Form(max_length=32, description="Keep items with one of these tags.")] = None,
) -> dict[str, Any]:
    """Multipart form: ``image`` file plus the same options as ``/v1/search`` as form fields."""
    data = await image.read()
    if not data:
        raise ImageError("the uploaded image is empty; choose a JPEG, PNG or WebP file")
    opts = SearchOptions(target=target, k=k, offset=offset, safety=safety, filter=SearchFilter(tags=tags) if tags else None)
    return await searching.search(services, caller, opts, image=data)


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS, summary="Embed a text or image",
             openapi_extra=TOKEN_OPTIONAL)
async def embed(body: EmbedRequest, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    """The query's embedding and safety report: geometry, curvature, vector, distance to the origin, unsafe.

    No token is needed; a moderator's token makes the request privileged (audited) like their searches.
    """
    image = await run_in_threadpool(decode_base64, body.image) if body.image is not None else None
    return await searching.embed(services, caller, text=body.text, image=image)
