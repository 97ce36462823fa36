"""The learning-rate schedule as a pure function: the same rate at every step as the trainer gave before the split."""

from __future__ import annotations

import math

import pytest
import torch

from training.optim import lr_at, set_lr

# (epochs, steps per epoch, warm-up steps, schedule, lr): the demo recipes (hysac/clip, safeclip), the
# references' constant rate, warm-up without decay, warm-up longer than the run, and no warm-up at all
CONFIGS = [
    (24, 30, 10, "cosine", 2e-3),
    (16, 60, 10, "cosine", 1e-3),
    (50, 12, 0, "constant", 1e-4),
    (3, 6, 4, "constant", 1e-4),
    (1, 2, 5, "cosine", 1e-3),
    (3, 6, 0, "cosine", 1e-3),
]


def schedule_before_the_split(step: int, epochs: int, steps_per_epoch: int, warmup_steps: int, schedule: str,
                              lr: float) -> float:
    """``trainer._Run._set_lr`` as it was before ``lr_at`` existed (commit 89c27c5), line for line."""
    factor = 1.0
    if warmup_steps and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    elif schedule == "cosine":
        total = max(epochs * steps_per_epoch - warmup_steps, 1)
        factor = 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / total, 1.0)))
    return lr * factor


@pytest.mark.parametrize("epochs,spe,warmup,schedule,lr", CONFIGS)
def test_every_step_gets_exactly_the_rate_the_trainer_gave_before(epochs, spe, warmup, schedule, lr):
    for step in range(epochs * spe + 5):  # a few past the end too (a resumed run given more epochs)
        got = lr_at(step, lr=lr, warmup_steps=warmup, schedule=schedule, total_steps=epochs * spe)
        assert got == schedule_before_the_split(step, epochs, spe, warmup, schedule, lr), step


def test_the_rates_recorded_from_the_old_code_path():
    # printed by the trainer's own _set_lr before the split, for the demo recipe's hysac schedule
    demo = dict(lr=2e-3, warmup_steps=10, schedule="cosine", total_steps=24 * 30)
    recorded = {0: 0.0002, 4: 0.001, 9: 0.002, 10: 0.002, 11: 0.0019999902106840922, 100: 0.0019217488001088783,
                365: 0.001, 718: 3.9157071969997406e-08, 719: 9.789315907893226e-09, 720: 0.0, 799: 0.0}
    assert {step: lr_at(step, **demo) for step in recorded} == recorded
    short = dict(lr=1e-3, warmup_steps=5, schedule="cosine", total_steps=2)  # warm-up longer than the run
    assert [lr_at(s, **short) for s in range(8)] == [0.0002, 0.0004, 0.0006, 0.0008, 0.001, 0.001, 0.0, 0.0]


def test_warm_up_is_linear_then_constant_or_a_cosine_to_zero():
    for step in range(4):
        assert lr_at(step, lr=1.0, warmup_steps=4, schedule="cosine", total_steps=104) == (step + 1) / 4
    assert lr_at(4, lr=1.0, warmup_steps=4, schedule="cosine", total_steps=104) == 1.0
    assert lr_at(54, lr=1.0, warmup_steps=4, schedule="cosine", total_steps=104) == pytest.approx(0.5)
    assert lr_at(104, lr=1.0, warmup_steps=4, schedule="cosine", total_steps=104) == 0.0
    rates = [lr_at(s, lr=1.0, warmup_steps=4, schedule="cosine", total_steps=104) for s in range(4, 105)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)), "the cosine decay must fall at every step"
    assert {lr_at(s, lr=3e-4, warmup_steps=0, schedule="constant", total_steps=10) for s in range(20)} == {3e-4}


def test_set_lr_reaches_every_parameter_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.0}, {"params": [b]}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
