"""The job runner: the trainer's and indexer's CLI commands run as child processes, one job at a time.

What a job is for (its plan, steps, evaluation and acceptance) is :mod:`service.admin`'s; the runner only runs
steps, persists the record, and calls back: ``judge`` after each step, ``on_success`` at the commit point,
``on_discard`` when a job's outputs must go. The plan is opaque to it (persisted as the admin side gave it).

A job is a list of steps (command lines of ``safe-retrieval``) run in order in a fresh process
group, with output going to a log file. Its record (status, progress, timestamps, error, result) is
a JSON file in ``STATE_DIR/jobs/ID/``, so ``GET /v1/admin/jobs`` still answers after a restart; a
job that was running when the service stopped is ended and marked failed when it starts again.
Cancelling ends the whole process group (SIGTERM, then SIGKILL after a grace period).

A job builds, it never switches: its ``index build/add/delete`` steps run with ``--no-switch`` and
``--result-file``, so they leave a complete generation *staged* and name it (``JobRecord.staged``),
and a retrain writes its new model into the state's ``models`` folder. Nothing a job makes is served until the
job's one **commit point** in ``_run``: under the manager's lock, with every step succeeded and no
cancel requested, the job is marked ``committed``; only then does ``on_success`` (the service's
acceptance) open the staged generation, check it against the model, switch the pointer and swap
the served pair together. ``judge`` is called after every step: when it measured something (a job's evaluation
step) the result keeps it, and when it refuses the job (a new model that missed its acceptance, unless the request
said ``force``) the job ends ``failed`` there, before any later step (the reindex) runs, and nothing is reindexed or
swapped. A cancel that lands before the commit point ends the job ``cancelled``
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
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from service.errors import ConflictError, NotFoundError
from training.errors import SafeRetrievalError

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
    plan: dict[str, Any] = field(default_factory=dict)  # the admin side's ``Plan``, as a dict: opaque to the runner
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
        judge: Callable[[JobRecord, int, Path], tuple[dict[str, Any], str | None] | None] | None = None,
        on_change: Callable[[dict[str, int]], None] | None = None,
        cancel_grace_s: float = 10.0,
        env: dict[str, str] | None = None,
    ):
        self.dir = Path(state_dir) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(state_dir) / "models"
        self.on_success = on_success
        self.on_discard = on_discard  # deletes what a job made (generation, model); False: it is already served
        self.judge = judge  # (job, step index, job folder) -> (measured, refusal or None), or None: nothing to judge
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
                if self.judge is not None:
                    self._judge(job, i)
            with self._lock:  # THE commit point: a cancel either got in before it, or is too late
                if not cancel.is_set():
                    job.committed = True
                    self._set(job, step="swap")
            if not job.committed:
                self._finish(job, "failed" if job.error else "cancelled", error=job.error)
                return
            result = {**job.result, **self.on_success(job)}
        except SafeRetrievalError as e:
            self._finish(job, "failed", error=str(e))
            return
        except Exception as e:  # noqa: BLE001 - a bug must still end the job cleanly
            log.exception("job %s crashed", job.id)
            self._finish(job, "failed", error=f"internal error: {e.__class__.__name__}; see the server log")
            return
        self._finish(job, "succeeded", result=result)

    def _judge(self, job: JobRecord, step: int) -> None:
        """What ``judge`` measured after ``step`` goes into the result; a refusal fails the job before its next step."""
        verdict = self.judge(job, step, self.folder(job.id)) if self.judge is not None else None
        if verdict is None:
            return
        measured, refusal = verdict
        self._set(job, result={**job.result, **measured})
        if refusal is not None:
            raise JobRefused(refusal)

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
        """Have ``on_discard`` delete what the job made; False when it is already served (a commit that switched
        before the service stopped)."""
        if self.on_discard is None:
            return True
        try:
            return self.on_discard(job)
        except Exception:  # noqa: BLE001 - a leftover is never served; pruning removes generations later
            log.exception("job %s: deleting its outputs failed", job.id)
            return True


class JobRefused(SafeRetrievalError):
    """``judge`` refused the job (a new model that missed its acceptance): it fails, nothing is swapped."""
