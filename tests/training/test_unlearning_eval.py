"""The unlearning evaluation: its metrics on hand-made embeddings, then on tiny real artifacts, then the command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training import unlearning_eval as ue
from training.errors import ArtifactError, DataError, InputError
from training.evaluate import Space

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


def test_recall_at_10_counts_targets_in_the_top_ten():
    gallery = _unit(30, d=32)
    queries = gallery[:4].clone()
    queries[3] = -gallery[3]  # farthest from its own target: ranks last
    assert ue.recall_at_k(queries, gallery, torch.arange(4), EUCLID) == 75.0
    assert ue.recall_at_k(queries[:0], gallery, torch.arange(0), EUCLID) is None


def test_probe_reads_a_separable_concept_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(300, 16, generator=g), torch.randn(100, 16, generator=g)
    y, yt = torch.zeros(300, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)
    y[:15], yt[:5] = True, True  # 1 in 20 positive, as one concept among many
    shifted, shifted_t = x.clone(), xt.clone()
    shifted[y, 0] += 10
    shifted_t[yt, 0] += 10
    assert ue.probe_balanced_accuracy(shifted, y, shifted_t, yt) == 100.0
    # labels unrelated to the features: near chance, although "always negative" would be 95% accurate
    noise = ue.probe_balanced_accuracy(x, y, xt, yt)
    assert 25 <= noise <= 75
    assert ue.probe_balanced_accuracy(x, y, xt, yt) == noise  # deterministic


# ------------------------------------------------------------------------------------ real artifacts
def _align(encoder, records, catalogue, *, steps: int = 300) -> None:
    """Teach a tiny Euclidean ``encoder`` to put each unsafe image next to its concept's prompt.

    Only the two projections are trained (a contrastive loss over the concepts' prompts), on features
    of the frozen towers computed once: seconds on a CPU, where training the towers takes minutes.
    """
    from training.images import open_image

    names = list(catalogue.concepts)
    shown = [(r, catalogue.concept_of(r)) for r in records]
    shown = [(r, c) for r, c in shown if c is not None]
    labels = torch.tensor([names.index(c.name) for _, c in shown])
    clip = encoder.clip
    with torch.no_grad():  # identity projections: the towers' own features
        clip.visual.proj.copy_(torch.eye(*clip.visual.proj.shape))
        clip.text_projection.copy_(torch.eye(*clip.text_projection.shape))
        images = clip.encode_image(encoder.preprocess([open_image(r.nsfw_image) for r, _ in shown]))
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small synthetic dataset (30 test quadruplets), two untrained tiny artifacts of different geometry
    (``before`` Euclidean, ``after`` Lorentz) and a Euclidean one aligned to the concepts' prompts."""
    from training import architectures, artifact
    from training.data import synthetic
    from training.data.concepts import catalogue
    from training.data.visu import load_split
    from training.encoder import SafetyEncoder

    tmp = tmp_path_factory.mktemp("unlearning-eval")
    synthetic.generate(tmp / "data", n=300, seed=2, image_size=32, unsafe_look="generated")
    for name, geometry, seed in (("before", "euclidean", 0), ("after", "lorentz", 1)):
        torch.manual_seed(seed)
        prov = artifact.provenance("init", **({"method": "ga"} if name == "after" else {}))
        artifact.save(artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), geometry), provenance=prov),
                      tmp / name)
    torch.manual_seed(2)
    enc = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    _align(enc, load_split(tmp / "data", "train").records, catalogue(tmp / "data"))
    artifact.save(artifact.Artifact(enc, provenance=artifact.provenance("test", method="aligned")), tmp / "aligned")
    return tmp


#: half the tags: enough forgotten test images for f_acc to tell models apart
FORGET = "weapons,drug use,blood,violence,vandalism,nudity,sexual,suicide,hate,suffering"


@pytest.fixture(scope="module")
def compared(setup):
    out = setup / "report"
    # by the bare prompt: "aligned" was aligned to the bare prompts
    result = ue.run([setup / "before", setup / "after", setup / "aligned"], out, forget=FORGET, data=setup / "data",
                    device="cpu", probe_limit=80, zero_shot="prompt")
    return result, out


def test_report_maps_each_artifact_to_the_seven_metrics_in_range(compared):
    result, out = compared
    report = json.loads((out / ue.REPORT).read_text())
    assert report == result["report"]
    assert list(report) == ["before", "after", "aligned"]
    for metrics in report.values():
        assert set(metrics) == set(ue.METRICS)
        for key, value in metrics.items():
            lo = -100 if key == "benign_drop" else 0
            assert value is not None and lo <= value <= 100, (key, value)
    assert report["before"]["benign_drop"] == 0.0
    details = json.loads((out / ue.DETAILS).read_text())
    assert details["null"] == {}  # every metric measured
    assert details["synthetic"] is True and details["split"] == "test" and details["reference"] == "before"
    assert details["models"]["after"]["method"] == "ga" and details["models"]["after"]["geometry"] == "lorentz"
    # benign_drop = the before model's benign accuracy minus this one's
    b = {n: details["models"][n]["benign_acc"] for n in report}
    assert report["aligned"]["benign_drop"] == pytest.approx(b["before"] - b["aligned"], abs=0.11)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


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
    assert counts["gallery"] == 60 and counts["benign"] == counts["f_acc"] and counts["multi_concept"] == counts["f_acc"]
    assert details["classes"] == list(cat.concepts) and len(details["benign"]["classes"]) > 22


def test_a_model_aligned_to_the_concepts_recognises_them_better_than_a_random_one(compared):
    report = compared[0]["report"]
    assert report["aligned"]["f_acc"] > report["before"]["f_acc"]
    assert report["aligned"]["r_acc"] > report["before"]["r_acc"]


def test_markdown_and_plot(compared):
    result, out = compared
    md = (out / ue.MARKDOWN).read_text()
    assert md == ue.markdown(result)
    assert md.startswith("# Unlearning evaluation (synthetic): forget ")
    assert "| Method | F-acc ↓ | R-acc ↑ | F-R@10 ↓ | R-R@10 ↑ | Residue ↓ | Benign drop ↓ | Multi-concept R@10 ↑ |" in md
    assert "| before |" in md and "| ga (after) |" in md and "| aligned |" in md
    with Image.open(out / ue.PLOT) as im:
        assert im.format == "PNG" and im.width > 300


def test_one_artifact_has_no_benign_drop_and_a_lorentz_one_is_ranked_in_its_own_space(setup, tmp_path):
    result = ue.run([setup / "after"], tmp_path / "one", forget="knife", data=setup / "data", device="cpu",
                    probe_limit=40, labels=["hyperbolic"])
    (metrics,) = result["report"].values()
    assert list(result["report"]) == ["hyperbolic"] and metrics["benign_drop"] is None
    assert "--compare" in result["details"]["null"]["benign_drop"]
    assert all(metrics[k] is not None for k in ue.METRICS if k != "benign_drop")
    assert "`benign_drop` is empty" in (tmp_path / "one" / ue.MARKDOWN).read_text()


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


def _imagefolder(root, classes: dict[str, list[tuple[int, int, int]]]):
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (24, 24), colour).save(root / name / f"{i}.png")
    return root


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
        assert all(m[k] is None for k in ue.METRICS if k not in ("f_acc", "r_acc"))
        assert details["models"][name]["imagefolder"] == {"images": 5, "forget_images": 2, "skipped": 1}
    assert details["dataset"] is None and not details["synthetic"]
    md = (tmp_path / "out" / ue.MARKDOWN).read_text()
    assert md.startswith("# Unlearning evaluation: forget knife") and "synthetic" not in md.splitlines()[0]
    with pytest.raises(InputError, match="its classes: knife, spoon, tennis ball"):
        ue.run([setup / "before"], tmp_path / "o2", forget="gun", data=None, imagefolder=folder)


def test_an_imagefolder_beside_the_dataset_goes_under_its_own_key(setup, tmp_path):
    folder = _imagefolder(tmp_path / "folder", {"gun": [(20, 20, 20)], "umbrella": [(0, 0, 200)]})
    # the folder's class 'gun' is forgotten through the dataset's tag 'weapons'
    result = ue.run([setup / "before"], tmp_path / "out", forget="weapons", data=setup / "data", imagefolder=folder,
                    device="cpu", probe_limit=40)
    m = result["report"]["before"]
    assert set(m) == {*ue.METRICS, "imagefolder"} and set(m["imagefolder"]) == {"f_acc", "r_acc"}
    assert m["imagefolder"]["f_acc"] in (0.0, 100.0) and m["f_recall"] is not None
    assert result["details"]["imagefolder"]["forgotten"] == ["gun"]
    assert "ImageFolder `" in (tmp_path / "out" / ue.MARKDOWN).read_text()


# ------------------------------------------------------------------------------------------ the command
def _main(*args, capsys) -> tuple[int, str, str]:
    """The root command in-process, as the console script runs it: (exit code, stdout, stderr)."""
    from service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def test_eval_unlearning_options_are_checked(setup, capsys, tmp_path):
    base = ["eval", "--data", setup / "data", "--out", tmp_path / "o", "--model", setup / "before"]
    cases = [
        (base + ["--forget", "knife"], "add --unlearning"),
        (base + ["--unlearning"], "add --forget CONCEPTS"),
        (base + ["--imagefolder", tmp_path], "add --unlearning --forget"),
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


def test_in_context_each_image_is_classified_among_its_own_caption_naming_each_class(setup):
    from training.data.concepts import catalogue

    plan = ue.plan_data(setup / "data", "test", ["graffiti"])  # auto: the synthetic catalogue has phrases
    cat = catalogue(setup / "data")
    assert plan.zero_shot == "context" and set(plan.context) == set(plan.concept_label)
    for i, prompts in plan.context.items():
        record, truth = plan.records[i], cat.concept_of(plan.records[i])
        assert len(prompts) == len(plan.classes)
        assert prompts[plan.concept_label[i]] == truth.swap(record.nsfw, truth.canonical)
        # the prompts differ in the object alone: removing each class's phrase leaves the same scene
        rest = {p.replace(cat.concepts[k].canonical, "") for p, k in zip(prompts, plan.classes, strict=True)}
        assert len(rest) == 1
    assert plan.benign_context and all(len(p) == len(plan.benign_classes) for p in plan.benign_context.values())
    assert ue.plan_data(setup / "data", "test", ["graffiti"], zero_shot="prompt").context == {}


def test_in_context_needs_phrases_and_the_bare_prompt_figures_are_kept(setup, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(setup / "data", bare)
    (bare / "dataset.json").unlink()  # no catalogue: one concept per tag, no phrases (as real ViSU)
    with pytest.raises(InputError, match="--zero-shot prompt"):
        ue.plan_data(bare, "test", ["weapons"], zero_shot="context")
    assert ue.plan_data(bare, "test", ["weapons"]).zero_shot == "prompt"
    result = ue.run([setup / "before"], tmp_path / "ctx", forget="graffiti", data=setup / "data", device="cpu",
                    probe_limit=40)
    assert result["details"]["zero_shot"] == "context"
    assert set(result["details"]["models"]["before"]["zero_shot_by_prompt"]) == {"f_acc", "r_acc"}
    assert "in context" in (tmp_path / "ctx" / ue.MARKDOWN).read_text()


def test_data_roots_confine_what_the_evaluation_reads(setup, tmp_path):
    from training.errors import OutsideRootsError

    elsewhere = tmp_path / "roots"
    elsewhere.mkdir()
    with pytest.raises(OutsideRootsError):
        ue.run([setup / "before"], tmp_path / "out", forget="graffiti", data=setup / "data", device="cpu",
               data_roots=[elsewhere])
    assert not (tmp_path / "out").exists()
