"""The `model` and `embed` commands through the real console script."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import CLI, on_a_full_disk
from training import architectures, artifact
from training.encoder import SafetyEncoder


def test_init_info_and_embed_on_a_fresh_tiny_model(cli, tmp_path):
    out = tmp_path / "tiny"
    cli("model", "init", "--arch", "tiny", "--geometry", "lorentz", "--out", out)
    info = json.loads(cli("model", "info", out).stdout)
    assert info["geometry"] == "lorentz" and info["architecture"]["name"] == "tiny"
    assert info["fingerprint"].startswith("sha256:") and info["bounds"] == {}
    emb = json.loads(cli("embed", "--model", out, "--text", "a red ball").stdout)
    assert emb["geometry"] == "lorentz" and len(emb["vector"]) == 128
    assert emb["distance_to_origin"] > 0 and emb["unsafe"] is None  # no calibrated threshold yet
    # the printed vector is what the library computes
    art = artifact.load(out, device="cpu")
    assert torch.allclose(torch.tensor(emb["vector"]), art.encoder.encode_text(["a red ball"])[0], atol=1e-6)


def test_embed_image_with_traversal_on_a_calibrated_model(cli, tmp_path):
    from PIL import Image

    enc = SafetyEncoder(architectures.resolve("tiny"), "lorentz")
    bounds = {c: {"mean": 0.002, "p05": 0.001, "p50": 0.002, "p95": 0.003} for c in "SVUG"}
    art = artifact.Artifact(enc, bounds=bounds, safety={"unsafe_threshold": {"text": 0.005, "image": 0.005}})
    path = artifact.save(art, tmp_path / "cal")
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "red").save(img)
    emb = json.loads(cli("embed", "--model", path, "--image", img, "--traverse").stdout)
    assert emb["modality"] == "image" and emb["unsafe"] is True
    trav = emb["traversal"]
    assert trav["triggered"] and abs(trav["distance_to_origin_after"] - 0.002) < 1e-5
    assert trav["distance_to_origin"] == emb["distance_to_origin"]


def test_errors_are_printed_without_traceback(cli, tmp_path):
    cases = [
        (["model", "init", "--arch", "ViT-Q-99", "--out", tmp_path / "m"], "Valid names"),
        (["embed", "--model", tmp_path / "missing", "--text", "x"], "not found"),
    ]
    (tmp_path / "w.pth").write_bytes(b"not really")
    cases.append((["embed", "--model", tmp_path / "w.pth", "--text", "x"], "model convert"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cli("model", "init", "--out", tmp_path / "ok")
    cases.append((["embed", "--model", tmp_path / "ok", "--image", bad], str(bad)))
    cases.append((["embed", "--model", tmp_path / "ok", "--text", " "], "empty"))
    cases.append((["embed", "--model", tmp_path / "ok"], "exactly one"))
    for args, message in cases:
        proc = cli(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_a_full_disk_gets_a_message_and_leaves_no_partial_dataset(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    synth = f'"{CLI}" data synth --out "{mnt}/visu" --n 60; rc=$?; ls -A "{mnt}"; exit $rc'  # ls: what is left
    proc = on_a_full_disk(["sh", "-c", synth], mnt)
    assert proc.returncode == 2, proc.stderr
    assert "the disk is full" in proc.stderr and "free some space" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "", "a partial dataset (or its temp directory) was left on the full disk"


def test_a_place_it_may_not_write_gets_a_message(cli, tmp_path):
    # /sys refuses new directories even to root, where a chmod'ed tmp_path would not
    out = Path("/sys/kernel/safe-retrieval-test/visu")
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys here to refuse a write")
    proc = cli("data", "synth", "--out", out, "--n", 10, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot write /sys/kernel/safe-retrieval-test") and "permissions" in lines[0]


def test_every_command_has_help(cli):
    for args in (["--help"], ["model", "--help"], ["model", "convert", "--help"], ["data", "synth", "--help"],
                 ["embed", "--help"], ["model", "init", "--help"], ["model", "info", "--help"]):
        assert "Usage" in cli(*args).stdout


def test_train_help_lists_each_forget_method_s_terms_weights_and_forms_from_the_method_table(cli):
    from training import methods

    text = "".join(cli("train", "--help").stdout.split())  # wrapped at spaces and hyphens: compare without them
    for name in methods.FORGETTING:
        assert "".join(methods.describe(name).split()) in text, name
    assert "acform=paper:retain_contrastivenegative_calibration(epsilon*alpha)" in text
    assert "alpha=0.75,beta=0.5,gamma=0.75" in text and "acform=ours(ours)" in text


def test_eval_has_help_in_either_form(cli):
    # the `eval` command (today's options) or, once the root mounts training.cli.eval_app, the group of its subcommands
    text = cli("eval", "--help").stdout
    assert "Usage" in text and ("--floors" in text or ("Commands:" in text and "unlearning" in text))
