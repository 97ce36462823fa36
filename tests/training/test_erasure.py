"""The closed-form concept eraser: LEACE's guarantee on its own data, folding into the encoder, the artifact, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import run_cli
from tests.helpers.models import random_tiny_artifacts
from training import architectures, artifact, erasure
from training.data import synthetic
from training.encoder import SafetyEncoder
from training.errors import ArtifactError, InputError
from training.eval import probes


def planted(n: int = 2000, d: int = 16, k: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated Gaussian features in which each of ``k`` binary concepts shifts the mean along a direction of its own."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)
    z = (torch.rand(n, k, generator=g) < 0.3).float()
    shift = torch.randn(k, d, generator=g) * 2
    return torch.randn(n, d, generator=g) @ mix + z @ shift + 3.0, z


# ------------------------------------------------------------------------------------------- LEACE
@pytest.mark.parametrize("k", [1, 2])
def test_the_edit_leaves_no_linear_covariance_with_the_concepts_and_removes_rank_k(k):
    x, z = planted(k=k)
    edit = erasure.fit_leace(x, z)
    assert edit.rank == k
    before = erasure.linear_covariance(x, z).abs().max()
    after = erasure.linear_covariance(edit(x), z).abs().max()
    assert before > 0.3 and after < 1e-5 * before
    # a rank-k change: the edit moves every point within a k-dimensional subspace
    assert torch.linalg.matrix_rank(edit(x) - x, atol=1e-3) == k


def test_no_linear_probe_finds_the_concept_after_the_edit_on_the_fitted_data():
    x, z = planted(seed=1)
    y = z[:, 0].bool()
    assert probes.linear_probe(x, y, x, y).balanced_accuracy > 95
    erased = erasure.fit_leace(x, z)(x)
    assert probes.linear_probe(erased, y, erased, y).balanced_accuracy < 55


def test_the_edit_is_idempotent_and_with_white_features_an_orthogonal_projection():
    x, z = planted(seed=2)
    edit = erasure.fit_leace(x, z)
    once = edit(x)
    assert torch.allclose(edit(once), once, atol=1e-3)
    g = torch.Generator().manual_seed(3)
    white = torch.randn(20000, 8, generator=g)
    label = (white[:, 0] + white[:, 1] > 0).float()
    w = erasure.fit_leace(white, label).weight.double()
    u = erasure.linear_covariance(white, label)[:, 0]
    u = u / u.norm()
    assert torch.allclose(w, torch.eye(8, dtype=torch.float64) - torch.outer(u, u), atol=0.05)


def test_with_the_shared_mean_s_direction_gone_normalising_cannot_bring_the_concept_back():
    """Positives sit nearer the origin (the demo base's graffiti images did): after LEACE both classes share one mean,
    and dividing each point by its norm scales that mean by a class's own 1/norm, a difference a probe on unit vectors
    reads. Without the mean's direction both classes are centred on zero, which normalising cannot move."""
    g = torch.Generator().manual_seed(4)
    n, d = 4000, 12
    z = (torch.rand(n, 1, generator=g) < 0.3).float()
    scale = 1.0 - 0.5 * z  # positives: half the spread
    x = 6.0 + torch.randn(n, d, generator=g) * scale + z * torch.randn(1, d, generator=g)
    y = z[:, 0].bool()
    unit = torch.nn.functional.normalize
    leace = erasure.fit_leace(x, z)
    assert probes.linear_probe(leace(x), y, leace(x), y).balanced_accuracy < 55  # before the head: gone
    assert probes.linear_probe(unit(leace(x)), y, unit(leace(x)), y).balanced_accuracy > 70  # after it: back
    both = erasure.without_mean_direction(leace, x)
    assert both.rank == 2 and both(x).mean(dim=0).abs().max() < 1e-3
    assert erasure.linear_covariance(both(x), z).abs().max() < 1e-4
    assert probes.linear_probe(unit(both(x)), y, unit(both(x)), y).balanced_accuracy < 55


def test_too_few_rows_or_a_constant_label_are_refused():
    x, z = planted(n=10, d=16)
    with pytest.raises(InputError, match="more than 16 rows"):
        erasure.fit_leace(x, z)
    x, _ = planted()
    with pytest.raises(InputError, match="constant"):
        erasure.fit_leace(x, torch.zeros(len(x), 1))


# ------------------------------------------------------------------------------------- the encoder
@pytest.fixture(scope="module")
def encoders() -> dict[str, SafetyEncoder]:
    torch.manual_seed(0)
    return {g: SafetyEncoder(architectures.resolve("tiny"), g).eval() for g in ("euclidean", "lorentz")}


def _edit(dim: int, seed: int) -> erasure.Edit:
    x, z = planted(n=600, d=dim, seed=seed)
    return erasure.fit_leace(x, z)


@pytest.mark.parametrize("geometry", ["euclidean", "lorentz"])
def test_an_eraser_acts_before_the_head_and_a_second_one_composes(encoders, geometry, tmp_path):
    enc = encoders[geometry].blank_copy()
    enc.load_state_dict(encoders[geometry].state_dict())
    pixels = torch.rand(4, 3, 64, 64)
    raw = enc.encode_image(pixels, head=False)
    dim = enc.arch.embed_dim
    e1, e2 = _edit(dim, 1), _edit(dim, 2)
    enc.add_eraser("image", e1.weight, e1.bias)
    enc.add_eraser("image", e2.weight, e2.bias)
    assert torch.allclose(enc.encode_image(pixels, head=False), e2(e1(raw)), atol=1e-4)
    # the head (normalisation, or alpha and exp_map0) takes the erased features
    assert torch.allclose(enc.encode_image(pixels), encoders[geometry].lift(e2(e1(raw)), "image"), atol=1e-5)
    assert sorted(k for k in enc.state_dict() if k.startswith("erasers.")) == ["erasers.image.bias",
                                                                               "erasers.image.weight"]
    # the artifact carries it: the same embeddings after a round trip, the fingerprint verified
    enc.erasure = [{"method": "leace", "towers": ["image"], "concepts": ["x"]}]
    saved = artifact.save(artifact.Artifact(enc), tmp_path / "a")
    loaded = artifact.load(saved, device="cpu")
    assert loaded.encoder.erasure == enc.erasure
    assert torch.allclose(loaded.encoder.encode_image(pixels), enc.encode_image(pixels), atol=1e-6)
    assert torch.equal(loaded.encoder.encode_text(["a cat"]), enc.encode_text(["a cat"]))  # the text tower untouched


def test_an_artifact_without_erasers_keeps_its_config_and_a_mismatched_eraser_is_refused(encoders, tmp_path):
    plain = artifact.save(artifact.Artifact(encoders["euclidean"]), tmp_path / "plain")
    assert "erasure" not in json.loads((plain / artifact.CONFIG).read_text())
    with pytest.raises(InputError, match="128x128"):
        encoders["euclidean"].blank_copy().add_eraser("image", torch.eye(64), torch.zeros(64))
    cfg = json.loads((plain / artifact.CONFIG).read_text())
    cfg["erasure"] = [{"method": "leace", "towers": ["text"], "concepts": ["x"]}]
    cfg.pop("fingerprint")
    (plain / artifact.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="eraser on the text tower.*no matrix"):
        artifact.load(plain, device="cpu")


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def erasable(tmp_path_factory) -> dict[str, Path]:
    """A small dataset with 128 or more train images of gun, knife and graffiti (as many as the tiny model's features
    have dimensions), and a random tiny artifact of each geometry."""
    root = tmp_path_factory.mktemp("erasure")
    data = root / "visu"
    synthetic.generate(data, n=100, seed=4, image_size=32, boost=["gun", "knife", "graffiti"], boost_n=128,
                       boost_split="train")
    return {"data": data, **random_tiny_artifacts(root)}


def test_train_method_erase_writes_an_erased_artifact_that_records_what_it_took_out(erasable, tmp_path):
    out = tmp_path / "erased"
    proc = run_cli("train", "--method", "erase", "--model", erasable["lorentz"], "--data", erasable["data"],
                   "--forget", "weapons", "--erase-towers", "image,text", "--out", out)
    summary = json.loads(proc.stdout)
    assert summary["concepts"] == ["gun", "knife"] and summary["rank"] == {"image": 2, "text": 2}
    art = artifact.load(out, device="cpu")
    (record,) = art.encoder.erasure
    assert record["towers"] == ["image", "text"] and record["split"] == "train"
    assert min(record["positives"].values()) >= 128
    assert art.provenance["method"] == "erase" and art.provenance["forget"]["concepts"] == ["gun", "knife"]
    assert art.bounds and art.safety["unsafe_threshold"]  # recalibrated on the validation split
    # a second request stacks onto the first
    again = tmp_path / "again"
    run_cli("train", "--method", "erase", "--model", out, "--data", erasable["data"], "--forget", "graffiti",
            "--out", again)
    assert [r["concepts"] for r in artifact.load(again, device="cpu").encoder.erasure] == [["gun", "knife"],
                                                                                            ["graffiti"]]


def test_then_erase_follows_an_unlearning_run_and_leaves_only_the_erased_artifact(erasable, tmp_path):
    out = tmp_path / "forgot"
    proc = run_cli("train", "--method", "ga", "--model", erasable["euclidean"], "--data", erasable["data"], "--forget",
                   "graffiti", "--max-steps", "2", "--epochs", "1", "--then-erase", "--out", out)
    art = artifact.load(out, device="cpu")
    assert art.provenance["method"] == "ga+erase" and art.provenance["before"]["method"] == "ga"
    assert art.provenance["forget"]["concepts"] == ["graffiti"] and art.encoder.erasure[0]["rank"] == {"image": 2}
    assert json.loads(proc.stdout[proc.stdout.rindex("{\n  \"method\": \"leace"):])["out"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forgot", "forgot.run"]  # no half-made artifact left


@pytest.mark.parametrize(("args", "message"), [
    (("--forget", "graffiti,drug use"), r"too few examples .*\(syringe \d+, pills \d+ images\).* at least 128"),
    (("--forget", "weapons", "--erase-towers", "audio"), "--erase-towers takes image or text"),
    (("--forget", "nonsense"), "unknown concept 'nonsense'"),
    (("--forget", "weapons", "--method", "clip", "--then-erase"), "--then-erase follows an unlearning method"),
])
def test_bad_erase_requests_fail_clearly_and_write_nothing(erasable, tmp_path, args, message):
    out = tmp_path / "never"
    argv = ["train", "--method", "erase", "--model", erasable["euclidean"], "--data", erasable["data"], "--out", out]
    proc = run_cli(*argv, *args, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
