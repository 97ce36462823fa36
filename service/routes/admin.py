"""``/v1/admin/*``: reindex, retrain and forget jobs, their status and cancellation, a reload, and the audit log (admin token).

Job submissions and cancels are privileged requests: each leaves an audit record (token name ``admin``),
written before the job exists or the cancel takes effect: no record (503), no job.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator, BeforeValidator

from service import audit
from service.collection import journal_path
from service.deps import ServicesDep, audited_admin, require_admin
from service.errors import ForbiddenError, UnavailableError
from service.jobs import (
    JobManager,
    acceptance_plan,
    check_erasable,
    check_forget_evaluation,
    check_forget_method,
    check_retrain_evaluation,
    forget_concepts,
    forget_data,
    forget_steps,
    read_source,
    reindex_steps,
    resolve_under_roots,
    retrieval_eval_step,
    train_step,
)
from service.schemas import (
    INTEGER_NOTE,
    AuditPage,
    ForgetRequest,
    IndexSource,
    IntText,
    Job,
    JobList,
    ReindexRequest,
    Reload,
    RetrainRequest,
)
from service.settings import TOKEN_NAME
from service.state import Services, model_candidates
from training.errors import InputError

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


def _jobs(services: Services) -> JobManager:
    """The job manager; a replica started with SAFE_RETRIEVAL_RUN_JOBS=false has none."""
    if services.jobs is None:
        raise ForbiddenError("this replica runs no jobs (SAFE_RETRIEVAL_RUN_JOBS=false): send job requests to the "
                             "replica that runs them")
    return services.jobs


def _served_model(services: Services) -> Path:
    pair = services.state.current
    if pair is not None:
        return pair.model_path
    candidates = model_candidates(services.settings)
    if not candidates:
        raise UnavailableError("no model is configured to index with; start the server with --model")
    return candidates[0]


@router.post("/reindex", response_model=Job, status_code=202, responses=ERRORS, summary="Build a new index generation",
             dependencies=[Depends(audited_admin)])
async def reindex(body: ReindexRequest, request: Request, services: ServicesDep) -> dict[str, Any]:
    """Index ``source`` with the served model; when ``name`` is the served index, the new generation is swapped in."""
    audit.note(request, query=body.model_dump(exclude_none=True))
    settings = services.settings
    name = body.name or settings.index
    swap = name == settings.index
    model = _served_model(services)
    steps = reindex_steps(body, model=model, name=name, roots=settings.data_roots, media_root=settings.media_root,
                          qdrant_url=settings.qdrant_url, index_root=settings.index_root,
                          max_file_bytes=settings.job_max_file_bytes, takedowns=journal_path(settings.state_dir))
    plan = {"swap": swap, "model": str(model), "index": name, "source": body.source.model_dump(exclude_none=True)}
    return await _submit(request, services, "reindex", body.model_dump(exclude_none=True), steps, plan)


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
    settings = services.settings
    model = _served_model(services)
    data = resolve_under_roots(body.data, settings.data_roots, what="data")
    _jobs(services).check_idle()  # a 409 at once, before the test split is read
    await asyncio.to_thread(check_retrain_evaluation, data, settings.data_roots)
    out = _jobs(services).models_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{body.method}"
    steps = [train_step(body, model=model, out=out, roots=settings.data_roots),
             retrieval_eval_step(data, model=model, out=out)]
    max_drop = settings.retrain_max_recall_drop if body.max_recall_drop is None else body.max_recall_drop
    plan: dict[str, Any] = {"swap": body.reindex, "model": str(out), "new_model": str(out), "index": settings.index,
                            "acceptance": acceptance_plan(1, force=body.force, max_recall_drop=max_drop)}
    if body.reindex:
        steps += _reindex_with(out, body.source, services, plan)
    return await _submit(request, services, "retrain", body.model_dump(exclude_none=True), steps, plan)


async def _submit(request: Request, services: Services, kind: str, body: dict[str, Any], steps: list[list[str]],
                  plan: dict[str, Any]) -> dict[str, Any]:
    """Start the job, its audit record (202, the job's id) written first: no record (503), no job."""

    def record(job_id: str) -> None:
        audit.note(request, job=job_id)
        audit.record_now(request, 202)

    return await asyncio.to_thread(_jobs(services).submit, kind, body, steps, plan, before_start=record)


def _reindex_with(model: Path, source: IndexSource | None, services: Services, plan: dict[str, Any]) -> list[list[str]]:
    """The step that rebuilds the served index with a job's new ``model`` (from ``source``, default: the last
    reindex's), recording the source in ``plan``."""
    settings = services.settings
    if source is None:
        remembered = read_source(settings.state_dir)
        if remembered is None:
            raise InputError("nothing to reindex from yet: give `source` (the gallery to index with the new model)")
        source = IndexSource(**remembered)
    plan["source"] = source.model_dump(exclude_none=True)
    return reindex_steps(ReindexRequest(source=source), model=model, name=settings.index, roots=settings.data_roots,
                         media_root=settings.media_root, qdrant_url=settings.qdrant_url, index_root=settings.index_root,
                         max_file_bytes=settings.job_max_file_bytes, takedowns=journal_path(settings.state_dir))


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
    settings = services.settings
    model = _served_model(services)
    check_forget_method(body, model)
    data = forget_data(body.data, model, settings.data_roots)
    _jobs(services).check_idle()  # a 409 at once, before the dataset is read (seconds, and once per waiting caller)
    concepts = await asyncio.to_thread(forget_concepts, data, body.concepts, settings.data_roots)
    await asyncio.to_thread(check_forget_evaluation, data, concepts, settings.data_roots)
    await asyncio.to_thread(check_erasable, body, model, data, concepts, settings.data_roots)
    out = _jobs(services).models_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-forget-{body.method}"
    steps = forget_steps(body, concepts=concepts, model=model, out=out, data=data, roots=settings.data_roots)
    acceptance = acceptance_plan(len(steps) - 1, force=body.force, min_forget_drop=body.min_forget_drop,
                                 max_retain_drop=body.max_retain_drop, max_benign_drop=body.max_benign_drop)
    plan: dict[str, Any] = {"swap": body.reindex, "model": str(out), "new_model": str(out), "index": settings.index,
                            "served_model": str(model), "unlearning": {"concepts": concepts, "method": body.method},
                            "acceptance": acceptance}
    if body.reindex:
        steps += _reindex_with(out, body.source, services, plan)
    return await _submit(request, services, "forget", body.model_dump(exclude_none=True), steps, plan)


@router.get("/jobs", response_model=JobList, responses=ERRORS, summary="All jobs, newest first")
async def list_jobs(services: ServicesDep) -> dict[str, Any]:
    return {"jobs": _jobs(services).list()}


@router.get("/jobs/{job_id}", response_model=Job, responses=ERRORS, summary="One job's status, progress and log tail")
async def get_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
    return _jobs(services).get(job_id)


@router.post("/jobs/{job_id}/cancel", response_model=Job, responses=ERRORS, summary="Cancel a job",
             dependencies=[Depends(audited_admin)])
async def cancel_job(job_id: str, request: Request, services: ServicesDep) -> dict[str, Any]:
    """End the job's process group; what is served does not change."""
    audit.note(request, job=job_id)
    # the record first, then the cancel: no record (503), no cancel
    return await asyncio.to_thread(_jobs(services).cancel, job_id, before=lambda: audit.record_now(request, 200))


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
