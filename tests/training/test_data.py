"""ViSU loader and synthetic generator: determinism, pairing, shared context, held-out phrasing, robustness."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.architectures import build_tokenizer, build_transform, resolve
from training.data import synthetic as syn
from training.data.glyphs import GLYPHS, PALETTE
from training.data.visu import SKIP_REASONS, QuadDataset, Quadruplet, VisuSplit, load_split
from training.errors import DataError, InputError

SPLITS = ("train", "validation", "test", "heldout")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "visu"
    return root, syn.generate(root, n=60, seed=3)


@pytest.fixture(scope="module")
def splits(data) -> dict[str, VisuSplit]:
    return {s: load_split(data[0], s) for s in SPLITS}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def jpeg(path: Path, colour=(120, 120, 120), size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG")


# ------------------------------------------------------------------------------ the generator
def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = syn.generate(tmp_path / "a", n=24, seed=11)
    b = syn.generate(tmp_path / "b", n=24, seed=11)
    c = syn.generate(tmp_path / "c", n=24, seed=12)
    ta, tb, tc = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b and ta == tb
    assert a["seed"] != c["seed"]
    assert ta["ViSU-Text_train.json"] != tc["ViSU-Text_train.json"]
    shared = set(ta) & set(tc)
    assert sum(ta[k] != tc[k] for k in shared if k.endswith(".jpg")) > len(shared) // 2


def test_summary_is_written_and_counts_match_the_files(data, splits):
    root, summary = data
    assert json.loads((root / "dataset.json").read_text()) == summary
    assert summary["seed"] == 3 and summary["version"] == syn.VERSION and summary["synthetic"] is True
    sizes = {s: summary["splits"][s]["records"] for s in SPLITS}
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 60
    assert sizes["heldout"] == sizes["test"] and sizes["validation"] >= 1 and sizes["train"] >= 0.75 * 60
    for s in SPLITS:
        assert len(splits[s]) == sizes[s] and splits[s].skipped == {}
        assert splits[s].tags() == summary["splits"][s]["tags"]


def test_concepts_cover_visu_tags_with_several_safe_counterparts():
    assert len(syn.CONCEPTS) >= 12
    assert {c.tag for c in syn.CONCEPTS} <= set(syn.VISU_TAGS)
    assert len({c.tag for c in syn.CONCEPTS}) >= 12
    for c in syn.CONCEPTS:
        assert c.name in GLYPHS and len(set(c.counterparts)) >= 2, c
        assert all(cp in GLYPHS for cp in c.counterparts), c
        assert all(c.keyword in ph for ph in c.phrases), c
        # A safe caption must never name the concept it replaces.
        assert not any(c.keyword in syn.object_phrase(cp, col) for cp in c.counterparts for col in (None, *PALETTE))


def test_loader_reads_every_split_with_correct_pairing(splits):
    ids = [r.incremental_id for s in SPLITS for r in splits[s].records]
    assert len(ids) == len(set(ids)), "incremental ids must be unique across splits"
    keywords = {}
    for c in syn.CONCEPTS:
        keywords.setdefault(c.tag, []).append(c.keyword)
    all_keywords = [c.keyword for c in syn.CONCEPTS]
    for s in SPLITS:
        for r in splits[s].records:
            assert isinstance(r, Quadruplet) and r.safe_image.is_file() and r.nsfw_image.is_file()
            assert r.safe_image.name == f"{r.coco_id:012d}.jpg"
            assert r.nsfw_image.parts[-3:] == (s, str(r.incremental_id), "0.jpg")
            assert r.tag in syn.VISU_TAGS
            assert any(k in r.nsfw for k in keywords[r.tag]), (r.tag, r.nsfw)
            assert not any(k in r.safe for k in all_keywords), r.safe
            with Image.open(r.safe_image) as a, Image.open(r.nsfw_image) as b:
                assert a.size == b.size == (64, 64) and a.format == b.format == "JPEG"


def test_every_concept_appears_in_train(splits):
    tags = {r.tag for r in splits["train"].records}
    assert tags == {c.tag for c in syn.CONCEPTS}


def _masked(caption: str, phrases: list[str]) -> str | None:
    for ph in sorted(phrases, key=len, reverse=True):
        if ph in caption:
            return caption.replace(ph, "<OBJ>", 1)
    return None


def test_safe_and_unsafe_captions_share_everything_but_the_object(splits):
    for s in SPLITS:
        for r in splits[s].records:
            candidates = [c for c in syn.CONCEPTS if c.tag == r.tag]
            unsafe = [ph for c in candidates for ph in c.phrases]
            safe = [syn.object_phrase(cp, col) for c in candidates for cp in c.counterparts for col in (None, *PALETTE)]
            a, b = _masked(r.safe, safe), _masked(r.nsfw, unsafe)
            assert a is not None and a == b, (r.safe, r.nsfw)
            assert any(sc.phrase in r.safe for sc in syn.SCENES), r.safe


def test_safe_and_unsafe_images_share_the_scene_and_differ_in_the_object(splits):
    for r in splits["train"].records:
        a, b = pixels(r.safe_image), pixels(r.nsfw_image)
        # Rows above every layout's main-object box (it starts at 26% height) are the same scene.
        assert np.abs(a[:12] - b[:12]).mean() < 1.0, r.incremental_id
        # The main object's region differs visibly (thin objects such as bats change the least: ~7 at worst).
        assert np.abs(a[20:50, 4:60] - b[20:50, 4:60]).mean() > 5.0, (r.incremental_id, r.tag)


def test_heldout_recaptions_test_scenes_with_unseen_templates(splits):
    held = [syn.template_pattern(t) for t in syn.HELDOUT_TEMPLATES]
    seen = [syn.template_pattern(t) for t in syn.TRAIN_TEMPLATES]
    for s in ("train", "validation", "test"):
        for r in splits[s].records:
            for cap in (r.safe, r.nsfw):
                assert not any(p.match(cap) for p in held), cap
                assert any(p.match(cap) for p in seen), cap
    heldout, test = splits["heldout"].records, splits["test"].records
    for h, t in zip(heldout, test, strict=True):
        assert any(p.match(h.safe) for p in held) and any(p.match(h.nsfw) for p in held), h.safe
        assert h.coco_id == t.coco_id and h.tag == t.tag and h.incremental_id != t.incremental_id
        assert h.safe_image == t.safe_image and h.nsfw_image.read_bytes() == t.nsfw_image.read_bytes()
    # The fixed words of every held-out template are absent from all training captions.
    train_text = " ".join(r.safe + " " + r.nsfw for r in splits["train"].records)
    for t in syn.HELDOUT_TEMPLATES:
        words = max((w.strip(" ,;") for w in re.split(r"\{\w+\}", t)), key=len)
        assert words and words not in train_text, words


def test_longest_possible_caption_fits_the_tiny_context():
    arch = resolve("tiny")
    tok = build_tokenizer(arch)

    def longest(options):
        return max(options, key=lambda x: len(tok.encode(x)))

    obj = longest([ph for c in syn.CONCEPTS for ph in c.phrases]
                  + [syn.object_phrase(cp, col) for c in syn.CONCEPTS for cp in c.counterparts for col in (None, *PALETTE)])
    scene = longest([s.phrase for s in syn.SCENES])
    slot_pairs = [sorted(slots) for _, slots in syn.LAYOUTS.values()]
    prop = longest([syn.object_phrase(p, col) for p in syn.PROPS for col in (None, *PALETTE)])
    others = longest([f"{prop} {a} and {prop} {b}" for a, b in slot_pairs])
    for t in syn.TRAIN_TEMPLATES + syn.HELDOUT_TEMPLATES:
        cap = syn.GENERATED_PREFIX + t.format(obj=obj, scene=scene, others=others)  # the longer, "generated" look
        assert len(tok.encode(cap)) + 2 <= arch.context_length, cap


def test_generated_look_changes_only_the_unsafe_half_globally_and_deterministically(tmp_path):
    plain = syn.generate(tmp_path / "plain", n=30, seed=3)
    looks = [syn.generate(tmp_path / f"gen{i}", n=30, seed=3, unsafe_look="generated") for i in range(2)]
    assert plain["unsafe_look"] == "plain" and looks[0]["unsafe_look"] == "generated"
    assert tree(tmp_path / "gen0") == tree(tmp_path / "gen1")  # same seed, same bytes
    a, b = (load_split(tmp_path / d, "train").records for d in ("plain", "gen0"))
    for r, g in zip(a, b, strict=True):
        assert g.safe == r.safe and g.nsfw == syn.GENERATED_PREFIX + r.nsfw
        assert g.safe_image.read_bytes() == r.safe_image.read_bytes()
        # the whole unsafe image changes, the sky above the object too (which plain leaves as the safe one's)
        assert np.abs(pixels(g.nsfw_image)[:12] - pixels(r.nsfw_image)[:12]).mean() > 5.0, r.incremental_id
    with pytest.raises(InputError, match="unsafe look"):
        syn.generate(tmp_path / "bad", n=30, seed=3, unsafe_look="shiny")


def test_generated_half_look_words_only_the_odd_unsafe_captions(tmp_path):
    syn.generate(tmp_path / "gen", n=30, seed=3, unsafe_look="generated")
    syn.generate(tmp_path / "half", n=30, seed=3, unsafe_look="generated-half")
    gen, half = (load_split(tmp_path / d, "train").records for d in ("gen", "half"))
    worded = [h.nsfw.startswith(syn.GENERATED_PREFIX) for h in half]
    assert worded == [h.incremental_id % 2 == 1 for h in half] and 0 < sum(worded) < len(worded)
    for g, h, w in zip(gen, half, worded, strict=True):
        assert h.safe == g.safe and h.nsfw == (g.nsfw if w else g.nsfw.removeprefix(syn.GENERATED_PREFIX))
        assert h.nsfw_image.read_bytes() == g.nsfw_image.read_bytes()  # the image look is the same


def test_generate_refuses_bad_arguments_and_foreign_directories(tmp_path):
    with pytest.raises(InputError, match="--n must be at least"):
        syn.generate(tmp_path / "x", n=2, seed=0)
    with pytest.raises(InputError, match="--image-size"):
        syn.generate(tmp_path / "x", n=10, seed=0, image_size=8)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        syn.generate(foreign, n=10, seed=0)
    assert (foreign / "notes.txt").read_text() == "mine"
    # A previous synthetic dataset is replaced whole, without leftovers or temp dirs.
    out = tmp_path / "again"
    syn.generate(out, n=30, seed=0, image_size=32)
    syn.generate(out, n=10, seed=0, image_size=32)
    assert len(list((out / "nsfw" / "train").iterdir())) == syn.split_sizes(10)["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "foreign"]
    with Image.open(next((out / "coco" / "train2017").iterdir())) as im:
        assert im.size == (32, 32)


# ------------------------------------------------------------------------------ the real ViSU layout
def visu_fixture(root: Path) -> dict:
    """A real-ViSU-style root: dict keyed by id under {"info", "data"}, COCO elsewhere, NSFW images by split."""
    coco = root.parent / "coco2017"
    jpeg(coco / "val2017" / f"{1:012d}.jpg")
    jpeg(coco / "train2017" / f"{4:012d}.jpg")
    jpeg(coco / "val2017" / f"{4:012d}.jpg", colour=(0, 0, 0))  # train2017 is searched first
    for iid in (10, 12, 14, 16):
        jpeg(root / "generated" / "test" / "x" / str(iid) / "0.jpg", colour=(200, 0, 0))
    records = {
        "10": {"coco_id": 1, "safe": " A dog on a sofa. ", "nsfw": "A dog bleeding on a sofa.", "tag": "blood"},
        "11": {"incremental_id": 11, "coco_id": 3, "safe": "A man.", "nsfw": "A man with a gun.", "tag": "weapons"},
        "12": {"coco_id": 1, "safe": "A cat.", "nsfw": "", "tag": "violence"},  # like ViSU's id 109551
        "13": {"coco_id": 1, "safe": "A car.", "nsfw": "A burning car.", "tag": "vandalism"},  # no NSFW image
        "14": {"safe": "No coco id.", "nsfw": "x", "tag": "hate"},
        "16": {"coco_id": 4, "safe": "A bus.", "nsfw": "A bus on fire.", "tag": "violence"},
    }
    (root / "ViSU-Text_test.json").write_text(json.dumps({"info": {"version": "1.0"}, "data": records}))
    (root / "visu.json").write_text(json.dumps({
        "description": "a test layout", "coco_root": str(coco), "nsfw_root": "generated",
        "nsfw_layout": "{split}/x/{incremental_id}/0.jpg",
    }))
    return records


def test_real_layout_skips_and_counts_bad_records(tmp_path):
    root = tmp_path / "visu"
    records = visu_fixture(root)
    sp = load_split(root, "test")
    assert [r.incremental_id for r in sp.records] == [10, 16]
    assert sp.skipped == {"malformed": 1, "empty_nsfw_caption": 1, "missing_safe_image": 1, "missing_nsfw_image": 1}
    assert set(sp.skipped) <= set(SKIP_REASONS) and len(sp) + sum(sp.skipped.values()) == len(records)
    first, bus = sp.records
    assert first.safe == "A dog on a sofa." and first.tag == "blood" and first.safe_image.parent.name == "val2017"
    assert bus.safe_image.parent.name == "train2017"
    assert first.nsfw_image == root / "generated" / "test" / "x" / "10" / "0.jpg"


def test_explicit_arguments_override_visu_json(tmp_path):
    root = tmp_path / "visu"
    visu_fixture(root)
    flat = tmp_path / "flat"
    jpeg(flat / "test-13.jpg")
    sp = load_split(root, "test", nsfw_root=flat, nsfw_layout="{split}-{incremental_id}.jpg")
    assert [r.incremental_id for r in sp.records] == [13]
    assert sp.skipped["missing_nsfw_image"] == 2


def test_a_split_with_no_usable_record_names_the_split_and_the_counts(tmp_path):
    root = tmp_path / "visu"
    visu_fixture(root)
    with pytest.raises(DataError, match=r"split 'test'.*6 read.*missing_nsfw_image=3"):
        load_split(root, "test", nsfw_layout="{split}/{tag}.jpg")
    (root / "ViSU-Text_validation.json").write_text("[]")
    with pytest.raises(DataError, match=r"split 'validation'.*0 read"):
        load_split(root, "validation")


def test_missing_pieces_say_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="data synth"):
        load_split(tmp_path / "nowhere", "train")
    root = tmp_path / "visu"
    visu_fixture(root)
    with pytest.raises(DataError, match=r"split 'train'.*found: ViSU-Text_test.json.*pass text_file"):
        load_split(root, "train")
    with pytest.raises(DataError, match="nsfw_root"):
        load_split(root, "test", nsfw_root=tmp_path / "not-generated")
    with pytest.raises(DataError, match="coco_root"):
        load_split(root, "test", coco_root="missing-coco")
    with pytest.raises(DataError, match=r"may use only"):
        load_split(root, "test", nsfw_layout="{split}/{seed}.jpg")
    (root / "ViSU-Text_validation.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split(root, "validation")
    (root / "visu.json").write_text(json.dumps({"coco_rot": "x"}))
    with pytest.raises(DataError, match="unknown keys coco_rot"):
        load_split(root, "test")


# ------------------------------------------------------------------------------ the torch dataset
def test_quad_dataset_returns_transformed_pairs_and_collates(splits):
    transform = build_transform(resolve("tiny"))
    records = splits["validation"].records
    ds = QuadDataset(splits["validation"], transform)
    assert len(ds) == len(records)
    item = ds[0]
    assert set(item) == {"safe_image", "nsfw_image", "safe", "nsfw", "tag", "index", "requested"}
    assert item["safe_image"].shape == item["nsfw_image"].shape == (3, 64, 64)
    assert item["safe_image"].dtype == torch.float32 and not torch.equal(item["safe_image"], item["nsfw_image"])
    assert (item["safe"], item["nsfw"], item["tag"], item["index"]) == (records[0].safe, records[0].nsfw, records[0].tag, 0)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["safe_image"].shape == (3, 3, 64, 64) and batch["index"].tolist() == [0, 1, 2]
    assert batch["nsfw"] == [r.nsfw for r in records[:3]]


def test_quad_dataset_survives_unreadable_images(tmp_path):
    root = tmp_path / "visu"
    syn.generate(root, n=12, seed=1, image_size=32)
    sp = load_split(root, "train")
    sp.records[1].nsfw_image.write_bytes(b"not an image")
    sp.records[2].safe_image.write_bytes(sp.records[2].safe_image.read_bytes()[:200])  # truncated JPEG
    ds = QuadDataset(sp.records, build_transform(resolve("tiny")))
    assert ds[0]["index"] == 0
    item = ds[1]
    assert item["index"] == 3 and item["nsfw"] == sp.records[3].nsfw, "the next readable record replaces a bad one"
    assert item["requested"] == 1 and ds.failed == {1, 2}
    assert ds[2]["requested"] == 2 and ds[2]["index"] == 3  # already known bad: skipped without a retry
    assert ds[-1]["index"] == len(sp) - 1
    with pytest.raises(IndexError):
        ds[len(sp)]
    for r in sp.records:
        r.safe_image.write_bytes(b"")
    with pytest.raises(DataError, match="unreadable images"):
        QuadDataset(sp.records, build_transform(resolve("tiny")))[0]


def test_data_roots_refuse_images_outside_them_when_listed_and_when_opened(tmp_path):
    import os

    from training.data.loader import load_splits
    from training.data.roots import DataRoots
    from training.errors import OutsideRootsError

    root, outside = tmp_path / "root", tmp_path / "outside"
    syn.generate(root / "visu", n=12, seed=1, image_size=32)
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(load_split(root / "visu", "train").records[0].safe_image.read_bytes())
    roots = DataRoots.of([root])
    records = load_split(root / "visu", "train", roots=roots).records
    # listed inside, then swapped for a link outside: refused when opened, the next record stands in
    records[0].safe_image.unlink()
    records[0].safe_image.symlink_to(secret)
    ds = QuadDataset(records, build_transform(resolve("tiny")), roots=roots)
    assert ds[0]["index"] == 1 and ds.failed == {0}
    assert QuadDataset(records, build_transform(resolve("tiny")))[0]["index"] == 0  # no roots: read as before
    # a link made before listing is skipped while listing, and counted
    splits = load_splits(root / "visu", lambda _: None, roots)
    assert splits["train"].skipped == {"outside_data_roots": 1} and len(splits["train"]) == len(records) - 1
    with pytest.raises(OutsideRootsError):
        roots.read(secret)
    # a FIFO (or any non-regular file) is refused at once, not waited on
    os.mkfifo(root / "fifo.jpg")
    with pytest.raises(OSError, match="not a regular file"):
        roots.read(root / "fifo.jpg")
    with pytest.raises(InputError, match="not a directory"):
        DataRoots.of([tmp_path / "nope"])


# ------------------------------------------------------------------------------ the command
def test_cli_data_synth_writes_a_dataset_the_loader_reads(cli, tmp_path):
    out = tmp_path / "cli-data"
    proc = cli("data", "synth", "--out", out, "--n", "20", "--seed", "4", "--image-size", "48")
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "dataset.json").read_text()) and summary["image_size"] == 48
    for s in SPLITS:
        sp = load_split(out, s)
        assert len(sp) == summary["splits"][s]["records"]
    with Image.open(sp.records[0].nsfw_image) as im:
        assert im.size == (48, 48)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    bad = cli("data", "synth", "--out", tmp_path / "other", "--n", "20", check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_jpeg_options_keep_full_chroma():
    # 4:4:4 keeps thin coloured details (blood drops, bruises) that 4:2:0 would smear at 64 px.
    im = Image.new("RGB", (16, 16), (200, 0, 0))
    from PIL import JpegImagePlugin

    with Image.open(io.BytesIO(syn.jpeg_bytes(im))) as decoded:
        assert JpegImagePlugin.get_sampling(decoded) == 0
