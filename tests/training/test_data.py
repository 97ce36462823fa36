"""ViSU loader and synthetic generator: determinism, pairing, shared context, held-out phrasing, robustness."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
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


def _longest_in_tokens():
    """The tiny model's tokenizer, and a function picking the option that takes it the most tokens."""
    tok = build_tokenizer(resolve("tiny"))
    return tok, lambda options: max(options, key=lambda x: len(tok.encode(x)))


def _longest_object_and_scene(longest):
    """The longest main-object phrase (an unsafe phrase or a coloured counterpart) and the longest scene phrase."""
    obj = longest([ph for c in syn.CONCEPTS for ph in c.phrases]
                  + [syn.object_phrase(cp, col) for c in syn.CONCEPTS for cp in c.counterparts for col in (None, *PALETTE)])
    return obj, longest([s.phrase for s in syn.SCENES])


def test_longest_possible_caption_fits_the_tiny_context():
    tok, longest = _longest_in_tokens()
    obj, scene = _longest_object_and_scene(longest)
    slot_pairs = [sorted(slots) for _, slots in syn.LAYOUTS.values()]
    prop = longest([syn.object_phrase(p, col) for p in syn.PROPS for col in (None, *PALETTE)])
    others = longest([f"{prop} {a} and {prop} {b}" for a, b in slot_pairs])
    for t in syn.TRAIN_TEMPLATES + syn.HELDOUT_TEMPLATES:
        cap = syn.GENERATED_PREFIX + t.format(obj=obj, scene=scene, others=others)  # the longer, "generated" look
        assert len(tok.encode(cap)) + 2 <= resolve("tiny").context_length, cap


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


# ------------------------------------------------------------------------------ the benchmark options
#: sha256 of the JSON files (names and bytes, in name order) of ``generate(n=60, seed=3)`` as written before the
#: options existed; JPEG bytes are left out, as they may change with the Pillow build, not with this code.
DEFAULT_JSON_SHA256 = "4a3b282b5d33084b55af4adee93d6970c292be72966c8ef561f688fca698966e"


def json_digest(root: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in sorted(root.glob("*.json")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_synth_without_options_writes_what_it_always_wrote(data, tmp_path):
    root, _ = data
    assert json_digest(root) == DEFAULT_JSON_SHA256
    off = syn.generate(tmp_path / "off", n=60, seed=3, boost=(), boost_n=7, holdout_lookalikes=False, multi=0)
    assert off == json.loads((root / "dataset.json").read_text()) and tree(tmp_path / "off") == tree(root)
    assert not (root / "ViSU-Text_multi.json").exists() and "multi" not in off["splits"]


def test_synth_boost_appends_test_records_and_their_recaptions(data, tmp_path):
    root, base = data
    info = syn.generate(tmp_path / "b", n=60, seed=3, boost=["Stolen cash", "graffiti"], boost_n=5)
    before, after = tree(root), tree(tmp_path / "b")
    touched = ("dataset.json", "ViSU-Text_test.json", "ViSU-Text_heldout.json")
    assert all(after[k] == v for k, v in before.items() if k not in touched)  # every image and the other splits
    old = {s: json.loads(before[f"ViSU-Text_{s}.json"]) for s in ("test", "heldout")}
    new = {s: json.loads(after[f"ViSU-Text_{s}.json"]) for s in ("test", "heldout")}
    last = max(r["incremental_id"] for r in old["heldout"])
    for s in ("test", "heldout"):
        assert new[s][: len(old[s])] == old[s] and len(new[s]) == len(old[s]) + 10
    extra_test, extra_held = new["test"][len(old["test"]):], new["heldout"][len(old["heldout"]):]
    assert [r["incremental_id"] for r in extra_test + extra_held] == list(range(last + 1, last + 21))
    assert [r["tag"] for r in extra_test] == ["vandalism"] * 5 + ["theft"] * 5
    assert all("graffiti" in r["nsfw"] for r in extra_test[:5]) and all("stolen" in r["nsfw"] for r in extra_test[5:])
    assert [r["coco_id"] for r in extra_held] == [r["coco_id"] for r in extra_test]
    assert info["boost"] == {"concepts": ["graffiti", "stolen cash"], "n": 5, "note": info["boost"]["note"],
                             "ids": {"test": [last + 1, last + 10], "heldout": [last + 11, last + 20]}}
    assert info["splits"]["test"]["records"] == base["splits"]["test"]["records"] + 10
    assert info["splits"]["test"]["tags"]["vandalism"] == base["splits"]["test"]["tags"].get("vandalism", 0) + 5
    held, test = (load_split(tmp_path / "b", s).records for s in ("heldout", "test"))
    assert [h.nsfw_image.read_bytes() for h in held] == [t.nsfw_image.read_bytes() for t in test]
    with pytest.raises(InputError, match=r"unknown concept 'graffito'.*gun, knife"):
        syn.generate(tmp_path / "x", n=60, seed=3, boost=["graffito"])
    with pytest.raises(InputError, match="--boost-n"):
        syn.generate(tmp_path / "x", n=60, seed=3, boost=["graffiti"], boost_n=0)


def test_synth_boost_into_train_appends_train_records_only(data, tmp_path):
    root, base = data
    info = syn.generate(tmp_path / "t", n=60, seed=3, boost=["graffiti"], boost_n=6, boost_split="train")
    before, after = tree(root), tree(tmp_path / "t")
    assert all(after[k] == v for k, v in before.items() if k not in ("dataset.json", "ViSU-Text_train.json"))
    old, new = (json.loads(t["ViSU-Text_train.json"]) for t in (before, after))
    assert new[: len(old)] == old and [r["tag"] for r in new[len(old):]] == ["vandalism"] * 6
    assert info["boost"]["split"] == "train" and info["splits"]["train"]["records"] == base["splits"]["train"]["records"] + 6
    assert len(load_split(tmp_path / "t", "train").records) == len(new)  # their images are there
    with pytest.raises(InputError, match="--boost-split is test or train"):
        syn.generate(tmp_path / "x", n=60, seed=3, boost=["graffiti"], boost_split="validation")


def test_synth_heldout_counterparts_prefer_classes_other_concepts_still_draw():
    held = syn.heldout_counterparts()
    assert held["graffiti"] == "clock" and held["gun"] == "banana"  # shared with skull; no shared one: the last
    owners: dict[str, list[str]] = {}
    for c in syn.CONCEPTS:
        assert held[c.name] in c.counterparts
        for cp in c.counterparts:
            owners.setdefault(cp, []).append(c.name)
    kept = {x for name, x in held.items() if any(o != name and held[o] != x for o in owners[x])}
    # every shared class held out stays some other concept's drawable look-alike; the rest are unshared
    assert kept == {x for x in held.values() if len(owners[x]) > 1} == {"paintbrush", "rug", "puddle of water",
                                                                        "clock", "balloon", "book"}


def test_synth_holdout_lookalikes_keeps_them_out_of_their_concepts_train_records(tmp_path):
    from training.data.concepts import catalogue

    n, seed = 300, 2
    plain, held_plan = syn.plan(n, seed), syn.plan(n, seed, holdout_lookalikes=True)
    changed = 0
    for a, b in zip(plain, held_plan, strict=True):  # only train counterparts move
        assert replace(b, counterpart=a.counterpart, counterpart_colour=a.counterpart_colour) == a
        changed += a != b
        assert a == b or a.split == "train"
    assert changed > 0
    info = syn.generate(tmp_path / "h", n=n, seed=seed, holdout_lookalikes=True)
    held = syn.heldout_counterparts()
    assert {k: v["heldout_counterparts"] for k, v in info["concepts"].items()} == {k: [v] for k, v in held.items()}
    cat = catalogue(tmp_path / "h")
    shown: dict[str, set[str]] = {}
    for split in SPLITS:
        for r in load_split(tmp_path / "h", split).records:
            c = cat.concept_of(r)
            cp = c.counterpart_in(r.safe)
            assert cp is not None, r.safe
            if split == "train":
                assert cp != held[c.name], (c.name, r.safe)
            shown.setdefault(split, set()).add(cp)
    assert any(held[cat.concept_of(r).name] == cat.concept_of(r).counterpart_in(r.safe)
               for r in load_split(tmp_path / "h", "test").records), "test records still draw held-out look-alikes"
    report = info["holdout_lookalikes"]
    assert report["drawn_in_train"] == ["balloon", "book", "clock", "paintbrush", "puddle of water", "rug"]
    assert set(report["drawn_in_train"]) <= shown["train"]
    assert set(report["absent_from_train"]) == set(held.values()) - set(report["drawn_in_train"])
    assert not set(report["absent_from_train"]) & shown["train"]


def test_synth_multi_plan_pairs_every_concept_both_ways_without_boost():
    samples = [s for s in syn.plan(30, 3, multi=3) if s.split == syn.MULTI]
    assert len(samples) == len(syn.CONCEPTS) * 2 * 2  # ceil(3/2) as the main object, as many in the slot
    for i, c in enumerate(syn.CONCEPTS):
        block = samples[4 * i: 4 * i + 4]
        assert [s.concept for s in block[:2]] == [s.second.concept for s in block[2:]] == [c, c]
    assert all(s.concept != s.second.concept for s in samples)
    assert len({s.second.concept for s in samples}) > len(syn.CONCEPTS) // 2  # any other concept can be the partner
    assert samples == [s for s in syn.plan(30, 3, multi=3) if s.split == syn.MULTI]  # deterministic


def test_synth_multi_split_shows_two_concepts_in_the_main_box_and_a_slot(tmp_path):
    from training.data.roots import DataRoots
    from training.data.visu import MultiRecord, load_multi
    from training.errors import OutsideRootsError

    root = tmp_path / "m"
    (tmp_path / "all").mkdir()
    syn.generate(root, n=30, seed=3)
    with pytest.raises(DataError, match="--multi"):
        load_multi(root)
    boost = ("graffiti", "stolen cash")
    info = syn.generate(root, n=30, seed=3, boost=list(boost), boost_n=2, multi=3)
    records = load_multi(root)
    assert len(records) == info["splits"]["multi"]["records"] == 2 * 2 * 2 and info["multi"]["n"] == 3
    assert all(isinstance(r, MultiRecord) for r in records)
    samples = {s.incremental_id: s for s in syn.plan(30, 3, boost=boost, boost_n=2, multi=3)}
    held = [syn.template_pattern(t) for t in syn.HELDOUT_TEMPLATES]
    for focus in boost:
        assert sum(r.concepts[0] == focus for r in records) == sum(r.concepts[1] == focus for r in records) == 2
    for r in records:
        a_name, b_name = r.concepts
        assert a_name != b_name and (a_name in boost) != (b_name in boost), r.concepts  # forgotten beside retained
        assert all(ph in r.caption for ph in r.phrases) and any(p.match(r.caption) for p in held), r.caption
        assert any(p.match(r.safe_caption) for p in held) and not any(ph in r.safe_caption for ph in r.phrases)
        s = samples[r.incremental_id]
        assert (s.concept.name, s.second.concept.name) == r.concepts and r.caption.index(r.phrases[1]) > 0
        assert f"{r.phrases[1]} {s.second.slot}" in r.caption
        a, b = pixels(r.safe_image), pixels(r.image)
        assert a.shape == b.shape == (64, 64, 3) and r.image.parts[-3:] == ("multi", str(r.incremental_id), "0.jpg")
        main, slots = syn.LAYOUTS[s.layout]
        other = next(sl for sl in slots if sl != s.second.slot)
        diff = {name: np.abs(a[box] - b[box]).mean() for name, box in
                (("main", region(main, 0.04)), ("slot", region(slots[s.second.slot], 0.03)),
                 ("other", region(slots[other], 0.03)))}
        # the other slot shows the same prop (or nothing) in both halves: only JPEG blocks bleed into it
        assert diff["main"] > 5.0 and diff["slot"] > 5.0, (r.concepts, diff)
        assert diff["other"] < min(diff["main"], diff["slot"]) / 2, (r.concepts, diff)
    assert load_multi(root, roots=DataRoots.of([root])) == records
    with pytest.raises(OutsideRootsError):
        load_multi(root, roots=DataRoots.of([tmp_path / "all"]))
    quads = load_split(root, "multi")
    assert [q.tag for q in quads.records] == [samples[r.incremental_id].concept.tag for r in records]
    with pytest.raises(InputError, match="leave at least one concept"):
        syn.generate(tmp_path / "all", n=30, seed=3, boost=[c.name for c in syn.CONCEPTS], boost_n=1, multi=1)


def region(box: tuple[float, float, float, float], jitter: float, size: int = 64) -> tuple[slice, slice]:
    """The pixels inside ``box`` (fractions) whatever its jitter."""
    u0, v0, u1, v1 = box
    return (slice(int((v0 + jitter) * size) + 1, int((v1 - jitter) * size)),
            slice(int((u0 + jitter) * size) + 1, int((u1 - jitter) * size)))


def test_synth_multi_captions_name_both_concepts_within_the_tiny_context():
    tok, longest = _longest_in_tokens()
    obj, scene = _longest_object_and_scene(longest)
    slot = longest([sl for _, slots in syn.LAYOUTS.values() for sl in slots])
    for t in syn.HELDOUT_TEMPLATES:
        # the prop that may follow the second concept can lose its last words; the two concepts never do
        cap = syn.GENERATED_PREFIX + t.format(obj=obj, scene=scene, others=f"{obj} {slot}")
        assert len(tok.encode(cap)) + 2 <= resolve("tiny").context_length, cap


def test_cli_data_synth_benchmark_options(cli, tmp_path):
    out = tmp_path / "cli-bench"
    proc = cli("data", "synth", "--out", out, "--n", "30", "--seed", "2", "--image-size", "32", "--boost", "graffiti",
               "--boost-n", "3", "--holdout-lookalikes", "--multi", "2")
    summary = json.loads(proc.stdout)
    assert summary["boost"]["concepts"] == ["graffiti"] and summary["boost"]["n"] == 3
    assert summary["concepts"]["graffiti"]["heldout_counterparts"] == ["clock"]
    assert summary["splits"]["multi"]["records"] == 2 and (out / "ViSU-Text_multi.json").is_file()
    for args, message in ((["--boost", "graffito"], "unknown concept 'graffito'"),
                          (["--boost-n", "3"], "--boost CONCEPTS")):
        bad = cli("data", "synth", "--out", tmp_path / "bad", "--n", "30", *args, check=False)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


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
