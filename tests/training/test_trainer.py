"""The trainer end to end on a tiny synthetic dataset: artifacts, checkpoints, resume, signals, DDP, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import CLI
from training import architectures, artifact, objectives, optim, recipes, trainer
from training.data.loader import Collate
from training.encoder import SafetyEncoder
from training.errors import ArtifactError, CheckpointError, DataError, OutOfMemory
from training.recipes import TrainConfig

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
BATCH = 8


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """60 quadruplets: 48 train (6 steps of 8), 6 validation, 6 test."""
    from training.data import synthetic

    root = tmp_path_factory.mktemp("trainer-data") / "visu"
    synthetic.generate(root, n=60, seed=3)
    return root


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(method="hysac", data=data, out=out, model="tiny", full_finetune=True, epochs=1, batch_size=BATCH,
                lr=1e-3, workers=0, progress=False, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / trainer.METRICS).read_text().splitlines()]


@pytest.fixture(scope="module")
def hysac_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hysac-run") / "model"
    result = trainer.train(_config(small_data, out, epochs=2))
    return result, out


# ----------------------------------------------------------------------------------------- learning
def _fixed_batch(enc: SafetyEncoder, data: Path):
    from training.data import visu

    records = visu.load_split(data, "train").records[:BATCH]
    items = [visu.QuadDataset(records, enc.transform)[i] for i in range(len(records))]
    b = Collate(enc.tokenizer)(items)
    return b.safe_tokens, b.nsfw_tokens, b.safe_pixels, b.nsfw_pixels


@pytest.mark.parametrize("method", ["hysac", "safeclip", "clip"])
def test_a_few_real_steps_reduce_the_loss(method, small_data):
    torch.manual_seed(0)
    cls = objectives.objective_class(method)
    enc = SafetyEncoder(architectures.resolve("tiny"), cls.geometry)
    cfg = recipes.resolve_config(_config(small_data, small_data / "unused", method=method))
    reference = SafetyEncoder(architectures.resolve("tiny"), cls.geometry) if method == "safeclip" else None
    optim.prepare_encoder(enc, cls, cfg)
    step = trainer.TrainStep(enc, objectives.build(method, reference=reference))
    opt = optim.build_optimizer(enc, method, cfg)
    batch = _fixed_batch(enc, small_data)
    with torch.no_grad():
        before = float(step(*batch)[0])
    for _ in range(6):
        loss = step(*batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        enc.clamp_scalars()
    with torch.no_grad():
        after = float(step(*batch)[0])
    assert after < before, (before, after)


def test_optimizers_follow_the_references(small_data):
    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve("tiny"))
    cfg = recipes.resolve_config(_config(small_data, small_data / "unused"))
    optim.prepare_encoder(enc, objectives.HySACObjective, cfg)
    opt = optim.build_optimizer(enc, "hysac", cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.98)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.2 for p in g["params"]}
    for name in ("curv", "visual_alpha", "textual_alpha", "logit_scale", "clip.ln_final.weight",
                 "clip.transformer.resblocks.0.mlp.c_fc.bias"):
        assert id(enc.get_parameter(name)) not in decayed, name
    assert id(enc.clip.transformer.resblocks[0].mlp.c_fc.weight) in decayed
    euclid = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    sc_cfg = recipes.resolve_config(_config(small_data, small_data / "unused", method="safeclip", full_finetune=False, lr=None))
    optim.prepare_encoder(euclid, objectives.SafeClipObjective, sc_cfg)
    sc_opt = optim.build_optimizer(euclid, "safeclip", sc_cfg)
    assert type(sc_opt) is torch.optim.Adam and sc_opt.param_groups[0]["lr"] == 1e-3
    assert not euclid.logit_scale.requires_grad  # Safe-CLIP's scale is fixed


# ---------------------------------------------------------------------------------------- artifacts
def test_training_writes_a_calibrated_artifact_and_a_pickle_free_run_dir(hysac_run):
    result, out = hysac_run
    assert result.artifact == out and result.epochs_completed == 2 and result.steps == 2 * (48 // BATCH)
    art = artifact.load(out, device="cpu")  # a plain SafetyEncoder, fingerprint verified
    assert art.geometry == "lorentz" and art.provenance["method"] == "hysac"
    assert set(art.bounds) == {"S", "V", "U", "G"}
    assert set(art.safety["unsafe_threshold"]) == {"text", "image"}
    run_files = sorted(p.relative_to(result.run_dir).as_posix() for p in result.run_dir.rglob("*") if p.is_file())
    assert run_files == ["best.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors",
                         "checkpoint/rng.safetensors", "checkpoint/state.json", "metrics.jsonl"]
    events = _events(result.run_dir)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "artifact" and kinds.count("epoch") == 2
    epoch = next(e for e in events if e["event"] == "epoch")
    assert set(epoch["validation"]) == {"S->V", "V->S", "S->G", "G->S", "U->V", "V->U", "sum"}
    assert all("samples_per_s" in e and "loss" in e for e in events if e["event"] == "step")
    assert not list(out.parent.glob(".*.tmp")), "a temporary directory was left behind"


def test_lora_training_merges_adapters_and_never_moves_the_query_projection(small_data, tmp_path):
    torch.manual_seed(7)
    source = tmp_path / "source"
    artifact.save(artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), "euclidean")), source)
    out = tmp_path / "clip-lora"
    result = trainer.train(_config(small_data, out, method="clip", model=str(source), full_finetune=False,
                                   lora_rank=4, lr=1e-2, max_steps=3))
    assert result.steps == 3
    before = load_file(str(source / artifact.WEIGHTS))
    after = load_file(str(out / artifact.WEIGHTS))
    assert set(after) == set(before), "the artifact must hold plain (merged) weights"
    key = "clip.visual.transformer.resblocks.0.attn.in_proj_weight"
    w = before[key].shape[1]
    assert torch.equal(after[key][:w], before[key][:w]), "q rows changed"
    assert not torch.equal(after[key][w:], before[key][w:]), "k/v rows did not train"
    assert torch.equal(after["clip.ln_final.weight"], before["clip.ln_final.weight"]), "a frozen weight changed"
    artifact.load(out, device="cpu")


# ------------------------------------------------------------------------------------------- resume
def test_resume_continues_at_the_next_epoch(hysac_run, small_data, tmp_path):
    result, _ = hysac_run
    out = tmp_path / "resumed"
    again = trainer.train(_config(small_data, out, epochs=3, resume=result.run_dir))
    assert again.epochs_completed == 3 and again.steps == 3 * (48 // BATCH)
    events = _events(again.run_dir)
    assert events[0]["event"] == "start" and events[0]["resumed_at_epoch"] == 2
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [3]
    assert artifact.load(out, device="cpu").provenance["epochs"] == 3


def test_resume_with_another_method_is_refused_with_a_clear_error(hysac_run, small_data, tmp_path):
    result, _ = hysac_run
    with pytest.raises(CheckpointError, match="--method hysac"):
        trainer.train(_config(small_data, tmp_path / "x", method="clip", epochs=3, resume=result.run_dir))
    with pytest.raises(CheckpointError, match="adapters"):
        trainer.train(_config(small_data, tmp_path / "y", full_finetune=False, epochs=3, resume=result.run_dir))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.glob("*.run")), "a refused resume left a run directory behind"


def test_resume_with_another_architecture_is_refused_with_a_clear_error(hysac_run, small_data, tmp_path):
    result, _ = hysac_run
    other = tmp_path / "other.run"
    shutil.copytree(result.run_dir, other)
    state_path = other / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["architecture"] = {"name": "ViT-B-32", "model_cfg": {**state["architecture"]["model_cfg"], "embed_dim": 512}}
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="holds a 'ViT-B-32' model but --model gives 'tiny'"):
        trainer.train(_config(small_data, tmp_path / "x", epochs=3, resume=other))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.run").exists()


def test_a_mid_epoch_checkpoint_resumes_only_with_its_batch_size(small_data, tmp_path):
    first = trainer.train(_config(small_data, tmp_path / "a", epochs=2, max_steps=3))  # half of the first epoch
    state = json.loads((first.run_dir / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step_in_epoch"] == 3 and state["world_size"] == 1
    with pytest.raises(CheckpointError, match="inside an epoch.*--batch-size 8"):
        trainer.train(_config(small_data, tmp_path / "b", epochs=2, batch_size=4, resume=first.run_dir))
    again = trainer.train(_config(small_data, tmp_path / "c", epochs=2, resume=first.run_dir))
    assert again.epochs_completed == 2 and again.steps == 2 * (48 // BATCH)


def test_resume_from_a_missing_checkpoint_says_where_it_looked(small_data, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        trainer.train(_config(small_data, tmp_path / "x", resume=tmp_path))


# --------------------------------------------------------------------------------------- bad input
def test_an_existing_output_is_refused_before_any_work(small_data, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        trainer.train(_config(small_data, tmp_path / "taken"))
    assert not (tmp_path / "taken.run").exists()


def test_an_empty_split_is_a_data_error(small_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "ViSU-Text_validation.json").write_text("[]")
    with pytest.raises(DataError, match="validation"):
        trainer.train(_config(data, tmp_path / "out"))


@pytest.mark.parametrize("where", ["step", "validation", "calibration"])
def test_out_of_gpu_memory_says_what_to_lower_wherever_it_happens(where, small_data, tmp_path, monkeypatch):
    # a CPU cannot run out of CUDA memory: raise the error CUDA raises from the part that would allocate
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    target = {"step": (trainer.TrainStep, "forward"), "validation": (trainer, "validation_scores"),
              "calibration": (trainer, "calibration")}[where]
    monkeypatch.setattr(*target, oom)
    with pytest.raises(OutOfMemory, match="--batch-size.*--grad-checkpointing") as err:
        trainer.train(_config(small_data, tmp_path / "model"))
    assert "Tried to allocate 2.00 GiB" in str(err.value) and err.value.exit_code == 3
    assert not (tmp_path / "model").exists(), "a partial artifact was left where the final one goes"


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(small_data, tmp_path, monkeypatch):
    sums = iter([2.0, 2.5, 1.0, 0.5, 3.0])  # best at epoch 2, then two worse epochs: patience 2 stops at epoch 4
    real = trainer.validation_scores
    weights: dict[int, dict] = {}

    def scripted(encoder, records, **kw):
        weights[len(weights) + 1] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        return {**real(encoder, records, **kw), "sum": next(sums)}

    monkeypatch.setattr(trainer, "validation_scores", scripted)
    result = trainer.train(_config(small_data, tmp_path / "model", epochs=5, patience=2))
    assert result.stopped_early and result.epochs_completed == 4 and result.best_epoch == 2
    assert result.best_recall_sum == 2.5
    events = [e for e in _events(result.run_dir) if e["event"] == "epoch"]
    assert [e["patience_left"] for e in events] == [2, 2, 1, 0]
    art = artifact.load(tmp_path / "model", device="cpu")
    assert art.provenance["best_epoch"] == 2 and art.provenance["epochs"] == 4
    # the artifact holds epoch 2's weights, not the last epoch's
    best, last = weights[2], weights[4]
    key = "clip.visual.proj" if "clip.visual.proj" in best else next(k for k in best if k.startswith("clip.visual"))
    saved = art.encoder.state_dict()[key]
    assert torch.allclose(saved, best[key]) and not torch.allclose(saved, last[key])


@pytest.mark.parametrize("option", [{"grad_checkpointing": True}, {"precision": "bf16"}])
def test_checkpointing_and_bf16_train_the_same_model_as_the_plain_path(option, small_data, tmp_path):
    plain = trainer.train(_config(small_data, tmp_path / "plain", max_steps=2))
    other = trainer.train(_config(small_data, tmp_path / "other", max_steps=2, **option))
    assert plain.steps == other.steps == 2
    a = artifact.load(tmp_path / "plain", device="cpu").encoder.state_dict()
    b = artifact.load(tmp_path / "other", device="cpu").encoder.state_dict()
    torch.manual_seed(0)  # the trainer's seed: the weights both runs started from
    init = SafetyEncoder(architectures.resolve("tiny"), "lorentz").state_dict()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], init[k])]
    assert len(moved) > len(a) // 2, "two steps changed almost nothing"
    if "grad_checkpointing" in option:  # recomputing activations changes nothing
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in moved)
    else:  # bf16 autocast really ran (other rounding) and trained the same way (Adam moves 1e-3 a step)
        assert any(not torch.equal(a[k], b[k]) for k in moved)
        assert all(torch.allclose(a[k], b[k], atol=5e-3) for k in moved)
    event = _events(other.run_dir)[0]
    assert event["precision"] == ("bf16" if "precision" in option else "fp32")


def test_each_step_trains_at_the_rate_lr_at_gives(small_data, tmp_path):
    result = trainer.train(_config(small_data, tmp_path / "model", epochs=2, max_steps=8, warmup_steps=3,
                                   schedule="cosine", log_every=1))
    rates = [e["lr"] for e in _events(result.run_dir) if e["event"] == "step"]  # epoch 1 and two steps of epoch 2
    assert rates == [optim.lr_at(s, lr=1e-3, warmup_steps=3, schedule="cosine", total_steps=2 * 6) for s in range(8)]


@pytest.mark.parametrize("epochs,workers", [(1, 1), (2, 0)])  # decoded in a loader worker; decoded once and cached
def test_an_unreadable_training_image_is_skipped_and_counted(epochs, workers, small_data, tmp_path):
    from training.data import visu

    data = tmp_path / "visu"
    shutil.copytree(small_data, data)
    bad = visu.load_split(data, "train").records[5].safe_image
    bad.write_bytes(b"not a jpeg")  # present, so the loader keeps the record; only decoding finds it
    result = trainer.train(_config(data, tmp_path / "model", epochs=epochs, workers=workers))
    assert result.artifact is not None and result.epochs_completed == epochs
    assert result.skipped["train"] == {"unreadable image": 1}
    assert [e["unreadable_images"] for e in _events(result.run_dir) if e["event"] == "epoch"] == [1] * epochs


def test_the_progress_bar_shows_loss_rate_and_the_whole_runs_eta(small_data, tmp_path, capsys):
    trainer.train(_config(small_data, tmp_path / "model", epochs=2, progress=True))
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    first = [line for line in err.replace("\r", "\n").splitlines() if "epoch 1/2" in line and "run_eta=" in line][0]
    assert "loss=" in first and "samples_s=" in first
    assert trainer._clock(59) == "0:59" and trainer._clock(3725) == "1:02:05"


def test_a_batch_lists_the_unreadable_positions_its_items_skipped():
    collate = Collate(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), n_records=10)
    item = {"safe_image": torch.zeros(3, 2, 2), "nsfw_image": torch.zeros(3, 2, 2), "safe": "a", "nsfw": "b"}
    items = [{**item, "requested": 4, "index": 4}, {**item, "requested": 8, "index": 1}]  # the second wrapped around
    assert collate(items).unreadable == (8, 9, 0)


def test_a_batch_larger_than_the_split_is_a_data_error(small_data, tmp_path):
    with pytest.raises(DataError, match="--batch-size"):
        trainer.train(_config(small_data, tmp_path / "out", batch_size=64))


@pytest.mark.parametrize("method", ["hysac", "safeclip", "clip"])
def test_the_demo_preset_needs_a_base_model(small_data, tmp_path, method):
    from training.errors import InputError

    with pytest.raises(InputError, match="--model: .*--preset demo-base"):
        trainer.train(TrainConfig(method=method, preset="demo", data=small_data, out=tmp_path / "o", progress=False))
    assert not (tmp_path / "o").exists()


def test_a_preset_generates_the_synthetic_data_it_is_sized_for_when_missing(tmp_path):
    data = tmp_path / "visu"
    cfg = TrainConfig(method="hysac", preset="demo", model="tiny", data=data, out=tmp_path / "o", max_steps=1, progress=False)
    assert trainer.train(cfg).artifact is not None
    info = json.loads((data / "dataset.json").read_text())
    recipe = recipes.RECIPES["demo"]
    assert (info["n"], info["unsafe_look"]) == (recipe["synthetic_n"], recipe["synthetic_look"])


def test_the_demo_base_preset_is_a_clip_on_all_pairs(small_data, tmp_path):
    from training.errors import InputError

    with pytest.raises(InputError, match="--method clip"):
        recipes.resolve_config(TrainConfig(method="hysac", preset="demo-base", data=small_data, out=tmp_path / "o"))
    cfg = recipes.resolve_config(TrainConfig(method="clip", preset="demo-base", data=small_data, out=tmp_path / "o"))
    assert (cfg.model, cfg.clip_pairs, cfg.full_finetune) == ("tiny", "all", True)
    # the demo fine-tune: hysac's entailment weight from the preset, an explicit value still wins
    demo = dict(method="hysac", preset="demo", model="base", data=small_data, out=tmp_path / "o")
    assert recipes.resolve_config(TrainConfig(**demo)).eta == 2.0
    assert recipes.resolve_config(TrainConfig(**demo, eta=1.0)).eta == 1.0
    assert recipes.resolve_config(TrainConfig(method="hysac", data=small_data, out=tmp_path / "o")).eta == 1.0


# ------------------------------------------------------------------------------ signals, DDP and CLI
def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited early ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("training did not get going in time")


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--method", "hysac", "--data", str(data), "--out", str(out), "--model", "tiny", "--full-finetune",
            "--batch-size", str(BATCH), "--lr", "1e-3", "--workers", "0", "--device", "cpu", "--seed", "0", *extra]


def test_sigterm_saves_a_checkpoint_leaves_no_artifact_and_the_cli_resumes(small_data, tmp_path):
    out = tmp_path / "model"
    run_dir = tmp_path / "model.run"
    proc = subprocess.Popen([CLI, *_train_args(small_data, out, "--epochs", "500")], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = run_dir / "checkpoint" / "state.json"
    _wait_for(checkpoint.is_file, proc)  # the first epoch is done: we are inside the second one
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint saved" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists(), "a partial artifact was left where the final one goes"
    assert not list(tmp_path.glob(".*.tmp"))
    state = json.loads(checkpoint.read_text())
    done = state["progress"]["epoch"]
    assert done >= 1 and state["method"] == "hysac"
    assert _events(run_dir)[-1]["event"] == "interrupted"

    resumed = subprocess.run([CLI, *_train_args(small_data, out, "--epochs", str(done + 1), "--resume", str(run_dir))],
                             text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["artifact"] == str(out) and summary["epochs_completed"] == done + 1
    assert "resumed from" in resumed.stderr
    assert artifact.load(out, device="cpu").provenance["epochs"] == done + 1


def test_cli_reports_bad_input_without_a_traceback(small_data, tmp_path):
    proc = subprocess.run([CLI, *_train_args(small_data, tmp_path / "o", "--method", "clip", "--resume", str(tmp_path))],
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2 and "no checkpoint found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method,weights", [
    ("safeclip", (1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)),  # the two cosine preservation terms only
    ("hysac", (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),  # (T, I) alone, no entailment
])
def test_weights_from_the_cli_are_the_ones_the_loss_uses(small_data, tmp_path, method, weights):
    from training.objectives.base import weighted_mean

    cls = objectives.objective_class(method)
    out = tmp_path / "m"
    proc = subprocess.run([CLI, *_train_args(small_data, out, "--method", method, "--epochs", "1",
                                             "--weights", ",".join(map(str, weights)))],
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    steps = [e for e in _events(tmp_path / "m.run") if e["event"] == "step"]
    assert steps
    for e in steps:
        terms = [torch.tensor(e["terms"][t]) for t in cls.terms]
        assert e["loss"] == pytest.approx(weighted_mean(terms, list(weights)).item(), rel=1e-4)
        assert e["loss"] != pytest.approx(weighted_mean(terms, list(objectives.reference_weights(method))).item(), rel=0.05)
    prov = artifact.load(out, device="cpu").provenance
    assert prov["weights"] == list(weights) and prov["eta"] is None


def test_without_weights_the_artifact_records_the_weights_eta_gives(small_data, tmp_path):
    result = trainer.train(_config(small_data, tmp_path / "h", max_steps=1, eta=2.0))
    prov = artifact.load(result.artifact, device="cpu").provenance
    assert prov["weights"] == [1, 1, 1, 1, 2, 2, 2] and prov["eta"] == 2.0


@pytest.mark.parametrize("method,kw,message", [
    ("safeclip", {"weights": (0.1, 0.1)}, "for safeclip takes 8 non-negative numbers"),
    ("safeclip", {"weights": (0.1, -0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5)}, "got 0.1,-0.1,"),
    ("hysac", {"weights": (0.0,) * 7}, "not all zero"),
    ("clip", {"weights": (1.0,)}, "single loss term"),
    ("hysac", {"weights": (1.0,) * 7, "eta": 2.0}, "--eta or --weights, not both"),
])
def test_bad_weights_say_what_is_expected(small_data, tmp_path, method, kw, message):
    from training.errors import InputError

    with pytest.raises(InputError, match=message) as err:
        trainer.train(_config(small_data, tmp_path / "o", method=method, **kw))
    if method == "safeclip":
        assert "cd_S_Sref" in str(err.value) and "0.1,0.1,0.1,0.2,0.25,0.25,0.25,0.5" in str(err.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()


def test_weights_that_are_not_numbers_are_refused_by_the_cli(small_data, tmp_path):
    proc = subprocess.run([CLI, *_train_args(small_data, tmp_path / "o", "--weights", "0.1,x")],
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2 and "--weights takes comma-separated numbers" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_two_process_ddp_on_cpu_trains_and_only_rank_zero_writes(small_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", CLI,
         *_train_args(small_data, out, "--epochs", "2", "--gather-negatives")],
        text=True, capture_output=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # only rank 0 prints it
    per_rank_steps = (48 // 2) // BATCH
    assert summary["steps"] == 2 * per_rank_steps
    start = _events(tmp_path / "ddp.run")[0]
    assert start["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.run"]
    art = artifact.load(out, device="cpu")
    assert art.provenance["world_size"] == 2 and art.provenance["gather_negatives"] is True
