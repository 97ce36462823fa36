"""The served (artifact, index generation) pair, how it is replaced without failing a request, and
``Services``: everything the routes use, with the reload, connect, job acceptance and pin operations.

A request *leases* the current pair for its whole life: it encodes with that pair's model and
searches that pair's index. A swap installs a new pair for the requests that start afterwards; the
old pair is closed only when its last lease ends, so in-flight requests finish on the old pair and
none fails. The two halves are always swapped together, and a pair is only built after checking
that the index was made with the model (``indexer.index.check_model``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from indexer.errors import IndexBusyError
from indexer.index import Index, check_model, check_storage_mode, generations_for, open_index
from service import audit as audit_records
from service.admin.acceptance import forced
from service.admin.plans import Plan, write_source
from service.admission import MemoryBudget
from service.audit import AuditLog
from service.batching import Batcher
from service.collection import Collection
from service.errors import ConflictError, UnavailableError
from service.jobs import JobManager, JobRecord
from service.metrics import Metrics
from service.settings import Settings
from training import artifact as artifacts
from training.artifact import Artifact
from training.errors import SafeRetrievalError

log = logging.getLogger("safe_retrieval.service")

SERVED_RECORD = "served.json"


@dataclass(eq=False)
class ServedPair:
    """A model and the index generation built with it, served together."""

    artifact: Artifact
    index: Index
    info: dict[str, Any]
    model_path: Path
    leases: int = field(default=0, repr=False)
    retired: bool = field(default=False, repr=False)

    @property
    def ref(self) -> dict[str, Any]:
        """``{name, generation, model}`` for responses."""
        return {"name": self.info.get("name"), "generation": self.info.get("generation"), "model": self.artifact.fingerprint}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.index.close()


class ServedState:
    """Holds the current pair (or the reason there is none) and hands out leases on it."""

    def __init__(self, retry_after: float = 5.0):
        self._pair: ServedPair | None = None
        self._lock = threading.Lock()
        self.problem: str | None = "starting: the model and index are not loaded yet"
        self.retry_after = retry_after

    @property
    def current(self) -> ServedPair | None:
        return self._pair

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedPair]:
        """Use the current pair until the block ends; 503 (UnavailableError) when none is served."""
        with self._lock:
            pair = self._pair
            if pair is None:
                raise UnavailableError(f"the service is not ready: {self.problem}", self.retry_after)
            pair.leases += 1
        try:
            yield pair
        finally:
            with self._lock:
                pair.leases -= 1
                done = pair.retired and pair.leases == 0
            if done:
                _close_later(pair)

    def swap(self, new: ServedPair) -> ServedPair | None:
        """Serve ``new`` from now on; the old pair closes when its last request finishes."""
        with self._lock:
            old, self._pair = self._pair, new
            self.problem = None
            done = False
            if old is not None and old is not new:
                old.retired = True
                done = old.leases == 0
        if done and old is not None:
            _close_later(old)
        return old

    def withdraw(self, reason: str) -> None:
        """Stop serving (e.g. the index vanished); requests get 503 with ``reason`` until the next swap."""
        with self._lock:
            old, self._pair = self._pair, None
            self.problem = reason
            done = False
            if old is not None:
                old.retired = True
                done = old.leases == 0
        if done and old is not None:
            _close_later(old)

    def close(self) -> None:
        self.withdraw("the service is shutting down")


def _close_later(pair: ServedPair) -> None:
    # closing flushes the store; never do it on the event loop or inside the lock
    threading.Thread(target=pair.close, name="close-pair", daemon=True).start()


# ------------------------------------------------------------------ loading a pair
def open_served_index(settings: Settings, name: str | None = None) -> Index:
    """Open the current generation of the served index (embedded store or Qdrant server)."""
    return open_index(name or settings.index, root=settings.index_root, url=settings.qdrant_url,
                      api_key=settings.qdrant_key())


def model_candidates(settings: Settings) -> list[Path]:
    """Artifacts that may be served, in order of preference.

    The one a job last swapped in (so a restart keeps serving it), then ``--model``, then the other
    retrained artifacts, newest first: if the service stopped between a job's acceptance switching
    the index and recording the swap, the model that index was built with is among them.
    """
    out: list[Path] = []
    record = read_served_record(settings.state_dir)
    if record and record.get("index") == settings.index and record.get("model"):
        out.append(Path(record["model"]))
    if settings.model is not None:
        out.append(settings.model)
    models = settings.state_dir / "models"
    if models.is_dir():
        out += sorted((p for p in models.iterdir() if (p / artifacts.CONFIG).is_file()), reverse=True)
    return list(dict.fromkeys(out))


class PairLoader:
    """Builds checked pairs; keeps loaded artifacts so retries after a store outage do not reload them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._artifacts: dict[tuple[str, str], Artifact] = {}
        self._lock = threading.Lock()

    def artifact(self, path: Path) -> Artifact:
        fingerprint = artifacts.read_config(path).get("fingerprint", "")
        key = (str(Path(path).resolve()), fingerprint)
        with self._lock:
            art = self._artifacts.get(key)
            if art is None:
                art = artifacts.load(path, device=self.settings.device)
                self._artifacts = {key: art}  # keep only the newest: old models are freed after a swap
            return art

    def load(self, model_path: Path | None = None, *, index: Index | None = None) -> ServedPair:
        """Open the index and pick the model it was built with (``model_path`` or the candidates)."""
        paths = [model_path] if model_path is not None else model_candidates(self.settings)
        if not paths:
            raise UnavailableError("no model configured: start with --model ARTIFACT or set SAFE_RETRIEVAL_MODEL")
        index = index if index is not None else open_served_index(self.settings)
        try:
            info = dict(index.info)
            wanted = info.get("fingerprint")
            chosen = next((p for p in paths if _fingerprint(p) == wanted), paths[0])
            art = self.artifact(chosen)
            check_model(index, art)
            check_storage_mode(index, self.settings.index_storage)
        except BaseException:
            with contextlib.suppress(Exception):
                index.close()
            raise
        return ServedPair(artifact=art, index=index, info=info, model_path=Path(chosen))


def _fingerprint(path: Path) -> str | None:
    try:
        return artifacts.read_config(path).get("fingerprint")
    except SafeRetrievalError:
        return None


# ------------------------------------------------------------------ what was swapped in last
def read_served_record(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / SERVED_RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_served_record(state_dir: Path, *, model: Path, index: str, generation: str | None) -> None:
    """Remember the swapped-in pair, so a restarted service serves it rather than the original ``--model``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{SERVED_RECORD}.tmp"
    tmp.write_text(json.dumps({"model": str(model), "index": index, "generation": generation}, indent=2) + "\n")
    os.replace(tmp, state_dir / SERVED_RECORD)


# ------------------------------------------------------------------ what the routes use
@dataclass(eq=False)
class Services:
    """Everything the routes use, created once per app."""

    settings: Settings
    metrics: Metrics
    state: ServedState
    loader: PairLoader
    batcher: Batcher
    audit: AuditLog
    image_budget: MemoryBudget  # what the query-image decodes in flight may take together
    jobs: JobManager | None = None
    collection: Collection | None = None  # online item writes (the service that runs jobs only)
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
        if model is not None and Path(model).resolve() != current.model_path.resolve():
            return True
        s = self.settings
        # read the pointer only: Qdrant Edge cannot open the served generation's directory a second time
        generation = generations_for(s.index, root=s.index_root, url=s.qdrant_url, api_key=s.qdrant_key()).current()
        return generation != current.info.get("generation")

    def generations(self, name: str | None = None):
        """The generations of the served index (or of ``name``) where the settings keep them."""
        s = self.settings
        return generations_for(name or s.index, root=s.index_root, url=s.qdrant_url, api_key=s.qdrant_key())

    def _install(self, pair: ServedPair) -> None:
        """Serve ``pair`` (under the swap lock), after replaying the journal of online changes onto it: a pair is
        never served without an acknowledged add, or with an item taken down."""
        if self.collection is not None:
            replayed = self.collection.replay(pair)
            if replayed["added"] or replayed["missing"]:
                log.info("replayed the journal onto generation %s: %s", pair.info.get("generation"), replayed)
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
        """The jobs' ``on_success``: accept what the job staged (``_accept``). The job's evaluation and its
        acceptance are already in its result (judged before its reindex step); a model that missed its acceptance
        gets here only when the request said ``force``, and is swapped in only once the audit log records it."""
        acceptance = forced(job.result)
        if acceptance is not None:
            self._audit_forced(job, acceptance)
        return self._accept(job)

    def _audit_forced(self, job: JobRecord, acceptance: dict[str, Any]) -> None:
        """The audit record of a forced swap, written before it happens: no record (UnavailableError), no swap."""
        try:
            self.audit.write(audit_records.job_record(job.id, forced=True, misses=list(acceptance["misses"])))
        except OSError:
            log.exception("could not write the audit record of job %s's forced swap", job.id)
            raise UnavailableError(f"the audit log cannot be written, so job {job.id}'s model, which missed its "
                                   "acceptance, was not forced in; free space on the audit directory's disk (or make "
                                   "it writable) and submit the job again") from None

    def _accept(self, job: JobRecord) -> dict[str, Any]:
        """Past the job's commit point: accept what the job staged.

        For the served index: open the staged generation itself (not the pointer), check that it
        was built by the model, and only then switch the pointer and swap the pair, under the swap
        lock; if anything fails before the switch the pointer has not moved. Another index's
        staged generation is switched to; a retrain without reindex serves nothing new.
        """
        plan = Plan.of(job.plan)
        gen = job.staged.get("generation")
        if gen and job.staged.get("state") != "complete":
            raise ConflictError(f"the job's generation {gen} is not complete; submit the job again")
        if not plan.swap:
            if gen:
                self._switch(self.generations(plan.index), gen)
            return {"swapped": False, "model": plan.new_model, "index": plan.index, "generation": gen}
        if not gen:
            raise ConflictError("the job's index step reported no generation (no --result-file); see its log")
        model = Path(plan.model) if plan.model else None
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
        if plan.source:  # what a later retrain reindexes by default
            write_source(self.settings.state_dir, plan.source)
        return {"swapped": True, "model": str(model) if model else None, "index": pair.ref}

    def _switch(self, gens, gen: str) -> None:
        gens.switch(gen)
        self._prune(gens, gen)

    def _prune(self, gens, gen: str) -> None:
        """Prune old generations after a switch, if no build holds the lock (its own prune will)."""
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
        """The jobs' ``on_discard``: delete the generation a cancelled or failed job staged, and the model it trained.

        Returns False, deleting nothing, when that generation is the current or a pinned one (a
        commit switched to it before the service stopped). Partial generations go too: a job that
        did not succeed leaves nothing behind, and submitting it again starts afresh.
        """
        plan = Plan.of(job.plan)
        gen = job.staged.get("generation")
        if gen:
            try:
                gens = self.generations(plan.index)
                if gen == gens.current() or gen in gens.pinned():
                    return False
                with gens.lock():
                    gens.delete_generation(gen)
                log.info("job %s: deleted its staged generation %s", job.id, gen)
            except Exception:  # noqa: BLE001 - a leftover generation is never served; pruning removes it later
                log.exception("job %s: deleting its staged generation failed", job.id)
        plan.delete_new_model()
        return True
