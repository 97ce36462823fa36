"""Artifacts: atomic save, pickle-free load, fingerprints, and the errors users see."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.cli import on_a_full_disk
from training import architectures, artifact
from training.encoder import SafetyEncoder
from training.errors import ArtifactError, CheckpointError


@pytest.fixture()
def art():
    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve("tiny"), "lorentz")
    bounds = {c: {"mean": 1.0 + i, "p05": 0.5 + i, "p50": 1.0 + i, "p95": 1.5 + i} for i, c in enumerate("SVUG")}
    return artifact.Artifact(enc, bounds=bounds, safety={"unsafe_threshold": {"text": 2.0, "image": 3.0}},
                             provenance=artifact.provenance("test"))


def test_round_trip_reproduces_embeddings_and_metadata(art, tmp_path):
    path = artifact.save(art, tmp_path / "a")
    assert sorted(p.name for p in path.iterdir()) == ["bounds.json", "config.json", "model.safetensors"]
    back = artifact.load(path, device="cpu")
    texts = ["a red ball", "a blue box"]
    assert torch.equal(back.encoder.encode_text(texts), art.encoder.encode_text(texts))
    assert back.fingerprint == art.fingerprint and back.fingerprint.startswith("sha256:")
    assert back.bounds == art.bounds and back.unsafe_threshold("image") == 3.0
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["geometry"] == "lorentz" and cfg["curvature"] == pytest.approx(1.0)
    assert cfg["preprocess"]["interpolation"] == "bicubic" and cfg["provenance"]["source"] == "test"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs must not remain"


def test_fingerprint_follows_weights_and_bounds_not_provenance(art, tmp_path):
    first = artifact.save(art, tmp_path / "a") and art.fingerprint
    art.provenance = artifact.provenance("elsewhere")
    artifact.save(art, tmp_path / "b")
    assert art.fingerprint == first
    art.bounds["S"]["p95"] = 9.0
    artifact.save(art, tmp_path / "c")
    assert art.fingerprint != first
    with torch.no_grad():
        art.encoder.clip.ln_final.weight.add_(0.1)
    art.bounds["S"]["p95"] = 1.5
    artifact.save(art, tmp_path / "d")
    assert art.fingerprint != first


def test_tampered_weights_are_detected(art, tmp_path):
    path = artifact.save(art, tmp_path / "a")
    state = load_file(str(path / "model.safetensors"))
    state["curv"] = state["curv"] + 1
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ArtifactError, match="fingerprint"):
        artifact.load(path)


def test_missing_and_unexpected_keys_are_named(art, tmp_path):
    path = artifact.save(art, tmp_path / "a")
    state = load_file(str(path / "model.safetensors"))
    state.pop("clip.ln_final.weight")
    state["clip.extra.weight"] = torch.zeros(1)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        artifact.load(path, verify=False)
    assert "clip.ln_final.weight" in str(e.value) and "clip.extra.weight" in str(e.value)


def test_pickle_checkpoint_is_refused_with_guidance(tmp_path):
    pth = tmp_path / "hysac_model.pth"
    torch.save({"x": torch.zeros(1)}, pth)
    with pytest.raises(ArtifactError, match="model convert"):
        artifact.load(pth)


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"format": "other"}')), "not a safe-retrieval artifact"),
])
def test_not_an_artifact(tmp_path, setup, message):
    p = tmp_path / "x"
    setup(p)
    with pytest.raises(ArtifactError, match=message):
        artifact.load(p)


def test_save_refuses_to_clobber_unless_asked(art, tmp_path):
    artifact.save(art, tmp_path / "a")
    with pytest.raises(ArtifactError, match="already exists"):
        artifact.save(art, tmp_path / "a")
    artifact.save(art, tmp_path / "a", overwrite=True)
    assert artifact.load(tmp_path / "a").fingerprint == art.fingerprint


def test_failed_save_leaves_nothing_behind(art, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(OSError):
        artifact.save(art, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_previous_directory_and_says_what_to_do(tmp_path):
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / "step").write_text("7")

    def write(tmp):
        (tmp / "optimizer.bin").symlink_to("/dev/full")  # the kernel answers every write to it with ENOSPC
        with open(tmp / "optimizer.bin", "wb") as f:
            f.write(bytes(1 << 16))

    with pytest.raises(ArtifactError, match=r"disk holding .* is full.*previous one is kept.*free some space"):
        artifact.atomic_dir(final, write)
    assert (final / "step").read_text() == "7"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


_FULL_TMPFS = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from training import artifact
from training.errors import ArtifactError
final = Path(sys.argv[1]) / "checkpoint"
final.mkdir()
(final / "step").write_text("7")
try:
    artifact.atomic_dir(final, lambda tmp: save_file({"w": torch.zeros(1 << 16)}, str(tmp / "optimizer.safetensors")))
except ArtifactError as e:
    print(e)
print(sorted(p.name for p in final.parent.iterdir()), (final / "step").read_text())
"""


def test_a_full_disk_under_safetensors_gets_the_same_message(tmp_path):
    """safetensors writes through a temp file of its own, so the full disk must be real: a 64 KiB tmpfs."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    run = on_a_full_disk([sys.executable, "-c", _FULL_TMPFS, mnt], mnt)
    assert run.returncode == 0, run.stderr
    message, listing = run.stdout.strip().splitlines()
    assert "is full" in message and "previous one is kept" in message and "free some space" in message
    assert listing == "['checkpoint'] 7"
