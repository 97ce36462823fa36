"""What trains and how it moves: adapters or full fine-tuning, the optimizer, the learning-rate schedule.

- :func:`prepare_encoder` adds LoRA adapters (or unfreezes every CLIP weight) and trains only the
  encoder scalars the objective uses.
- :func:`build_optimizer` follows each method's reference: AdamW with betas ``(0.9, 0.98)`` and
  decay on weight matrices only (HySAC, CLIP), or Adam without decay (Safe-CLIP).
- :func:`lr_at` is the schedule as a pure function of the optimizer step: linear warm-up, then a
  constant rate or a cosine decay to 0 at the last step of the last epoch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from training import lora, objectives
from training.encoder import SafetyEncoder
from training.errors import InputError
from training.objectives import Objective
from training.recipes import TrainConfig

SCALARS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")  # the encoder's learnable scalars
UNUSED_CLIP_PARAMETERS = ("logit_scale", "logit_bias")


def prepare_encoder(encoder: SafetyEncoder, objective_cls: type[Objective], cfg: TrainConfig) -> list[str]:
    """Add adapters (or unfreeze everything) and set which scalars train; returns the adapted tensors."""
    adapted: list[str] = []
    if cfg.full_finetune:
        for name, p in encoder.clip.named_parameters():
            # open_clip's own logit scale/bias are unused: the encoder carries the scale the objectives read
            p.requires_grad_(name not in UNUSED_CLIP_PARAMETERS)
    else:
        adapted = lora.apply_lora(encoder.clip, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    for name in SCALARS:
        if hasattr(encoder, name):
            getattr(encoder, name).requires_grad_(name in objective_cls.trained_scalars)
    if cfg.grad_checkpointing:
        encoder.clip.set_grad_checkpointing(True)
    return adapted


def _no_decay(name: str, p: Tensor) -> bool:
    """Biases, norm gains, the learnable scalars and embedding tables are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or "embedding" in leaf or leaf in SCALARS


def build_optimizer(encoder: SafetyEncoder, method: str, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``method``'s objective names over the encoder's trainable parameters, at ``cfg.lr``."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if not named:
        raise InputError("nothing to train: every parameter is frozen")
    # The fused kernels (CPU and CUDA) are several times faster than the per-tensor loop.
    fused = {"fused": True} if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in named) else {}
    if objectives.objective_class(method).optimizer == "adam":
        return torch.optim.Adam([p for _, p in named], lr=cfg.lr, **fused)
    decay = [p for n, p in named if not _no_decay(n, p)]
    rest = [p for n, p in named if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, **fused)


def lr_at(step: int, *, lr: float, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then ``lr``
    (``schedule="constant"``) or ``lr * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of the
    steps after warm-up that are done, capped at 1 (``schedule="cosine"``).
    """
    factor = 1.0
    if warmup_steps and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    elif schedule == "cosine":
        decay_steps = max(total_steps - warmup_steps, 1)
        factor = 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / decay_steps, 1.0)))
    return lr * factor


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``opt`` the learning rate ``lr``."""
    for group in opt.param_groups:
        group["lr"] = lr
