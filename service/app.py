"""The application factory: ``create_app(settings)`` wires settings, the served pair, the batcher and jobs.

The lifespan loads the model and opens the index once. When that fails (no index yet, the Qdrant
server down, an index built by another model) the app still starts: ``/readyz`` and the search
routes answer 503 with the reason and ``Retry-After``, and a supervisor task retries every
``store_retry_s`` until the pair loads, so the service recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.audit import AuditLog, AuditTrail
from service.batching import Batcher
from service.errors import ConflictError, TooLargeError, status_for
from service.jobs import JobManager, JobRecord
from service.metrics import Metrics
from service.middleware import AdminGate
from service.settings import Settings
from service.startup import check_model, check_page, check_state_dir, listen
from service.state import PairLoader, ServedPair, ServedState, write_served_record
from training.errors import SafeRetrievalError

log = logging.getLogger("safe_retrieval.service")
STATIC = Path(__file__).parent / "static"
PIN_RENEW_S = 60.0  # well within indexer.generations.PIN_TTL_S


@dataclass(eq=False)
class Services:
    """Everything the routes use, created once per app."""

    settings: Settings
    metrics: Metrics
    state: ServedState
    loader: PairLoader
    batcher: Batcher
    jobs: JobManager | None = None
    swap_lock: threading.Lock = field(default_factory=threading.Lock)

    def reload(self, model: Path | None = None) -> tuple[bool, dict[str, Any]]:
        """Load the index's current generation with its model and swap them in together.

        Returns ``(changed, index ref)``. Blocking: call it from a worker thread.
        """
        with self.swap_lock:
            current = self.state.current
            if current is not None and not self._stale(current, model):
                return False, current.ref
            pair = self.loader.load(model)
            self._install(pair)
            return True, pair.ref

    def _stale(self, current: ServedPair, model: Path | None) -> bool:
        """Whether the served pair differs from what a reload would load."""
        from indexer.index import generations_for

        if model is not None and Path(model).resolve() != current.model_path.resolve():
            return True
        s = self.settings
        api_key = s.qdrant_api_key.get_secret_value() if s.qdrant_api_key else None
        # read the pointer only: Qdrant Edge cannot open the served generation's directory a second time
        generation = generations_for(s.index, root=s.index_root, url=s.qdrant_url, api_key=api_key).current()
        return generation != current.info.get("generation")

    def generations(self, name: str | None = None):
        """The generations of the served index (or of ``name``) where the settings keep them."""
        from indexer.index import generations_for

        s = self.settings
        api_key = s.qdrant_api_key.get_secret_value() if s.qdrant_api_key else None
        return generations_for(name or s.index, root=s.index_root, url=s.qdrant_url, api_key=api_key)

    def _install(self, pair: ServedPair) -> None:
        self.state.swap(pair)
        self.metrics.swaps.inc()
        self.metrics.ready.set(1)
        if self.settings.run_jobs:  # one writer per state volume: the job runner
            write_served_record(
                self.settings.state_dir, model=pair.model_path.resolve(), index=self.settings.index,
                generation=pair.info.get("generation"),
            )
        self.pin()
        log.info("serving %s generation %s with model %s", pair.info.get("name"), pair.info.get("generation"),
                 pair.artifact.fingerprint)

    def connect(self) -> bool:
        """One attempt to load the served pair (startup and supervisor); the reason is kept on failure."""
        try:
            with self.swap_lock:
                if self.state.current is not None:
                    return True
                self._install(self.loader.load())
            return True
        except SafeRetrievalError as e:
            self.state.problem = str(e)
        except Exception as e:  # noqa: BLE001 - any failure to load is reported by /readyz, not raised
            log.exception("loading the served pair failed")
            self.state.problem = f"loading the model or index failed ({e.__class__.__name__}); see the server log"
        self.metrics.ready.set(0)
        return False

    def pin(self) -> None:
        """Pin (or renew the pin of) the served generation, so that no prune deletes it while it is served."""
        pair = self.state.current
        if pair is None or not pair.info.get("generation"):
            return
        try:
            self.generations().pin(pair.info["generation"])
        except Exception:  # noqa: BLE001 - serving goes on; the next renewal tries again
            log.warning("could not pin generation %s", pair.info.get("generation"), exc_info=True)

    def follow(self) -> None:
        """On a replica without jobs: serve the generation the job runner switched the index to."""
        try:
            self.reload()
        except Exception as e:  # noqa: BLE001 - keep serving the previous pair; the next round tries again
            log.warning("could not follow index %s to its current generation: %s", self.settings.index, e)

    def job_succeeded(self, job: JobRecord) -> dict[str, Any]:
        """The jobs' ``on_success`` (past the job's commit point): accept what the job staged.

        For the served index: open the staged generation itself (not the pointer), check that it
        was built by the model, and only then switch the pointer and swap the pair, under the swap
        lock; if anything fails before the switch the pointer has not moved. Another index's
        staged generation is switched to; a retrain without reindex serves nothing new.
        """
        plan = job.plan
        gen = job.staged.get("generation")
        if gen and job.staged.get("state") != "complete":
            raise ConflictError(f"the job's generation {gen} is not complete; submit the job again")
        if not plan.get("swap"):
            if gen:
                self._switch(self.generations(plan.get("index")), gen)
            return {"swapped": False, "model": plan.get("new_model"), "index": plan.get("index"), "generation": gen}
        if not gen:
            raise ConflictError("the job's index step reported no generation (no --result-file); see its log")
        model = Path(plan["model"]) if plan.get("model") else None
        from indexer.index import open_index

        gens = self.generations()
        with self.swap_lock:
            index = open_index(gens.name, root=gens.root, client=getattr(gens, "client", None), generation=gen)
            pair = self.loader.load(model, index=index)  # closes the index and raises when the model does not match
            previous = gens.current()
            try:
                gens.switch(gen)
                self._install(pair)
            except BaseException:
                if previous is not None:  # never leave the pointer on a pair that is not served
                    gens.switch(previous)
                pair.close()
                raise
        self._prune(gens, gen)
        return {"swapped": True, "model": str(model) if model else None, "index": pair.ref}

    def _switch(self, gens, gen: str) -> None:
        gens.switch(gen)
        self._prune(gens, gen)

    def _prune(self, gens, gen: str) -> None:
        """Prune old generations after a switch, if no build holds the lock (its own prune will)."""
        from indexer.errors import IndexBusyError

        try:
            with gens.lock():
                pruned = gens.prune(protect={gen})
        except IndexBusyError:
            return
        except Exception:  # noqa: BLE001 - pruning is housekeeping; what is served is already switched
            log.warning("pruning %s failed", gens.name, exc_info=True)
            return
        if pruned:
            log.info("pruned %s", ", ".join(pruned))

    def job_discarded(self, job: JobRecord) -> bool:
        """The jobs' ``on_discard``: delete the generation a cancelled or failed job staged.

        Returns False, deleting nothing, when that generation is the current or a pinned one (a
        commit switched to it before the service stopped). Partial generations go too: a job that
        did not succeed leaves nothing behind, and submitting it again starts afresh.
        """
        gen = job.staged.get("generation")
        gens = self.generations(job.plan.get("index"))
        if gen == gens.current() or gen in gens.pinned():
            return False
        with gens.lock():
            gens.delete_generation(gen)
        log.info("job %s: deleted its staged generation %s", job.id, gen)
        return True


# ------------------------------------------------------------------ middleware
class BodyLimit:
    """413 for bodies over ``max_bytes``: declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_json(send, 400, {"error": "InputError", "detail": "Content-Length is not a number"})
                return
            if size > self.max_bytes:
                await _send_json(send, 413, _too_large(self.max_bytes))
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions met while reading the body; the handler makes it JSON
                    raise HTTPException(413, _too_large(self.max_bytes)["detail"])
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> dict[str, str]:
    return {"error": TooLargeError.__name__,
            "detail": f"request body over {limit} bytes; send a smaller image (SAFE_RETRIEVAL_MAX_BODY_BYTES sets the limit)"}


async def _send_json(send: Send, status: int, body: dict) -> None:
    response = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class RequestMetrics:
    """Counts responses by route template and status (unmatched paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()


# ------------------------------------------------------------------ error handlers
def _error_response(status: int, name: str, detail: Any, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": name, "detail": detail, **extra}, status_code=status, headers=headers)


async def _on_project_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_for(exc)
    headers = None
    extra: dict[str, Any] = {}
    if status == 503:
        headers = {"Retry-After": str(max(1, round(getattr(exc, "retry_after", 0) or request.app.state.settings.store_retry_s)))}
    if isinstance(exc, ConflictError) and exc.job_id:
        extra["job_id"] = exc.job_id
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return _error_response(status, exc.__class__.__name__, str(exc), headers, **extra)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    # no "input"/"ctx": they can echo megabytes of the request back
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return _error_response(422, "ValidationError", errors)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    name = "TooLargeError" if exc.status_code == 413 else "HTTPError"
    return _error_response(exc.status_code, name, exc.detail, dict(exc.headers) if exc.headers else None)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(500, "InternalError", "internal error; the server log has the details")


# ------------------------------------------------------------------ factory
def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    from service.routes import admin, health, items, search

    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        services = Services(
            settings=settings, metrics=metrics, state=ServedState(settings.store_retry_s), loader=PairLoader(settings),
            batcher=Batcher(max_batch=settings.batch_max_size, max_wait_ms=settings.batch_max_wait_ms,
                            cache_size=settings.cache_size, dtype=settings.inference_dtype,
                            torch_threads=settings.torch_threads, metrics=metrics),
        )
        if settings.run_jobs:
            services.jobs = JobManager(
                settings.state_dir, on_success=services.job_succeeded, on_discard=services.job_discarded,
                cancel_grace_s=settings.job_cancel_grace_s,
                env=job_environment(settings),
                on_change=lambda counts: [metrics.jobs.labels(k).set(v) for k, v in counts.items()],
            )
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
    app.state.audit = audit = AuditLog(settings.state_dir / "audit", max_bytes=settings.audit_max_bytes,
                                       keep=settings.audit_keep)
    app.add_exception_handler(SafeRetrievalError, _on_project_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    for router in (search.router, items.router, admin.router, health.router):
        app.include_router(router)
    check_page(STATIC)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(AuditTrail, audit=audit)  # innermost: it reads the matched route
    app.add_middleware(AdminGate, settings=settings)  # before any admin route reads its body
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # added last: runs first
    return app


def job_environment(settings: Settings) -> dict[str, str]:
    """The jobs' environment: this process's without any ``SAFE_RETRIEVAL_*`` setting (the admin and
    moderator tokens among them: a job needs none, its steps get every path on their command line),
    plus the Qdrant API key that ``index build`` needs on a server."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAFE_RETRIEVAL_")}
    if settings.qdrant_api_key is not None:
        env["SAFE_RETRIEVAL_QDRANT_API_KEY"] = settings.qdrant_api_key.get_secret_value()
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
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safe-retrieval")
    except PackageNotFoundError:
        return "0"



def serve(settings: Settings) -> None:
    """Run the app under uvicorn until interrupted (one worker: jobs and swaps belong to one process)."""
    import uvicorn

    app = create_app(settings)
    check_model(settings)
    check_state_dir(settings)
    sock = listen(settings.host, settings.port)  # before the model loads: a taken port fails at once
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, log_level="info", access_log=settings.access_log, timeout_graceful_shutdown=10,
                            server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        raise SafeRetrievalError("the server did not start; the log above says why")
