"""Generations: atomic switch, readers of an old generation, pruning, the build lock, both homes.

The server home runs against qdrant-client's local mode (``QdrantClient(":memory:")``), which has
collections, aliases and collection metadata like a Qdrant server; no server binary is available here.
"""

from __future__ import annotations

import threading
import time

import pytest
from qdrant_client import QdrantClient

from indexer import builder, sources
from indexer.errors import IndexBusyError, IndexNotFoundError, ModelMismatchError
from indexer.generations import GEN_RE, LocalGenerations, check_name
from indexer.index import generations_for, open_index
from indexer.search import search
from indexer.server_store import ServerGenerations
from tests.helpers.indexer import write_images
from training.errors import InputError


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    folder = tmp_path_factory.mktemp("few")
    write_images(folder, 4)
    return folder


def test_switch_is_atomic_old_readers_keep_working_and_prune_keeps_n(tmp_path, art, few):
    gens = LocalGenerations("col", tmp_path)
    items = sources.folder_items(few)
    opts = {"workers": 0, "progress": False, "keep": 2, "media_root": few}
    first = builder.build(gens, art, items, **opts)
    q = art.encoder.encode_text(["query"])[0]
    reader = open_index("col", root=tmp_path)  # holds the first generation, as the service would
    before = [h.id for h in search(reader, art, q, query_modality="text", k=3, safety="off").hits]

    seen: list[tuple[str | None, str | None]] = []
    stop = threading.Event()

    def watch() -> None:  # a reader of the pointer must only ever see a complete generation
        while not stop.is_set():
            cur = gens.current()
            seen.append((cur, gens.read_meta(cur)["state"] if cur else None))
            time.sleep(0.002)  # leave the build some CPU

    t = threading.Thread(target=watch)
    t.start()
    try:
        second = builder.build(gens, art, items, **opts)
    finally:
        stop.set()
        t.join()
    assert seen and set(seen) <= {(first.generation, "complete"), (second.generation, "complete")}
    assert gens.current() == second.generation
    # the old generation still answers, with the same results
    assert [h.id for h in search(reader, art, q, query_modality="text", k=3, safety="off").hits] == before
    reader.close()

    third = builder.build(gens, art, items, **opts)
    assert third.pruned == [first.generation]
    assert gens.generations() == [second.generation, third.generation] and gens.current() == third.generation
    assert (tmp_path / "col" / "CURRENT").read_text().strip() == third.generation
    assert all(GEN_RE.match(g) for g in gens.generations())


def test_second_job_fails_fast_and_the_first_is_unharmed(tmp_path, art, few):
    gens = LocalGenerations("col", tmp_path)
    with gens.lock():
        t0 = time.monotonic()
        with pytest.raises(IndexBusyError, match=r"col is being built by another job \(pid \d+"):
            builder.build(LocalGenerations("col", tmp_path), art, sources.folder_items(few), workers=0, progress=False)
        assert time.monotonic() - t0 < 5
        assert gens.generations() == []  # the refused job wrote nothing
    res = builder.build(gens, art, sources.folder_items(few), workers=0, progress=False)  # lock released
    assert res.points == 4


def test_a_killed_build_is_resumed_not_served(tmp_path, art, few):
    """A partial generation (a build that died) is never current; the same build resumes into it."""
    gens = LocalGenerations("col", tmp_path)
    items = sources.folder_items(few)
    gen = gens.new_name()
    meta = builder.index_record(art, name="col", generation=gen, sources="sig")
    store = gens.create_store(gen, builder.schema_for(art), meta)
    from indexer.pipeline import Job

    Job(art, store, workers=0, progress=False, media_root=few).run(items[:2])  # then "killed"
    store.close()
    with pytest.raises(IndexNotFoundError, match="no complete generation"):
        open_index("col", root=tmp_path)
    res = builder.build(gens, art, items, sources="sig", workers=0, progress=False, media_root=few)
    assert res.resumed and res.generation == gen
    assert (res.summary.skipped, res.summary.indexed, res.points) == (2, 2, 4)
    other = builder.build(gens, art, items, sources="other inputs", workers=0, progress=False, media_root=few)
    assert not other.resumed and other.generation != gen


def test_model_mismatch_is_refused_for_add(tmp_path, art, other_art, few):
    gens = LocalGenerations("col", tmp_path)
    builder.build(gens, art, sources.folder_items(few), workers=0, progress=False)
    with pytest.raises(ModelMismatchError, match="reindex with this model"):
        builder.add(gens, other_art, sources.folder_items(few), workers=0, progress=False)


def test_server_generations_alias_metadata_lock_prune_and_drop(tmp_path, art, few):
    client = QdrantClient(":memory:")
    gens = ServerGenerations("col", client, tmp_path)
    items = sources.folder_items(few)
    r1 = builder.build(gens, art, items, workers=0, progress=False, keep=1)
    r2 = builder.build(gens, art, items, workers=0, progress=False, keep=1)
    assert {a.alias_name: a.collection_name for a in client.get_aliases().aliases} == {"col": r2.generation}
    assert r2.pruned == [r1.generation] and gens.generations() == [r2.generation]
    meta = gens.read_meta(r2.generation)
    assert meta["state"] == "complete" and meta["points"] == 4 and meta["geometry"] == "lorentz"
    with gens.lock():
        with pytest.raises(IndexBusyError, match="--break-lock"):
            with ServerGenerations("col", client, tmp_path).lock():
                pass
    with gens.lock(), ServerGenerations("col", client, tmp_path).lock(break_lock=True):
        pass  # a lock left behind can be broken on purpose
    assert "col@lock" not in [c.name for c in client.get_collections().collections]
    with gens.lock():
        assert gens.drop() == [r2.generation]
    assert gens.current() is None and gens.generations() == []


def test_names_are_checked():
    for bad in ("", "a/b", "x@y", "../up", "-x"):
        with pytest.raises(InputError, match="invalid index name"):
            check_name(bad)
    assert check_name("gallery-v2.1_a") == "gallery-v2.1_a"


# ------------------------------------------------------------------ staging and pins
def test_a_staged_build_neither_switches_nor_prunes(tmp_path, art, few):
    gens = LocalGenerations("col", tmp_path)
    items = sources.folder_items(few)
    first = builder.build(gens, art, items, workers=0, progress=False, media_root=few)
    named: list[str] = []
    staged = builder.build(gens, art, items, workers=0, progress=False, media_root=few, keep=1, switch=False,
                           staged=named.append)
    assert named == [staged.generation] and staged.pruned == []
    assert gens.current() == first.generation  # the pointer did not move
    assert gens.read_meta(staged.generation)["state"] == "complete"
    added = builder.add(gens, art, items, workers=0, progress=False, media_root=few, switch=False, staged=named.append)
    assert named[-1] == added.generation != first.generation and gens.current() == first.generation
    assert set(gens.generations()) == {first.generation, staged.generation, added.generation}


def test_prune_never_deletes_a_pinned_generation_even_after_two_switches(tmp_path, art, few):
    """A service pins what it serves; two later builds with --keep 1 must leave it alone."""
    gens = LocalGenerations("col", tmp_path)
    items = sources.folder_items(few)
    opts = {"workers": 0, "progress": False, "media_root": few, "keep": 1}
    served = builder.build(gens, art, items, **opts).generation
    gens.pin(served)  # this test process plays the serving process
    with open_index("col", root=tmp_path) as reader:
        second = builder.build(gens, art, items, **opts)
        third = builder.build(gens, art, items, **opts)
        assert second.pruned == [] and third.pruned == [second.generation]
        assert gens.generations() == [served, third.generation] and gens.pinned() == {served}
        q = art.encoder.encode_text(["query"])[0]
        assert len(search(reader, art, q, query_modality="text", k=2, safety="off").hits) == 2  # still answers
    gens.unpin()
    with gens.lock():
        assert gens.prune(1) == [served]


def test_prune_removes_a_store_left_without_its_record(tmp_path, art, few):
    """A job cancelled while it created the store leaves NAME@TS/shard without meta.json: the next prune removes it."""
    gens = LocalGenerations("col", tmp_path)
    served = builder.build(gens, art, sources.folder_items(few), workers=0, progress=False, media_root=few).generation
    orphan = gens.dir / gens.new_name()
    (orphan / "shard" / "segments").mkdir(parents=True)
    (orphan / "shard" / "segments" / "data.bin").write_bytes(b"\0" * 4096)
    assert gens.generations() == [served]  # no record: not a generation, so nothing else would ever delete it
    with gens.lock():
        gens.prune(1)
    assert not orphan.exists() and not list(gens.dir.glob(".*.deleting"))
    assert gens.generations() == [served] and gens.current() == served


def test_a_pin_of_a_dead_process_protects_nothing(tmp_path, art, few):
    import json
    import subprocess

    gens = LocalGenerations("col", tmp_path)
    items = sources.folder_items(few)
    old = builder.build(gens, art, items, workers=0, progress=False, media_root=few).generation
    dead = subprocess.Popen(["true"])
    dead.wait()
    pin = tmp_path / "col" / ".pin-gone"
    pin.write_text(json.dumps({"generation": old, "host": __import__("socket").gethostname(), "pid": dead.pid,
                               "pid_start": "1"}))
    new = builder.build(gens, art, items, workers=0, progress=False, media_root=few, keep=1)
    assert new.pruned == [old] and not pin.exists()


def test_server_pins_are_leases_and_incremental_jobs_cannot_be_staged(tmp_path, art, few):
    client = QdrantClient(":memory:")
    gens = ServerGenerations("col", client, tmp_path)
    items = sources.folder_items(few)
    served = builder.build(gens, art, items, workers=0, progress=False, keep=1).generation
    gens.pin(served)
    builder.build(gens, art, items, workers=0, progress=False, keep=1)
    third = builder.build(gens, art, items, workers=0, progress=False, keep=1)
    assert gens.generations() == [served, third.generation] and gens.pinned() == {served}
    gens.pin(served, ttl_s=-1)  # a lease nobody renewed
    assert gens.pinned() == set() and not [c for c in gens.client.get_collections().collections if "@pin-" in c.name]
    staged = builder.build(gens, art, items, workers=0, progress=False, switch=False)
    assert gens.current() == third.generation and gens.read_meta(staged.generation)["state"] == "complete"
    with pytest.raises(InputError, match="in place and cannot be staged"):
        builder.add(gens, art, items, workers=0, progress=False, switch=False)
    with pytest.raises(InputError, match="in place and cannot be staged"):
        builder.delete(gens, ids=["x"], switch=False)


class RecordingClient(QdrantClient):
    """The real local-mode client, remembering the layout each collection was created with.

    Local mode accepts ``shard_number``/``replication_factor`` but keeps one shard (it is one
    process); what a cluster would receive is what this records.
    """

    def __init__(self):
        super().__init__(":memory:")
        self.layouts: dict[str, tuple] = {}

    def create_collection(self, collection_name, *args, **kwargs):
        self.layouts[collection_name] = (kwargs.get("shard_number"), kwargs.get("replication_factor"))
        return super().create_collection(collection_name, *args, **kwargs)


def test_server_generations_spread_over_a_cluster_and_keep_their_layout(tmp_path, art, few):
    client = RecordingClient()
    items = sources.folder_items(few)
    first = builder.build(ServerGenerations("col", client, tmp_path, shards=3, replicas=2), art, items,
                          workers=0, progress=False)
    assert client.layouts[first.generation] == (3, 2)
    gens = ServerGenerations("col", client, tmp_path)
    assert gens.read_meta(first.generation)["layout"] == {"shard_number": 3, "replication_factor": 2}
    with open_index("col", client=client) as index:  # a collection over shards searches like one
        q = art.encoder.encode_text(["a photo"])[0]
        assert len(search(index, art, q, query_modality="text", k=10, safety="off").hits) == 4
    # a reindex that says nothing about the layout (an admin job) keeps the cluster's
    second = builder.build(gens, art, items, workers=0, progress=False)
    assert client.layouts[second.generation] == (3, 2)
    third = builder.build(ServerGenerations("col", client, tmp_path, shards=6), art, items, workers=0, progress=False)
    assert client.layouts[third.generation] == (6, 2)
    # without a layout anywhere, the server's defaults apply (nothing is sent)
    plain = builder.build(ServerGenerations("other", client, tmp_path), art, items, workers=0, progress=False)
    assert client.layouts[plain.generation] == (None, None)
    assert "layout" not in gens.read_meta(plain.generation)


def test_shards_and_replicas_need_a_server(tmp_path):
    with pytest.raises(InputError, match="--qdrant-url"):
        generations_for("col", root=tmp_path, shards=2)
    with pytest.raises(InputError, match="--qdrant-url"):
        generations_for("col", root=tmp_path, replicas=2)
