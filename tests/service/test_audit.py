"""The audit trail: one record per privileged request, none for ordinary ones, read back through the admin API."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest

from service.audit import AuditLog
from tests.helpers.service import (
    ADMIN,
    MODERATOR,
    LiveServer,
    copy_index,
    live,
    settings_for,
    unsafe_caption,
)

ALICE = "alice-secret-token"
BOB = "bob-secret-token"


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


# ------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def audited(world, tmp_path_factory) -> Iterator[LiveServer]:
    """A server with the single moderator token and two named ones, and an audit log rotated every few records."""
    tmp = tmp_path_factory.mktemp("audited")
    settings = settings_for(world, tmp, index_root=copy_index(world, tmp / "idx"),
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
            assert client.get(f"/v1/items/{flagged}").status_code == 401
            assert client.get(f"/v1/media/{flagged}").status_code == 401
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
    with live(settings) as s, s.client(MODERATOR) as m, s.client() as c:
        r = m.post("/v1/search", json={"text": "a cat", "safety": "off"})
        assert r.status_code == 503 and "audit log" in r.json()["detail"] and "results" not in r.text
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 200  # ordinary requests go on
