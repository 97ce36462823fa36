"""Admin jobs: real CLI subprocesses, one at a time, cancellable, persisted; swaps of model + index together."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from indexer.generations import LocalGenerations
from indexer.index import schema_of
from service.admin.acceptance import retrieval_acceptance
from service.admin.facade import judge
from service.admin.kinds import RETRIEVAL, check_retrain_evaluation, reindex_steps, retrieval_eval_step, train_step
from service.admin.paths import resolve_under_roots
from service.admin.plans import Acceptance, Plan
from service.app import job_environment
from service.errors import ConflictError, ForbiddenError
from service.jobs import JOB_DIR, TRACE_OMITTED, JobManager, JobRecord, _alive, _proc_start, _tail
from service.schemas import IndexSource, ReindexRequest, RetrainRequest
from tests.helpers.indexer import leaked, leaky_root
from tests.helpers.service import ADMIN, INDEX, MODERATOR, copy_index, live, settings_for
from training.errors import InputError


# ------------------------------------------------------------------ paths in requests
def test_paths_must_lie_under_the_data_roots(tmp_path):
    root = tmp_path / "data"
    (root / "set").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert resolve_under_roots("set", [root]) == (root / "set").resolve()
    assert resolve_under_roots(str(root / "set"), [root]) == (root / "set").resolve()
    for bad in ("../outside", "set/../../outside", str(tmp_path / "outside"), "/etc", "escape"):
        with pytest.raises(InputError):
            resolve_under_roots(bad, [root])
    with pytest.raises(InputError, match="does not exist"):
        resolve_under_roots("nothing-here", [root])
    with pytest.raises(ForbiddenError, match="SAFE_RETRIEVAL_DATA_ROOTS"):
        resolve_under_roots("set", [])


def test_every_job_command_is_confined_to_the_existing_data_roots(tmp_path):
    root = tmp_path / "data"
    (root / "set").mkdir(parents=True)
    roots = [root, tmp_path / "not-there"]
    commands = [reindex_steps(ReindexRequest(source=IndexSource(images="set")), model=tmp_path / "m", name="g",
                              roots=roots, media_root=None, qdrant_url=None, index_root=tmp_path / "idx")[0],
                train_step(RetrainRequest(data="set"), model=tmp_path / "m", out=tmp_path / "out", roots=roots)]
    for argv in commands:
        pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--data-root"]
        assert pairs == [str(root)], argv


def test_progress_and_log_tail_from_a_progress_bar(tmp_path):
    log = tmp_path / "log.txt"
    log.write_bytes(b"start\nepoch 1:  10%|#  | 1/10\repoch 1:  40%|####  | 4/10\rdone?\n")
    tail, pct = _tail(log)
    assert pct == pytest.approx(0.4)
    assert tail[-1] == "done?" and tail[0] == "start"


def test_log_tail_shows_no_stack_frames_but_keeps_the_error_line(tmp_path):
    jobs = JobManager(tmp_path / "state", on_success=lambda job: {})
    record = JobRecord(id="20250101-000000-000-abcdef", kind="reindex", status="failed")
    jobs._save(record)
    jobs = JobManager(tmp_path / "state", on_success=lambda job: {})  # as after a restart: it reads the record
    trace = (
        "$ safe-retrieval index build --manifest m.jsonl\n"
        "reading m.jsonl\n"
        "Traceback (most recent call last):\n"
        '  File "/x/indexer/sources.py", line 80, in manifest_items\n'
        "    row.get('image')\n"
        "    ^^^^^^^\n"
        "AttributeError: 'list' object has no attribute 'get'\n"
        "\n"
        "During handling of the above exception, another exception occurred:\n"
        "\n"
        "Traceback (most recent call last):\n"
        '  File "/x/indexer/cli.py", line 12, in build_cmd\n'
        "    raise RuntimeError('wrapped')\n"
        "RuntimeError: wrapped\n"
    )
    jobs.log_path(record.id).write_text(trace)
    tail = jobs.get(record.id)["log_tail"]
    assert tail == ["$ safe-retrieval index build --manifest m.jsonl", "reading m.jsonl", TRACE_OMITTED,
                    "RuntimeError: wrapped"]
    assert not any(line.startswith(("Traceback", "  File")) for line in tail)
    assert "AttributeError" in jobs.log_path(record.id).read_text()  # the log file keeps it all
    # a tail that starts in the middle of a trace (the window cut its first line) is cleaned too
    jobs.log_path(record.id).write_text('  File "/x/a.py", line 1, in f\n    g()\nValueError: bad\nnext line\n')
    assert jobs.get(record.id)["log_tail"] == [TRACE_OMITTED, "ValueError: bad", "next line"]


def test_an_incremental_reindex_on_a_qdrant_server_is_refused(tmp_path):
    (tmp_path / "imgs").mkdir()
    req = ReindexRequest(source={"images": "imgs"}, incremental=True)
    with pytest.raises(InputError, match="cannot be staged on a Qdrant server"):
        reindex_steps(req, model=tmp_path / "m", name="g", roots=[tmp_path], media_root=None,
                      qdrant_url="http://127.0.0.1:6333", index_root=tmp_path / "idx")
    steps = reindex_steps(req, model=tmp_path / "m", name="g", roots=[tmp_path], media_root=None, qdrant_url=None,
                          index_root=tmp_path / "idx")
    assert steps[0][:2] == ["index", "add"] and "--no-switch" in steps[0] and "--result-file" in steps[0]


def test_reindex_jobs_pass_the_file_size_limit(tmp_path):
    (tmp_path / "imgs").mkdir()
    req = ReindexRequest(source={"images": "imgs"})
    common = dict(model=tmp_path / "m", name="g", roots=[tmp_path], media_root=None, qdrant_url=None,
                  index_root=tmp_path / "idx")
    (argv,) = reindex_steps(req, max_file_bytes=123_456, **common)
    assert argv[argv.index("--max-file-bytes") + 1] == "123456"
    assert "--max-file-bytes" not in reindex_steps(req, **common)[0]  # the CLI's own default


# ------------------------------------------------------------------ the manager with real CLI commands
def manager(tmp_path, calls: list | None = None) -> JobManager:
    def on_success(job: JobRecord) -> dict:
        if calls is not None:
            calls.append(job.id)
        return {"ok": True}

    return JobManager(tmp_path / "state", on_success=on_success, on_discard=delete_new_model, judge=judge,
                      cancel_grace_s=2)


def delete_new_model(job: JobRecord) -> bool:
    """The service's discard as far as these jobs need it (they stage no generation): the model they trained goes."""
    Plan.of(job.plan).delete_new_model()
    return True


def test_a_job_runs_its_steps_and_persists(tmp_path):
    calls: list = []
    jobs = manager(tmp_path, calls)
    job = jobs.submit("reindex", {"x": 1}, [["data", "synth", "--out", str(tmp_path / "d"), "--n", "3"]], {})
    done = jobs.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["started_at"] and done["finished_at"]
    assert calls == [job["id"]] and done["result"] == {"ok": True}
    assert done["log_tail"] and done["log_tail"][-1] == "}"  # the end of the command's JSON summary
    assert jobs.log_path(job["id"]).read_text().startswith("$ safe-retrieval data synth --out")
    assert (tmp_path / "d" / "dataset.json").is_file()
    again = manager(tmp_path)  # a restarted service reads the same records
    assert again.get(job["id"])["status"] == "succeeded"


def test_a_failing_step_fails_the_job_with_the_cli_message(tmp_path):
    calls: list = []
    jobs = manager(tmp_path, calls)
    out = tmp_path / "new-model"
    out.mkdir()
    job = jobs.submit("retrain", {}, [["data", "synth", "--out", str(tmp_path / "d"), "--n", "1"]], {"new_model": str(out)})
    done = jobs.wait(job["id"], timeout=60)
    assert done["status"] == "failed"
    assert "--n must be at least 3" in done["error"]
    assert calls == [] and not out.exists()  # nothing swapped, the unfinished output removed


# ------------------------------------------------------------------ a retrain's acceptance
def test_retrieval_acceptance_allows_a_fall_up_to_the_margin():
    assert retrieval_acceptance(61.0, 56.0, max_recall_drop=5)["passed"] is True  # exactly the margin
    assert retrieval_acceptance(61.0, 70.0, max_recall_drop=0)["passed"] is True
    verdict = retrieval_acceptance(61.0, 53.8, max_recall_drop=5)
    assert verdict["passed"] is False and verdict["misses"] == ["T->V R@1 fell 7.2 points (61.0 -> 53.8), 5 allowed"]
    assert verdict["checks"]["recall"]["drop"] == 7.2 and verdict["thresholds"] == {"max_recall_drop": 5}
    assert retrieval_acceptance(61.0, 53.8, max_recall_drop=5, force=True)["forced"] is True
    unmeasured = retrieval_acceptance(None, 53.8, max_recall_drop=5)
    assert unmeasured["misses"] == ["T->V R@1 could not be measured: the evaluation reports no T->V R@1 for the served model"]


def test_the_retrain_evaluation_step_compares_the_served_and_the_new_model_on_the_test_split(tmp_path):
    argv = retrieval_eval_step(tmp_path / "data", model=tmp_path / "served", out=tmp_path / "new")
    assert argv[:3] == ["eval", "--data", str(tmp_path / "data")] and argv[argv.index("--split") + 1] == "test"
    assert argv[argv.index("--out") + 1] == f"{JOB_DIR}/{RETRIEVAL}" and argv[argv.index("--traversal") + 1] == "off"
    assert argv[-3:] == ["--compare", str(tmp_path / "served"), str(tmp_path / "new")]  # before, after


def _recall_report(folder: Path, before: float, after: float) -> None:
    """What ``eval --compare SERVED NEW`` writes, as far as the acceptance reads it (fractions, as evaluate does)."""
    def row(r1: float) -> dict:
        return {"label": "m", "variants": {"plain": {"tasks": {"T->V": {"R@1": r1, "R@5": 1.0}, "V->T": {"R@1": 0.1}}}}}

    (folder / RETRIEVAL).mkdir(parents=True)
    (folder / RETRIEVAL / "report.json").write_text(json.dumps({"models": [row(before), row(after)]}))


@pytest.mark.parametrize("after,force", [(0.538, False), (0.538, True), (0.60, False)])
def test_a_retrain_judged_after_its_evaluation_stops_before_its_next_step(tmp_path, after, force):
    """The manager judges the model once the step the plan names has succeeded: a miss fails the job there (its
    next step, the reindex, never runs; the new model is deleted; nothing is accepted), unless forced."""
    calls: list = []
    jobs = manager(tmp_path, calls)
    out = tmp_path / "new-model"
    out.mkdir()
    reindexed = tmp_path / "reindexed"

    def evaluated(job_id: str) -> None:  # the evaluation's report, as its step would leave it
        _recall_report(jobs.folder(job_id), 0.61, after)

    plan = Plan(index=INDEX, new_model=str(out), acceptance=Acceptance(0, force, {"max_recall_drop": 5})).to_dict()
    steps = [["--help"], ["data", "synth", "--out", str(reindexed), "--n", "3"]]
    job = jobs.submit("retrain", {}, steps, plan, before_start=evaluated)
    done = jobs.wait(job["id"], timeout=60)
    acceptance = done["result"]["retrieval"]["acceptance"]
    assert (done["result"]["retrieval"]["before"], done["result"]["retrieval"]["after"]) == (61.0, round(100 * after, 2))
    if after == 0.60 or force:
        assert done["status"] == "succeeded", done
        assert done["result"]["ok"] is True and calls == [job["id"]] and reindexed.is_dir()
        assert acceptance["forced"] is force and acceptance["passed"] is (not force)
    else:
        assert done["status"] == "failed", done
        assert done["error"].startswith("the new model was refused: T->V R@1 fell 7.2 points (61.0 -> 53.8), 5 allowed")
        assert acceptance["passed"] is False and acceptance["forced"] is False
        assert calls == [] and not reindexed.exists() and not out.exists()
        assert manager(tmp_path).get(job["id"])["result"] == done["result"]  # kept across a restart


def test_a_retrain_whose_evaluation_wrote_no_report_fails(tmp_path):
    calls: list = []
    jobs = manager(tmp_path, calls)
    plan = Plan(index=INDEX, acceptance=Acceptance(0, True, {"max_recall_drop": 5}))
    job = jobs.submit("retrain", {}, [["--help"]], plan.to_dict())
    done = jobs.wait(job["id"], timeout=60)
    assert done["status"] == "failed" and "wrote no readable report.json" in done["error"] and calls == []


def test_a_retrain_whose_test_split_is_missing_or_leaves_the_data_roots_is_refused(world, tmp_path):
    from service.errors import UnprocessableError
    from training.data import visu

    root = tmp_path / "root"
    shutil.copytree(world.data, root / "data")
    check_retrain_evaluation(root / "data", [root])
    outside = tmp_path / "outside.png"
    image = visu.load_split(root / "data", "test").records[0].safe_image
    shutil.copy(image, outside)
    image.unlink()
    image.symlink_to(outside)
    with pytest.raises(UnprocessableError, match="1 record.* outside the data roots, which the job's evaluation would read"):
        check_retrain_evaluation(root / "data", [root])
    (root / "data" / "ViSU-Text_test.json").unlink()
    with pytest.raises(UnprocessableError, match="evaluation could not run.*Give `data` whose test split"):
        check_retrain_evaluation(root / "data", [root])


def _long_job(jobs: JobManager, tmp_path: Path) -> dict:
    # a real command that runs for minutes: generating 200k synthetic quadruplets
    return jobs.submit("reindex", {}, [["data", "synth", "--out", str(tmp_path / "big"), "--n", "200000"]], {})


def _wait_running(jobs: JobManager, job_id: str) -> JobRecord:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = jobs._jobs[job_id]
        if record.pid is not None:
            return record
        time.sleep(0.05)
    raise AssertionError("the job never started its process")


def test_one_job_at_a_time_and_cancel_ends_the_process_group(tmp_path):
    calls: list = []
    jobs = manager(tmp_path, calls)
    job = _long_job(jobs, tmp_path)
    record = _wait_running(jobs, job["id"])
    pid, started = record.pid, record.pid_started
    with pytest.raises(ConflictError) as busy:
        jobs.submit("reindex", {}, [["--help"]], {}, before_start=lambda job_id: pytest.fail("called while busy"))
    assert busy.value.job_id == job["id"]
    with pytest.raises(ConflictError):
        jobs.check_idle()

    def unaudited(*_) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):  # its audit record could not be written: the cancel does not happen
        jobs.cancel(job["id"], before=unaudited)
    assert jobs.get(job["id"])["status"] == "running" and _alive(pid, started)
    done = jobs.cancel(job["id"])
    assert done["status"] == "cancelled" and calls == []
    assert done["progress"] < 1.0  # a killed step did not finish
    assert not _alive(pid, started)
    with pytest.raises(OSError):  # nor does a job whose record could not be written
        jobs.submit("reindex", {}, [["--help"]], {}, before_start=unaudited)
    assert [j["id"] for j in jobs.list()] == [job["id"]] and [p.name for p in jobs.dir.iterdir()] == [job["id"]]
    seen: list[str] = []
    started_job = jobs.submit("reindex", {}, [["--help"]], {}, before_start=seen.append)
    assert seen == [started_job["id"]] and started_job["status"] in ("queued", "running", "succeeded")


def test_job_processes_get_no_tokens(tmp_path, monkeypatch):
    """The environment a real step sees (/proc/PID/environ of the running process) holds no token."""
    from service.settings import Settings

    monkeypatch.setenv("SAFE_RETRIEVAL_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("SAFE_RETRIEVAL_MODERATOR_TOKEN", MODERATOR)
    monkeypatch.setenv("SAFE_RETRIEVAL_QDRANT_API_KEY", "qdrant-key")
    settings = Settings(state_dir=tmp_path / "state")
    assert settings.token("admin") == ADMIN  # the service itself has them
    jobs = JobManager(tmp_path / "state", on_success=lambda job: {}, cancel_grace_s=2, env=job_environment(settings))
    job = _long_job(jobs, tmp_path)
    record = _wait_running(jobs, job["id"])
    try:
        environ = Path(f"/proc/{record.pid}/environ").read_bytes().split(b"\0")
    finally:
        jobs.cancel(job["id"])
    assert environ and b"PATH=" in b"\0".join(environ)
    assert not any(ADMIN.encode() in v or MODERATOR.encode() in v for v in environ)
    assert not any(v.startswith((b"SAFE_RETRIEVAL_ADMIN", b"SAFE_RETRIEVAL_MODERATOR")) for v in environ)
    assert b"SAFE_RETRIEVAL_QDRANT_API_KEY=qdrant-key" in environ  # what index build needs on a server


def test_a_cancel_after_the_commit_point_is_too_late(tmp_path):
    """Once every step succeeded and the job is committed, a cancel changes nothing: the job succeeds."""
    accepting, release = threading.Event(), threading.Event()
    discarded: list = []

    def on_success(job: JobRecord) -> dict:
        accepting.set()
        assert release.wait(30)
        return {"swapped": True}

    jobs = JobManager(tmp_path / "state", on_success=on_success, on_discard=lambda job: discarded.append(job) or True,
                      cancel_grace_s=2)
    job = jobs.submit("reindex", {}, [["data", "synth", "--out", str(tmp_path / "d"), "--n", "3"]], {})
    assert accepting.wait(60)
    assert jobs._jobs[job["id"]].committed
    cancel = threading.Thread(target=jobs.cancel, args=(job["id"],))
    cancel.start()
    time.sleep(0.3)
    release.set()
    cancel.join(30)
    done = jobs.get(job["id"])
    assert done["status"] == "succeeded" and done["result"] == {"swapped": True} and discarded == []


def test_a_job_running_when_the_service_stopped_is_ended_and_failed_on_restart(tmp_path):
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        jobs = manager(tmp_path)
        record = JobRecord(id="20250101-000000-abcdef", kind="retrain", status="running", pid=proc.pid,
                           pid_started=_proc_start(proc.pid), steps=[["train"]])
        jobs._save(record)
        restarted = manager(tmp_path)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        job = restarted.get(record.id)
        assert job["status"] == "failed" and "restarted" in job["error"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------ over HTTP
#: every path field of the admin job requests, as (route, field)
PATH_FIELDS = [(route, f"source.{name}") for route in ("reindex", "retrain")
               for name in ("images", "manifest", "visu", "texts", "media_root")] + [("retrain", "data"), ("forget", "data")]


def job_body(route: str, field: str, value: str) -> dict:
    """A request that is valid but for ``value`` in ``field`` (the other paths exist under the world's root)."""
    name = field.split(".")[-1]
    if name == "visu":
        source = {"visu": value, "split": "test"}
    elif name in ("images", "manifest"):
        source = {name: value}
    else:
        source = {"visu": "data", "split": "test", name: value}
    if route == "reindex":
        return {"source": source}
    if route == "forget":
        return {"concepts": ["knife"], "data": value, "reindex": False}
    return {"data": value, "reindex": False} if field == "data" else {"data": "data", "source": source}


@pytest.fixture(scope="module")
def odd_server(world, tmp_path_factory):
    """A server whose second data root holds a symlink loop."""
    odd = tmp_path_factory.mktemp("odd-root")
    (odd / "loop").symlink_to(odd / "loop")
    tmp = tmp_path_factory.mktemp("odd-server")
    settings = settings_for(world, tmp, data_roots=[world.root, odd], index_root=copy_index(world, tmp / "idx"))
    with live(settings) as s:
        yield s, odd


@pytest.mark.parametrize("kind", ["too-long", "loop"])
@pytest.mark.parametrize("route,field", PATH_FIELDS)
def test_job_paths_the_os_refuses_are_400_with_a_message(odd_server, route, field, kind):
    server, odd = odd_server
    values = {"too-long": ["x" * 300, str(odd / ("x" * 300) / "y")], "loop": ["loop", str(odd / "loop" / "x")]}[kind]
    with server.client(ADMIN) as c:
        for value in values:
            r = c.post(f"/v1/admin/{route}", json=job_body(route, field, value))
            assert r.status_code == 400, (value[:40], r.text)
            detail = r.json()["detail"]
            assert detail.startswith(field.split(".")[-1] if field == "data" else field) and "cannot be used" in detail
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}


def test_a_reindex_reads_no_file_outside_the_data_roots(world, tmp_path):
    """A manifest inside a data root naming files outside it (absolute, ../, a symlink): failures, never payloads."""
    leaky = leaky_root(tmp_path / "leaky")
    index_root = copy_index(world, tmp_path / "idx")
    settings = settings_for(world, tmp_path, data_roots=[world.root, leaky.root], index_root=index_root)
    source = {"manifest": str(leaky.manifest), "captions": True, "media_root": str(leaky.root)}
    with live(settings) as s, s.client(ADMIN) as admin:
        job = admin.post("/v1/admin/reindex", json={"source": source, "name": "leaky"}).json()
        done = s.services.jobs.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    gens = LocalGenerations("leaky", index_root)
    gen = gens.generations()[-1]
    failures = [json.loads(line) for line in gens.failures_path(gen).read_text().splitlines()]
    assert len(failures) == 7 and sum("outside the data roots" in f["error"] for f in failures) == 6
    assert any(f["item"] == f"{leaky.manifest}:5" and "not an object" in f["error"] for f in failures)
    with gens.open_store(gen, schema_of(gens.read_meta(gen))) as store:
        payloads = [p.payload for p in store.retrieve(list(store.iter_ids()))]
    assert len(payloads) == 2 and not leaked(payloads, leaky)
    assert {p["uri"] or p["image_uri"] for p in payloads} == {"imgs/img001.png"}

def test_admin_routes_need_the_admin_token(server):
    with server.client() as c:
        assert c.get("/v1/admin/jobs").status_code == 401
    with server.client("wrong") as c:
        assert c.get("/v1/admin/jobs").status_code == 401
    with server.client(MODERATOR) as c:
        assert c.get("/v1/admin/jobs").status_code == 401
    with server.client(ADMIN) as c:
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}
        assert c.get("/v1/admin/jobs/nope").status_code == 404
        assert c.post("/v1/admin/reload").json()["changed"] is False


def test_admin_is_forbidden_without_a_configured_token(world, tmp_path):
    settings = settings_for(world, tmp_path, admin_token=None, index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client("anything") as c:
        r = c.post("/v1/admin/reindex", json={"source": {"visu": "data", "split": "test"}})
        assert r.status_code == 403 and "SAFE_RETRIEVAL_ADMIN_TOKEN" in r.json()["detail"]


def test_job_paths_outside_the_data_roots_are_refused(server, world):
    with server.client(ADMIN) as c:
        for source in ({"images": "../../etc"}, {"images": "/etc"}, {"visu": "data/../..", "split": "test"}):
            r = c.post("/v1/admin/reindex", json={"source": source})
            assert r.status_code == 400, r.text
        r = c.post("/v1/admin/retrain", json={"data": "/tmp", "reindex": False})
        assert r.status_code == 400
        for bad in (-1, 100.5, "some"):
            r = c.post("/v1/admin/retrain", json={"data": "data", "reindex": False, "max_recall_drop": bad})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_recall_drop"], r.text
        r = c.post("/v1/admin/reindex", json={"source": {"images": "x", "visu": "y", "split": "test"}})
        assert r.status_code == 422
        assert c.get("/v1/admin/jobs").json() == {"jobs": []}


@pytest.mark.slow
def test_retrain_and_reindex_swap_model_and_index_together(world, tmp_path):
    """A cancelled job changes nothing; a successful retrain+reindex swaps both together and no request fails.

    (A failed job's "changes nothing" is shown on the job manager above: on_success is never called.)
    """
    settings = settings_for(world, tmp_path, index_root=copy_index(world, tmp_path / "idx"))
    source = {"visu": "data", "split": "test", "captions": True}
    with live(settings) as s, s.client(ADMIN) as admin, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]

        # 1. a reindex, a second job refused with 409 while it runs, then the first cancelled
        job = admin.post("/v1/admin/reindex", json={"source": source}).json()
        busy = admin.post("/v1/admin/retrain", json={"data": "data", "reindex": False})
        assert busy.status_code == 409 and busy.json()["job_id"] == job["id"]
        cancelled = admin.post(f"/v1/admin/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert c.post("/v1/search", json={"text": "a cat"}).json()["index"] == before

        # 3. retrain + reindex, with searches running all the while
        seen: list[tuple[int, str | None, str | None]] = []
        stop = threading.Event()

        def hammer() -> None:
            with s.client() as h:
                while not stop.is_set():
                    r = h.post("/v1/search", json={"text": "a photo of a dog", "k": 3})
                    ref = r.json().get("index", {}) if r.status_code == 200 else {}
                    seen.append((r.status_code, ref.get("generation"), ref.get("model")))

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            job = admin.post("/v1/admin/retrain", json={"data": "data", "epochs": 1, "batch_size": 16, "max_steps": 1,
                                                       "source": source, "max_recall_drop": 100}).json()
            done = s.services.jobs.wait(job["id"], timeout=240)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert done["status"] == "succeeded", done
        after = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        assert after["model"] != before["model"] and after["generation"] != before["generation"]
        assert done["result"]["swapped"] is True and done["result"]["index"] == after
        retrieval = done["result"]["retrieval"]  # the real evaluation's T->V R@1, before and after, in %
        assert all(isinstance(retrieval[k], float) and 0 <= retrieval[k] <= 100 for k in ("before", "after")), retrieval
        assert retrieval["acceptance"]["passed"] is True and retrieval["acceptance"]["thresholds"] == {"max_recall_drop": 100}
        log = (s.settings.state_dir / "jobs" / done["id"] / "log.txt").read_text()
        assert log.index("$ safe-retrieval eval") < log.index("$ safe-retrieval index build")  # judged before the reindex
        assert all(code == 200 for code, _, _ in seen), {code for code, _, _ in seen}
        pairs = {(gen, model) for _, gen, model in seen}
        assert pairs <= {(before["generation"], before["model"]), (after["generation"], after["model"])}
        assert (after["generation"], after["model"]) in pairs
        assert admin.get("/v1/admin/jobs").json()["jobs"][0]["id"] == job["id"]
        assert 'safe_retrieval_jobs{state="succeeded"} 1.0' in c.get("/metrics").text

    # 4. a restart keeps the job history and serves the swapped-in pair
    with live(settings) as s, s.client(ADMIN) as admin:
        statuses = {j["id"]: j["status"] for j in admin.get("/v1/admin/jobs").json()["jobs"]}
        assert statuses == {cancelled["id"]: "cancelled", job["id"]: "succeeded"}
        assert admin.get("/readyz").json()["index"] == after


# ------------------------------------------------------------------ cancel vs commit, on the real service
def _cancel_once_staged(s, admin, job_id: str, before_gen: str, timeout: float = 300) -> tuple[str, dict]:
    """Cancel the job the moment its new generation's record says ``complete`` (the instant at which an
    index step used to switch the pointer); returns that generation and the cancelled job."""
    folder = s.settings.index_root / INDEX
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for gen in (p.name for p in folder.iterdir() if "@" in p.name and p.name != before_gen):
            try:
                state = json.loads((folder / gen / "meta.json").read_text()).get("state")
            except (OSError, ValueError):
                continue
            if state == "complete":
                return gen, admin.post(f"/v1/admin/jobs/{job_id}/cancel").json()
        if admin.get(f"/v1/admin/jobs/{job_id}").json()["status"] not in ("queued", "running"):
            pytest.fail(f"the job ended before its generation was seen: {admin.get(f'/v1/admin/jobs/{job_id}').json()}")
        time.sleep(0.002)
    pytest.fail("the job's generation never completed")


def _serves_the_old_pair(s, c, before: dict) -> None:
    assert (s.settings.index_root / INDEX / "CURRENT").read_text().strip() == before["generation"]
    assert c.post("/v1/search", json={"text": "a cat"}).json()["index"] == before
    pair = s.services.state.current
    assert (pair.info["generation"], pair.artifact.fingerprint) == (before["generation"], before["model"])


def test_a_reindex_cancelled_as_its_generation_completes_changes_nothing_served(world, tmp_path):
    """Regression: the cancel used to land after ``index build`` had switched the pointer, which stayed switched."""
    settings = settings_for(world, tmp_path, index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client(ADMIN) as admin, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        job = admin.post("/v1/admin/reindex", json={"source": {"visu": "data", "split": "test", "captions": True}}).json()
        staged, done = _cancel_once_staged(s, admin, job["id"], before["generation"])
        assert done["status"] == "cancelled", done
        assert done["progress"] < 1.0
        _serves_the_old_pair(s, c, before)
        assert not (settings.index_root / INDEX / staged).exists()  # the staged generation was discarded
        assert admin.post("/v1/admin/reload").json() == {"changed": False, "index": before}
        _serves_the_old_pair(s, c, before)
    with live(settings) as s, s.client() as c:  # and after a restart
        assert c.get("/readyz").json()["index"] == before
        _serves_the_old_pair(s, c, before)


@pytest.mark.slow
def test_a_retrain_cancelled_as_its_generation_completes_keeps_serving_the_old_pair(world, tmp_path):
    """Regression: the pointer moved to the new model's generation while the new model was deleted (503 after a restart)."""
    settings = settings_for(world, tmp_path, index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client(ADMIN) as admin, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        job = admin.post("/v1/admin/retrain", json={"data": "data", "epochs": 1, "batch_size": 16, "max_steps": 1,
                                                    "source": {"visu": "data", "split": "test"},
                                                    "max_recall_drop": 100}).json()
        staged, done = _cancel_once_staged(s, admin, job["id"], before["generation"])
        assert done["status"] == "cancelled", done
        assert list((settings.state_dir / "models").iterdir()) == []  # the new model (and its run) deleted
        assert not (settings.index_root / INDEX / staged).exists()
        _serves_the_old_pair(s, c, before)
    with live(settings) as s, s.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["index"] == before
        _serves_the_old_pair(s, c, before)


def test_a_staged_generation_that_fails_acceptance_never_moves_the_pointer(world, tmp_path):
    """Acceptance opens the staged generation and checks its model before switching; a mismatch switches nothing."""
    import torch

    from indexer import builder, sources
    from indexer.errors import ModelMismatchError
    from training import architectures, artifact
    from training.encoder import SafetyEncoder

    torch.manual_seed(1)
    other = artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), "lorentz"),
                              provenance=artifact.provenance("test: another model"))
    artifact.save(other, tmp_path / "other")
    settings = settings_for(world, tmp_path, index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client() as c:
        before = c.post("/v1/search", json={"text": "a cat"}).json()["index"]
        gens = s.services.generations()
        assert gens.pinned() == {before["generation"]}  # the service pins what it serves
        items = sources.collect(visu=world.data, split="test")[:4]
        staged = builder.build(gens, other, items, media_root=world.data, workers=0, progress=False, switch=False)
        record = JobRecord(id="20250101-000000-000-abcdef", kind="reindex", plan={"swap": True, "model": str(world.model),
                           "index": INDEX}, staged={"generation": staged.generation, "state": "complete"})
        with pytest.raises(ModelMismatchError):
            s.services.job_succeeded(record)
        _serves_the_old_pair(s, c, before)
        assert s.services.job_discarded(record) is True and staged.generation not in gens.generations()
        record.staged["generation"] = before["generation"]
        assert s.services.job_discarded(record) is False  # the served generation is never deleted
        assert before["generation"] in gens.generations()


def test_a_job_interrupted_by_a_stop_is_discarded_unless_its_commit_switched(tmp_path):
    """At start-up an interrupted job's staged generation and model go, unless the pointer already moved to them."""
    asked: list[str] = []

    def on_discard(job: JobRecord) -> bool:
        asked.append(job.id)
        if job.staged["generation"] == "gallery@20250101T000000000000Z":  # "the current generation"
            return False
        return delete_new_model(job)

    models = tmp_path / "state" / "models"
    saver = manager(tmp_path)  # as the stopped service left them
    for name, gen in (("20250101-000000-000-aaaaaa", "gallery@20250101T000000000000Z"),
                      ("20250101-000000-000-bbbbbb", "gallery@20250102T000000000000Z")):
        (models / name).mkdir(parents=True)
        saver._save(JobRecord(id=name, kind="retrain", status="running", plan={"new_model": str(models / name)},
                               staged={"generation": gen, "state": "complete"}))
    jobs = JobManager(tmp_path / "state", on_success=lambda job: {}, on_discard=on_discard)
    committed, interrupted = jobs.get("20250101-000000-000-aaaaaa"), jobs.get("20250101-000000-000-bbbbbb")
    assert sorted(asked) == ["20250101-000000-000-aaaaaa", "20250101-000000-000-bbbbbb"]
    assert committed["status"] == "succeeded" and (models / "20250101-000000-000-aaaaaa").is_dir()
    assert interrupted["status"] == "failed" and "restarted" in interrupted["error"]
    assert not (models / "20250101-000000-000-bbbbbb").exists()


def test_admin_routes_check_the_token_before_the_body(server):
    bad_bodies = [
        (b"{not json", "application/json"),
        (b'{"source": {"images": 7}, "surprise": true}', "application/json"),
        (b'{"data": "x", "epochs": 1.5}', "application/json"),
        (b"[" + b"1," * 2_000_000 + b"1]", "application/json"),  # 4 MB, under the 10 MB body limit
        (b"a=b", "application/x-www-form-urlencoded"),
    ]
    for token in (None, "wrong", MODERATOR):
        with server.client(token) as c:
            for route in ("/v1/admin/reindex", "/v1/admin/retrain", "/v1/admin/forget", "/v1/admin/jobs/x/cancel",
                          "/v1/admin/reload"):
                for body, kind in bad_bodies:
                    r = c.post(route, content=body, headers={"content-type": kind})
                    assert r.status_code == 401, (token, route, body[:20], r.text)
                    assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"] == "UnauthorizedError"
            assert c.get("/v1/admin/audit", params={"limit": "lots"}).status_code == 401
            assert c.get("/v1/admin/nothing-here").status_code == 401  # no route is revealed without the token
    with server.client(ADMIN) as c:  # with the token, the body is judged
        assert c.post("/v1/admin/reindex", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/admin/retrain", json={"data": "x", "epochs": 1.5}).status_code == 422
        assert c.post("/v1/admin/forget", json={"concepts": ["knife"], "epochs": 1.5}).status_code == 422
        assert c.get("/v1/admin/nothing-here").status_code == 404
