"""``/v1/items/{id}`` (payload, optionally the stored vector) and ``/v1/media/{id}`` (the image file); adding items
(``POST /v1/items``, ``POST /v1/items/upload``: admin token) and taking them down (``DELETE /v1/items/{id}``: admin or
moderator token), which :mod:`service.collection` carries out.

Items flagged unsafe are shown to moderators only; to anyone else they look exactly like absent ids
(the same 404, see :func:`service.searching.fetch_item`). Media files are served only from the configured
media root: a stored URI that resolves outside it is treated as missing.
"""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from indexer.sources import Item as SourceItem
from indexer.store import content_id
from service import audit, searching
from service.admin.paths import confined, resolve_under_roots
from service.collection import Collection
from service.deps import TOKEN_OPTIONAL, CallerDep, ServicesDep, TakedownCallerDep, audited_admin
from service.errors import ForbiddenError, NotFoundError
from service.schemas import (
    ALLOW_NEAR_DUPLICATE,
    MAX_REASON_CHARS,
    Caption,
    Item,
    ItemAdd,
    ItemWritten,
    Tag,
    Takedown,
    TakedownRequest,
)
from service.searching import fetch_item, item_vector
from service.state import Services
from training.errors import ImageError, OutsideRootsError
from training.images import read_image_file

router = APIRouter(prefix="/v1", tags=["items"])
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such item, an item flagged unsafe asked for without the moderator token, "
                         "or no such file under the media root."},
    503: {"description": "Store not ready; retry after Retry-After seconds."},
}


@router.get("/items/{item_id}", response_model=Item, responses=ERRORS, summary="An indexed item's payload",
            openapi_extra=TOKEN_OPTIONAL)
async def get_item(
    item_id: str,
    services: ServicesDep,
    caller: CallerDep,
    with_vector: bool = Query(False, description="Add the stored vector (space components or unit vector)."),
) -> dict[str, Any]:
    await caller.note_query(item_id=item_id)
    with services.state.lease() as pair:
        record = await fetch_item(services, pair, caller, item_id, with_vector=with_vector)
    payload = dict(record.get("payload") or {})
    return {
        "id": str(record.get("id", item_id)),
        "kind": payload.get("kind", "image"),
        "uri": payload.get("uri"),
        "caption": payload.get("caption"),
        "tags": list(payload.get("tags") or []),
        "unsafe": payload.get("unsafe"),
        "payload": payload,
        "vector": item_vector(record) if with_vector else None,
    }


@router.get(
    "/media/{item_id}",
    response_class=FileResponse,
    responses={**ERRORS, 200: {"content": {"image/*": {}}, "description": "The image file."}},
    summary="An indexed image's bytes",
    openapi_extra=TOKEN_OPTIONAL,
)
async def get_media(item_id: str, services: ServicesDep, caller: CallerDep) -> FileResponse:
    await caller.note_query(item_id=item_id)
    with services.state.lease() as pair:
        record = await fetch_item(services, pair, caller, item_id, with_vector=False)
    payload = record.get("payload") or {}
    uri = payload.get("uri")
    if payload.get("kind", "image") != "image" or not uri:
        raise NotFoundError(f"item {item_id!r} has no image")
    path = media_path(services.settings.media_root, str(uri))
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600",
                                                              "X-Content-Type-Options": "nosniff"})


def media_path(root: Path | None, uri: str) -> Path:
    """The file a stored URI names, only if it lies under the media root."""
    if root is None:
        raise NotFoundError("no media root is configured (SAFE_RETRIEVAL_MEDIA_ROOT); images cannot be served")
    base = root.resolve()
    path = (base / uri).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise NotFoundError("the image of this item is not under the media root")
    return path


# ------------------------------------------------------------------ writes
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A bad or oversized image (pixels, aspect), or a path outside the data roots."},
    401: {"description": "Token missing or wrong."},
    403: {"description": "The role is not configured; no media root for image uploads; or a replica without jobs."},
    409: {"description": "This content, or with NEAR_DUPLICATE_DISTANCE an image this close to it, was taken down: "
                        "it may not be added again (a near one may, with allow_near_duplicate)."},
    413: {"description": "Body over the size limit."},
    503: {"description": "Model or store not ready, or the image memory budget is full; retry after Retry-After."},
    507: {"description": "The journal or the image could not be written (a full disk): nothing was changed."},
}


ADD_RESPONSES: dict[int | str, dict[str, Any]] = {
    **WRITE_ERRORS,
    200: {"model": ItemWritten, "description": "The same content is indexed already (the id is the content's): "
                                                "nothing was written, `created` is false."},
}


def _collection(services: Services) -> Collection:
    if services.collection is None:
        raise ForbiddenError("this replica takes no item writes (SAFE_RETRIEVAL_RUN_JOBS=false): send them to the "
                             "replica that runs jobs")
    return services.collection


async def _add(services: Services, request: Request, response: Response, item: SourceItem, *,
               image: bytes | None = None, allow_near_duplicate: bool = False) -> dict[str, Any]:
    """Embed ``item`` (its ``image`` bytes, or its text) with the served model and write it: 201, or 200 when the
    same content is already indexed (the id is the content's). ``allow_near_duplicate``: the admin's override of the
    near-duplicate refusal (never of the exact content's), in the audit record with the item it overrode."""
    collection = _collection(services)
    pid = content_id(image if image is not None else item.text or "")
    query: dict[str, Any] = {"kind": item.kind, "item_id": pid, "caption": item.caption, "tags": list(item.tags)}
    if allow_near_duplicate:
        query["allow_near_duplicate"] = True
    audit.note(request, query=query)
    collection.check_not_taken_down(pid)  # before any decoding
    near = None
    with services.state.lease() as pair:
        encoded, _ = await searching.encode_query(services, pair, text=item.text, image=image)
        fingerprint = pair.artifact.fingerprint
        if image is not None:
            near = collection.check_not_near_duplicate(pair, encoded.vector, allow=allow_near_duplicate)
    if near is not None:
        audit.note(request, query={**query, "near_duplicate_of": near["id"], "near_duplicate_distance": near["distance"]})
    payload, created, ref = await asyncio.to_thread(collection.add, pid, item, encoded.vector, fingerprint,
                                                    by=audit.ADMIN, data=image)
    response.status_code = 201 if created else 200
    return {"id": pid, "kind": payload.get("kind", item.kind), "created": created, "uri": payload.get("uri"),
            "caption": payload.get("caption"), "tags": list(payload.get("tags") or []), "unsafe": payload.get("unsafe"),
            "index": ref, "near_duplicate_of": near["id"] if near else None,
            "near_duplicate_distance": near["distance"] if near else None}


@router.post("/items", response_model=ItemWritten, status_code=201, responses=ADD_RESPONSES,
             summary="Add an image file under the data roots, or a text", dependencies=[Depends(audited_admin)])
async def add_item(body: ItemAdd, request: Request, response: Response, services: ServicesDep) -> dict[str, Any]:
    """Embed the item with the served model, flag it by the served unsafe rule and index it: searchable as soon as
    the response is sent. An image ``path`` (under the data roots, within the upload limits) is copied into the
    uploads folder, content-addressed."""
    if body.text is not None:
        return await _add(services, request, response, SourceItem(kind="text", text=body.text, tags=tuple(body.tags)))
    settings = services.settings
    assert body.path is not None, "ItemAdd's validator: exactly one of path or text"
    path = resolve_under_roots(body.path, settings.data_roots, what="path")
    data = await run_in_threadpool(_read_under_roots, path, settings.data_roots, settings.max_body_bytes)
    item = SourceItem(kind="image", caption=body.caption, tags=tuple(body.tags))
    return await _add(services, request, response, item, image=data, allow_near_duplicate=body.allow_near_duplicate)


def _read_under_roots(path: Path, roots: list[Path], max_bytes: int) -> bytes:
    try:
        return read_image_file(path, max_bytes=max_bytes, roots=confined(roots))[0]
    except OutsideRootsError as e:
        raise ImageError(str(e)) from e
    except OSError as e:
        raise ImageError(f"cannot read the image {path.name!r} ({e.strerror or e}); give a readable image file") from e


@router.post("/items/upload", response_model=ItemWritten, status_code=201, responses=ADD_RESPONSES,
             summary="Add an uploaded image", dependencies=[Depends(audited_admin)])
async def upload_item(
    request: Request,
    response: Response,
    services: ServicesDep,
    image: Annotated[UploadFile, File(description="The image (JPEG, PNG, WebP, ...), within the search's limits.")],
    caption: Annotated[Caption | None, Form(description="Its caption.")] = None,
    tags: Annotated[list[Tag] | None, Form(max_length=32, description="Its tags.")] = None,
    allow_near_duplicate: Annotated[bool, Form(description=ALLOW_NEAR_DUPLICATE)] = False,
) -> dict[str, Any]:
    """Multipart form: ``image`` with ``caption``, ``tags`` and ``allow_near_duplicate``; as ``POST /v1/items``, the
    bytes stored under the uploads folder."""
    data = await image.read()
    if not data:
        raise ImageError("the uploaded image is empty; choose a JPEG, PNG or WebP file")
    item = SourceItem(kind="image", caption=caption, tags=tuple(tags or ()))
    return await _add(services, request, response, item, image=data, allow_near_duplicate=allow_near_duplicate)


@router.delete("/items/{item_id}", response_model=Takedown, summary="Take an item down",
               responses={**WRITE_ERRORS, 404: {"description": "No such item."},
                          403: {"description": "Neither the admin nor a moderator token is configured; or a replica "
                                                "without jobs."},
                          422: {"description": f"No reason, or one over {MAX_REASON_CHARS} characters."}})
async def take_down(
    item_id: str,
    body: TakedownRequest,
    request: Request,
    services: ServicesDep,
    by: TakedownCallerDep,
    purge: bool = Query(False, description="Also delete the stored file of an image added through the API."),
) -> dict[str, Any]:
    """The item is gone from every search, ``/v1/items`` and ``/v1/media`` once this answers, and never comes back:
    every later generation and upload consults the takedown list. Taking an id down again answers its first
    takedown (``already``)."""
    audit.note(request, query={"item_id": item_id, "reason": body.reason, "purge": purge})
    return await asyncio.to_thread(_collection(services).take_down, item_id, reason=body.reason, by=by, purge=purge)
