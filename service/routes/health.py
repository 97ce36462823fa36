"""``/healthz`` (alive), ``/readyz`` (model loaded, store answering, fingerprints match), ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import ServicesDep
from service.metrics import CONTENT_TYPE_LATEST, process_memory
from service.schemas import Health, Readiness
from service.state import ServedPair

router = APIRouter(tags=["health"])
PROBE_TIMEOUT_S = 3.0
#: an id no point has: retrieving it is a cheap round trip through the store
PROBE_ID = "00000000-0000-0000-0000-000000000000"


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; `reason` says why."}},
    summary="Readiness: model loaded, store reachable, index built by this model",
)
async def readyz(services: ServicesDep) -> Any:
    retry = {"Retry-After": str(max(1, round(services.settings.store_retry_s)))}
    pair = services.state.current
    if pair is None:
        services.metrics.ready.set(0)
        return JSONResponse({"ready": False, "reason": services.state.problem, "index": None}, 503, headers=retry)
    reason = None
    try:
        await asyncio.wait_for(pair.index.aretrieve(PROBE_ID), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        reason = f"the vector store did not answer within {PROBE_TIMEOUT_S:.0f} s"
    except Exception as e:  # noqa: BLE001 - any failure of the probe means not ready, with its message
        reason = f"the vector store is not answering: {e}"
    if reason is None and pair.info.get("fingerprint") != pair.artifact.fingerprint:
        reason = "the index was built with another model; reindex with the served model"
    services.metrics.ready.set(0 if reason else 1)
    store = await asyncio.to_thread(footprint, pair)
    services.metrics.note_footprint(store)
    body = {"ready": reason is None, "reason": reason, "index": pair.ref, "store": store}
    return JSONResponse(body, 503, headers=retry) if reason else body


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(services: ServicesDep) -> Response:
    if (pair := services.state.current) is not None:
        services.metrics.note_footprint(await asyncio.to_thread(footprint, pair))
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def footprint(pair: ServedPair) -> dict[str, Any]:
    """The served index's storage mode, points and disk, and this process's memory (blocking: a directory walk)."""
    memory, points = process_memory(), None
    with contextlib.suppress(Exception):  # a store that stopped answering: the probe above says so
        points = pair.index.store.count()
    return {**pair.index.store.footprint(), "points": points,
            "memory_anonymous_bytes": memory["anonymous"], "memory_resident_bytes": memory["resident"]}
