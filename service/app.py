"""The application factory: ``create_app(settings)`` wires settings, the served pair, the batcher and jobs.

The lifespan loads the model and opens the index once. When that fails (no index yet, the Qdrant
server down, an index built by another model) the app still starts: ``/readyz`` and the search
routes answer 503 with the reason and ``Retry-After``, and a supervisor task retries every
``store_retry_s`` until the pair loads, so the service recovers by itself. What the routes use is
``service.state.Services``; the middlewares are in ``service.middleware``, the error handlers in
``service.handlers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from service import handlers
from service.admin.facade import judge
from service.admission import MemoryBudget
from service.audit import AuditLog, AuditTrail
from service.batching import Batcher
from service.collection import Collection
from service.jobs import JobManager
from service.metrics import Metrics
from service.middleware import AdminGate, AuditedCaller, BodyLimit, RequestMetrics
from service.routes import admin, health, items, search, web
from service.settings import Settings
from service.startup import check_audit_dir, check_model, check_page, check_state_dir, listen
from service.state import PairLoader, ServedState, Services
from training.errors import SafeRetrievalError

PIN_RENEW_S = 60.0  # well within indexer.generations.PIN_TTL_S


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()
    check_audit_dir(settings)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        services = Services(
            settings=settings, metrics=metrics, state=ServedState(settings.store_retry_s), loader=PairLoader(settings),
            batcher=Batcher(max_batch=settings.batch_max_size, max_wait_ms=settings.batch_max_wait_ms,
                            cache_size=settings.cache_size, dtype=settings.inference_dtype,
                            torch_threads=settings.torch_threads, metrics=metrics),
            audit=audit,
            image_budget=MemoryBudget(settings.image_memory_budget_bytes, max_wait_s=settings.image_admission_wait_s,
                                      metrics=metrics),
        )
        if settings.run_jobs:
            services.jobs = JobManager(
                settings.state_dir, on_success=services.job_succeeded, on_discard=services.job_discarded, judge=judge,
                cancel_grace_s=settings.job_cancel_grace_s,
                env=job_environment(settings),
                on_change=functools.partial(_publish_job_counts, metrics),
            )
            services.collection = Collection(settings, services.swap_lock, lambda: services.state.current)
        app.state.services = services
        services.batcher.start()
        await asyncio.to_thread(services.connect)
        supervisor = asyncio.create_task(_supervise(services))
        try:
            yield
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            if services.jobs is not None:
                await asyncio.to_thread(services.jobs.shutdown)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lambda: services.generations().unpin())
            services.batcher.stop()
            services.state.close()
            audit.close()

    app = FastAPI(
        title="safe-retrieval",
        version=_version(),
        summary="Image/text retrieval that stays safe when the query is not.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.audit = audit = AuditLog(settings.audit_dir or settings.state_dir / "audit", max_bytes=settings.audit_max_bytes,
                                       keep=settings.audit_keep)
    handlers.install(app)
    routers = (search.router, items.router, admin.router, health.router, web.router)
    for router in routers:
        app.include_router(router)
    check_page(web.STATIC)
    app.mount("/static", StaticFiles(directory=web.STATIC), name="static")
    # added innermost first; they run in the opposite order (service/middleware.py says why)
    app.add_middleware(AdminGate, settings=settings)  # before any admin route reads its body
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AuditTrail, audit=audit,  # outside the body limit: a privileged 413 leaves its record too
                       identify=AuditedCaller(settings, [route for router in routers for route in router.routes]))
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: runs first, counts what the client gets
    return app


def _publish_job_counts(metrics: Metrics, counts: dict[str, int]) -> None:
    for status, n in counts.items():
        metrics.jobs.labels(status).set(n)


def job_environment(settings: Settings) -> dict[str, str]:
    """The jobs' environment: this process's without any ``SAFE_RETRIEVAL_*`` setting (the admin and
    moderator tokens among them: a job needs none, its steps get every path on their command line),
    plus the Qdrant API key that ``index build`` needs on a server."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAFE_RETRIEVAL_")}
    key = settings.qdrant_key()
    if key is not None:
        env["SAFE_RETRIEVAL_QDRANT_API_KEY"] = key
    return env


async def _supervise(services: Services) -> None:
    """Retry loading the served pair while there is none (store down, index not built yet); renew the
    served generation's pin; on a replica without jobs, also follow the index pointer the job runner switches."""
    renewed = asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(services.settings.store_retry_s)
        if services.state.current is None:
            await asyncio.to_thread(services.connect)
        elif asyncio.get_running_loop().time() - renewed > PIN_RENEW_S:  # a server pin is a lease: renew it
            renewed = asyncio.get_running_loop().time()
            await asyncio.to_thread(services.pin)
        if services.state.current is not None and not services.settings.run_jobs:
            await asyncio.to_thread(services.follow)


def _version() -> str:
    try:
        return version("safe-retrieval")
    except PackageNotFoundError:
        return "0"


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for ``settings``. ``X-Forwarded-For``/``-Proto`` are believed only from
    ``TRUSTED_PROXIES`` (uvicorn alone believes any loopback caller): otherwise the client address, the
    one the audit log records, is the connection's peer."""
    return {"log_level": "info", "access_log": settings.access_log, "timeout_graceful_shutdown": 10,
            "server_header": False, "proxy_headers": bool(settings.trusted_proxies),
            "forwarded_allow_ips": list(settings.trusted_proxies)}


def serve(settings: Settings) -> None:
    """Run the app under uvicorn until interrupted (one worker: jobs and swaps belong to one process)."""
    app = create_app(settings)
    check_model(settings)
    check_state_dir(settings)
    sock = listen(settings.host, settings.port)  # before the model loads: a taken port fails at once
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, **uvicorn_options(settings))
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        raise SafeRetrievalError("the server did not start; the log above says why")
