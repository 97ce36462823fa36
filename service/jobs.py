"""Admin jobs: the trainer's and indexer's CLI commands run as child processes, one job at a time.

A job is a list of steps (command lines of ``safe-retrieval``) run in order in a fresh process
group, with output going to a log file. Its record (status, progress, timestamps, error, result) is
a JSON file in ``STATE_DIR/jobs/ID/``, so ``GET /v1/admin/jobs`` still answers after a restart; a
job that was running when the service stopped is ended and marked failed when it starts again.
Cancelling ends the whole process group (SIGTERM, then SIGKILL after a grace period).

A job builds, it never switches: its ``index build/add/delete`` steps run with ``--no-switch`` and
``--result-file``, so they leave a complete generation *staged* and name it (``JobRecord.staged``),
and a retrain writes its new model to ``plan["new_model"]``. Nothing a job makes is served until the
job's one **commit point** in ``_run``: under the manager's lock, with every step succeeded and no
cancel requested, the job is marked ``committed``; only then does ``on_success`` (the service's
acceptance) open the staged generation, check it against the model, switch the pointer and swap
the served pair together. A job whose plan names an ``acceptance`` is judged right after its evaluation step,
before any later step (the reindex) runs: a new model that misses a threshold ends the job ``failed`` there
(:class:`AcceptanceError`, unless the request said ``force``), with what was measured kept in its result, and
nothing is reindexed or swapped. A cancel that lands before the commit point ends the job ``cancelled``
and ``on_discard`` deletes the staged generation, as a failure does (the new model is removed too);
a cancel after it is too late and the job ends ``succeeded``. If acceptance fails, the pointer has
not moved and the outputs are discarded. So a job that does not end ``succeeded`` changes nothing
served, at any instant. A job found running at start-up was interrupted: its outputs are discarded,
unless its commit had already switched the pointer to them (then it ended ``succeeded``).

The API's ``log_tail`` never shows Python stack frames: a traceback becomes one line (the log file
keeps it whole). Job processes get an environment without the service's tokens (``app.job_environment``).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from service.errors import ConflictError, ForbiddenError, NotFoundError, UnprocessableError
from service.schemas import ForgetRequest, IndexSource, ReindexRequest, RetrainRequest
from training.errors import DataError, InputError, SafeRetrievalError
from training.methods import ERASE

log = logging.getLogger("safe_retrieval.jobs")

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
LOG_TAIL_LINES = 20
#: argv tokens starting with this are paths in the job's own folder (its id is not known when steps are made)
JOB_DIR = "{job_dir}"
#: where an index step reports the generation it staged (``--result-file``)
INDEX_RESULT = f"{JOB_DIR}/index-result.json"
BEFORE_COMMIT = 0.99  # the most progress a job shows before its commit point: 1.0 means it succeeded
TRACE_OMITTED = "(stack trace omitted; the job's log file has it)"
_PERCENT = re.compile(rb"(\d{1,3})%\|")
#: run ``safe-retrieval ARGS`` with this interpreter, whether or not the console script is on PATH
CLI = [sys.executable, "-c", "import sys; from service.cli import main; main(sys.argv[1:])"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """A job as persisted: the public fields of ``schemas.Job`` plus how to run and find it."""

    id: str
    kind: str
    status: str = "queued"
    progress: float = 0.0
    step: str | None = None
    error: str | None = None
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    steps: list[list[str]] = field(default_factory=list)  # argv after ``safe-retrieval``
    plan: dict[str, Any] = field(default_factory=dict)  # what on_success needs: model, index, swap
    staged: dict[str, Any] = field(default_factory=dict)  # the index step's --result-file: the staged generation
    committed: bool = False  # past the commit point: a cancel is too late, on_success decides
    pid: int | None = None
    pid_started: str | None = None  # /proc start time, so a recycled pid is never killed

    def public(self, log_tail: list[str]) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "status": self.status, "progress": round(self.progress, 4),
            "step": self.step, "log_tail": log_tail, "error": self.error, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "request": self.request,
            "result": self.result,
        }


# ------------------------------------------------------------------ paths in requests
def resolve_under_roots(text: str, roots: list[Path], *, what: str = "path") -> Path:
    """A path from a request, refused unless it lies under one of ``roots`` (no ``..``, no symlink escape).

    Relative paths are taken relative to the first root under which they exist (else the first root).
    A name the OS refuses (a component over 255 bytes, a symlink loop) is an InputError (400), not a crash.
    The files a job then finds inside (manifest rows, symlinks in a folder, a ViSU layout) are confined
    by the job itself: every command gets ``--data-root`` for each root.
    """
    if not roots:
        raise ForbiddenError("no data roots are configured; set SAFE_RETRIEVAL_DATA_ROOTS to allow job paths")
    shown = repr(text if len(text) <= 200 else text[:200] + "...")
    if "\x00" in text:
        raise InputError(f"{what} contains a NUL byte")
    raw = Path(text)
    if ".." in raw.parts:
        raise InputError(f"{what} {shown} contains '..'; give a path under the data roots")
    try:
        resolved_roots = [r.resolve() for r in roots]
        if raw.is_absolute():
            candidates = [raw.resolve()]
        else:
            candidates = [(root / raw).resolve() for root in resolved_roots]
            existing = [c for c in candidates if c.exists()]
            candidates = existing[:1] or candidates[:1]
        path = candidates[0]
        inside = any(path == root or path.is_relative_to(root) for root in resolved_roots)
        exists = inside and path.exists()
    except (OSError, RuntimeError) as e:  # ENAMETOOLONG from stat, "Symlink loop" from resolve
        why = e.strerror if isinstance(e, OSError) and e.strerror else "a symlink loop" if isinstance(e, RuntimeError) else e
        raise InputError(f"{what} {shown} cannot be used ({why}); give a plain path under the data roots") from e
    if not inside:
        allowed = ", ".join(str(r) for r in resolved_roots)
        raise InputError(f"{what} {shown} is outside the data roots ({allowed})")
    if not exists:
        raise InputError(f"{what} {shown} does not exist under the data roots")
    return path


def data_root_args(roots: list[Path]) -> list[str]:
    """``--data-root`` for each root: the job reads no file outside them, whatever a manifest or symlink says.

    A configured root that does not exist holds no file, so leaving it out confines as much; at least one
    exists, as every job path was found under one.
    """
    return [arg for root in roots if os.path.isdir(root) for arg in ("--data-root", str(root))]


# ------------------------------------------------------------------ processes
def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def _alive(pid: int | None, started: str | None) -> bool:
    return pid is not None and started is not None and _proc_start(pid) == started


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the child leads its own session, so its pgid is its pid


def _tail(path: Path, lines: int = LOG_TAIL_LINES, size: int = 16384, since: int = 0) -> tuple[list[str], float | None]:
    """Last ``lines`` lines of a log (progress bars' carriage returns split lines) and the last percentage,
    reading nothing before byte ``since`` (where the current step's output starts)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - size, since, 0))
            data = f.read()
    except OSError:
        return [], None
    pct = _PERCENT.findall(data)
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    out = without_stack_traces([line.rstrip() for line in text.split("\n") if line.strip()])
    return out[-lines:], (min(int(pct[-1]), 100) / 100 if pct else None)


_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def without_stack_traces(lines: list[str]) -> list[str]:
    """``lines`` with each Python traceback (chained ones included) replaced by ``TRACE_OMITTED``,
    keeping the final error line (``ValueError: ...``). Frames cut at the start of a tail count too."""
    out: list[str] = []
    in_trace = ended = False  # inside a trace; the last line kept is the one that ended a trace
    for line in lines:
        if line.startswith("Traceback (most recent call last):") or (not out and line.startswith('  File "')):
            if not (out and out[-1] == TRACE_OMITTED):
                out.append(TRACE_OMITTED)
            in_trace, ended = True, False
        elif in_trace and line[:1].isspace():
            continue  # a frame or its source line
        elif ended and line.startswith(_CHAINED):
            out.pop()  # the earlier exception's line belongs to the omitted chain
            in_trace, ended = True, False
        elif in_trace and line.startswith(_CHAINED):
            continue
        else:
            ended, in_trace = in_trace, False
            out.append(line)
    return out


def _error_line(lines: list[str]) -> str | None:
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return None


# ------------------------------------------------------------------ the manager
class JobManager:
    """Starts, tracks, cancels and persists admin jobs; at most one runs at a time."""

    def __init__(
        self,
        state_dir: Path,
        *,
        on_success: Callable[[JobRecord], dict[str, Any]],
        on_discard: Callable[[JobRecord], bool] | None = None,
        on_change: Callable[[dict[str, int]], None] | None = None,
        cancel_grace_s: float = 10.0,
        env: dict[str, str] | None = None,
    ):
        self.dir = Path(state_dir) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(state_dir) / "models"
        self.on_success = on_success
        self.on_discard = on_discard  # deletes a job's staged generation; False: it is already served
        self.on_change = on_change
        self.cancel_grace_s = cancel_grace_s
        self.env = env
        self._lock = threading.RLock()
        self._jobs: dict[str, JobRecord] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._load()

    # -------------------------------------------------------------- persistence
    def _load(self) -> None:
        for path in sorted(self.dir.glob("*/job.json")):
            try:
                job = JobRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable job record %s: %s", path, e)
                continue
            if job.status in ACTIVE:  # the service stopped while it ran: end it
                if job.pid is not None and _alive(job.pid, job.pid_started):
                    _kill_group(job.pid, signal.SIGKILL)
                self._read_staged(job)
                job.finished_at, job.step, job.pid, job.pid_started = _now(), None, None, None
                if self._discard_outputs(job):
                    job.status = "failed"
                    job.error = "the service restarted while this job ran; nothing was changed, submit it again"
                else:  # its commit had switched the pointer before the stop: what it made is served
                    job.status, job.error = "succeeded", None
                    job.result = {"swapped": True, "recovered": True, "index": job.staged.get("generation")}
                self._save(job)
            self._jobs[job.id] = job
        self._changed()

    def _save(self, job: JobRecord) -> None:
        folder = self.dir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=2) + "\n")
        os.replace(tmp, folder / "job.json")

    def log_path(self, job_id: str) -> Path:
        return self.dir / job_id / "log.txt"

    def folder(self, job_id: str) -> Path:
        """The job's own folder (record, log, what its steps write under ``JOB_DIR``)."""
        return self.dir / job_id

    def _changed(self) -> None:
        if self.on_change is not None:
            counts = {s: 0 for s in ACTIVE + FINAL}
            for job in self._jobs.values():
                counts[job.status] = counts.get(job.status, 0) + 1
            self.on_change(counts)

    # -------------------------------------------------------------- queries
    # JobManager.list shadows the builtin inside this class body: annotations below spell builtins.list
    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.id, reverse=True)
        return [self._public(j) for j in jobs]

    def get(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}; GET /v1/admin/jobs lists them")
        return self._public(job)

    def _public(self, job: JobRecord) -> dict[str, Any]:
        tail, _ = _tail(self.log_path(job.id))
        return job.public(tail)

    def running(self) -> JobRecord | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.status in ACTIVE), None)

    # -------------------------------------------------------------- submitting
    def check_idle(self) -> None:
        """Raise ConflictError (409) naming the job that is running, if one is: before any costly check of a request."""
        busy = self.running()
        if busy is not None:
            raise ConflictError(f"job {busy.id} ({busy.kind}) is {busy.status}; wait for it or cancel it", busy.id)

    def submit(self, kind: str, request: dict[str, Any], steps: builtins.list[builtins.list[str]],
               plan: dict[str, Any], *, before_start: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Start a job now, or raise ConflictError naming the job that is running.

        ``before_start(job_id)`` runs once the job may start but before it exists (the audit record of the
        request that submits it): if it raises, nothing is created and the exception propagates.
        """
        with self._lock:
            self.check_idle()
            now = time.time()  # ids sort in submission order: second, millisecond, then a random tag
            job_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"
            if before_start is not None:
                before_start(job_id)
            job = JobRecord(id=job_id, kind=kind, request=request, steps=steps, plan=plan)
            self._jobs[job_id] = job
            self._cancel[job_id] = threading.Event()
            self._save(job)
            thread = threading.Thread(target=self._run, args=(job,), name=f"job-{job_id}", daemon=True)
            self._threads[job_id] = thread
            self._changed()
            thread.start()
            return self._public(job)

    def cancel(self, job_id: str, *, before: Callable[[], None] | None = None) -> dict[str, Any]:
        """Ask a queued/running job to stop and wait for it to end.

        Before the job's commit point it ends ``cancelled`` and its outputs are deleted; after it the
        cancel is too late and the job ends as its acceptance decides. Finished jobs are returned unchanged.
        ``before()`` runs once the job is found, before the cancel takes effect (the request's audit
        record): if it raises, the job is left as it was and the exception propagates.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id!r}; GET /v1/admin/jobs lists them")
            if before is not None:
                before()
            event = self._cancel.get(job_id)
            if job.status in ACTIVE and event is not None and not job.committed:  # after the commit: too late
                event.set()
                if job.pid is not None:
                    _kill_group(job.pid, signal.SIGTERM)
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(self.cancel_grace_s + 5)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(job_id)

    def shutdown(self) -> None:
        """End a running job (the service is stopping): it is marked failed and changes nothing
        (one past its commit point finishes its acceptance instead)."""
        job = self.running()
        if job is not None:
            with self._lock:
                if not job.committed:
                    self._cancel[job.id].set()
                    job.error = "the service stopped while this job ran; nothing was changed, submit it again"
                    if job.pid is not None:
                        _kill_group(job.pid, signal.SIGTERM)
            thread = self._threads.get(job.id)
            if thread is not None:
                thread.join(self.cancel_grace_s + 5)

    # -------------------------------------------------------------- running
    def _set(self, job: JobRecord, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(job, k, v)
            self._save(job)
            if "status" in changes:
                self._changed()

    def _run(self, job: JobRecord) -> None:
        cancel = self._cancel[job.id]
        logfile = self.log_path(job.id)
        self._set(job, status="running", started_at=_now())
        try:
            for i, argv in enumerate(job.steps):
                if cancel.is_set():
                    break
                argv = self._argv(job, argv)
                self._set(job, step="safe-retrieval " + shlex.join(argv))
                rc = self._run_step(job, argv, logfile, i, cancel)
                self._read_staged(job)
                if cancel.is_set():
                    break
                if rc != 0:
                    tail, _ = _tail(logfile, lines=200)
                    why = _error_line(tail) or f"'safe-retrieval {argv[0]}' exited with status {rc}; see log_tail"
                    self._finish(job, "failed", error=why)
                    return
                if (job.plan.get("acceptance") or {}).get("after_step") == i:
                    self._judge(job)
            with self._lock:  # THE commit point: a cancel either got in before it, or is too late
                if not cancel.is_set():
                    job.committed = True
                    self._set(job, step="swap")
            if not job.committed:
                self._finish(job, "failed" if job.error else "cancelled", error=job.error)
                return
            result = {**job.result, **self.on_success(job)}
            if job.plan.get("source") and job.plan.get("swap"):
                write_source(self.dir.parent, job.plan["source"])
        except SafeRetrievalError as e:
            self._finish(job, "failed", error=str(e))
            return
        except Exception as e:  # noqa: BLE001 - a bug must still end the job cleanly
            log.exception("job %s crashed", job.id)
            self._finish(job, "failed", error=f"internal error: {e.__class__.__name__}; see the server log")
            return
        self._finish(job, "succeeded", result=result)

    def _judge(self, job: JobRecord) -> None:
        """Read the evaluation the job's last step wrote into its result, and refuse a model that missed its
        acceptance (AcceptanceError, unless forced): the job then fails before its next step."""
        measured = evaluation_result(job.kind, self.folder(job.id), job.plan)
        self._set(job, result={**job.result, **measured})
        refusal = refused(measured)
        if refusal is not None:
            raise AcceptanceError(refusal)

    def _run_step(self, job: JobRecord, argv: builtins.list[str], logfile: Path, index: int, cancel: threading.Event) -> int:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        with logfile.open("ab") as out:
            out.write(f"$ safe-retrieval {shlex.join(argv)}\n".encode())
            out.flush()
            start = out.tell()
            proc = subprocess.Popen(
                CLI + argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self._set(job, pid=proc.pid, pid_started=_proc_start(proc.pid))
        if cancel.is_set():  # cancelled between the check and the start
            _kill_group(proc.pid, signal.SIGTERM)
        killed_at: float | None = None
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel.is_set():
                if killed_at is None:
                    killed_at = time.monotonic()
                    _kill_group(proc.pid, signal.SIGTERM)
                elif time.monotonic() - killed_at > self.cancel_grace_s:
                    _kill_group(proc.pid, signal.SIGKILL)
            _, pct = _tail(logfile, lines=1, since=start)
            if pct is not None:
                self._set(job, progress=min((index + pct) / len(job.steps), BEFORE_COMMIT))
        _kill_group(proc.pid, signal.SIGKILL)  # leftovers of the group (workers) never outlive their step
        done = rc == 0 and not cancel.is_set()  # a killed step did not finish: its share stays undone
        progress = {"progress": min((index + 1) / len(job.steps), BEFORE_COMMIT)} if done else {}
        self._set(job, pid=None, pid_started=None, **progress)
        return rc

    def _argv(self, job: JobRecord, argv: builtins.list[str]) -> builtins.list[str]:
        folder = str(self.dir / job.id)
        return [folder + a[len(JOB_DIR):] if a.startswith(JOB_DIR + "/") else a for a in argv]

    def _read_staged(self, job: JobRecord) -> None:
        """What the index step reported through ``--result-file`` (it may have been killed before writing)."""
        path = self.dir / job.id / INDEX_RESULT[len(JOB_DIR) + 1:]
        try:
            staged = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(staged, dict) and staged != job.staged:
            self._set(job, staged=staged)

    def _finish(self, job: JobRecord, status: str, *, error: str | None = None, result: dict | None = None) -> None:
        """End the job; its result is ``result``, else what it has recorded so far (a failed job keeps what its
        evaluation measured)."""
        if status != "succeeded":
            self._discard_outputs(job)
        done = {"progress": 1.0} if status == "succeeded" else {}
        self._set(job, status=status, error=error, result=job.result if result is None else result, finished_at=_now(),
                  step=None, **done)

    def _discard_outputs(self, job: JobRecord) -> bool:
        """Delete the staged generation (``on_discard``) and the new model, unless they are already
        served (a commit that switched before the service stopped): then keep both and return False."""
        if self.on_discard is not None and job.staged.get("generation"):
            try:
                if not self.on_discard(job):
                    return False
            except Exception:  # noqa: BLE001 - a leftover generation is never served; pruning removes it later
                log.exception("job %s: deleting its staged generation failed", job.id)
        out = job.plan.get("new_model")
        if out:  # the unfinished artifact and its run directory (checkpoints, metrics)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(f"{out}.run", ignore_errors=True)
        return True


# ------------------------------------------------------------------ the last indexed source
SOURCE_RECORD = "source.json"


def read_source(state_dir: Path) -> dict[str, Any] | None:
    """The source of the served index's last successful build (what a retrain reindexes by default)."""
    try:
        return json.loads((Path(state_dir) / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_source(state_dir: Path, source: dict[str, Any]) -> None:
    tmp = Path(state_dir) / f".{SOURCE_RECORD}.tmp"
    tmp.write_text(json.dumps(source, indent=2) + "\n")
    os.replace(tmp, Path(state_dir) / SOURCE_RECORD)


# ------------------------------------------------------------------ command lines
def store_args(*, qdrant_url: str | None, index_root: Path) -> list[str]:
    """Where ``index build`` writes: the Qdrant server, or the embedded store's root.

    The server's API key travels in the environment (``SAFE_RETRIEVAL_QDRANT_API_KEY``), never on
    a command line that job records and ``ps`` would show.
    """
    return ["--qdrant-url", qdrant_url] if qdrant_url else ["--root", str(index_root)]


def source_args(source: IndexSource, roots: list[Path], default_media_root: Path | None) -> list[str]:
    """``index build`` arguments for a source, every path checked against the data roots."""
    args: list[str] = []
    if source.images is not None:
        args += ["--images", str(resolve_under_roots(source.images, roots, what="source.images"))]
    elif source.manifest is not None:
        args += ["--manifest", str(resolve_under_roots(source.manifest, roots, what="source.manifest"))]
    else:
        assert source.visu is not None and source.split is not None  # IndexSource's validator: exactly one source
        args += ["--visu", str(resolve_under_roots(source.visu, roots, what="source.visu")), "--split", source.split]
    if source.captions:
        args.append("--captions-as-text")
    if source.texts is not None:
        args += ["--texts", str(resolve_under_roots(source.texts, roots, what="source.texts"))]
    if source.media_root is not None:
        args += ["--media-root", str(resolve_under_roots(source.media_root, roots, what="source.media_root"))]
    elif default_media_root is not None:
        args += ["--media-root", str(default_media_root)]
    return args + data_root_args(roots)


def reindex_steps(req: ReindexRequest, *, model: Path, name: str, roots: list[Path], media_root: Path | None,
                  qdrant_url: str | None, index_root: Path, max_file_bytes: int | None = None,
                  takedowns: Path | None = None) -> list[list[str]]:
    """The index step of a job: it stages a generation (``--no-switch``) and reports it (``--result-file``).

    ``takedowns`` (the collection's journal, ``service.collection.journal_path``) becomes ``--takedowns``: content on
    the takedown list is a failure of the job, never a point of the new generation.

    ``max_file_bytes`` (the service's ``JOB_MAX_FILE_BYTES``) becomes ``--max-file-bytes``: image files over
    it are failures of the job, refused from their size before they are read.

    An incremental job on a Qdrant server is refused: there ``index add`` changes the served
    collection in place, which no cancel could undo (see ``indexer.builder._check_stageable``).
    """
    if req.incremental and qdrant_url:
        raise InputError("an incremental reindex cannot be staged on a Qdrant server (adding changes the served "
                         "collection in place); submit it without 'incremental' to build a new generation")
    verb = "add" if req.incremental else "build"
    return [["index", verb, "--model", str(model), "--name", name,
             *source_args(req.source, roots, media_root), *store_args(qdrant_url=qdrant_url, index_root=index_root),
             *(["--max-file-bytes", str(max_file_bytes)] if max_file_bytes is not None else []),
             *(["--takedowns", str(takedowns)] if takedowns is not None else []),
             "--no-switch", "--result-file", INDEX_RESULT]]


def train_step(req: RetrainRequest, *, model: Path, out: Path, roots: list[Path]) -> list[str]:
    argv = ["train", "--method", req.method, "--data", str(resolve_under_roots(req.data, roots, what="data")),
            "--model", str(model), "--out", str(out), *data_root_args(roots)]
    options = {"--preset": req.preset, "--epochs": req.epochs, "--batch-size": req.batch_size, "--lr": req.lr,
               "--lora-rank": req.lora_rank, "--eta": req.eta, "--precision": req.precision, "--seed": req.seed,
               "--max-steps": req.max_steps}
    for flag, value in options.items():
        if value is not None:
            argv += [flag, str(value)]
    if req.full_finetune:
        argv.append("--full-finetune")
    return argv


# ------------------------------------------------------------------ forget jobs
#: where a forget job's evaluation writes report.json and report.md, in the job's folder
UNLEARNING = "unlearning"


def forget_data(requested: str | None, model: Path, roots: list[Path]) -> Path:
    """The dataset a forget job trains and evaluates on: the request's ``data``, else the served model's
    training data (its provenance ``data``), which must lie under the data roots as any job path."""
    if requested is not None:
        return resolve_under_roots(requested, roots, what="data")
    from training.artifact import read_config

    known = (read_config(model).get("provenance") or {}).get("data")
    if not isinstance(known, str) or not known:
        raise UnprocessableError("the served model records no training data (its provenance has no 'data'); give `data`: "
                                 "the ViSU-layout dataset, under the data roots, whose pairs show the concepts")
    try:
        return resolve_under_roots(known, roots, what="the served model's training data")
    except InputError as e:
        raise UnprocessableError(f"{e}; give `data`: a copy of that dataset (or another one) under the data roots") from e


def forget_concepts(data: Path, names: list[str], roots: list[Path]) -> list[str]:
    """The concepts that ``names`` (concept names or tags, any case) stand for in the dataset at ``data``.

    The request is checked as the job's training step will check it (:func:`training.data.forget.split`
    on the train split), so it fails here, before any job starts: a name the dataset does not know (the
    message lists its concepts and tags), a concept no training pair shows, or nothing left to retain
    is an UnprocessableError (422). Nothing outside the data roots is read.
    """
    from training.data import concepts, forget, visu

    confined = _confined(roots)
    summary = data / concepts.DATASET_SUMMARY
    if summary.exists():
        confined.check(summary, what=f"{data.name}/{concepts.DATASET_SUMMARY}")
    records = visu.load_split(data, "train", roots=confined).records
    try:
        return list(forget.split(records, data, forget=names, roots=confined).concepts)
    except InputError as e:
        raise UnprocessableError(str(e)) from e


def check_forget_method(req: ForgetRequest, model: Path) -> None:
    """The method, its ``weights`` and ``options`` checked as training will check them (422 with the reason): a
    method whose geometry is ``lorentz`` (``hac``) needs a lorentz model, and the others name the methods that fit."""
    from training import methods
    from training.artifact import read_config

    if req.method == ERASE:
        extra = [k for k in ("preset", "epochs", "lr", "max_steps", "weights", "options") if getattr(req, k) is not None]
        if extra:
            raise UnprocessableError(f"method 'erase' fits a closed-form eraser and trains nothing, so it takes no "
                                     f"{', '.join(map(repr, extra))}; leave them out, or pick a method that trains")
        return
    geometry = read_config(model).get("geometry")
    if methods.METHODS[req.method].geometry == "lorentz" and geometry != "lorentz":
        usable = [m for m in methods.FORGETTING if methods.METHODS[m].geometry != "lorentz"]
        raise UnprocessableError(f"method {req.method!r} needs a lorentz (hyperbolic) model, and the served model is "
                                 f"{geometry}; use a method for any model: {', '.join(map(repr, usable))}")
    try:
        methods.term_weights(req.method, params=req.weights, options=req.options)
    except InputError as e:
        raise UnprocessableError(str(e)) from e


def _confined(roots: list[Path]):
    from training.data.roots import DataRoots

    return DataRoots.of([r for r in roots if os.path.isdir(r)])


def _test_split(data: Path, roots: list[Path], why: str):
    """The test split of ``data``, which the job's evaluation step reads; none is a 422 saying ``why``."""
    from training.data import visu

    try:
        return visu.load_split(data, "test", roots=_confined(roots))
    except (DataError, InputError) as e:
        raise UnprocessableError(f"the job's evaluation could not run, so {why}: {e}. Give `data` whose test split "
                                 "(its ViSU-Text test file and images, under the data roots) is there") from e


def check_erasable(req: ForgetRequest, model: Path, data: Path, concepts: list[str], roots: list[Path]) -> None:
    """Refuse (422), before anything is trained, a forget job whose eraser could not be fitted: too few train images
    of a concept (the message says how many it needs). Nothing to check without the eraser."""
    from training import erasure
    from training.artifact import read_config

    if not (req.erase or req.method == ERASE):
        return
    try:
        erasure.plan(data, concepts, dim=int(read_config(model)["embed_dim"]), roots=_confined(roots))
    except (DataError, InputError) as e:
        raise UnprocessableError(f"{e}; or ask for no eraser (`erase`: false)") from e


def check_forget_evaluation(data: Path, concepts: list[str], roots: list[Path]) -> None:
    """Refuse (422), before anything is trained, a forget job whose evaluation could not measure the model: no
    test split, one that shows none of ``concepts`` (forgetting unmeasured), or nothing else (retention unmeasured).

    The same rules as the evaluation's own (``eval --unlearning``), on the same split.
    """
    from training.data.concepts import catalogue

    records = _test_split(data, roots, "the new model could not be checked").records
    cat = catalogue(data, records, roots=_confined(roots))
    shown = [cat.concept_of(r) for r in records]
    forgotten = sum(1 for c in shown if c is not None and c.name in concepts)
    retained = sum(1 for c in shown if c is not None and c.name not in concepts)
    if not forgotten:
        raise UnprocessableError(f"the test split of {data.name} shows none of {', '.join(concepts)}, so the job's "
                                 "evaluation could not measure what the new model forgot; give `data` whose test split "
                                 f"shows them, or forget concepts it shows ({cat.known()})")
    if not retained:
        raise UnprocessableError(f"every test record of {data.name} with a known concept shows {', '.join(concepts)}, "
                                 "so the job's evaluation could not measure what the new model retained; forget fewer "
                                 "concepts, or give `data` whose test split also shows others")


def check_retrain_evaluation(data: Path, roots: list[Path]) -> None:
    """Refuse (422), before anything is trained, a retrain whose evaluation (the test split of ``data``) cannot run,
    or would read an image outside the data roots: ``eval`` reads every record of the split and, unlike the
    unlearning evaluation, takes no ``--data-root``, so the split is confined here."""
    split = _test_split(data, roots, "the new model's retrieval could not be checked")
    outside = split.skipped.get("outside_data_roots", 0)
    if outside:
        raise UnprocessableError(f"{outside} record(s) of the test split of {data.name} name images outside the data "
                                 "roots, which the job's evaluation would read; move them under the data roots or give "
                                 "other `data`")


def forget_steps(req: ForgetRequest, *, concepts: list[str], model: Path, out: Path, data: Path,
                 roots: list[Path]) -> list[list[str]]:
    """A forget job's training and evaluation steps (its index step is ``reindex_steps``).

    ``train`` unlearns ``concepts`` from ``model`` into ``out``; ``eval --unlearning`` compares the
    two on the test split of ``data`` and writes ``report.json`` into the job's ``UNLEARNING`` folder.
    """
    forget = ",".join(concepts)
    train = ["train", "--method", req.method, "--model", str(model), "--forget", forget, "--data", str(data),
             "--out", str(out), *data_root_args(roots)]
    options = {"--preset": req.preset, "--epochs": req.epochs, "--lr": req.lr, "--seed": req.seed,
               "--max-steps": req.max_steps}
    for flag, value in options.items():
        if value is not None:
            train += [flag, str(value)]
    if req.weights:  # by name: the trainer checks them as the route did (training.methods.term_weights)
        train += ["--weights", ",".join(f"{name}={weight!r}" for name, weight in req.weights.items())]
    for name, choice in (req.options or {}).items():
        train += ["--objective-option", f"{name}={choice}"]
    if req.erase and req.method != ERASE:
        train.append("--then-erase")
    evaluate = ["eval", "--unlearning", "--forget", forget, "--data", str(data), "--split", "test",
                "--out", f"{JOB_DIR}/{UNLEARNING}", *data_root_args(roots), "--compare", str(model), str(out)]
    return [train, evaluate]


def unlearning_result(folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """A forget job's ``result["unlearning"]``: its evaluation's table (``report.json``: artifact directory name
    -> metrics) with the concepts, the method and the forget/retain sizes the new model's provenance records.

    Raises DataError when the evaluation left no readable report (the job then fails, changing nothing).
    """
    from training.artifact import read_config

    path = folder / UNLEARNING / "report.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"the forget job's evaluation wrote no readable {path.name} ({e.__class__.__name__}); "
                        "see the job's log, then submit the job again") from e
    if not isinstance(table, dict) or len(table) != 2:
        raise DataError(f"the forget job's {path.name} does not hold two rows (before, after); see the job's log")
    before, after = table  # in the order of --compare: the served model, then the new one
    info = plan.get("unlearning") or {}
    forgotten = (read_config(plan["new_model"]).get("provenance") or {}).get("forget") or {}
    return {
        "concepts": info.get("concepts"), "method": info.get("method"),
        "forget_pairs": forgotten.get("forget_pairs"), "retain_pairs": forgotten.get("retain_pairs"),
        "before": before, "after": after, "table": table, "report": str(folder / UNLEARNING / "report.md"),
    }


# ------------------------------------------------------------------ retrain evaluation
#: where a retrain's evaluation writes report.json and report.md, in the job's folder
RETRIEVAL = "retrieval"
#: the task and metric a retrain must keep: safe caption -> safe image, recall at 1
RECALL_TASK, RECALL_METRIC = "T->V", "R@1"


def retrieval_eval_step(data: Path, *, model: Path, out: Path) -> list[str]:
    """A retrain's evaluation step: the served ``model`` and the new one (``out``) on the test split of ``data``,
    without traversal (T->V queries are safe captions), into the job's ``RETRIEVAL`` folder.

    ``eval`` takes no ``--data-root`` outside ``--unlearning``: the route confines the split itself
    (:func:`check_retrain_evaluation`) before the job starts.
    """
    return ["eval", "--data", str(data), "--split", "test", "--traversal", "off", "--out", f"{JOB_DIR}/{RETRIEVAL}",
            "--compare", str(model), str(out)]


def retrieval_result(folder: Path) -> dict[str, Any]:
    """A retrain's ``result["retrieval"]`` (without its acceptance): T->V R@1 (%) of the served model (``before``) and
    the new one (``after``) from its evaluation's ``report.json``; a figure the report lacks is None.

    Raises DataError when the evaluation left no readable report.
    """
    path = folder / RETRIEVAL / "report.json"
    try:
        report = json.loads(path.read_text())
        models = report["models"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"the retrain's evaluation wrote no readable {path.name} ({e.__class__.__name__}); "
                        "see the job's log, then submit the job again") from e
    if not isinstance(models, list) or len(models) != 2:
        raise DataError(f"the retrain's {path.name} does not hold two models (served, new); see the job's log")

    def recall(row: Any) -> float | None:
        try:
            value = _number(100 * row["variants"]["plain"]["tasks"][RECALL_TASK][RECALL_METRIC])
        except (KeyError, TypeError):
            return None
        return None if value is None else round(value, 2)

    return {"task": RECALL_TASK, "metric": RECALL_METRIC, "before": recall(models[0]), "after": recall(models[1]),
            "report": str(folder / RETRIEVAL / "report.md")}


# ------------------------------------------------------------------ acceptance
_EPS = 1e-6  # figures are rounded to 0.1: a fall of exactly the threshold passes


class AcceptanceError(SafeRetrievalError):
    """The new model missed its acceptance and the request did not say ``force``: the job fails, nothing is swapped."""


def _number(value: Any) -> float | None:
    """A measured figure, or None when it is missing, null, not a number or NaN (it could not be measured)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _unmeasured(what: str, metric: str, before: float | None, after: float | None, note: str | None) -> str:
    rows = " and ".join(name for name, v in (("the served model", before), ("the new model", after)) if v is None)
    return f"{what} could not be measured: the evaluation reports no {metric} for {rows}" + (f" ({note})" if note else "")


def unlearning_acceptance(before: Mapping[str, Any], after: Mapping[str, Any], *, min_forget_drop: float,
                          max_retain_drop: float, max_benign_drop: float, force: bool = False,
                          notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Judge a forget job's new model from its evaluation's rows (``before``: the served model, ``after``: the new one).

    - forget: ``f_acc`` must fall by at least ``min(min_forget_drop, before f_acc)`` points (where the served model
      recognised less than the threshold, all of it must go);
    - retain: ``r_acc`` may fall by at most ``max_retain_drop`` points;
    - benign: ``after["benign_drop"]`` (points lost on harmless look-alikes) may be at most ``max_benign_drop``.

    A figure that is null (``notes``: metric -> why, from the evaluation) fails its check. Returns ``{"passed",
    "forced", "thresholds", "checks": {forget, retain, benign}, "misses"}``; ``forced`` when it failed and ``force``.
    """
    notes = notes or {}
    checks: dict[str, dict[str, Any]] = {}
    f0, f1 = _number(before.get("f_acc")), _number(after.get("f_acc"))
    required = min(min_forget_drop, f0) if f0 is not None else min_forget_drop
    forget: dict[str, Any] = {"metric": "f_acc", "before": f0, "after": f1, "required": required}
    if f0 is None or f1 is None:
        forget.update(drop=None, passed=False, reason=_unmeasured("forget accuracy", "f_acc", f0, f1, notes.get("f_acc")))
    else:
        drop = f0 - f1
        ok = drop >= required - _EPS
        all_of_it = f" (all of it: the served model recognised only {f0:.1f}%)" if required < min_forget_drop else ""
        moved = f"fell only {drop:.1f} points" if drop >= 0 else f"rose {-drop:.1f} points"
        forget.update(drop=round(drop, 2), passed=ok,
                      reason=None if ok else f"forget accuracy {moved} ({f0:.1f} -> {f1:.1f}), {required:g} required{all_of_it}")
    checks["forget"] = forget

    r0, r1 = _number(before.get("r_acc")), _number(after.get("r_acc"))
    retain: dict[str, Any] = {"metric": "r_acc", "before": r0, "after": r1, "allowed": max_retain_drop}
    if r0 is None or r1 is None:
        retain.update(drop=None, passed=False, reason=_unmeasured("retain accuracy", "r_acc", r0, r1, notes.get("r_acc")))
    else:
        drop = r0 - r1
        ok = drop <= max_retain_drop + _EPS
        retain.update(drop=round(drop, 2), passed=ok,
                      reason=None if ok else f"retain accuracy fell {drop:.1f} points, {max_retain_drop:g} allowed")
    checks["retain"] = retain

    b = _number(after.get("benign_drop"))
    benign: dict[str, Any] = {"metric": "benign_drop", "drop": b, "allowed": max_benign_drop}
    if b is None:
        why = notes.get("benign_drop")
        benign.update(passed=False, reason="look-alike accuracy could not be measured: the evaluation reports no "
                      "benign_drop for the new model" + (f" ({why})" if why else ""))
    else:
        ok = b <= max_benign_drop + _EPS
        benign.update(passed=ok, reason=None if ok else f"look-alike accuracy fell {b:.1f} points, {max_benign_drop:g} allowed")
    checks["benign"] = benign

    thresholds = {"min_forget_drop": min_forget_drop, "max_retain_drop": max_retain_drop, "max_benign_drop": max_benign_drop}
    return _verdict(checks, thresholds, force)


def retrieval_acceptance(before: float | None, after: float | None, *, max_recall_drop: float,
                         force: bool = False) -> dict[str, Any]:
    """Judge a retrain's new model: its T->V R@1 (%) may fall at most ``max_recall_drop`` points below the served
    model's on the same data; a figure that could not be measured fails. Returns what :func:`unlearning_acceptance` does."""
    name = f"{RECALL_TASK} {RECALL_METRIC}"
    check: dict[str, Any] = {"metric": name, "before": before, "after": after, "allowed": max_recall_drop}
    if before is None or after is None:
        check.update(drop=None, passed=False, reason=_unmeasured(name, name, before, after, None))
    else:
        drop = before - after
        ok = drop <= max_recall_drop + _EPS
        check.update(drop=round(drop, 2), passed=ok, reason=None if ok else
                     f"{name} fell {drop:.1f} points ({before:.1f} -> {after:.1f}), {max_recall_drop:g} allowed")
    return _verdict({"recall": check}, {"max_recall_drop": max_recall_drop}, force)


def _verdict(checks: dict[str, dict[str, Any]], thresholds: dict[str, float], force: bool) -> dict[str, Any]:
    misses = [c["reason"] for c in checks.values() if not c["passed"]]
    return {"passed": not misses, "forced": bool(misses) and force, "thresholds": thresholds, "checks": checks,
            "misses": misses}


def acceptance_plan(after_step: int, *, force: bool, **thresholds: float) -> dict[str, Any]:
    """``plan["acceptance"]``: the model is judged once step ``after_step`` (the evaluation) has succeeded."""
    return {"after_step": after_step, "force": force, "thresholds": thresholds}


#: which result key holds each job kind's evaluation and acceptance
EVALUATION_KEY = {"forget": "unlearning", "retrain": "retrieval"}


def _evaluation_notes(folder: Path) -> dict[str, str]:
    """Why the unlearning evaluation left a figure null (``null`` of its ``details.json``: metric -> why), when it
    says so; the acceptance works without it."""
    try:
        notes = json.loads((folder / UNLEARNING / "details.json").read_text()).get("null")
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


def evaluation_result(kind: str, folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """What a job's evaluation measured, judged against ``plan["acceptance"]``: ``{"unlearning": ...}`` for a forget
    job (the table, with ``acceptance``), ``{"retrieval": ...}`` for a retrain. Raises DataError without a report."""
    spec = plan["acceptance"]
    force, limits = bool(spec.get("force")), spec["thresholds"]
    if kind == "forget":
        measured = unlearning_result(folder, plan)
        table = measured["table"]
        measured["acceptance"] = unlearning_acceptance(
            table[measured["before"]], table[measured["after"]], force=force, notes=_evaluation_notes(folder), **limits)
    elif kind == "retrain":
        measured = retrieval_result(folder)
        measured["acceptance"] = retrieval_acceptance(measured["before"], measured["after"], force=force, **limits)
    else:
        raise DataError(f"a {kind} job has no evaluation to judge")
    return {EVALUATION_KEY[kind]: measured}


def refused(result: dict[str, Any]) -> str | None:
    """The job's error when the acceptance in ``result`` failed and was not forced, else None."""
    for key, measured in result.items():
        acceptance = measured.get("acceptance") if isinstance(measured, dict) else None
        if acceptance and not acceptance["passed"] and not acceptance["forced"]:
            return (f"the new model was refused: {'; '.join(acceptance['misses'])}. Nothing was reindexed or swapped "
                    f"and the new model was deleted (result.{key} holds the evaluation and its acceptance); train it "
                    "differently or change the thresholds and submit again, or submit with force: true to swap it in "
                    "anyway")
    return None


def forced(result: dict[str, Any]) -> dict[str, Any] | None:
    """The acceptance in ``result`` that failed but was forced (the commit's audit record names it), else None."""
    for measured in result.values():
        acceptance = measured.get("acceptance") if isinstance(measured, dict) else None
        if acceptance and acceptance["forced"]:
            return acceptance
    return None
