"""``/v1/items/{id}`` (payload, optionally the stored vector) and ``/v1/media/{id}`` (the image file).

Items flagged unsafe are shown to moderators only; to anyone else they look exactly like absent ids
(the same 404, see :func:`service.searching.fetch_item`). Media files are served only from the configured
media root: a stored URI that resolves outside it is treated as missing.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service.deps import TOKEN_OPTIONAL, CallerDep, ServicesDep
from service.errors import NotFoundError
from service.schemas import Item
from service.searching import fetch_item, item_vector

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
