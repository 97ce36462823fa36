"""A checkpoint written and read back without a training run: weights, optimizer, RNG and the objective's frozen models."""

from __future__ import annotations

import json

import pytest
import torch

from training import architectures, checkpoint, objectives, optim
from training.checkpoint import Progress
from training.encoder import SafetyEncoder
from training.errors import CheckpointError
from training.recipes import TrainConfig


def _setup(seed: int):
    """A Safe-CLIP run's pieces after one optimizer step: encoder, objective (its frozen reference), optimizer."""
    torch.manual_seed(seed)
    encoder = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    objective = objectives.build("safeclip", reference=encoder)
    cfg = TrainConfig(method="safeclip", full_finetune=True, lr=1e-3)
    optim.prepare_encoder(encoder, type(objective), cfg)
    opt = optim.build_optimizer(encoder, "safeclip", cfg)
    for p in encoder.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    return encoder, objective, opt, cfg


def test_a_resumed_run_gets_back_its_weights_optimizer_rng_and_frozen_reference(tmp_path):
    encoder, objective, opt, cfg = _setup(seed=0)
    identity = checkpoint.identity(encoder, cfg, objective)
    checkpoint.save_frozen(tmp_path, objective)
    progress = Progress(epoch=2, step_in_epoch=3, global_step=15, best_recall_sum=1.5, best_epoch=1)
    torch.manual_seed(123)
    ckpt = checkpoint.save_checkpoint(tmp_path, encoder, opt, cfg, progress, 1, identity)
    expected_draw = torch.rand(4)

    other, other_objective, other_opt, _ = _setup(seed=1)  # another start: every tensor differs
    state = checkpoint.read_checkpoint_state(checkpoint.find_checkpoint(tmp_path))
    checkpoint.check_compatible(state, checkpoint.identity(other, cfg, other_objective), ckpt)
    assert state["objective"] == {} and state["adapters"] == "full" and state["method"] == "safeclip"
    resumed = checkpoint.load_checkpoint(ckpt, state, other, other_opt, other_objective)

    assert resumed == progress
    assert torch.equal(torch.rand(4), expected_draw), "the RNG stream must continue where it was saved"
    for (name, a), b in zip(encoder.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(objective.ref.state_dict().values(), other_objective.ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in other_objective.ref.parameters()), "the reference must stay frozen"
    saved, loaded = opt.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, st in saved["state"].items():
        assert all(torch.equal(v, loaded["state"][i][k]) for k, v in st.items())


def test_a_run_directory_without_the_frozen_reference_is_refused(tmp_path):
    encoder, objective, opt, cfg = _setup(seed=0)
    ckpt = checkpoint.save_checkpoint(tmp_path, encoder, opt, cfg, Progress(epoch=1), 1,
                                      checkpoint.identity(encoder, cfg, objective))
    state = checkpoint.read_checkpoint_state(ckpt)
    with pytest.raises(CheckpointError, match="lacks reference.safetensors.*start without --resume"):
        checkpoint.load_checkpoint(ckpt, state, encoder, opt, objective)


def test_resuming_into_another_run_directory_takes_the_best_weights_and_frozen_models_along(tmp_path):
    _, objective, _, _ = _setup(seed=0)
    old, new = tmp_path / "old.run", tmp_path / "new.run"
    old.mkdir()
    new.mkdir()
    checkpoint.save_frozen(old, objective)
    checkpoint.save_tensors({"w": torch.ones(2)}, old / checkpoint.BEST)
    checkpoint.carry_over(old, new, objective)
    assert sorted(p.name for p in new.iterdir()) == ["best.safetensors", "reference.safetensors"]


def test_the_objectives_options_are_part_of_a_checkpoints_identity(tmp_path):
    encoder = SafetyEncoder(architectures.resolve("tiny"), "euclidean")
    cfg = TrainConfig(method="clip", full_finetune=True)
    safe, every = objectives.build("clip", clip_pairs="safe"), objectives.build("clip", clip_pairs="all")
    state = json.loads(json.dumps(checkpoint.identity(encoder, cfg, safe)))
    assert state["objective"] == {"clip_pairs": "safe"}
    with pytest.raises(CheckpointError, match="objective .* --clip-pairs"):
        checkpoint.check_compatible(state, checkpoint.identity(encoder, cfg, every), tmp_path)
