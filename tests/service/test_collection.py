"""A live collection: items added and taken down through the API, on the real app, uvicorn and Qdrant Edge store.

Every test writes into its own copy of the index and its own state directory (journal, uploads, audit log).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from PIL import Image

from indexer.journal import ADD, Journal, read_entries
from indexer.store import content_id
from service.collection import journal_path
from service.settings import Settings
from tests.helpers.service import (
    ADMIN,
    MODERATOR,
    fresh_png,
    live,
    make_settings,
    png_with_size,
    private_media,
    small_tmpfs,
)

#: the tokens file's second moderator, so records can tell moderators apart
CAROL = "carol-secret-token"


@pytest.fixture
def media(world, tmp_path) -> Path:
    return private_media(world, tmp_path)


@pytest.fixture
def settings(world, tmp_path, media):
    return make_settings(world, tmp_path, media)


def upload(client, data: bytes, caption: str | None = "a fresh photo", tags=("fresh",)):
    form = {"caption": caption} if caption is not None else {}
    return client.post("/v1/items/upload", files={"image": ("x.png", data, "image/png")},
                       data={**form, "tags": list(tags)})


def nearest(client, item_id: str) -> list[str]:
    """Ids a moderator's unfiltered "more like this" search returns for ``item_id`` (the item itself first)."""
    r = client.post("/v1/search", json={"item_id": item_id, "safety": "off", "k": 5, "target": "any"})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def gallery_ids(server, n: int) -> list[str]:
    return list(server.services.state.current.index.store.iter_ids())[:n]


# ------------------------------------------------------------------ adds
def test_an_uploaded_image_is_searchable_and_served_at_once(settings):
    data = fresh_png(1)
    with live(settings) as s, s.client(ADMIN) as admin, s.client(MODERATOR) as mod:
        before = s.services.state.current.index.store.count()
        r = upload(admin, data, tags=("fresh", "api"))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["id"] == content_id(data) and body["created"] and body["kind"] == "image"
        assert body["caption"] == "a fresh photo" and body["tags"] == ["fresh", "api"]
        assert body["uri"].startswith("uploads/") and isinstance(body["unsafe"], bool)  # the served rule flagged it
        assert s.services.state.current.index.store.count() == before + 1
        assert nearest(mod, body["id"])[0] == body["id"]
        item = mod.get(f"/v1/items/{body['id']}").json()
        assert item["payload"]["source"] == "api" and item["payload"]["model"] == s.services.state.current.artifact.fingerprint
        assert mod.get(f"/v1/media/{body['id']}").content == data
        stored = settings.media_root / body["uri"]
        assert stored.read_bytes() == data and stored.name.startswith(stored.parent.name)  # content-addressed
        again = upload(admin, data)
        assert again.status_code == 200 and again.json()["id"] == body["id"] and not again.json()["created"]
    adds = [e for e in read_entries(journal_path(settings.state_dir)) if e["op"] == ADD]
    assert [e["id"] for e in adds] == [body["id"]] and adds[0]["by"] == "admin"


def test_text_and_path_items(settings, world, media):
    gallery_image = next((media / "coco" / "val2017").glob("*.jpg"))
    with live(settings) as s, s.client(ADMIN) as admin, s.client(MODERATOR) as mod:
        text = admin.post("/v1/items", json={"text": "a lighthouse on a cliff at dusk", "tags": ["coast"]})
        assert text.status_code == 201 and text.json()["kind"] == "text", text.text
        assert text.json()["id"] == content_id("a lighthouse on a cliff at dusk")
        assert nearest(mod, text.json()["id"])[0] == text.json()["id"]
        # an image file under the data roots: copied into the uploads folder
        fresh = media / "incoming" / "new.png"
        fresh.parent.mkdir()
        fresh.write_bytes(fresh_png(2))
        made = admin.post("/v1/items", json={"path": str(fresh), "caption": "from a path"})
        assert made.status_code == 201 and made.json()["uri"].startswith("uploads/"), made.text
        # a file the gallery indexed already: the same id, nothing written
        known = admin.post("/v1/items", json={"path": str(gallery_image)})
        assert known.status_code == 200 and not known.json()["created"]
        assert known.json()["id"] == content_id(gallery_image.read_bytes())
        for bad, word in (({"path": "/etc/hostname"}, "outside the data roots"), ({"path": "../x.png"}, "'..'"),
                          ({"path": str(media / "nope.png")}, "does not exist")):
            r = admin.post("/v1/items", json=bad)
            assert r.status_code == 400 and word in r.json()["detail"], r.text
        for bad in ({}, {"text": "x", "path": str(fresh)}, {"text": "   "}, {"text": "x", "caption": "y"}):
            assert admin.post("/v1/items", json=bad).status_code == 422, bad
    assert len([e for e in read_entries(journal_path(settings.state_dir)) if e["op"] == ADD]) == 2


def test_adding_needs_the_admin_token_and_good_images(world, tmp_path, media):
    settings = make_settings(world, tmp_path, media, max_body_bytes=64 * 1024)
    with live(settings) as s, s.client(ADMIN) as admin:
        for token in (None, "wrong", MODERATOR):
            with s.client(token) as c:
                assert upload(c, fresh_png(3)).status_code == 401
                assert c.post("/v1/items", json={"text": "t"}).status_code == 401
        assert upload(admin, b"").status_code == 400
        assert upload(admin, b"not an image at all").status_code == 400
        bomb = upload(admin, png_with_size(8_000, 8_000))  # 64 Mpx: over the service's 40, under PIL's own guard
        assert bomb.status_code == 400 and "pixels" in bomb.json()["detail"], bomb.text
        assert upload(admin, fresh_png(4, size=300)).status_code == 413  # ~270 KB over a 64 KB body limit
        assert s.services.state.current.index.store.count() == len(gallery_ids(s, 10_000))
    assert read_entries(journal_path(settings.state_dir)) == []
    assert not (media / "uploads").exists()


# ------------------------------------------------------------------ takedowns
def test_a_takedown_is_gone_everywhere_audited_and_final(world, tmp_path, media):
    settings = make_settings(world, tmp_path, media, moderator_token=None,
                             moderator_tokens={"alice": MODERATOR, "carol": CAROL})
    with live(settings) as s, s.client(MODERATOR) as alice, s.client(CAROL) as carol, s.client(ADMIN) as admin:
        victim, other = gallery_ids(s, 2)
        payload = alice.get(f"/v1/items/{victim}").json()["payload"]
        r = alice.request("DELETE", f"/v1/items/{victim}", json={"reason": "legal request #41"})
        assert r.status_code == 200, r.text
        assert r.json()["by"] == "alice" and r.json()["reason"] == "legal request #41" and not r.json()["already"]
        assert alice.get(f"/v1/items/{victim}").status_code == 404
        assert alice.get(f"/v1/media/{victim}").status_code == 404
        assert victim not in nearest(alice, other)
        for target in ("image", "text", "any"):
            hits = alice.post("/v1/search", json={"text": payload.get("caption") or "a photo", "safety": "off",
                                                   "k": 100, "target": target}).json()["results"]
            assert victim not in [h["id"] for h in hits]
        # again, by someone else: the first takedown stands, no second entry
        again = carol.request("DELETE", f"/v1/items/{victim}", json={"reason": "duplicate report"})
        assert again.status_code == 200 and again.json()["already"] and again.json()["by"] == "alice"
        # the admin may take down too
        assert admin.request("DELETE", f"/v1/items/{other}", json={"reason": "spam"}).json()["by"] == "admin"
        # the same bytes never come back
        if payload.get("kind") == "image":
            data = (world.data / payload["uri"]).read_bytes()
            refused = upload(admin, data)
            assert refused.status_code == 409 and "taken down" in refused.json()["detail"]
        records = admin.get("/v1/admin/audit", params={"limit": 100}).json()["records"]
    takedowns = [e for e in read_entries(journal_path(settings.state_dir)) if e["op"] == "takedown"]
    assert [(e["id"], e["by"]) for e in takedowns] == [(victim, "alice"), (other, "admin")]
    deletes = [r for r in records if r["method"] == "DELETE"]
    assert [(r["token"], r["query"]["item_id"], r["query"]["reason"], r["status"]) for r in deletes] == [
        ("alice", victim, "legal request #41", 200), ("carol", victim, "duplicate report", 200),
        ("admin", other, "spam", 200)]


def test_takedown_bad_input(settings):
    with live(settings) as s, s.client(MODERATOR) as mod:
        (victim,) = gallery_ids(s, 1)
        unknown = "00000000-0000-0000-0000-000000000000"
        assert mod.request("DELETE", f"/v1/items/{unknown}", json={"reason": "x"}).status_code == 404
        assert mod.request("DELETE", "/v1/items/not-a-uuid", json={"reason": "x"}).status_code == 404
        for body in ({}, {"reason": ""}, {"reason": "   "}, {"reason": "x" * 1001}, {"reason": "x", "extra": 1}):
            r = mod.request("DELETE", f"/v1/items/{victim}", json=body)
            assert r.status_code == 422, (body, r.text)
        assert mod.request("DELETE", f"/v1/items/{victim}", json={"reason": "x" * 1000}).status_code == 200
        for token in (None, "wrong"):
            with s.client(token) as c:
                assert c.request("DELETE", f"/v1/items/{victim}", json={"reason": "x"}).status_code == 401
    assert len(read_entries(journal_path(settings.state_dir))) == 1


def test_purge_deletes_the_uploaded_file(settings):
    with live(settings) as s, s.client(ADMIN) as admin:
        kept, purged = (upload(admin, fresh_png(seed)).json() for seed in (5, 6))
        r = admin.request("DELETE", f"/v1/items/{purged['id']}", params={"purge": "true"}, json={"reason": "csam"})
        assert r.json()["purged"] is True
        r = admin.request("DELETE", f"/v1/items/{kept['id']}", json={"reason": "not purged"})
        assert r.json()["purged"] is False
    assert not (settings.media_root / purged["uri"]).exists() and (settings.media_root / kept["uri"]).exists()


# ------------------------------------------------------------------ nothing lost, nothing returns
def test_a_restart_replays_the_journal(settings):
    """What was acknowledged survives a restart; a change journaled but never stored (a kill -9 between the two)
    is applied once at start-up; a half-written last line (a kill -9 mid-write) is not a change."""
    with live(settings) as s, s.client(ADMIN) as admin:
        added = upload(admin, fresh_png(7)).json()
        victim = next(i for i in gallery_ids(s, 5) if i != added["id"])
        assert admin.request("DELETE", f"/v1/items/{victim}", json={"reason": "r"}).status_code == 200
        count = s.services.state.current.index.store.count()
    # as if the service died after journaling these, before its store saw them
    crashed = fresh_png(8)
    uploads = settings.media_root / "uploads"
    digest = content_id(crashed)
    (uploads / "crash.png").write_bytes(crashed)
    journal = Journal(journal_path(settings.state_dir))
    journal.append(ADD, id=digest, kind="image", caption="journaled only", text=None, tags=[], by="admin",
                   file="crash.png")
    (second,) = [i for i in gallery_ids_offline(settings.index_root, 20) if i not in (victim, added["id"])][:1]
    journal.append("takedown", id=second, reason="journaled only", by="admin", kind="image", uri=None, purged=False)
    journal.close()
    with open(journal_path(settings.state_dir), "ab") as f:
        f.write(b'{"seq":99,"op":"add","id":"11111111-2222-3333-4444-555555555555","kind":"te')
    with live(settings) as s, s.client(MODERATOR) as mod:
        store = s.services.state.current.index.store
        assert mod.get(f"/v1/items/{added['id']}").status_code == 200
        assert mod.get(f"/v1/items/{digest}").json()["caption"] == "journaled only"
        for gone in (victim, second):
            assert mod.get(f"/v1/items/{gone}").status_code == 404
        assert store.count() == count + 1 - 1
    assert journal_path(settings.state_dir).read_bytes().endswith(b"\n")  # the half line was cut


def gallery_ids_offline(index_root: Path, n: int) -> list[str]:
    """The first ``n`` ids of the gallery's index under ``index_root``, read while no server holds it."""
    from indexer.index import open_index
    from tests.helpers.service import INDEX

    with open_index(INDEX, root=index_root) as index:
        return list(index.store.iter_ids())[:n]


def test_a_reindex_keeps_online_changes_and_skips_taken_down_content(settings, world):
    """A reindex of the gallery's source with changes made before it and while it runs: the new generation holds
    every add (embedded again at the job's commit) and none of the taken-down items; the build itself skipped what
    was taken down before it read the takedown list, as failures that say why."""
    with live(settings) as s, s.client(ADMIN) as admin, s.client(MODERATOR) as mod:
        added = upload(admin, fresh_png(9)).json()
        images = [p for p in gallery_ids(s, 50) if mod.get(f"/v1/items/{p}").json()["kind"] == "image"]
        victim, late_victim = images[:2]
        assert admin.request("DELETE", f"/v1/items/{victim}", json={"reason": "r"}).status_code == 200
        before = s.services.state.current.info["generation"]
        job = admin.post("/v1/admin/reindex", json={"source": {"visu": str(world.data), "split": "test",
                                                               "captions": True}})
        assert job.status_code == 202, job.text
        late = upload(admin, fresh_png(10)).json()  # while the job runs: into the served generation, and replayed
        assert mod.request("DELETE", f"/v1/items/{late_victim}", json={"reason": "late"}).status_code == 200
        assert s.services.jobs.get(job.json()["id"])["status"] == "running"
        done = s.services.jobs.wait(job.json()["id"], timeout=300)
        assert done["status"] == "succeeded", done
        pair = s.services.state.current
        assert pair.info["generation"] != before
        for kept in (added["id"], late["id"]):
            assert mod.get(f"/v1/items/{kept}").status_code == 200
        for gone in (victim, late_victim):
            assert mod.get(f"/v1/items/{gone}").status_code == 404
        gens = s.services.generations()
        failures = [json.loads(line) for line in gens.failures_path(pair.info["generation"]).read_text().splitlines()]
    # the late takedown may reach the build too (if it came before the build read the list) or only the replay
    assert 1 <= len([f for f in failures if "takedown list" in f["error"]]) <= 2, failures


def test_a_full_disk_fails_the_write_and_changes_nothing(world, tmp_path, media):
    with small_tmpfs(tmp_path / "state", "1m") as state:
        settings = make_settings(world, tmp_path, media, state_dir=state, audit_dir=tmp_path / "audit")
        with live(settings) as s, s.client(MODERATOR) as mod:
            (victim,) = gallery_ids(s, 1)
            with open(state / "filler", "ab", buffering=0) as f:  # fill the volume
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            size = journal_path(state).stat().st_size if journal_path(state).exists() else 0
            long_reason = "r" * 1000
            refused = [mod.request("DELETE", f"/v1/items/{victim}", json={"reason": long_reason}) for _ in range(3)]
            assert all(r.status_code == 507 and "nothing was changed" in r.json()["detail"] for r in refused), refused[0].text
            assert mod.get(f"/v1/items/{victim}").status_code == 200
            assert (journal_path(state).stat().st_size if journal_path(state).exists() else 0) == size
            (state / "filler").unlink()
            assert mod.request("DELETE", f"/v1/items/{victim}", json={"reason": long_reason}).status_code == 200
            assert mod.get(f"/v1/items/{victim}").status_code == 404
        assert [e["id"] for e in read_entries(journal_path(state))] == [victim]


def test_a_replica_without_jobs_takes_no_writes(settings, tmp_path):
    replica = settings.model_copy(update={"run_jobs": False, "audit_dir": tmp_path / "replica-audit"})
    with live(replica) as s, s.client(ADMIN) as admin:
        r = admin.post("/v1/items", json={"text": "x"})
        assert r.status_code == 403 and "RUN_JOBS" in r.json()["detail"]


# ------------------------------------------------------------------ a Qdrant server
def test_writes_and_replay_on_a_qdrant_server_collection(world, tmp_path, media):
    """The same writes through qdrant-client's local mode (the server backend's calls; no cluster runs here): an add
    and a takedown change the served collection in place (replicas following the alias see them), and a new
    generation built from the source gets both replayed onto it before it is served."""
    import threading

    from qdrant_client import QdrantClient

    from indexer import builder, sources
    from indexer.index import open_index
    from indexer.server_store import ServerGenerations
    from indexer.sources import Item as SourceItem
    from service.collection import Collection
    from service.state import ServedPair
    from training import artifact as artifacts

    client = QdrantClient(":memory:")
    gens = ServerGenerations("gallery", client, tmp_path / "jobs")
    art = artifacts.load(world.model, device="cpu")
    items = sources.collect(visu=world.data, split="test", captions_as_text=True)
    first = builder.build(gens, art, items, media_root=world.data, workers=0, progress=False).generation
    settings = make_settings(world, tmp_path, media)
    current: list[ServedPair] = []

    def serve(gen: str) -> ServedPair:
        index = open_index("gallery", client=client, generation=gen)
        return ServedPair(artifact=art, index=index, info=dict(index.info), model_path=world.model)

    current.append(serve(first))
    collection = Collection(settings, threading.Lock(), lambda: current[-1])
    data = fresh_png(11)
    x = art.encoder.encode_image(torch_pixels(art, data))[0]
    pid = content_id(data)
    payload, created, _ = collection.add(pid, SourceItem(kind="image", caption="on a server"), x, art.fingerprint,
                                         by="admin", data=data)
    assert created and payload["source"] == "api"
    victim = next(i for i in current[-1].index.store.iter_ids() if i != pid)
    collection.take_down(victim, reason="r", by="admin", purge=False)
    with open_index("gallery", client=client) as follower:  # a replica's own view of the alias
        assert follower.retrieve(pid)["caption"] == "on a server" and follower.retrieve(victim) is None
    # a reindex job's new generation: built from the source without the add, skipping the listed item
    second = builder.build(gens, art, items, media_root=world.data, workers=0, progress=False, switch=False,
                           blocked=frozenset(collection.journal.takedowns)).generation
    staged = serve(second)
    assert staged.index.retrieve(pid) is None
    assert collection.replay(staged) == {"removed": 1, "added": 1, "missing": [], "unmatched_takedowns": 0}
    assert staged.index.retrieve(pid)["caption"] == "on a server" and staged.index.retrieve(victim) is None
    assert collection.replay(staged)["added"] == 0  # idempotent
    assert staged.index.store.count() == current[-1].index.store.count()


def torch_pixels(art, data: bytes):
    from training.images import preprocess_bytes

    return preprocess_bytes(data, art.encoder.transform)[None]


# ------------------------------------------------------------------ kill -9
def test_a_kill_9_mid_writes_loses_no_acknowledged_change(world, tmp_path, media):
    """A real ``safe-retrieval serve`` killed with SIGKILL while adds and takedowns stream in: after a restart every
    add it answered 201 is there and every takedown it answered 200 is gone; a change in flight is there exactly
    once or not at all (the journal holds no half line and no id twice)."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    from tests.helpers.service import INDEX, copy_index, free_port, wait_ready

    index_root = copy_index(world, tmp_path / "indexes")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_RETRIEVAL_")}
    env.update(SAFE_RETRIEVAL_MODEL=str(world.model), SAFE_RETRIEVAL_INDEX=INDEX, SAFE_RETRIEVAL_INDEX_ROOT=str(index_root),
               SAFE_RETRIEVAL_STATE_DIR=str(state), SAFE_RETRIEVAL_DEVICE="cpu", SAFE_RETRIEVAL_ADMIN_TOKEN=ADMIN,
               SAFE_RETRIEVAL_MODERATOR_TOKEN=MODERATOR, SAFE_RETRIEVAL_MEDIA_ROOT=str(media))
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; main(sys.argv[1:])", "serve"]

    def start(log_name: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = (tmp_path / log_name).open("wb")
        proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        ready = wait_ready(proc, base, 90)
        assert ready is not None and ready.status_code == 200, (tmp_path / log_name).read_text()
        return proc, base

    victims = gallery_ids_offline(index_root, 12)  # before the server holds the store
    proc, base = start("first.log")
    acked_adds: list[str] = []
    acked_downs: list[str] = []
    stop = threading.Event()

    def adder() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as c:
            for seed in range(100, 400):
                if stop.is_set():
                    return
                try:
                    r = c.post("/v1/items/upload", files={"image": ("x.png", fresh_png(seed), "image/png")})
                except httpx.TransportError:
                    return
                if r.status_code == 201:
                    acked_adds.append(r.json()["id"])

    def remover() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {MODERATOR}"}, timeout=10) as c:
            for pid in victims:
                if stop.is_set():
                    return
                try:
                    r = c.request("DELETE", f"/v1/items/{pid}", json={"reason": "kill test"})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked_downs.append(pid)

    threads = [threading.Thread(target=adder), threading.Thread(target=remover)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (len(acked_adds) < 8 or len(acked_downs) < 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: requests are in flight
    proc.wait(30)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked_adds) >= 8 and len(acked_downs) >= 4
    entries = read_entries(journal_path(state))
    for op in ("add", "takedown"):
        ids = [e["id"] for e in entries if e["op"] == op]
        assert len(ids) == len(set(ids)), f"an {op} journaled twice"
    proc, base = start("second.log")
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {MODERATOR}"}, timeout=10) as c:
            for pid in acked_adds:
                assert c.get(f"/v1/items/{pid}").status_code == 200, pid
            for pid in acked_downs:
                assert c.get(f"/v1/items/{pid}").status_code == 404, pid
            journaled = {e["id"] for e in read_entries(journal_path(state)) if e["op"] == "add"}
            for pid in journaled:  # in flight at the kill, but journaled: applied once, at the restart
                assert c.get(f"/v1/items/{pid}").status_code == 200, pid
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


# ------------------------------------------------------------------ near-duplicates
def jpeg_copy(data: bytes, quality: int = 60, scale: float = 0.75) -> bytes:
    """The image resized and re-encoded as a JPEG: what a re-upload of a taken-down image often is."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class NearCase(NamedTuple):
    settings: Settings  # NEAR_DUPLICATE_DISTANCE set between the copy's distance and the nearest other image's
    original: Path  # the gallery image to take down (under the media root and the data roots)
    victim: str  # its id
    fresh: bytes  # an image farther than the threshold from it
    fingerprint: str
    dim: int


@pytest.fixture
def near(world, tmp_path, media) -> NearCase:
    """A gallery image whose resized, recompressed copy lies nearer to it than any other gallery image does, and a
    threshold between the two (the benchmark calibrates it on a whole gallery; the tests check the mechanism)."""
    from indexer import sources
    from training import artifact, lorentz
    from training.images import preprocess_bytes

    art = artifact.load(world.model, device="cpu")

    def embed(data: bytes):
        return art.encoder.encode_image(preprocess_bytes(data, art.encoder.transform)[None])[0]

    files = [it.path for it in sources.collect(visu=media, split="test") if it.kind == "image"]
    originals = [f.read_bytes() for f in files]
    x = torch.stack([embed(d) for d in originals])
    copies = torch.stack([embed(jpeg_copy(d)) for d in originals])
    others = lorentz.pairwise_dist(x, x, art.curvature).fill_diagonal_(float("inf")).min(1).values
    to_copy = lorentz.elementwise_dist(x, copies, art.curvature)
    v = int((others - to_copy).argmax())
    assert others[v] > to_copy[v], "no gallery image is farther from the others than from its own copy"
    threshold = float(to_copy[v] + others[v]) / 2
    fresh = fresh_png(31)
    assert float(lorentz.pairwise_dist(embed(fresh)[None], x[v : v + 1], art.curvature)) > threshold
    return NearCase(make_settings(world, tmp_path, media, near_duplicate_distance=threshold), files[v],
                    content_id(originals[v]), fresh, art.fingerprint, x.shape[1])


def test_near_duplicates_of_a_taken_down_image_are_refused(near):
    """With NEAR_DUPLICATE_DISTANCE, a resized, recompressed copy of a taken-down image is refused (409 naming the
    item and the override) while other images are not; the takedown's recorded embedding keeps refusing it after a
    restart."""
    original = near.original.read_bytes()
    with live(near.settings) as s, s.client(ADMIN) as admin, s.client(MODERATOR) as mod:
        assert mod.request("DELETE", f"/v1/items/{near.victim}", json={"reason": "r"}).status_code == 200
        refused = upload(admin, jpeg_copy(original))
        assert refused.status_code == 409 and "near-duplicate" in refused.json()["detail"], refused.text
        assert near.victim in refused.json()["detail"] and "allow_near_duplicate=true" in refused.json()["detail"]
        made = upload(admin, near.fresh)
        assert made.status_code == 201 and made.json()["near_duplicate_of"] is None
    with live(near.settings) as s, s.client(ADMIN) as admin:  # the recorded embedding, after a restart
        assert upload(admin, jpeg_copy(original, quality=80)).status_code == 409
    entry = next(e for e in read_entries(journal_path(near.settings.state_dir)) if e["op"] == "takedown")
    assert entry["model"] == near.fingerprint and len(entry["vector"]) == near.dim


def test_an_admin_overrides_a_near_duplicate_refusal_but_never_the_taken_down_content(near):
    """``allow_near_duplicate``: the refused copy is added (201, searchable) and its audit record names the override,
    the near item and the distance; the exact taken-down bytes stay a 409 with the flag, on both add routes."""
    original = near.original.read_bytes()
    copy = jpeg_copy(original)
    with live(near.settings) as s, s.client(ADMIN) as admin, s.client(MODERATOR) as mod:
        assert mod.request("DELETE", f"/v1/items/{near.victim}", json={"reason": "r"}).status_code == 200
        assert upload(admin, copy).status_code == 409
        allowed = admin.post("/v1/items/upload", files={"image": ("x.jpg", copy, "image/jpeg")},
                             data={"caption": "not the taken-down one", "allow_near_duplicate": "true"})
        assert allowed.status_code == 201, allowed.text
        body = allowed.json()
        assert body["id"] == content_id(copy) and body["near_duplicate_of"] == near.victim
        assert 0 <= body["near_duplicate_distance"] <= near.settings.near_duplicate_distance
        assert nearest(mod, body["id"])[0] == body["id"]
        assert mod.get(f"/v1/media/{body['id']}").content == copy
        for refused in (admin.post("/v1/items/upload", files={"image": ("x.jpg", original, "image/jpeg")},
                                   data={"allow_near_duplicate": "true"}),
                        admin.post("/v1/items", json={"path": str(near.original), "allow_near_duplicate": True})):
            assert refused.status_code == 409 and "taken down" in refused.json()["detail"], refused.text
            assert "not even with allow_near_duplicate" in refused.json()["detail"]
        assert admin.post("/v1/items", json={"text": "t", "allow_near_duplicate": True}).status_code == 422
        records = admin.get("/v1/admin/audit", params={"limit": 100}).json()["records"]
    adds = [r for r in records if r["route"] == "/v1/items/upload" and r["status"] == 201]
    assert [r["query"]["item_id"] for r in adds] == [body["id"]]
    assert adds[0]["query"]["allow_near_duplicate"] is True and adds[0]["query"]["near_duplicate_of"] == near.victim
    assert adds[0]["query"]["near_duplicate_distance"] == pytest.approx(body["near_duplicate_distance"])
    refusals = {(r["query"]["item_id"], r["query"].get("allow_near_duplicate")) for r in records if r["status"] == 409}
    assert refusals == {(body["id"], None), (near.victim, True)}  # the copy without the flag; the original with it
