"""The admin facade: the admin side from the routes' point of view (as :mod:`service.searching` is for searches): one call from a
parsed job request to the submitted job.

Each function checks the request (paths under the data roots, the dataset and the method, before any job exists),
plans the job (:class:`~service.admin.plans.Plan`), builds its steps (:mod:`service.admin.kinds`) and submits it to
the runner (:mod:`service.jobs`) with its audit record written first. The runner calls back :func:`judge` after each
step; the service's discard deletes what a job that did not succeed made; the service's commit
(:meth:`service.state.Services.job_succeeded`) reads the same plan.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import Request

from service import audit
from service.admin.acceptance import refused
from service.admin.kinds import (
    KINDS,
    check_erasable,
    check_forget_evaluation,
    check_forget_method,
    check_retrain_evaluation,
    forget_concepts,
    forget_data,
    forget_steps,
    reindex_steps,
    retrieval_eval_step,
    train_step,
)
from service.admin.paths import resolve_under_roots
from service.admin.plans import Acceptance, Plan, read_source
from service.collection import journal_path
from service.errors import ForbiddenError, UnavailableError
from service.jobs import JobManager, JobRecord
from service.schemas import ForgetRequest, IndexSource, ReindexRequest, RetrainRequest
from service.state import Services, model_candidates
from training.errors import InputError


def jobs_of(services: Services) -> JobManager:
    """The job manager; a replica started with SAFE_RETRIEVAL_RUN_JOBS=false has none."""
    if services.jobs is None:
        raise ForbiddenError("this replica runs no jobs (SAFE_RETRIEVAL_RUN_JOBS=false): send job requests to the "
                             "replica that runs them")
    return services.jobs


def served_model(services: Services) -> Path:
    """The model a job starts from: the served one, else the first candidate the service would serve."""
    pair = services.state.current
    if pair is not None:
        return pair.model_path
    candidates = model_candidates(services.settings)
    if not candidates:
        raise UnavailableError("no model is configured to index with; start the server with --model")
    return candidates[0]


def _index_steps(services: Services, body: ReindexRequest, *, model: Path, name: str) -> list[list[str]]:
    s = services.settings
    return reindex_steps(body, model=model, name=name, roots=s.data_roots, media_root=s.media_root,
                         qdrant_url=s.qdrant_url, index_root=s.index_root, max_file_bytes=s.job_max_file_bytes,
                         takedowns=journal_path(s.state_dir), storage=s.index_storage)


async def reindex(services: Services, request: Request, body: ReindexRequest) -> dict[str, Any]:
    """Index ``body.source`` with the served model; the served index's new generation is swapped in at the commit."""
    settings = services.settings
    name = body.name or settings.index
    model = served_model(services)
    steps = _index_steps(services, body, model=model, name=name)
    plan = Plan(index=name, swap=name == settings.index, model=str(model),
                source=body.source.model_dump(exclude_none=True))
    return await _submit(request, services, "reindex", body.model_dump(exclude_none=True), steps, plan)


async def retrain(services: Services, request: Request, body: RetrainRequest) -> dict[str, Any]:
    """Train from the served model, evaluate both on the test split of ``body.data`` (judged after that step), then
    (with ``reindex``) rebuild the served index with the new model."""
    settings = services.settings
    model = served_model(services)
    data = resolve_under_roots(body.data, settings.data_roots, what="data")
    jobs_of(services).check_idle()  # a 409 at once, before the test split is read
    await asyncio.to_thread(check_retrain_evaluation, data, settings.data_roots)
    out = jobs_of(services).models_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{body.method}"
    steps = [train_step(body, model=model, out=out, roots=settings.data_roots),
             retrieval_eval_step(data, model=model, out=out)]
    max_drop = settings.retrain_max_recall_drop if body.max_recall_drop is None else body.max_recall_drop
    plan = Plan(index=settings.index, swap=body.reindex, model=str(out), new_model=str(out), served_model=str(model),
                acceptance=Acceptance(1, body.force, {"max_recall_drop": max_drop}))
    if body.reindex:
        steps += _reindex_with(out, body.source, services, plan)
    return await _submit(request, services, "retrain", body.model_dump(exclude_none=True), steps, plan)


async def forget(services: Services, request: Request, body: ForgetRequest) -> dict[str, Any]:
    """Unlearn ``body.concepts`` from the served model, evaluate it before and after (judged after that step), then
    (with ``reindex``) rebuild the served index with the new model."""
    settings = services.settings
    model = served_model(services)
    check_forget_method(body, model)
    data = forget_data(body.data, model, settings.data_roots)
    jobs_of(services).check_idle()  # a 409 at once, before the dataset is read (seconds, and once per waiting caller)
    concepts = await asyncio.to_thread(forget_concepts, data, body.concepts, settings.data_roots)
    await asyncio.to_thread(check_forget_evaluation, data, concepts, settings.data_roots)
    await asyncio.to_thread(check_erasable, body, model, data, concepts, settings.data_roots)
    out = jobs_of(services).models_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-forget-{body.method}"
    steps = forget_steps(body, concepts=concepts, model=model, out=out, data=data, roots=settings.data_roots)
    thresholds = {"min_forget_drop": body.min_forget_drop, "max_retain_drop": body.max_retain_drop,
                  "max_benign_drop": body.max_benign_drop}
    plan = Plan(index=settings.index, swap=body.reindex, model=str(out), new_model=str(out), served_model=str(model),
                unlearning={"concepts": concepts, "method": body.method},
                acceptance=Acceptance(len(steps) - 1, body.force, thresholds))
    if body.reindex:
        steps += _reindex_with(out, body.source, services, plan)
    return await _submit(request, services, "forget", body.model_dump(exclude_none=True), steps, plan)


async def _submit(request: Request, services: Services, kind: str, body: dict[str, Any], steps: list[list[str]],
                  plan: Plan) -> dict[str, Any]:
    """Start the job, its audit record (202, the job's id) written first: no record (503), no job."""

    def record(job_id: str) -> None:
        audit.note(request, job=job_id)
        audit.record_now(request, 202)

    return await asyncio.to_thread(jobs_of(services).submit, kind, body, steps, plan.to_dict(), before_start=record)


def _reindex_with(model: Path, source: IndexSource | None, services: Services, plan: Plan) -> list[list[str]]:
    """The step that rebuilds the served index with a job's new ``model`` (from ``source``, default: the last
    reindex's), recording the source in ``plan``."""
    settings = services.settings
    if source is None:
        remembered = read_source(settings.state_dir)
        if remembered is None:
            raise InputError("nothing to reindex from yet: give `source` (the gallery to index with the new model)")
        source = IndexSource(**remembered)
    plan.source = source.model_dump(exclude_none=True)
    return _index_steps(services, ReindexRequest(source=source), model=model, name=settings.index)


# ------------------------------------------------------------------ the runner's callbacks
def judge(job: JobRecord, step: int, folder: Path) -> tuple[dict[str, Any], str | None] | None:
    """After ``step`` of ``job``: when its plan's acceptance names that step (its evaluation), what the evaluation
    measured judged against the thresholds, and the refusal (None when it passed or was forced)."""
    plan = Plan.of(job.plan)
    if plan.acceptance is None or plan.acceptance.after_step != step:
        return None
    measured = KINDS[job.kind].evaluate(folder, plan)
    return measured, refused(measured)
