"""Admin jobs: real CLI subprocesses, one at a time, cancellable, persisted; swaps of model + index together."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from service.errors import ConflictError, ForbiddenError
from service.jobs import JobManager, JobRecord, _alive, _proc_start, _tail, resolve_under_roots
from tests.service.conftest import ADMIN, MODERATOR, copy_index, live, settings_for
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


def test_progress_and_log_tail_from_a_progress_bar(tmp_path):
    log = tmp_path / "log.txt"
    log.write_bytes(b"start\nepoch 1:  10%|#  | 1/10\repoch 1:  40%|####  | 4/10\rdone?\n")
    tail, pct = _tail(log)
    assert pct == pytest.approx(0.4)
    assert tail[-1] == "done?" and tail[0] == "start"


# ------------------------------------------------------------------ the manager with real CLI commands
def manager(tmp_path, calls: list | None = None) -> JobManager:
    def on_success(job: JobRecord) -> dict:
        if calls is not None:
            calls.append(job.id)
        return {"ok": True}

    return JobManager(tmp_path / "state", on_success=on_success, cancel_grace_s=2)


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
        jobs.submit("reindex", {}, [["--help"]], {})
    assert busy.value.job_id == job["id"]
    done = jobs.cancel(job["id"])
    assert done["status"] == "cancelled" and calls == []
    assert not _alive(pid, started)
    assert jobs.submit("reindex", {}, [["--help"]], {})["status"] in ("queued", "running", "succeeded")


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
                                                       "source": source}).json()
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
            for route in ("/v1/admin/reindex", "/v1/admin/retrain", "/v1/admin/jobs/x/cancel", "/v1/admin/reload"):
                for body, kind in bad_bodies:
                    r = c.post(route, content=body, headers={"content-type": kind})
                    assert r.status_code == 401, (token, route, body[:20], r.text)
                    assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"] == "UnauthorizedError"
            assert c.get("/v1/admin/audit", params={"limit": "lots"}).status_code == 401
            assert c.get("/v1/admin/nothing-here").status_code == 401  # no route is revealed without the token
    with server.client(ADMIN) as c:  # with the token, the body is judged
        assert c.post("/v1/admin/reindex", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/admin/retrain", json={"data": "x", "epochs": 1.5}).status_code == 422
        assert c.get("/v1/admin/nothing-here").status_code == 404
