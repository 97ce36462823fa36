"""``/v1/admin/*``: reindex, retrain and forget jobs, their status and cancellation, a reload, and the audit log (admin token).

Job submissions and cancels are privileged requests: each leaves an audit record (token name ``admin``),
written before the job exists or the cancel takes effect: no record (503), no job.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator, BeforeValidator

from service import audit
from service.admin import facade as admin
from service.deps import ServicesDep, audited_admin, require_admin
from service.schemas import (
    INTEGER_NOTE,
    AuditPage,
    ForgetRequest,
    IntText,
    Job,
    JobList,
    ReindexRequest,
    Reload,
    RetrainRequest,
)
from service.settings import TOKEN_NAME

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A path outside the data roots, or a missing file."},
    401: {"description": "Admin token missing or wrong."},
    403: {"description": "No admin token configured (or no data roots for job paths)."},
    404: {"description": "No such job."},
    409: {"description": "Another job is running; `job_id` names it."},
    413: {"description": "Body over the size limit."},
    503: {"description": "No model is served or configured to index with; or the audit log cannot be written."},
}


@router.post("/reindex", response_model=Job, status_code=202, responses=ERRORS, summary="Build a new index generation",
             dependencies=[Depends(audited_admin)])
async def reindex(body: ReindexRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Index ``source`` with the served model; when ``name`` is the served index, the new generation is swapped in."""
    audit.note(request, query=body.model_dump(exclude_none=True))
    return await admin.reindex(services, request, body)


RETRAIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    422: {"description": "A malformed body; or a `data` whose test split (on which the new model is evaluated) is "
                         "missing or names images outside the data roots."},
}


@router.post("/retrain", response_model=Job, status_code=202, responses=RETRAIN_ERRORS, summary="Fine-tune a new model",
             dependencies=[Depends(audited_admin)])
async def retrain(body: RetrainRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Train from the served model, then evaluate the served and the new model on the test split of ``data``: a new
    model whose T->V R@1 falls more than ``max_recall_drop`` points fails the job before anything is reindexed or
    swapped (unless ``force``); with ``reindex`` the served index is rebuilt with the new model and both swap together."""
    audit.note(request, query=body.model_dump(exclude_none=True))
    return await admin.retrain(services, request, body)


FORGET_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    422: {"description": "A malformed body (a threshold outside 0-100 included); or a concept the dataset does not "
                         "know (the message lists its concepts and tags), `hac` on a Euclidean model, `weights` or "
                         "`options` the method does not have, too few train images of a concept to fit the eraser (the message "
                         "says how many it needs), no `data` when the served model records none, or a "
                         "`data` whose test split is missing or shows none of the concepts (the evaluation could not "
                         "run)."},
}


@router.post("/forget", response_model=Job, status_code=202, responses=FORGET_ERRORS,
             summary="Make the served model forget concepts", dependencies=[Depends(audited_admin)])
async def forget(body: ForgetRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Unlearn ``concepts`` from the served model and evaluate it before and after on the test split of the data
    (the job's ``result.unlearning`` holds the table and its ``acceptance``). A new model that misses
    ``min_forget_drop``, ``max_retain_drop`` or ``max_benign_drop`` fails the job before anything is reindexed or
    swapped (unless ``force``); otherwise, with ``reindex``, the served index is rebuilt with the new model and both
    swap together. A job that fails or is cancelled changes nothing served."""
    audit.note(request, query=body.model_dump(exclude_none=True))
    return await admin.forget(services, request, body)


@router.get("/jobs", response_model=JobList, responses=ERRORS, summary="All jobs, newest first")
async def list_jobs(services: ServicesDep) -> dict[str, Any]:
    return {"jobs": admin.jobs_of(services).list()}


@router.get("/jobs/{job_id}", response_model=Job, responses=ERRORS, summary="One job's status, progress and log tail")
async def get_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    return admin.jobs_of(services).get(job_id)


@router.post("/jobs/{job_id}/cancel", response_model=Job, responses=ERRORS, summary="Cancel a job",
             dependencies=[Depends(audited_admin)])
async def cancel_job(job_id: str, request: Request, services: ServicesDep) -> dict[str, Any]:
    """End the job's process group; what is served does not change."""
    audit.note(request, job=job_id)
    # the record first, then the cancel: no record (503), no cancel
    return await asyncio.to_thread(admin.jobs_of(services).cancel, job_id, before=lambda: audit.record_now(request, 200))


@router.post("/reload", response_model=Reload, responses={**ERRORS, 503: {"description": "Could not load."}},
             summary="Serve the index's current generation")
async def reload(services: ServicesDep) -> dict[str, Any]:
    """Reopen the served index's current generation with its model (after an out-of-band `index build`)."""
    changed, ref = await asyncio.to_thread(services.reload)
    return {"changed": changed, "index": ref}


_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_only(value: Any) -> Any:
    # pydantic alone also takes a number ("0.5") as a unix time, and a date alone as its midnight
    if not isinstance(value, str) or not _ISO_DATETIME.match(value):
        raise ValueError("give an ISO 8601 date-time, such as 2026-01-31T12:00:00Z")
    return value


def _utc_representable(value: datetime) -> datetime:
    try:
        audit.as_utc(value)
    except OverflowError:
        raise ValueError("out of range: in UTC this time falls before year 1 or after year 9999") from None
    return value


#: a query's time bound: an ISO 8601 date-time (UTC when it has no zone) that UTC can represent
TimeBound = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_utc_representable)]


@router.get("/audit", response_model=AuditPage, responses=ERRORS, summary="Records of privileged requests")
async def read_audit(
    services: ServicesDep,
    since: Annotated[TimeBound | None,
                     Query(description="Only records at or after this time: an ISO 8601 date-time such as "
                                       "2026-01-31T12:00:00Z (UTC when it has no zone).")] = None,
    until: Annotated[TimeBound | None,
                     Query(description="Only records before this time, an ISO 8601 date-time (page back: the first "
                                       "record's time).")] = None,
    token: Annotated[str | None, Query(pattern=TOKEN_NAME.pattern, description="Only records of this token name.")] = None,
    limit: Annotated[IntText, Query(ge=1, le=10_000, description="At most this many records: the newest that match. "
                                                               + INTEGER_NOTE)] = 100,
) -> dict[str, Any]:
    """The audit log across its rotated files, **oldest first (newest last)**: the newest ``limit`` matching
    records; ``truncated`` says older matching ones were left out."""
    records, truncated = await asyncio.to_thread(services.audit.read, since=since, until=until,
                                                 token=token, limit=limit)
    return {"records": records, "truncated": truncated}
