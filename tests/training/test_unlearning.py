"""Concept unlearning, training side: concepts, forget/retain sets, the six objectives, the trainer and CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.models import random_tiny_artifacts
from training import architectures, artifact, lorentz, objectives, recipes, trainer
from training.data import concepts, forget, loader, synthetic, visu
from training.data.roots import DataRoots
from training.encoder import SafetyEncoder
from training.errors import InputError, OutsideRootsError
from training.objectives import Embeddings
from training.objectives.unlearning import UNLEARNING

BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unlearning-data") / "visu"
    synthetic.generate(root, n=120, seed=5, image_size=32)
    return root


@pytest.fixture(scope="module")
def train_records(data):
    return visu.load_split(data, "train").records


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """geometry -> a randomly initialised tiny artifact to forget from."""
    return random_tiny_artifacts(tmp_path_factory.mktemp("unlearning-bases"))


# ------------------------------------------------------------------------------------ concepts
def test_a_synthetic_dataset_names_every_record_s_concept(data, train_records):
    cat = concepts.catalogue(data, train_records)
    assert len(cat.concepts) == len(synthetic.CONCEPTS)
    assert cat.tags["weapons"] == ("gun", "knife")
    for r in train_records:
        c = cat.concept_of(r)
        assert c is not None and c.tag == r.tag and c.named_in(r.nsfw)
        assert c.counterpart_in(r.safe) in c.safe_counterparts  # the safe half shows a harmless look-alike


def test_names_and_tags_resolve_and_an_unknown_name_lists_the_known_ones(data, train_records):
    cat = concepts.catalogue(data, train_records)
    assert [c.name for c in cat.resolve(["Knife "])] == ["knife"]
    assert {c.name for c in cat.resolve(["weapons", "pills"])} == {"gun", "knife", "pills"}
    with pytest.raises(InputError) as e:
        cat.resolve(["sword"])
    assert "sword" in str(e.value) and "knife" in str(e.value) and "weapons (gun, knife)" in str(e.value)
    with pytest.raises(InputError):
        concepts.parse_names(" , ")
    assert concepts.parse_names(["knife, gun", "drug use"]) == ["knife", "gun", "drug use"]


def test_without_a_dataset_summary_each_tag_is_a_concept(tmp_path, train_records):
    cat = concepts.catalogue(tmp_path, train_records)  # no dataset.json: the real ViSU case
    assert set(cat.concepts) == {r.tag for r in train_records}
    weapons = cat.resolve(["weapons"])[0]
    assert all(weapons.shown_by(r) == (r.tag == "weapons") for r in train_records)


def test_a_concept_s_words_leave_the_caption_and_the_rest_stays():
    knife = concepts.Concept("knife", "weapons", "knife", ("a sharp knife", "a knife"))
    assert knife.without("a photo of a sharp knife in a kitchen, with a red ball") == "a photo of in a kitchen, with a red ball"
    assert not knife.named_in("a knifes edge")  # whole words only


# ------------------------------------------------------------------------- forget and retain sets
def test_the_forget_set_is_the_unsafe_pairs_showing_the_concept_and_the_retain_set_everything_else(data, train_records):
    fs = forget.split(train_records, data, forget=["knife"])
    shows = [r for r in train_records if "knife" in r.nsfw]  # "gun" would miss "a handgun"
    assert {p.image for p in fs.forget} == {r.nsfw_image for r in shows} and len(fs.forget) == len(shows) > 0
    retained = {p.image for p in fs.retain}
    assert {r.safe_image for r in train_records} <= retained  # every safe look-alike (a spoon) is kept
    assert not {r.nsfw_image for r in shows} & retained
    assert len(fs.retain) == 2 * len(train_records) - len(shows)
    expected = {"concepts": ["knife"], "forget_pairs": len(shows), "retain_pairs": len(fs.retain), "manifest": None}
    assert {k: fs.provenance().get(k) for k in expected} == expected


def test_a_concept_no_training_pair_shows_is_refused_with_the_known_ones(data, train_records):
    without_knives = [r for r in train_records if "knife" not in r.nsfw]
    with pytest.raises(InputError, match="no training pair shows knife.*concepts: blood"):
        forget.split(without_knives, data, forget=["knife"])


def test_a_dataset_that_names_no_concept_says_so(tmp_path, train_records):
    untagged = [dataclasses.replace(r, tag="") for r in train_records]  # no dataset.json in tmp_path, no tags
    with pytest.raises(InputError, match="unknown concept 'knife': the dataset .* names no concept"):
        forget.split(untagged, tmp_path, forget=["knife"])


def test_a_manifest_lists_pairs_to_forget_and_its_images_leave_the_retain_set(data, train_records, tmp_path):
    chosen = train_records[:3]
    manifest = tmp_path / "takedown.csv"
    rows = ["image,caption"] + [f"{r.safe_image},{r.safe.replace(',', ' ')}" for r in chosen]
    manifest.write_text("\n".join(rows) + "\n")
    fs = forget.split(train_records, data, manifest=manifest)
    assert {p.image for p in fs.forget} == {r.safe_image for r in chosen} and fs.concepts == ()
    assert not {p.image for p in fs.retain} & {r.safe_image for r in chosen}
    assert len(fs.retain) == 2 * len(train_records) - 3
    jsonl = tmp_path / "takedown.jsonl"
    jsonl.write_text(json.dumps({"image": str(chosen[0].nsfw_image), "caption": "x"}) + "\n")
    both = forget.split(train_records, data, forget=["gun"], manifest=jsonl)
    assert chosen[0].nsfw_image in {p.image for p in both.forget} and both.concepts == ("gun",)


def test_a_manifest_s_tags_are_concepts_and_forget_chooses_among_its_rows(data, train_records, tmp_path):
    a, b, c = train_records[:3]
    manifest = tmp_path / "takedowns.jsonl"
    rows = [{"image": str(a.safe_image), "caption": "case 7", "tags": ["Takedown-7"]},
            {"image": str(b.safe_image), "caption": "case 8", "tags": "takedown-8|gun"},
            {"image": str(c.safe_image), "caption": "listed by hand"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    only_7 = forget.split(train_records, data, forget=["takedown-7"], manifest=manifest)
    assert {p.image for p in only_7.forget} == {a.safe_image, c.safe_image}  # the untagged row always goes
    assert b.safe_image in {p.image for p in only_7.retain}  # a row of another request stays where it was
    assert only_7.concepts == ("takedown-7",) and only_7.provenance()["manifest_pairs"] == 2
    guns = forget.split(train_records, data, forget=["weapons"], manifest=manifest)  # a dataset tag selects rows too
    assert b.safe_image in {p.image for p in guns.forget} and a.safe_image not in {p.image for p in guns.forget}
    assert "2 from manifest" in guns.describe()
    everything = forget.split(train_records, data, manifest=manifest)
    assert {p.image for p in everything.forget} == {a.safe_image, b.safe_image, c.safe_image}
    with pytest.raises(InputError, match="unknown concept 'takedown-9'.*the manifest's tags: gun, takedown-7, takedown-8"):
        forget.split(train_records, data, forget=["takedown-9"], manifest=manifest)


def test_a_concept_only_the_manifest_shows_is_forgotten_from_the_manifest(data, train_records, tmp_path):
    without_knives = [r for r in train_records if "knife" not in r.nsfw]
    knife = next(r for r in train_records if "knife" in r.nsfw)
    manifest = tmp_path / "knives.csv"
    manifest.write_text(f"image,caption,tags\n{knife.nsfw_image},a knife,knife\n")
    fs = forget.split(without_knives, data, forget=["knife"], manifest=manifest)
    assert [p.image for p in fs.forget] == [knife.nsfw_image] and fs.concepts == ("knife",)


@pytest.mark.parametrize("content, message", [
    ("image,caption\n", "lists no pairs"),
    ("image,caption\nmissing.jpg,a cat\n", "does not exist"),
    ("image\nmissing.jpg\n", "needs a non-empty image and caption"),
    ('{"image": "IMG", "caption": "a cat", "tags": {"a": 1}}\n', r"row 1: tags must be a list of strings.*not an object"),
])
def test_a_bad_manifest_says_what_is_wrong(data, train_records, tmp_path, content, message):
    manifest = tmp_path / ("m.jsonl" if content.startswith("{") else "m.csv")
    manifest.write_text(content.replace("IMG", str(train_records[0].safe_image)))
    with pytest.raises(InputError, match=message):
        forget.split(train_records, data, manifest=manifest)


def test_manifest_images_are_confined_to_the_data_roots(data, train_records, tmp_path):
    manifest = data.parent / "m.csv"
    outside = tmp_path / "x.jpg"
    outside.write_bytes(train_records[0].safe_image.read_bytes())
    manifest.write_text(f"image,caption\n{outside},a cat\n")
    with pytest.raises(OutsideRootsError):
        forget.split(train_records, data, manifest=manifest, roots=DataRoots.of([data.parent]))


def test_forgetting_everything_leaves_no_retain_set_and_is_refused(data, train_records, tmp_path):
    manifest = tmp_path / "all.csv"
    manifest.write_text("image,caption\n" + "".join(f"{r.safe_image},a\n" for r in train_records))
    with pytest.raises(InputError, match="retain set is empty"):
        forget.split(train_records, data, forget=sorted({r.tag for r in train_records}), manifest=manifest)


def test_pairings_walk_the_retain_set_once_and_cycle_the_forget_set(data, train_records):
    fs = forget.split(train_records, data, forget=["knife"])
    quads = forget.pairings(fs, seed=1, twin_repeats=0)
    assert [(q.safe, q.safe_image) for q in quads] == [(p.caption, p.image) for p in fs.retain]
    k = len(fs.forget)
    first = [q.nsfw_image for q in quads[:k]]
    assert sorted(first) == sorted(p.image for p in fs.forget)  # each forget pair once before any repeats
    assert [q.nsfw_image for q in quads[k:2 * k]] == first
    assert [q.nsfw_image for q in forget.pairings(fs, seed=1, twin_repeats=0)] == [q.nsfw_image for q in quads]


def test_twins_pair_each_forgotten_quadruplet_s_safe_half_with_its_own_forget_pair(data, train_records):
    fs = forget.split(train_records, data, forget=["knife"])
    shows = {r.nsfw_image: r for r in train_records if "knife" in r.nsfw}
    assert len(fs.twins) == len(shows)
    for keep, gone in fs.twins:  # the same scene: a spoon where the knife was
        assert shows[gone.image].safe_image == keep.image and keep in fs.retain
    quads = forget.pairings(fs, seed=1, twin_repeats=3)
    extra = quads[len(fs.retain):]
    assert len(extra) == 3 * len(fs.twins)
    assert all(shows[q.nsfw_image].safe_image == q.safe_image for q in extra)


# ------------------------------------------------------------------------------------ objectives
def _embeddings(geometry: str, b: int = 6, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, d, generator=g) for _ in range(4)]
    if geometry == "euclidean":
        xs = [torch.nn.functional.normalize(x, dim=-1) for x in xs]
    else:
        xs = [lorentz.exp_map0(0.5 * x, 1.0) for x in xs]
    return [x.requires_grad_(True) for x in xs]


@pytest.mark.parametrize("cls", UNLEARNING, ids=lambda c: c.name)
def test_every_method_gives_a_finite_loss_with_gradients_on_both_halves(cls):
    geometry = "lorentz" if cls.geometry == "lorentz" else "euclidean"
    enc = SafetyEncoder(architectures.resolve("tiny"), geometry)
    obj = objectives.build(cls.name, reference=enc)
    s, v, u, g = _embeddings(geometry)
    refs = {"s_ref": s.detach() + 0.01, "v_ref": v.detach()} if obj.frozen() else {}
    out = obj(Embeddings(s=s, v=v, u=u, g=g, **refs), enc)
    assert torch.isfinite(out.loss) and set(out.terms) == set(cls.terms)
    out.loss.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0  # the forget half is always pushed
    if cls.name != "ga":
        assert s.grad is not None and s.grad.abs().sum() > 0  # and the retain half held


def test_gradient_ascent_raises_the_forget_pairs_contrastive_loss():
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    obj = objectives.build("ga")
    s, v, u, g = _embeddings("euclidean")
    out = obj(Embeddings(s=s, v=v, u=u, g=g), enc)
    assert float(out.loss) == pytest.approx(-float(out.terms["forget_contrastive"]))


def test_cliperase_consistency_is_zero_while_the_model_is_the_original():
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    obj = objectives.build("cliperase", reference=enc)
    s, v, u, g = _embeddings("euclidean")
    out = obj(Embeddings(s=s, v=v, u=u, g=g, s_ref=s.detach(), v_ref=v.detach()), enc)
    assert float(out.terms["consistency_KL"]) == pytest.approx(0.0, abs=1e-6)
    moved = obj(Embeddings(s=s, v=v, u=u, g=g, s_ref=s.detach().roll(1, 0), v_ref=v.detach()), enc)
    assert float(moved.terms["consistency_KL"]) > 1e-3


def test_hac_forget_entailment_is_zero_once_the_forget_image_leaves_its_caption_s_cone():
    enc = SafetyEncoder(architectures.resolve("tiny"), "lorentz")
    obj = objectives.build("hac")
    s, v, u, _ = _embeddings("lorentz")
    inside = u.detach() * 1.5  # farther along the caption's own ray: inside its cone
    outside = -u.detach()  # the opposite direction: far outside
    terms_in = obj(Embeddings(s=s, v=v, u=u, g=inside), enc).terms
    terms_out = obj(Embeddings(s=s, v=v, u=u, g=outside), enc).terms
    assert float(terms_in["forget_entailment"]) > 0 and float(terms_out["forget_entailment"]) == 0


def test_options_are_checked_and_recorded():
    obj = objectives.build("hac", options={"form": "ours", "norm": "grow"})
    chosen = {"form": "ours", "norm": "grow"}
    assert obj.provenance()["options"] == chosen and obj.identity() == {"options": chosen}
    assert objectives.build("hac").identity() == {"options": {"form": "paper"}}  # the form is explicit, chosen or not
    with pytest.raises(InputError, match="norm=sideways: use one of shrink, grow, none"):
        objectives.build("hac", options={"form": "ours", "norm": "sideways"})
    with pytest.raises(InputError, match="norm=grow belongs to hac's form=ours"):
        objectives.build("hac", options={"norm": "grow"})
    with pytest.raises(InputError, match="no option 'norm'"):
        objectives.build("cliperase", options={"norm": "grow"})
    with pytest.raises(InputError, match="unlearning methods"):
        objectives.build("hysac", options={"norm": "grow"})


# ------------------------------------------------------------------------------------ the trainer
def _config(data: Path, out: Path, model: Path, **kw) -> recipes.TrainConfig:
    base = dict(method="cliperase", data=data, out=out, model=str(model), forget=("knife",), full_finetune=True,
                epochs=1, batch_size=BATCH, lr=1e-3, workers=0, progress=False, device="cpu", seed=0, max_steps=3)
    return recipes.TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method, geometry", [("cliperase", "euclidean"), ("hac", "lorentz")])
def test_an_unlearning_run_writes_an_artifact_that_records_what_it_forgot(method, geometry, data, bases, tmp_path):
    out = tmp_path / "forgot"
    result = trainer.train(_config(data, out, bases[geometry], method=method))
    art = artifact.load(result.artifact, device="cpu")
    assert art.geometry == geometry  # forgetting never converts its source
    prov = art.provenance
    assert prov["method"] == method and prov["forget"]["concepts"] == ["knife"]
    assert prov["forget"]["forget_pairs"] > 0 and prov["forget"]["retain_pairs"] > prov["forget"]["forget_pairs"]
    assert prov["weights"] == list(objectives.reference_weights(method))
    if method == "hac":  # the paper's form, with its named weights
        assert prov["options"] == {"form": "paper"} and prov["params"]["alpha"] == prov["params"]["gamma"] == 0.5
    assert result.steps == 3


@pytest.mark.parametrize("kw, message", [
    ({"method": "hysac"}, "go with an unlearning method"),
    ({"forget": ()}, "name what to forget"),
    ({"forget": ("sword",)}, "unknown concept 'sword'.*knife"),
    ({"method": "hac"}, "use --method ac"),
    ({"objective_options": ("norm",)}, "NAME=VALUE"),
    ({"method": "ga", "weights": (1.0,)}, "single loss term"),
    ({"method": "ac", "params": {"alpha": 0.5}}, "ac keeps alpha = gamma"),
    ({"method": "ac", "objective_options": ("perf=none",)}, "belongs to ac's form=ours"),
])
def test_bad_unlearning_input_is_refused_before_anything_is_written(kw, message, data, bases, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        trainer.train(_config(data, out, bases["euclidean"], **kw))
    assert not out.exists() and not out.with_name("out.run").exists()


def test_the_cli_trains_a_forgetting_run_with_named_weights_and_refuses_forget_without_a_method(cli, data, bases,
                                                                                                  tmp_path):
    out = tmp_path / "cli-forgot"
    cli("train", "--method", "ac", "--model", bases["euclidean"], "--forget", "knife,gun", "--data", data, "--out", out,
        "--weights", "alpha=0.25,gamma=0.25,epsilon=2", "--full-finetune", "--epochs", "1", "--batch-size", BATCH,
        "--max-steps", 2, "--device", "cpu", "--lr", "1e-4")
    prov = json.loads((out / artifact.CONFIG).read_text())["provenance"]
    assert prov["forget"]["concepts"] == ["gun", "knife"]
    assert prov["weights"] == [1.0, 0.5, 1.0, 0.5]  # 1, epsilon * (alpha, beta, gamma)
    assert prov["params"] == {"epsilon": 2.0, "alpha": 0.25, "beta": 0.5, "gamma": 0.25}
    proc = cli("train", "--method", "hysac", "--forget", "knife", "--data", data, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "unlearning method" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("train", "--method", "ac", "--model", bases["euclidean"], "--forget", "knife", "--data", data,
               "--out", tmp_path / "x", "--weights", "1,alpha=0.5", check=False)
    assert proc.returncode == 2 and "not a mix" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- the oracle: retrain without
def _oracle(data: Path, out: Path, **kw) -> recipes.TrainConfig:
    base = dict(method="clip", clip_pairs="all", data=data, out=out, model="tiny", forget=("knife",), full_finetune=True,
                epochs=1, batch_size=BATCH, lr=1e-3, workers=0, progress=False, device="cpu", seed=0)
    return recipes.TrainConfig(**{**base, **kw})


def test_the_oracle_trains_clip_on_every_pair_but_the_forget_pairs(data, train_records, tmp_path, monkeypatch):
    opened: list[Path] = []
    rows: list[tuple[str, str, bool]] = []
    read, collate = visu.QuadDataset._open, loader.Collate.__call__

    def spy_open(self, path):
        opened.append(Path(path))
        return read(self, path)

    def spy_collate(self, items):
        rows.extend((it["safe"], it["nsfw"], it["unsafe_kept"]) for it in items)
        batch = collate(self, items)
        assert batch.unsafe_kept.tolist() == [it["unsafe_kept"] for it in items]
        return batch

    monkeypatch.setattr(visu.QuadDataset, "_open", spy_open)
    monkeypatch.setattr(loader.Collate, "__call__", spy_collate)
    result = trainer.train(_oracle(data, tmp_path / "oracle"))  # one epoch: every train record in one batch
    knives = [r for r in train_records if "knife" in r.nsfw]
    assert len(rows) == len(train_records) == result.steps * BATCH and knives
    assert not {r.nsfw_image for r in knives} & set(opened)  # a left-out image is never even read
    assert {r.safe_image for r in knives} <= set(opened)  # its harmless look-alike (a spoon) is trained on
    others = {r.nsfw_image for r in train_records} - {r.nsfw_image for r in knives}
    assert others <= set(opened)
    left = [(safe, nsfw) for safe, nsfw, kept in rows if not kept]
    assert sorted(left) == sorted((r.safe, r.safe) for r in knives)  # their unsafe half: a masked placeholder
    assert not [nsfw for _, nsfw, kept in rows if kept and "knife" in nsfw]
    prov = artifact.load(result.artifact, device="cpu").provenance
    assert prov["method"] == "clip" and prov["clip_pairs"] == "all"
    expected = {"concepts": ["knife"], "forget_pairs": len(knives), "retain_pairs": 2 * len(train_records) - len(knives),
                "manifest": None, "oracle": "retrained without the forget pairs", "left_out_pairs": len(knives)}
    assert {k: prov["forget"].get(k) for k in expected} == expected


@pytest.mark.parametrize("kw, message", [
    ({"clip_pairs": "safe"}, "--clip-pairs safe never trains on the unsafe pairs.*add --clip-pairs all"),
    ({"clip_pairs": None}, "--clip-pairs safe never trains on the unsafe pairs"),  # clip's default
    ({"forget_manifest": Path("takedown.csv")}, "--forget-manifest goes with an unlearning method"),
    ({"forget": ("sword",)}, "unknown concept 'sword'.*knife"),
    ({"objective_options": ("form=ours",)}, "--objective-option goes with an unlearning method"),
    ({"method": "hysac", "clip_pairs": None}, "go with an unlearning method.*--method clip --clip-pairs all"),
])
def test_bad_oracle_input_is_refused_before_anything_is_written(kw, message, data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        trainer.train(_oracle(data, out, **kw))
    assert not out.exists() and not out.with_name("out.run").exists()
