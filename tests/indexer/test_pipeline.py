"""Inputs and the indexing pipeline: folders, manifests, failures, payloads, idempotence, both backends."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from qdrant_client import QdrantClient

from indexer import builder, sources
from indexer.generations import LocalGenerations
from indexer.index import open_index
from indexer.search import search
from indexer.server_store import ServerGenerations
from indexer.store import content_id
from tests.helpers.indexer import leaked, leaky_root, write_images
from training.data.roots import DataRoots
from training.errors import DataError, InputError, OutsideRootsError
from training.images import open_image


def image_ids(folder) -> set[str]:
    return {content_id(p.read_bytes()) for p in folder.rglob("*.png")}


def build(root, art, items, name="col", **kw):
    kw = {"workers": 0, "progress": False, **kw}
    return builder.build(LocalGenerations(name, root), art, items, **kw)


def test_folder_build_payloads_failures_and_vectors(tmp_path, art, images):
    items = sources.folder_items(images)
    assert len(items) == 13  # 12 PNGs + broken.jpg; notes.txt is not an image
    res = build(tmp_path, art, items, media_root=images, workers=2)  # real DataLoader worker processes
    assert (res.summary.indexed, res.summary.failed, res.points) == (12, 1, 12)
    failures = [json.loads(line) for line in open(res.failures)]
    assert [f["item"] for f in failures] == [str(images / "broken.jpg")] and "corrupt" in failures[0]["error"]
    with open_index("col", root=tmp_path) as idx:
        ids = set(idx.store.iter_ids())
        assert ids == image_ids(images)
        p = images / "sub" / "img003.png"
        got = idx.retrieve(content_id(p.read_bytes()), with_vector=True)
        assert got["uri"] == "sub/img003.png" and got["kind"] == "image" and got["tags"] == []
        pay = got["payload"]
        assert pay["model"] == art.fingerprint and pay["indexed_at"] and pay["d0"] > 0
        assert pay["unsafe"] == (pay["d0"] > 1.5)
        want = art.encoder.encode_image([open_image(p)])[0]
        assert torch.allclose(torch.tensor(got["vector"]), want, atol=1e-5)
        # the image finds itself first, at distance ~0
        hit = search(idx, art, want, query_modality="image", k=1, safety="off").hits[0]
        assert hit.id == got["id"] and hit.distance < 1e-2


def test_manifests_csv_jsonl_parquet_with_missing_files_and_captions(tmp_path, art):
    paths = [p.relative_to(tmp_path / "m").as_posix() for p in write_images(tmp_path / "m", 4)]
    rows = [
        {"image": paths[0], "caption": "a cat", "tags": "pets|animals", "license": "cc-by"},
        {"image": paths[1], "caption": "a dog", "tags": "pets", "license": "cc0"},
        {"image": paths[2], "caption": "", "tags": "", "license": "cc0"},
        {"image": "missing.png", "caption": "gone", "tags": "", "license": "cc0"},
    ]
    csv_path = tmp_path / "m" / "list.csv"
    csv_path.write_text("image,caption,tags,license\n" + "".join(
        f"{r['image']},{r['caption']},{r['tags']},{r['license']}\n" for r in rows))
    jsonl = tmp_path / "m" / "list.jsonl"
    jsonl.write_text("".join(json.dumps({**r, "tags": r["tags"].split("|") if r["tags"] else []}) + "\n" for r in rows))
    parquet = tmp_path / "m" / "list.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "score": 0.5} for r in rows]), parquet)
    parsed = [sources.manifest_items(p) for p in (csv_path, jsonl, parquet)]
    for items in parsed:
        assert [it.tags for it in items] == [("pets", "animals"), ("pets",), (), ()]
        assert items[0].caption == "a cat" and items[2].caption is None and items[0].extra["license"] == "cc-by"
    assert parsed[2][0].extra["score"] == 0.5
    items = sources.collect(manifest=csv_path, captions_as_text=True)
    assert sum(it.kind == "text" for it in items) == 3  # "a cat", "a dog", "gone"
    res = build(tmp_path / "idx", art, items, media_root=tmp_path / "m")
    assert (res.summary.indexed, res.summary.failed) == (6, 1)  # 3 images + 3 captions; missing.png failed
    assert "missing.png" in open(res.failures).read()
    with open_index("col", root=tmp_path / "idx") as idx:
        cat = idx.retrieve(content_id("a cat"))
        assert cat["kind"] == "text" and cat["payload"]["image_uri"] == "sub/img000.png" and cat["tags"] == ["pets", "animals"]
        gone = idx.retrieve(content_id("gone"))  # the caption of a missing image still indexes as text
        assert gone["kind"] == "text" and gone["payload"]["image_uri"] == "missing.png"
        img = idx.retrieve(content_id((tmp_path / "m" / paths[0]).read_bytes()))
        assert img["caption"] == "a cat" and img["payload"]["license"] == "cc-by"
        text_hits = search(idx, art, art.encoder.encode_text(["a dog"])[0], query_modality="text", target="text",
                           k=1, safety="off").hits
        assert text_hits[0].caption == "a dog"


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        sources.collect(images=tmp_path / "nope")
    with pytest.raises(DataError, match="manifest not found"):
        sources.collect(manifest=tmp_path / "nope.csv")
    (tmp_path / "x.csv").write_text("path,caption\na.png,b\n")
    with pytest.raises(DataError, match="no 'image' column"):
        sources.manifest_items(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("image,unsafe\na.png,no\n")
    with pytest.raises(DataError, match="reserved column names unsafe"):
        sources.manifest_items(tmp_path / "y.csv")
    (tmp_path / "z.txt").write_text("image\n")
    with pytest.raises(InputError, match="unsupported manifest"):
        sources.manifest_items(tmp_path / "z.txt")
    with pytest.raises(InputError, match="only one of"):
        sources.collect(images=tmp_path, manifest=tmp_path / "x.csv")
    with pytest.raises(InputError, match="nothing to index"):
        sources.collect()


def test_rerun_is_idempotent_and_duplicates_collapse(tmp_path, art):
    folder = tmp_path / "imgs"
    write_images(folder, 6)
    shutil.copy(folder / "img001.png", folder / "copy_of_1.png")  # same bytes, same id
    items = sources.folder_items(folder)
    first = build(tmp_path / "idx", art, items, media_root=folder)
    assert (first.summary.indexed, first.summary.skipped, first.points) == (6, 1, 6)
    second = build(tmp_path / "idx", art, items, media_root=folder)  # a new generation, the same points
    assert second.generation != first.generation and second.points == 6
    gens = LocalGenerations("col", tmp_path / "idx")
    ids = []
    for g in (first.generation, second.generation):
        with gens.open_store(g, builder.schema_for(art)) as store:
            ids.append(sorted(store.iter_ids()))
    assert ids[0] == ids[1] == sorted(image_ids(folder))
    again = builder.add(gens, art, items, media_root=folder, workers=0, progress=False)
    assert (again.summary.indexed, again.summary.skipped, again.points) == (0, 7, 6)
    write_images(folder, 2, start=100)
    more = builder.add(gens, art, sources.folder_items(folder), media_root=folder, workers=0, progress=False)
    assert (more.summary.indexed, more.points) == (2, 8)
    # embedded add/delete copy the current generation: the one a reader holds never changes
    gone = builder.delete(gens, uris=["img002.png"], ids=[content_id((folder / "img004.png").read_bytes())])
    assert (gone.removed, gone.points) == (2, 6) and gens.current() == gone.generation != more.generation
    with gens.open_store(more.generation, builder.schema_for(art)) as store:
        assert store.count() == 8


def test_oversized_images_are_failures_not_errors(tmp_path, art, images):
    res = build(tmp_path, art, sources.folder_items(images), max_pixels=64 * 64 - 1)
    assert (res.summary.indexed, res.summary.failed, res.points) == (0, 13, 0)
    assert sum("over the limit" in line for line in open(res.failures)) == 12


def test_server_backend_build_add_delete_and_identical_results(tmp_path, art, images):
    """Server backend against QdrantClient(":memory:") (no Qdrant server binary here; same API)."""
    items = sources.folder_items(images)
    client = QdrantClient(":memory:")
    sg = ServerGenerations("col", client, tmp_path / "jobs")
    res = builder.build(sg, art, items, media_root=images, workers=0, progress=False)
    assert res.points == 12 and sg.current() == res.generation
    assert sg.read_meta(res.generation)["fingerprint"] == art.fingerprint
    local = build(tmp_path / "edge", art, items, media_root=images)
    q = art.encoder.encode_text(["a striped square"])[0]
    with open_index("col", client=client) as a, open_index("col", root=tmp_path / "edge") as b:
        for safety in ("off", "strict"):
            ra = search(a, art, q, query_modality="text", k=8, safety=safety)
            rb = search(b, art, q, query_modality="text", k=8, safety=safety)
            assert [h.id for h in ra.hits] == [h.id for h in rb.hits]
            assert [h.distance for h in ra.hits] == pytest.approx([h.distance for h in rb.hits], abs=1e-3)
            assert ra.query == rb.query
    assert local.points == 12
    gone = builder.delete(sg, uris=["sub/img000.png"], ids=[content_id((images / "img001.png").read_bytes())])
    assert gone.removed == 2 and gone.points == 10 and gone.generation == res.generation  # in place on a server


def test_shards_of_a_torchrun_job_are_disjoint_and_cover_the_input(images):
    items = sources.folder_items(images)
    parts = [sources.shard(items, r, 3) for r in range(3)]
    flat = [it.path for p in parts for it in p]
    assert sorted(flat) == sorted(it.path for it in items) and len(set(flat)) == len(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(InputError):
        sources.shard(items, 3, 3)


def test_visu_split_indexes_both_images_of_each_quadruplet_and_captions(tmp_path, art):
    from training.data import synthetic

    synthetic.generate(tmp_path / "visu", n=30, seed=0)  # 3 test quadruplets
    items = sources.collect(visu=tmp_path / "visu", split="test", captions_as_text=True)
    images = [it for it in items if it.kind == "image"]
    assert len(images) == 6 and [it.extra["label"] for it in images] == ["safe", "unsafe"] * 3
    assert all(it.tags and it.caption for it in images) and sum(it.kind == "text" for it in items) == 6
    res = build(tmp_path / "idx", art, items, media_root=tmp_path / "visu")
    assert (res.summary.indexed, res.summary.failed, res.points) == (12, 0, 12)
    with open_index("col", root=tmp_path / "idx") as idx:
        nsfw = idx.retrieve(content_id(images[1].path.read_bytes()))
        assert nsfw["uri"].startswith("nsfw/test/") and nsfw["payload"]["label"] == "unsafe"
        assert nsfw["payload"]["split"] == "test" and nsfw["tags"] == list(images[1].tags)
        # the source's label flags the unsafe half (images and their captions) whatever the model says
        points = {p.id: p.payload for p in idx.store.retrieve([content_id(it.path.read_bytes()) for it in images])}
        assert [points[content_id(it.path.read_bytes())]["unsafe"] for it in images[1::2]] == [True] * 3
        query = art.encoder.encode_text([images[1].caption])[0].detach()
        for target in ("image", "text"):
            hits = search(idx, art, query, query_modality="text", target=target, k=12, safety="filter").hits
            assert hits and all(h.payload.get("label") == "safe" for h in hits), target
    with pytest.raises(InputError, match="--split"):
        sources.collect(visu=tmp_path / "visu")


# ------------------------------------------------------------------ data roots
def all_payloads(root, name="col") -> list[dict]:
    with open_index(name, root=root) as idx:
        return [p.payload for p in idx.store.retrieve(list(idx.store.iter_ids()))]


def failures_of(res) -> dict[str, str]:
    return {f["item"]: f["error"] for f in map(json.loads, open(res.failures))}


def test_data_roots_confine_folders_manifests_and_links_to_real_paths(tmp_path, art):
    leaky = leaky_root(tmp_path)
    roots = DataRoots.of([leaky.root])
    # a folder: the symlinked file is listed, then refused when opened; so is a file swapped for a link after listing
    items = sources.folder_items(leaky.root / "imgs", roots)
    assert len(items) == 4
    swapped = leaky.root / "imgs" / "img002.png"
    swapped.unlink()
    swapped.symlink_to(leaky.secret)
    res = build(tmp_path / "idx", art, items, media_root=leaky.root, roots=roots, workers=2)
    assert (res.summary.indexed, res.summary.failed, res.points) == (2, 2, 2)
    failed = failures_of(res)
    assert set(failed) == {str(leaky.root / "imgs" / "leak.png"), str(swapped)}
    assert all("outside the data roots" in e for e in failed.values())
    assert sorted(p["uri"] for p in all_payloads(tmp_path / "idx")) == ["imgs/img001.png", "imgs/sub/img000.png"]

    # a manifest: absolute, ../ and symlinked rows (and their captions) are failures; a non-object row too
    items = sources.collect(manifest=leaky.manifest, captions_as_text=True, roots=roots)
    res = build(tmp_path / "idx", art, items, name="man", media_root=leaky.root, roots=roots)
    assert (res.summary.indexed, res.summary.failed) == (2, 7)  # the good image and its caption
    failed = failures_of(res)
    assert failed[f"{leaky.manifest}:5"] == "the row is a list, not an object; fix or remove that row"
    assert sum("outside the data roots" in e for e in failed.values()) == 6
    payloads = all_payloads(tmp_path / "idx", "man")
    assert not leaked(payloads, leaky) and {p["caption"] for p in payloads} == {"a kept image"}

    # files read while listing: a texts file or a manifest that links outside
    for kwargs in ({"texts": leaky.root / "texts.txt"}, {"manifest": leaky.root / "link.jsonl"},
                   {"images": leaky.outside}):
        with pytest.raises(OutsideRootsError, match="outside the data roots"):
            sources.collect(**kwargs, roots=roots)

    # without roots (an operator's own CLI run) everything named is read, as before
    res = build(tmp_path / "free", art, sources.collect(manifest=leaky.manifest), media_root=leaky.root)
    assert (res.summary.indexed, res.summary.skipped, res.summary.failed) == (2, 2, 1)


def test_data_roots_confine_a_visu_layout(tmp_path, art):
    from training.data import synthetic, visu

    root = tmp_path / "root"
    synthetic.generate(root / "visu", n=30, seed=0)  # 3 test quadruplets
    secret = write_images(tmp_path / "outside", 1, start=50)[0]
    first = visu.load_split(root / "visu", "test").records[0]
    first.nsfw_image.unlink()
    first.nsfw_image.symlink_to(secret)
    roots = DataRoots.of([root])
    split = visu.load_split(root / "visu", "test", roots=roots)
    assert len(split) == 2 and split.skipped == {"outside_data_roots": 1}
    items = sources.collect(visu=root / "visu", split="test", captions_as_text=True, roots=roots)
    res = build(tmp_path / "idx", art, items, media_root=root / "visu", roots=roots)
    assert (res.summary.indexed, res.summary.failed) == (8, 0)
    assert not any(p["uri"] and p["uri"].startswith("/") for p in all_payloads(tmp_path / "idx"))
    # a layout that names image roots or a text file outside the roots is refused as a whole
    for key, target in (("coco_root", str(tmp_path / "outside")), ("text_file", str(tmp_path / "outside" / "x.json"))):
        (root / "visu" / "visu.json").write_text(json.dumps({key: target}))
        with pytest.raises(OutsideRootsError, match="outside the data roots"):
            visu.load_split(root / "visu", "test", roots=roots)


def test_malformed_manifest_rows_are_counted_failures_with_their_line(tmp_path, art):
    folder = tmp_path / "m"
    write_images(folder, 2)
    rows = ['{"image": "img001.png", "tags": ["a", 1, null], "score": NaN}', '"just a string"', "null",
            '{"image": 7}', '{"image": null}', '{"image": "img002.png", "tags": {"a": 1}}',
            '{"image": "img002.png", "tags": [["nested"]]}', '{"image": "img002.png", "caption": {"x": 1}}',
            '{"image": "a\\u0000b.png"}']  # (a csv cell with a NUL byte is the same failure)
    jsonl = folder / "list.jsonl"
    jsonl.write_text("\n".join(rows) + "\n")
    items = sources.manifest_items(jsonl)
    assert [it.origin for it in items if it.error] == [f"{jsonl}:{n}" for n in range(2, 10)]
    assert items[0].tags == ("a", "1") and items[0].extra == {"score": None}  # NaN is not JSON: stored as null
    res = build(tmp_path / "idx", art, items, media_root=folder)
    assert (res.summary.indexed, res.summary.failed) == (1, 8)
    errors = list(failures_of(res).values())
    for words in ("a string, not an object", "null, not an object", "not a number", "no image", "not an object)",
                  "not a list", "caption must be text", "NUL byte"):
        assert sum(words in e for e in errors) == 1, (words, errors)
    # parquet: a non-string image column, a null image, tags that are a struct
    tables = {"int.parquet": [{"image": 5}],
              "null.parquet": [{"image": None, "tags": ["x"]}, {"image": "img001.png", "tags": ["x", None]}],
              "struct.parquet": [{"image": "img001.png", "tags": {"a": 1}}]}
    for name, table in tables.items():
        pq.write_table(pa.Table.from_pylist(table), folder / name)
    errors = {name: [it.error for it in sources.manifest_items(folder / name)] for name in tables}
    assert "not a number" in errors["int.parquet"][0] and "no image" in errors["null.parquet"][0]
    assert errors["null.parquet"][1] is None and "not an object" in errors["struct.parquet"][0]
    assert sources.manifest_items(folder / "null.parquet")[0].origin == f"{folder / 'null.parquet'}:1"
    # csv: a row with more fields than the header; a byte-order mark before the header is not part of "image"
    (folder / "bom.csv").write_bytes("\ufeffimage,caption\nimg001.png,x\nimg002.png,y,extra\n".encode())
    items = sources.manifest_items(folder / "bom.csv")
    assert items[0].error is None and "more fields than the header" in items[1].error
    # whole-file problems are one clear error
    (folder / "latin.csv").write_bytes("image,caption\nimg001.png,caf\xe9\n".encode("latin-1"))
    (folder / "bad.parquet").write_bytes(b"PAR1 not really")
    (folder / "huge.csv").write_text("image\n\"" + "x" * 200_000 + "\"\n")  # over csv's field size limit
    (folder / "lists.jsonl").write_text("[1]\n[2]\n")
    for name, message in (("latin.csv", "not UTF-8"), ("bad.parquet", "not a readable Parquet"),
                          ("huge.csv", "not valid CSV"), ("lists.jsonl", "no row that is an object")):
        with pytest.raises(DataError, match=message):
            sources.manifest_items(folder / name)
