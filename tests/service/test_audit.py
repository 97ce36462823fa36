"""The audit trail: one record per privileged request, none for ordinary ones, read back through the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from service.app import uvicorn_options
from service.audit import AuditLog
from service.settings import Settings
from tests.helpers.service import (
    ADMIN,
    MODERATOR,
    LiveServer,
    copy_index,
    free_port,
    live,
    settings_for,
    small_tmpfs,
    unsafe_caption,
)

ALICE = "alice-secret-token"
BOB = "bob-secret-token"
BODY_LIMIT = 64 * 1024  # the audited server's; query images are a few KB


# ------------------------------------------------------------------ the file
def test_rotation_keeps_every_record_readable_in_order_until_the_oldest_file_goes(tmp_path):
    log = AuditLog(tmp_path / "audit", max_bytes=1024, keep=3)
    for i in range(20):
        log.write({"time": f"2026-01-01T00:00:{i:02d}.000000+00:00", "token": "alice" if i % 2 else "bob", "n": i,
                   "pad": "x" * 200})
    files = log.files()
    assert [p.name for p in files] == ["audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    assert all(p.stat().st_size <= 1024 for p in files)
    records, truncated = log.read(limit=100)
    # records of ~280 bytes: 3 per file; the newest 4 files hold the newest 10 to 12, the older ones are gone
    kept = [r["n"] for r in records]
    assert kept == list(range(20 - len(kept), 20)) and 10 <= len(kept) <= 12 and truncated is False
    newest, truncated = log.read(limit=2)
    assert [r["n"] for r in newest] == [18, 19] and truncated is True
    alice, _ = log.read(token="alice", since=datetime(2026, 1, 1, 0, 0, 13), until=datetime(2026, 1, 1, 0, 0, 17))
    assert [r["n"] for r in alice] == [13, 15]
    log.close()
    again = AuditLog(tmp_path / "audit", max_bytes=1024, keep=3)  # a restarted service appends to the same log
    again.write({"time": "2026-01-01T00:01:00.000000+00:00", "token": "bob", "n": 20})
    assert again.read(limit=1)[0][0]["n"] == 20


def test_concurrent_writes_are_whole_lines(tmp_path):
    log = AuditLog(tmp_path / "audit", max_bytes=64 * 1024, keep=50)

    def writer(name: str) -> None:
        for i in range(150):
            log.write({"time": "2026-01-01T00:00:00.000000+00:00", "token": name, "n": i, "pad": "y" * 300})

    threads = [threading.Thread(target=writer, args=(f"m{k}",)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [line for p in log.files() for line in p.read_text().splitlines()]
    records = [json.loads(line) for line in lines]  # every line parses: no interleaved writes
    assert len(records) == 900
    for k in range(6):
        assert sorted(r["n"] for r in records if r["token"] == f"m{k}") == list(range(150))


def test_a_line_cut_short_by_a_crash_is_dropped_before_the_next_record(tmp_path):
    directory = tmp_path / "audit"
    directory.mkdir()
    whole = b'{"time":"2026-01-01T00:00:00.000000+00:00","token":"a","n":0}\n'
    (directory / "audit.jsonl").write_bytes(whole + b'{"time":"2026-01-01T00:00:01.0000')  # never acknowledged
    log = AuditLog(directory, max_bytes=1 << 20, keep=2)
    log.write({"time": "2026-01-01T00:00:02.000000+00:00", "token": "a", "n": 1})
    log.close()
    text = (directory / "audit.jsonl").read_bytes()
    assert text.startswith(whole) and text.endswith(b"\n")
    assert [json.loads(line)["n"] for line in text.splitlines()] == [0, 1]


# ------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def audited(world, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with the single moderator token and two named ones, and an audit log rotated every few records."""
    tmp = tmp_path_factory.mktemp("audited")
    settings = settings_for(world, tmp, index_root=copy_index(world, tmp / "idx"), max_body_bytes=BODY_LIMIT,
                            moderator_tokens={"alice": ALICE, "bob": BOB}, audit_max_bytes=2048, audit_keep=1000)
    with live(settings) as s:
        yield s


def records(server: LiveServer, **params) -> list[dict]:
    with server.client(ADMIN) as admin:
        r = admin.get("/v1/admin/audit", params={"limit": 10_000, **params})
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is False
    return r.json()["records"]


def one_new_record(server: LiveServer, before: int) -> dict:
    after = records(server)
    assert len(after) == before + 1, after[before:]
    return after[-1]


def test_every_moderator_request_leaves_exactly_one_record_naming_the_unsafe_items(audited, world):
    text = unsafe_caption(world, audited)
    seen_unsafe = 0
    with audited.client(ALICE) as alice:
        for target in ("image", "text", "any"):
            for safety in ("off", "traverse", "strict"):
                before = len(records(audited))
                r = alice.post("/v1/search", json={"text": text, "target": target, "safety": safety, "k": 24})
                assert r.status_code == 200, r.text
                unsafe = [h["id"] for h in r.json()["results"] if h["unsafe"] is True]
                seen_unsafe += len(unsafe)
                record = one_new_record(audited, before)
                assert record["token"] == "alice" and record["unsafe_ids"] == unsafe
                assert (record["route"], record["method"], record["status"]) == ("/v1/search", "POST", 200)
                assert record["safety"] == safety and record["query"] == {"text": text}
                assert record["client"] == "127.0.0.1"
                assert ALICE not in json.dumps(record)
        assert seen_unsafe > 0  # the check above means something only if unsafe items did come back
        flagged = next(h for h in alice.post("/v1/search", json={"text": text, "safety": "off", "k": 24}).json()["results"]
                       if h["unsafe"] is True and h["kind"] == "image")
        for route, path in (("/v1/items/{item_id}", f"/v1/items/{flagged['id']}"),
                            ("/v1/media/{item_id}", f"/v1/media/{flagged['id']}")):
            before = len(records(audited))
            assert alice.get(path).status_code == 200
            record = one_new_record(audited, before)
            assert (record["route"], record["unsafe_ids"], record["query"]) == (route, [flagged["id"]],
                                                                                {"item_id": flagged["id"]})
        image = (world.data / flagged["uri"]).read_bytes()
        before = len(records(audited))
        r = alice.post("/v1/search/upload", files={"image": ("q.jpg", image, "image/jpeg")}, data={"safety": "off"})
        record = one_new_record(audited, before)
        assert record["query"] == {"image_sha256": hashlib.sha256(image).hexdigest()}
        assert record["unsafe_ids"] == [h["id"] for h in r.json()["results"] if h["unsafe"] is True]
        before = len(records(audited))
        assert alice.post("/v1/embed", json={"text": text}).status_code == 200
        record = one_new_record(audited, before)
        assert (record["route"], record["query"], record["unsafe_ids"]) == ("/v1/embed", {"text": text}, [])
        before = len(records(audited))  # a failed privileged request is still one record, with its status
        assert alice.get("/v1/items/00000000-0000-0000-0000-000000000001").status_code == 404
        assert one_new_record(audited, before)["status"] == 404
    assert len(audited.app.state.audit.files()) > 3  # and all of it was read back across rotated files


def test_ordinary_and_wrong_token_requests_leave_no_record(audited, world):
    text = unsafe_caption(world, audited)
    with audited.client(ALICE) as alice:
        hits = alice.post("/v1/search", json={"text": text, "safety": "off", "k": 24}).json()["results"]
    flagged = next(h["id"] for h in hits if h["unsafe"] is True and h["kind"] == "image")
    before = len(records(audited))
    with audited.client() as c, audited.client("wrong-token") as wrong, audited.client(ADMIN) as admin:
        for client in (c, wrong, admin):
            assert client.post("/v1/search", json={"text": text, "k": 24}).status_code == 200
            assert client.post("/v1/embed", json={"text": text}).status_code == 200
        assert c.post("/v1/search", json={"text": text, "safety": "off"}).status_code == 401
        wrong_off = wrong.post("/v1/search", json={"text": text, "safety": "off"})
        assert wrong_off.status_code == 401 and "alice" not in wrong_off.text and "bob" not in wrong_off.text
        for client in (c, wrong, admin):
            assert client.get(f"/v1/items/{flagged}").status_code in (401, 404)  # hidden from them, either way
            assert client.get(f"/v1/media/{flagged}").status_code in (401, 404)
        assert admin.get("/v1/admin/jobs").status_code == 200  # reading job records is not a privileged request
    assert len(records(audited)) == before


def test_two_named_moderators_and_the_single_token_are_told_apart(audited):
    start = datetime.now(timezone.utc)
    for token in (ALICE, BOB, BOB, MODERATOR):
        with audited.client(token) as m:
            assert m.post("/v1/search", json={"text": "a cat", "safety": "off"}).status_code == 200
    mine = records(audited, since=start.isoformat())
    assert [r["token"] for r in mine] == ["alice", "bob", "bob", "moderator"]
    assert [r["token"] for r in records(audited, since=start.isoformat(), token="bob")] == ["bob", "bob"]
    later = datetime.fromisoformat(mine[-1]["time"]) + timedelta(microseconds=1)
    assert records(audited, since=later.isoformat()) == []
    with audited.client(ADMIN) as admin:
        page = admin.get("/v1/admin/audit", params={"since": start.isoformat(), "limit": 2}).json()
        assert [r["token"] for r in page["records"]] == ["bob", "moderator"] and page["truncated"] is True
        assert admin.get("/v1/admin/audit", params={"token": "no such/name"}).status_code == 422
    with audited.client(ALICE) as alice:
        assert alice.get("/v1/admin/audit").status_code == 401  # moderators cannot read the audit log


def test_admin_job_submissions_and_cancels_are_audited(audited, world):
    start = datetime.now(timezone.utc).isoformat()
    with audited.client(ADMIN) as admin:
        refused = admin.post("/v1/admin/reindex", json={"source": {"images": "/etc"}})
        assert refused.status_code == 400
        job = admin.post("/v1/admin/reindex", json={"name": "scratch", "source": {"images": "data/coco"}})
        assert job.status_code == 202, job.text
        cancelled = admin.post(f"/v1/admin/jobs/{job.json()['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelled", "failed", "succeeded")
        assert admin.post("/v1/admin/reload").status_code == 200  # not a job submission: no record
    mine = records(audited, since=start)
    assert [(r["token"], r["route"], r["status"]) for r in mine] == [
        ("admin", "/v1/admin/reindex", 400), ("admin", "/v1/admin/reindex", 202),
        ("admin", "/v1/admin/jobs/{job_id}/cancel", 200)]
    assert mine[0]["query"] == {"source": {"images": "/etc", "captions": False}, "incremental": False}
    assert mine[1]["job"] == mine[2]["job"] == job.json()["id"]
    assert ADMIN not in json.dumps(mine)


def _refused_before_the_route(client: httpx.Client, item: str) -> list[tuple[str, str, int]]:
    """Requests that fail before any route code runs: (method, route template, status) of each, as sent."""
    def chunks() -> Iterator[bytes]:
        for _ in range(BODY_LIMIT // 8192 + 2):
            yield b" " * 8192

    sent = []
    for method, path, route, kwargs in (
        ("POST", "/v1/search", "/v1/search", {"content": b'{"text": ', "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/search", "/v1/search", {"json": {"text": "a cat", "k": "many"}}),
        ("POST", "/v1/embed", "/v1/embed", {"json": {}}),
        ("POST", "/v1/search", "/v1/search", {"content": b"x" * (BODY_LIMIT + 1)}),  # 413 from Content-Length
        ("POST", "/v1/search", "/v1/search", {"content": chunks()}),  # 413 while streaming
        ("POST", "/v1/search/upload", "/v1/search/upload",
         {"content": b"--b\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}}),  # no boundary: 400
        ("POST", "/v1/search/upload", "/v1/search/upload", {"data": {"safety": "off"}}),  # no image
        ("GET", f"/v1/items/{item}", "/v1/items/{item_id}", {"params": {"with_vector": "perhaps"}}),
        ("GET", "/v1/search", "/v1/search", {}),  # 405
    ):
        r = client.request(method, path, **kwargs)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        sent.append((method, route, r.status_code))
    return sent


def test_requests_refused_before_their_route_leave_one_record_for_moderators_and_none_for_others(audited, world):
    text = unsafe_caption(world, audited)
    with audited.client(ALICE) as alice:
        item = alice.post("/v1/search", json={"text": text, "k": 1}).json()["results"][0]["id"]
        before = len(records(audited))
        sent = _refused_before_the_route(alice, item)
    statuses = {status for _, _, status in sent}
    assert {400, 405, 413, 422} <= statuses, sent
    mine = records(audited)[before:]
    assert [(r["token"], r["method"], r["route"], r["status"]) for r in mine] == [("alice", *s) for s in sent]
    assert all(r["client"] == "127.0.0.1" and r["unsafe_ids"] == [] for r in mine)
    before = len(records(audited))
    with audited.client() as c, audited.client("wrong-token") as wrong, audited.client(ADMIN) as admin:
        for client in (c, wrong, admin):
            assert [status for *_, status in _refused_before_the_route(client, item)] == [s for *_, s in sent]
    assert len(records(audited)) == before


def test_admin_job_requests_with_a_bad_body_or_job_leave_their_record(audited):
    start = datetime.now(timezone.utc).isoformat()
    with audited.client(ADMIN) as admin:
        assert admin.post("/v1/admin/reindex", content=b"{", headers={"Content-Type": "application/json"}).status_code == 422
        assert admin.post("/v1/admin/forget", json={"concepts": []}).status_code == 422
        assert admin.post("/v1/admin/jobs/no-such-job/cancel").status_code == 404
        assert admin.post("/v1/admin/retrain", content=b"x" * (BODY_LIMIT + 1)).status_code == 413
    with audited.client(ALICE) as alice, audited.client("wrong-token") as wrong:
        for client in (alice, wrong):  # not the admin token: 401 before anything, and no record
            assert client.post("/v1/admin/reindex", content=b"{").status_code == 401
    assert [(r["token"], r["route"], r["status"]) for r in records(audited, since=start)] == [
        ("admin", "/v1/admin/reindex", 422), ("admin", "/v1/admin/forget", 422),
        ("admin", "/v1/admin/jobs/{job_id}/cancel", 404), ("admin", "/v1/admin/retrain", 413)]


@pytest.mark.parametrize("bound", [
    {"since": "0001-01-01T00:00:00+14:00"}, {"until": "9999-12-31T23:59:59-14:00"},  # not representable in UTC
    {"until": "0.5"}, {"since": "1767225600"}, {"since": "2026-01-01"}, {"until": "yesterday"},  # not ISO date-times
])
def test_audit_time_bounds_must_be_iso_date_times_that_utc_can_hold(audited, bound):
    with audited.client(ADMIN) as admin:
        r = admin.get("/v1/admin/audit", params=bound)
    assert r.status_code == 422, r.text
    assert "ISO 8601" in r.text or "out of range" in r.text


@pytest.mark.parametrize("limit", ["5.0", "1e2", " 5", "five"])
def test_the_audit_limit_is_a_strict_integer(audited, limit):
    with audited.client(ADMIN) as admin:
        assert admin.get("/v1/admin/audit", params={"limit": "5"}).status_code == 200
        r = admin.get("/v1/admin/audit", params={"limit": limit})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"], r.text


def test_audit_time_bounds_are_documented_as_date_times(audited):
    with audited.client(ADMIN) as admin:
        assert admin.get("/v1/admin/audit", params={"since": "2026-01-01T00:00:00Z",
                                                   "until": "9999-12-31T23:59:59"}).status_code == 200
        parameters = admin.get("/openapi.json").json()["paths"]["/v1/admin/audit"]["get"]["parameters"]
    for p in parameters:
        if p["name"] in ("since", "until"):
            assert {"type": "string", "format": "date-time"} in p["schema"]["anyOf"], p


def test_records_go_to_the_audit_logger_too(audited, caplog):
    with caplog.at_level("INFO", logger="safe_retrieval.audit"), audited.client(BOB) as bob:
        bob.post("/v1/search", json={"text": "a dog", "safety": "off"})
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "safe_retrieval.audit"]
    assert len(logged) == 1 and logged[0]["token"] == "bob" and logged[0] | {"job": None} == records(audited)[-1]


def test_an_unwritable_audit_log_refuses_privileged_requests(world, tmp_path):
    state = tmp_path / "state"
    (state / "audit").mkdir(parents=True)
    (state / "audit" / "audit.jsonl").mkdir()  # a directory where the file should be: every write fails
    settings = settings_for(world, tmp_path, state_dir=state, index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client(MODERATOR) as m, s.client() as c, s.client(ADMIN) as admin:
        r = m.post("/v1/search", json={"text": "a cat", "safety": "off"})
        assert r.status_code == 503 and "audit log" in r.json()["detail"] and "results" not in r.text
        assert "SAFE_RETRIEVAL_AUDIT_DIR" in r.json()["detail"]
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 200  # ordinary requests go on
        # no record, no job: the submission's record is written before the job exists
        job = admin.post("/v1/admin/reindex", json={"name": "scratch", "source": {"images": "data/coco"}})
        assert job.status_code == 503 and "audit log" in job.json()["detail"], job.text
        assert admin.get("/v1/admin/jobs").json()["jobs"] == []
        assert list((state / "jobs").iterdir()) == []


def fill(directory: Path) -> Path:
    """A file that takes every free byte of the file system of ``directory``."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(4096))
    return filler


def test_a_full_disk_refuses_privileged_requests_only_while_it_is_full_and_leaves_no_half_line(world, tmp_path):
    with small_tmpfs(tmp_path / "audit", "64k") as audit_dir:
        settings = settings_for(world, tmp_path, audit_dir=audit_dir, index_root=copy_index(world, tmp_path / "idx"))
        with live(settings) as s, s.client(MODERATOR) as m, s.client() as c:
            def search() -> httpx.Response:
                return m.post("/v1/search", json={"text": "a cat", "safety": "off"})

            assert search().status_code == 200
            filler = fill(audit_dir)
            served = 1
            r = search()
            while r.status_code == 200 and served < 100:  # records fit in the log's last page until it is full
                served += 1
                r = search()
            for _ in range(3):  # the same answer while it lasts: 503, never 500
                assert r.status_code == 503 and "audit log" in r.json()["detail"] and "results" not in r.text, r.text
                r = search()
            assert c.post("/v1/search", json={"text": "a cat"}).status_code == 200  # ordinary requests go on
            text = (audit_dir / "audit.jsonl").read_bytes()
            assert text.endswith(b"\n"), "a failed write left half a record"
            assert len([json.loads(line) for line in text.splitlines()]) == served
            filler.unlink()
            assert search().status_code == 200  # served again as soon as the record can be written
            assert len(records(s)) == served + 1 and all(r["status"] == 200 for r in records(s))


# ------------------------------------------------------------------ the client address
def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_records_the_peer_not_a_forwarded_address_by_default(tmp_path):
    # no model: the server starts at once (not ready), and a moderator's malformed request is still recorded
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_RETRIEVAL_")}
    env.update(SAFE_RETRIEVAL_STATE_DIR=str(tmp_path / "state"), SAFE_RETRIEVAL_AUDIT_DIR=str(tmp_path / "audit"),
               SAFE_RETRIEVAL_MODERATOR_TOKEN=MODERATOR, FORWARDED_ALLOW_IPS="*")  # uvicorn's own variable: ignored
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; main(sys.argv[1:])", "serve", "--port", str(port)]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline and not _answers(f"http://127.0.0.1:{port}/healthz"):
            time.sleep(0.1)
        assert proc.poll() is None and _answers(f"http://127.0.0.1:{port}/healthz"), (tmp_path / "serve.log").read_text()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed", json={}, timeout=30,
                       headers={"Authorization": f"Bearer {MODERATOR}", "X-Forwarded-For": "6.6.6.6"})
        assert r.status_code == 422
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    written = [json.loads(line) for line in (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(r["route"], r["client"]) for r in written] == [("/v1/embed", "127.0.0.1")]


@pytest.mark.parametrize(("trusted", "seen"), [
    ([], "127.0.0.1"), (["127.0.0.1"], "6.6.6.6"), (["10.0.0.0/8", "::1"], "127.0.0.1"), (["127.0.0.0/8"], "6.6.6.6"),
])
def test_serve_believes_forwarded_addresses_only_from_trusted_proxies(trusted, seen, monkeypatch):
    """What ``serve`` gives uvicorn, run on one request from 127.0.0.1 that says it forwards 6.6.6.6."""
    import uvicorn

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    clients = []

    async def app(scope, receive, send) -> None:
        clients.append(scope["client"][0])

    config = uvicorn.Config(app, **uvicorn_options(Settings(trusted_proxies=trusted)))
    config.load()
    scope = {"type": "http", "client": ("127.0.0.1", 40000), "headers": [(b"x-forwarded-for", b"6.6.6.6")]}
    asyncio.run(config.loaded_app(scope, None, None))
    assert clients == [seen]


def test_trusted_proxies_must_be_addresses_or_networks():
    from pydantic import ValidationError

    assert Settings(trusted_proxies=["10.1.2.3/24", " ::1"]).trusted_proxies == ["10.1.2.0/24", "::1"]
    with pytest.raises(ValidationError, match="not an IP address or network"):
        Settings(trusted_proxies=["proxy"])
