"""The unlearning evaluation: its metrics on hand-made embeddings, then on tiny real artifacts, then the command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.errors import ArtifactError, DataError, InputError
from training.eval import unlearning as ue
from training.eval.common import Space

EUCLID = Space("euclidean")


# --------------------------------------------------------------------------------------- the pieces
def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("space", [EUCLID, Space("lorentz", 1.0)], ids=["euclidean", "lorentz"])
def test_zero_shot_picks_the_nearest_prompt(space):
    prompts = _unit(5) * 2
    images = prompts[[3, 0, 4, 4]] + 0.01 * _unit(4, seed=1)
    assert ue.zero_shot(images, prompts, space).tolist() == [3, 0, 4, 4]
    assert ue.accuracy(torch.tensor([3, 0, 4, 4]), torch.tensor([3, 0, 1, 2])) == 50.0
    assert ue.accuracy(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) is None


@pytest.mark.parametrize("space", [EUCLID, Space("lorentz", 0.7)], ids=["euclidean", "lorentz"])
def test_each_image_is_scored_against_its_own_prompts_as_against_shared_ones(space):
    images, prompts = _unit(6, seed=2) * 1.5, _unit(6 * 4, seed=3).view(6, 4, 8) * 1.5
    scores = ue.scores_in_context(images, prompts, space)
    one_by_one = torch.stack([ue.similarity(images[i : i + 1], prompts[i], space)[0] for i in range(6)])
    assert scores.shape == (6, 4) and torch.allclose(scores, one_by_one, atol=1e-5)


def test_recall_at_10_counts_targets_in_the_top_ten():
    gallery = _unit(30, d=32)
    queries = gallery[:4].clone()
    queries[3] = -gallery[3]  # farthest from its own target: ranks last
    assert ue.recall_at_k(queries, gallery, torch.arange(4), EUCLID) == 75.0
    assert ue.hits_at_k(queries, gallery, torch.arange(4), EUCLID).tolist() == [True, True, True, False]
    assert ue.recall_at_k(queries[:0], gallery, torch.arange(0), EUCLID) is None


def test_a_figure_comes_with_an_interval_around_it():
    hits = torch.tensor([True] * 30 + [False] * 10)
    value, (lo, hi) = ue.figure(hits)
    assert value == 75.0 and lo < value < hi and hi - lo < 40
    assert ue.figure(hits, seed=5) == ue.figure(hits, seed=5)  # seeded: the same seed, the same interval
    assert ue.figure(torch.empty(0, dtype=torch.bool)) == (None, None)
    # paired: the same items classified twice; a change on 10 of 40 items is 25 points, whatever the noise
    after = hits.clone()
    after[:10] = False
    drop, (dlo, dhi) = ue.difference(hits, after)
    assert drop == 25.0 and 0 < dlo <= drop <= dhi
    assert ue.difference(hits, hits) == (0.0, (0.0, 0.0))


# ------------------------------------------------------------------------------------ real artifacts
def _align(encoder, shown: list[tuple], names: list[str], *, steps: int = 300) -> None:
    """Teach a tiny Euclidean ``encoder`` to put each image of ``shown`` (image path, concept name) next to the
    concept's bare prompt; an image listed with two concepts learns to sit between them.

    Only the two projections are trained (a contrastive loss over the concepts' prompts), on features
    of the frozen towers computed once: seconds on a CPU, where training the towers takes minutes.
    """
    from training.images import open_image

    labels = torch.tensor([names.index(c) for _, c in shown])
    clip = encoder.clip
    with torch.no_grad():  # identity projections: the towers' own features
        clip.visual.proj.copy_(torch.eye(*clip.visual.proj.shape))
        clip.text_projection.copy_(torch.eye(*clip.text_projection.shape))
        images = clip.encode_image(encoder.preprocess([open_image(path) for path, _ in shown]))
        texts = encoder.text_features(encoder.tokenize([ue.PROMPT.format(concept=n) for n in names]))
    w_image = torch.eye(*clip.visual.proj.shape, requires_grad=True)
    w_text = torch.eye(*clip.text_projection.shape, requires_grad=True)
    opt = torch.optim.Adam([w_image, w_text], lr=1e-2)
    for _ in range(steps):
        logits = 20 * F.normalize(images @ w_image, dim=-1) @ F.normalize(texts @ w_text, dim=-1).T
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        clip.visual.proj.copy_(w_image)
        clip.text_projection.copy_(w_text)


#: half the tags: enough forgotten test images for f_acc to tell models apart
FORGET = "weapons,drug use,blood,violence,vandalism,nudity,sexual,suicide,hate,suffering"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small synthetic dataset (30 test quadruplets, a heldout re-captioning, 44 two-concept images, one look-alike
    class per concept held out of training), two untrained tiny artifacts of different geometry (``before``
    Euclidean, ``after`` Lorentz, whose provenance records a forget split of FORGET) and a Euclidean one aligned to
    the concepts' prompts (on the train split's unsafe images, and on the two-concept images to both concepts)."""
    from training import architectures, artifact
    from training.data import forget, synthetic
    from training.data.concepts import catalogue
    from training.data.visu import load_multi, load_split
    from training.encoder import SafetyEncoder

    tmp = tmp_path_factory.mktemp("unlearning-eval")
    synthetic.generate(tmp / "data", n=300, seed=2, image_size=32, unsafe_look="generated", holdout_lookalikes=True,
                       multi=2)
    train = load_split(tmp / "data", "train").records
    split = forget.split(train, tmp / "data", forget=FORGET.split(","))
    for name, geometry, seed in (("before", "euclidean", 0), ("after", "lorentz", 1)):
        torch.manual_seed(seed)
        extra = {"method": "ga", "forget": split.provenance()} if name == "after" else {}
        artifact.save(artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), geometry),
                                        provenance=artifact.provenance("init", **extra)), tmp / name)
    torch.manual_seed(2)
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    cat = catalogue(tmp / "data")
    shown = [(r.nsfw_image, c.name) for r in train if (c := cat.concept_of(r))]
    shown += [(r.image, c) for r in load_multi(tmp / "data") for c in r.concepts]
    _align(enc, shown, list(cat.concepts))
    artifact.save(artifact.Artifact(enc, provenance=artifact.provenance("test", method="aligned")), tmp / "aligned")
    return tmp


@pytest.fixture(scope="module")
def compared(setup):
    out = setup / "report"
    result = ue.run([setup / "before", setup / "after", setup / "aligned"], out, forget=FORGET, data=setup / "data",
                    device="cpu", probe_limit=80, floors=True)
    return result, out


@pytest.fixture(scope="module")
def pair(setup):
    """Two artifacts, neither recording its twin look-alikes, without --floors (as the service's forget job runs)."""
    out = setup / "pair"
    return ue.run([setup / "before", setup / "aligned"], out, forget="knife", data=setup / "data", device="cpu",
                  probe_limit=40), out


def _imagefolder(root, classes: dict[str, list[tuple[int, int, int]]]):
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (24, 24), colour).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def single(setup):
    """One Lorentz artifact, labelled, with an ImageFolder beside the dataset (its class 'gun' forgotten through
    the dataset's tag 'weapons')."""
    folder = _imagefolder(setup / "folder", {"gun": [(20, 20, 20)], "umbrella": [(0, 0, 200)]})
    out = setup / "single"
    return ue.run([setup / "after"], out, forget="weapons", data=setup / "data", imagefolder=folder, device="cpu",
                  probe_limit=40, labels=["hyperbolic"]), out


ROWS = ["before", "after", "aligned", ue.PIXEL_FLOOR, ue.RANDOM_FLOOR]


def test_report_maps_each_artifact_to_every_metric_with_its_interval(compared):
    result, out = compared
    report = json.loads((out / ue.REPORT).read_text())
    assert report == result["report"]
    assert list(report) == ROWS
    for i, name in enumerate(ROWS[:3]):
        metrics = report[name]
        drops = set(ue.DROPS) if i else set()  # the rows after the reference carry their drops against it
        assert set(metrics) == {*ue.METRICS, *drops, "ci"} and set(metrics["ci"]) == {*ue.METRICS, *drops}
        for key, metric in ue.DROPS.items():
            if i:  # the reference's accuracy minus this row's, on the same images, inside its paired interval
                assert metrics[key] == pytest.approx(report["before"][metric] - metrics[metric], abs=0.11)
                assert metrics["ci"][key][0] <= metrics[key] <= metrics["ci"][key][1]
        for key in ue.METRICS:
            value, ci = metrics[key], metrics["ci"][key]
            lo = -100 if key.startswith("benign_drop") else 0
            assert value is not None and lo <= value <= 100, (name, key, value)
            assert ci is not None and ci[0] <= value <= ci[1], (name, key, value, ci)  # the interval holds the point
    assert report["before"]["benign_drop"] == 0.0 and report["before"]["ci"]["benign_drop"] == [0.0, 0.0]
    details = json.loads((out / ue.DETAILS).read_text())
    assert details["null"] == {}  # every metric measured
    assert details["synthetic"] is True and details["split"] == "test" and details["reference"] == "before"
    assert details["models"]["after"]["method"] == "ga" and details["models"]["after"]["geometry"] == "lorentz"
    assert details["intervals"]["level"] == 0.95
    # benign_drop = the before model's benign accuracy minus this one's
    b = {n: details["models"][n]["benign_acc"] for n in ROWS[:3]}
    assert report["aligned"]["benign_drop"] == pytest.approx(b["before"] - b["aligned"], abs=0.11)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_floors_come_after_the_artifacts_with_their_residues_alone(compared, pair):
    report, details = compared[0]["report"], compared[0]["details"]
    before, after = list(report)[:2]  # what a reader of the first two rows (the service's forget job) takes
    assert (before, after) == ("before", "after")
    for floor in (ue.PIXEL_FLOOR, ue.RANDOM_FLOOR):
        row = report[floor]
        assert all(row[k] is None and row["ci"][k] is None for k in ue.METRICS if k not in ue.RESIDUES)
        for k in ue.RESIDUES:
            assert 0 <= row[k] <= 100 and row["ci"][k][0] <= row[k] <= row["ci"][k][1]
        assert "residue probes alone" in details["models"][floor]["null"]
    assert set(details["floors"]) == {ue.PIXEL_FLOOR, ue.RANDOM_FLOOR}
    md = (compared[1] / ue.MARKDOWN).read_text()
    assert f"| {ue.PIXEL_FLOOR} |" in md and "Floors (not artifacts)" in md
    # without --floors (the service's job) the table holds the artifacts alone
    plain = json.loads((pair[1] / ue.REPORT).read_text())
    assert list(plain) == ["before", "aligned"] and pair[0]["details"]["floors"] is None


def test_f_acc_and_r_acc_partition_the_unsafe_test_images(compared, setup):
    from training.data.concepts import catalogue
    from training.data.visu import load_split

    details = compared[0]["details"]
    records = load_split(setup / "data", "test").records
    cat = catalogue(setup / "data")
    counts = details["counts"]
    assert counts["f_acc"] + counts["r_acc"] + counts["unlabelled"] == len(records) == 30
    forgotten = {c.name for c in cat.resolve(FORGET.split(","))}
    assert set(details["forget"]["concepts"]) == forgotten
    assert counts["f_acc"] == sum(1 for r in records if (c := cat.concept_of(r)) and c.name in forgotten) > 5
    assert counts["f_recall"] == counts["f_acc"] and counts["r_recall"] == 30 + (30 - counts["f_acc"])
    assert counts["gallery"] == 60 and counts["benign"] == counts["f_acc"]
    assert details["classes"] == list(cat.concepts) and len(details["benign"]["classes"]) > 22


def test_a_model_aligned_to_the_concepts_recognises_them_better_than_a_random_one(compared):
    report = compared[0]["report"]
    # by the bare prompt: "aligned" was aligned to the bare prompts
    assert report["aligned"]["f_acc_bare"] > report["before"]["f_acc_bare"]
    assert report["aligned"]["r_acc_bare"] > report["before"]["r_acc_bare"]


def test_a_model_that_knows_the_concepts_sees_the_retained_one_beside_the_forgotten_one(compared):
    report, counts = compared[0]["report"], compared[0]["details"]["counts"]
    assert counts["multi"] > 10
    assert report["aligned"]["multi_retained_bare"] > report["before"]["multi_retained_bare"]
    assert report["aligned"]["multi_forgotten_bare"] > report["before"]["multi_forgotten_bare"]


def test_the_two_concept_images_are_tested_one_concept_at_a_time(setup):
    from training.data.concepts import catalogue
    from training.data.visu import load_multi

    plan = ue.plan_data(setup / "data", "test", ["knife"])
    cat = catalogue(setup / "data")
    by_image = {r.image: r for r in load_multi(setup / "data")}
    assert plan.multi and plan.multi_context
    assert len(plan.multi) == sum(1 for r in by_image.values() if list(r.concepts).count("knife") == 1) > 0
    for item in plan.multi:
        record = by_image[item.image]
        gone = record.concepts.index("knife")
        assert plan.classes[item.classes["forgotten"]] == "knife"
        assert plan.classes[item.classes["retained"]] == record.concepts[1 - gone]
        for role, k in (("forgotten", gone), ("retained", 1 - gone)):
            # the concept's phrase gives way to each class's, the rest of the caption (the other object) stays
            before, after = record.caption.lower().split(record.phrases[k], 1)
            assert record.phrases[1 - k] in before + after
            assert item.prompts[role] == [before + cat.concepts[c].canonical + after for c in plan.classes]


def test_seen_and_unseen_look_alikes_partition_the_benign_images(compared, setup):
    from training.data import synthetic
    from training.data.concepts import catalogue
    from training.data.visu import load_split

    report, details = compared[0]["report"], compared[0]["details"]
    after = details["models"]["after"]["lookalikes"]
    twins = json.loads((setup / "after" / "config.json").read_text())["provenance"]["forget"]["twin_lookalikes"]
    assert after["seen"] == twins and after["source"].startswith("its forget provenance")
    assert after["images"]["seen"] + after["images"]["unseen"] == details["counts"]["benign"]
    assert after["images"]["seen"] > 0 and after["images"]["unseen"] > 0
    # the artifacts without the record take the union: here the after artifact's list
    assert details["models"]["before"]["lookalikes"]["seen"] == twins
    assert "union" in details["models"]["aligned"]["lookalikes"]["source"]
    # benign_drop is the image-weighted mean of its halves (up to rounding)
    row, n = report["aligned"], details["models"]["aligned"]["lookalikes"]["images"]
    mixed = (n["seen"] * row["benign_drop_seen"] + n["unseen"] * row["benign_drop_unseen"]) / (n["seen"] + n["unseen"])
    assert row["benign_drop"] == pytest.approx(mixed, abs=0.1)
    # the twins never showed a concept's held-out look-alike: held-out classes are unseen
    cat = catalogue(setup / "data")
    held = synthetic.heldout_counterparts()
    train = load_split(setup / "data", "train").records
    forgotten = {c.name for c in cat.resolve(FORGET.split(","))}
    shown = {c.counterpart_in(r.safe) for r in train if (c := cat.concept_of(r)) and c.name in forgotten}
    assert set(twins) == shown - {None}
    assert any(held[c] not in twins for c in forgotten)


def test_without_a_twin_record_the_look_alike_split_is_null(pair):
    result = pair[0]
    row = result["report"]["aligned"]
    assert row["benign_drop"] is not None and row["benign_drop_seen"] is None and row["benign_drop_unseen"] is None
    assert "twin_lookalikes" in result["details"]["null"]["benign_drop_seen"]


def test_r_probe_is_one_probe_per_retained_concept_and_their_mean(compared):
    result, _ = compared
    row = result["report"]["after"]
    per = result["details"]["models"]["after"]["r_probe_per_concept"]
    assert row["r_probe"] is not None and row["ci"]["r_probe"][0] <= row["r_probe"] <= row["ci"]["r_probe"][1]
    assert len(per) >= 2 and not set(per) & set(result["details"]["forget"]["concepts"])
    assert abs(row["r_probe"] - sum(per.values()) / len(per)) < 0.1


def test_markdown_and_plot(compared):
    result, out = compared
    md = (out / ue.MARKDOWN).read_text()
    assert md == ue.markdown(result)
    assert md.startswith("# Unlearning evaluation (synthetic): forget ")
    assert "| Method | F-acc ↓ | R-acc ↑ | F-acc bare ↓ | R-acc bare ↑ | F-R@10 ↓ | R-R@10 ↑ | Multi kept ↑ |" in md
    assert "| Method | Residue ↓ | Residue MLP ↓ | Probe kept ↑ | Benign drop ↓ | Drop seen ↓ | Drop unseen ↓ |" in md
    assert "| before |" in md and "| ga (after) |" in md and "| aligned |" in md
    r = result["report"]["after"]
    assert f"{r['f_acc']:.1f} [{r['ci']['f_acc'][0]:.1f}, {r['ci']['f_acc'][1]:.1f}]" in md
    assert "bootstrap interval" in md and "Residue MLP" in md
    with Image.open(out / ue.PLOT) as im:
        assert im.format == "PNG" and im.width > 300


def test_one_artifact_has_no_benign_drop_and_a_lorentz_one_is_ranked_in_its_own_space(single):
    result, out = single
    metrics = result["report"]["hyperbolic"]
    assert list(result["report"]) == ["hyperbolic"] and metrics["benign_drop"] is None
    assert "--compare" in result["details"]["null"]["benign_drop"]
    drops = ("benign_drop", "benign_drop_seen", "benign_drop_unseen")
    assert all(metrics[k] is not None for k in ue.METRICS if k not in drops)
    assert "`benign_drop`, `benign_drop_seen`, `benign_drop_unseen` are empty: one artifact" in (out / ue.MARKDOWN).read_text()
    # in context, from the heldout re-captions; the bare-prompt figures beside
    assert result["details"]["zero_shot"] == "context" and result["details"]["context"]["heldout_captions"] > 0
    assert metrics["f_acc_bare"] is not None and metrics["r_acc_bare"] is not None
    assert "in context" in (out / ue.MARKDOWN).read_text()


def _untouched(out) -> bool:
    return not out.exists()


def test_bad_input_is_refused_before_anything_is_written(setup, tmp_path):
    from training.data import synthetic
    from training.data.concepts import catalogue
    from training.data.visu import load_split

    small = tmp_path / "small"  # 6 test quadruplets: most concepts are absent from them
    synthetic.generate(small, n=60, seed=2, image_size=32)
    cat = catalogue(small)
    shown = {c.name for r in load_split(small, "test").records if (c := cat.concept_of(r))}
    absent = next(n for n in cat.concepts if n not in shown)
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    models = [setup / "before", setup / "after"]
    cases = [
        ({"forget": "chainsaw"}, InputError, ["unknown concept 'chainsaw'", "concepts: ", "tags: ", "weapons (gun, knife)"]),
        ({"forget": ""}, InputError, ["--forget takes concept names"]),
        ({"forget": absent, "data": small}, DataError, [f"no record of split 'test' shows {absent}", "--split"]),
        ({"forget": ",".join(cat.tags)}, DataError, ["forget fewer concepts"]),
        ({"forget": "knife", "data": None}, InputError, ["--data DIR", "--imagefolder DIR"]),
        ({"forget": "knife", "imagefolder": empty}, InputError, ["no class subfolders"]),
        ({"forget": "knife", "benign": "zeppelin"}, DataError, ["zeppelin", "benign"]),
        ({"forget": "knife", "prompt": "a photo"}, InputError, ["{concept}"]),
        ({"forget": "knife", "zero_shot": "telepathy"}, InputError, ["--zero-shot telepathy"]),
        ({"forget": "knife", "data": None, "imagefolder": empty, "floors": True}, InputError, ["--floors", "--data DIR"]),
    ]
    for kwargs, error, words in cases:
        kwargs = {"data": setup / "data", **kwargs}
        with pytest.raises(error) as e:
            ue.run(models, out, device="cpu", **kwargs)
        assert all(w in str(e.value) for w in words), (kwargs, str(e.value))
        assert _untouched(out), kwargs
    with pytest.raises(ArtifactError, match="not found"):
        ue.run([setup / "before", setup / "missing"], out, forget="knife", data=setup / "data")
    assert _untouched(out)


def test_an_imagefolder_alone_gives_f_acc_and_r_acc(setup, tmp_path):
    folder = _imagefolder(tmp_path / "folder", {"knife": [(200, 0, 0), (180, 10, 10)], "spoon": [(0, 0, 200)],
                                                "tennis_ball": [(0, 200, 0), (10, 190, 0)]})
    (folder / "spoon" / "broken.png").write_bytes(b"not a png")
    result = ue.run([setup / "before", setup / "after"], tmp_path / "out", forget="knife", data=None,
                    imagefolder=folder, device="cpu")
    details = result["details"]
    assert details["imagefolder"]["classes"] == ["knife", "spoon", "tennis ball"]  # underscores read as spaces
    assert details["imagefolder"]["forgotten"] == ["knife"]
    for name in ("before", "after"):
        m = result["report"][name]
        assert m["f_acc"] in (0.0, 50.0, 100.0) and m["r_acc"] in (0.0, 33.3, 66.7, 100.0)
        assert m["ci"]["f_acc"][0] <= m["f_acc"] <= m["ci"]["f_acc"][1]
        assert all(m[k] is None for k in ue.METRICS if k not in ("f_acc", "r_acc"))
        assert details["models"][name]["imagefolder"] == {"images": 5, "forget_images": 2, "skipped": 1}
    assert details["dataset"] is None and not details["synthetic"]
    md = (tmp_path / "out" / ue.MARKDOWN).read_text()
    assert md.startswith("# Unlearning evaluation: forget knife") and "synthetic" not in md.splitlines()[0]
    with pytest.raises(InputError, match="its classes: knife, spoon, tennis ball"):
        ue.run([setup / "before"], tmp_path / "o2", forget="gun", data=None, imagefolder=folder)


def test_an_imagefolder_beside_the_dataset_goes_under_its_own_key(single):
    result, out = single
    m = result["report"]["hyperbolic"]
    assert set(m) == {*ue.METRICS, "ci", "imagefolder"} and set(m["imagefolder"]) == {"f_acc", "r_acc", "ci"}
    assert m["imagefolder"]["f_acc"] in (0.0, 100.0) and m["f_recall"] is not None
    assert result["details"]["imagefolder"]["forgotten"] == ["gun"]
    assert "ImageFolder `" in (out / ue.MARKDOWN).read_text()


# ------------------------------------------------------------------------------------------ zero-shot
def test_in_context_prompts_use_the_heldout_re_captions_of_each_scene(setup):
    from training.data import synthetic
    from training.data.concepts import catalogue
    from training.data.visu import load_split

    plan = ue.plan_data(setup / "data", "test", ["graffiti"])  # auto: the synthetic catalogue has phrases
    cat = catalogue(setup / "data")
    heldout = {r.coco_id: r for r in load_split(setup / "data", "heldout").records}
    assert plan.zero_shot == "context" and set(plan.context) == set(plan.concept_label)
    for i, prompts in plan.context.items():
        record, truth = plan.records[i], cat.concept_of(plan.records[i])
        assert len(prompts) == len(plan.classes)
        assert prompts[plan.concept_label[i]] == truth.swap(heldout[record.coco_id].nsfw, truth.canonical)
        assert prompts[plan.concept_label[i]] != truth.swap(record.nsfw, truth.canonical)  # not the training template
        # the prompts differ in the object alone: removing each class's phrase leaves the same scene
        rest = {p.replace(cat.concepts[k].canonical, "") for p, k in zip(prompts, plan.classes, strict=True)}
        assert len(rest) == 1
    source = plan.context_source
    assert source["own_captions"] == 0 and source["heldout_captions"] == len(plan.concept_label)
    assert set(source["templates"]) <= set(synthetic.HELDOUT_TEMPLATES) and "never used" in source["source"]
    assert plan.benign_context and all(len(p) == len(plan.benign_classes) for p in plan.benign_context.values())
    assert ue.plan_data(setup / "data", "test", ["graffiti"], zero_shot="prompt").context == {}


def test_without_a_heldout_split_the_prompts_say_their_templates_were_seen_in_training(setup, tmp_path):
    from training.data import synthetic

    copy = tmp_path / "copy"
    shutil.copytree(setup / "data", copy)
    (copy / "ViSU-Text_heldout.json").unlink()
    plan = ue.plan_data(copy, "test", ["graffiti"])
    assert plan.zero_shot == "context" and plan.context_source["heldout_captions"] == 0
    assert "templates seen in training" in plan.context_source["source"]
    assert set(plan.context_source["templates"]) <= set(synthetic.TRAIN_TEMPLATES)


def test_in_context_needs_phrases_and_the_bare_prompt_figures_are_kept(setup, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(setup / "data", bare)
    (bare / "dataset.json").unlink()  # no catalogue: one concept per tag, no phrases (as real ViSU)
    with pytest.raises(InputError, match="--zero-shot prompt"):
        ue.plan_data(bare, "test", ["weapons"], zero_shot="context")
    plan = ue.plan_data(bare, "test", ["weapons"])
    assert plan.zero_shot == "prompt" and plan.context == {}
    assert plan.multi == [] and "unknown concept" in plan.notes["multi_retained_bare"]  # tags are its concepts
    # by the bare prompt, the two-concept images are measured by the bare prompts alone
    prompt = ue.plan_data(setup / "data", "test", ["knife"], zero_shot="prompt")
    assert prompt.multi and not prompt.multi_context and all(m.prompts == {} for m in prompt.multi)
    assert "bare prompt" in prompt.notes["multi_retained"] and "multi_retained_bare" not in prompt.notes


def test_no_multi_split_leaves_the_multi_figures_null_with_a_note(setup, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(setup / "data", copy)
    (copy / "ViSU-Text_multi.json").unlink()
    plan = ue.plan_data(copy, "test", ["knife"])
    assert plan.multi == [] and "multi" in plan.notes["multi_retained"] and "multi" in plan.notes["multi_forgotten_bare"]


def test_data_roots_confine_what_the_evaluation_reads(setup, tmp_path):
    from training.errors import OutsideRootsError

    elsewhere = tmp_path / "roots"
    elsewhere.mkdir()
    with pytest.raises(OutsideRootsError):
        ue.run([setup / "before"], tmp_path / "out", forget="graffiti", data=setup / "data", device="cpu",
               data_roots=[elsewhere])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the command
def _main(*args, capsys) -> tuple[int, str, str]:
    """The root command in-process, as the console script runs it: (exit code, stdout, stderr)."""
    from service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def _eval_group(*args):
    """``eval ...`` through the ``eval`` group as the root command mounts it (subcommands and the older form)."""
    import typer
    from typer.testing import CliRunner

    from training.cli import eval_app

    root = typer.Typer(rich_markup_mode=None)
    root.add_typer(eval_app, name="eval")
    root.command("noop")(lambda: None)  # a second command: "eval" is then a subcommand, as under safe-retrieval
    return CliRunner().invoke(root, [str(a) for a in args])


def test_eval_unlearning_options_are_checked(setup, capsys, tmp_path):
    base = ["eval", "--data", setup / "data", "--out", tmp_path / "o", "--model", setup / "before"]
    cases = [
        (base + ["--forget", "knife"], "add --unlearning"),
        (base + ["--unlearning"], "add --forget CONCEPTS"),
        (base + ["--imagefolder", tmp_path], "add --unlearning --forget"),
        (base + ["--floors"], "add --unlearning --forget"),
        (base + ["--unlearning", "--forget", "knife", "--limit", "3"], "--limit is not used with --unlearning"),
        (["eval", "--out", tmp_path / "o", "--model", setup / "before"], "--data DIR"),
        (base + ["--unlearning", "--forget", "chainsaw"], "unknown concept 'chainsaw'"),
    ]
    for args, message in cases:
        code, _, err = _main(*args, capsys=capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (args, err)
    assert not (tmp_path / "o").exists()


def test_eval_unlearning_end_to_end(cli, setup, tmp_path):
    out = tmp_path / "report"
    proc = cli("eval", "--unlearning", "--forget", "knife,gun", "--compare", setup / "before", setup / "after",
               "--data", setup / "data", "--split", "test", "--out", out, "--device", "cpu", "--probe-limit", "40",
               "--benign", "spoon,umbrella,pencil,camera", "--seed", "3")
    assert "Unlearning evaluation (synthetic)" in proc.stdout and "report.json" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    details = json.loads((out / "details.json").read_text())
    assert list(report) == ["before", "after"] and report["before"]["benign_drop"] == 0.0
    assert details["benign"]["classes"] == ["spoon", "umbrella", "pencil", "camera"]
    assert details["benign"]["source"].startswith("--benign") and details["seed"] == 3
    assert {p.name for p in out.iterdir()} == {"report.json", "details.json", "report.md", "forget_vs_retain.png"}


def test_eval_unlearning_subcommand_is_the_older_form(setup, tmp_path):
    folder = _imagefolder(tmp_path / "folder", {"knife": [(200, 0, 0)], "spoon": [(0, 0, 200), (0, 10, 190)]})
    common = ["--forget", "knife", "--imagefolder", folder, "--device", "cpu", "--seed", "4"]
    sub = _eval_group("eval", "unlearning", *common, "--out", tmp_path / "sub", "--compare", setup / "before",
                      setup / "after")
    assert sub.exit_code == 0, sub.output
    old = _eval_group("eval", "--unlearning", *common, "--out", tmp_path / "old", "--compare", setup / "before",
                      setup / "after")
    assert old.exit_code == 0, old.output
    report = json.loads((tmp_path / "sub" / ue.REPORT).read_text())
    assert report == json.loads((tmp_path / "old" / ue.REPORT).read_text()) and list(report) == ["before", "after"]
    assert json.loads((tmp_path / "sub" / ue.DETAILS).read_text())["seed"] == 4
    # --floors reaches the evaluation, which asks for the data the floors' probes need
    floors = _eval_group("eval", "unlearning", *common, "--out", tmp_path / "f", "--floors", "--model", setup / "before")
    assert isinstance(floors.exception, InputError) and "--floors" in str(floors.exception)
    missing = _eval_group("eval", "unlearning", "--data", setup / "data", "--out", tmp_path / "x", "--model",
                          setup / "before")
    assert missing.exit_code == 2 and "--forget" in missing.output and not (tmp_path / "x").exists()
