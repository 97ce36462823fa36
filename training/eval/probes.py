"""Probes that read a concept from frozen features, and the floors that say what a probe reads anyway.

A *probe* trains a binary classifier on features of a train set (``train_x (N, D)``, ``train_y (N,)``
bool: the image shows a forgotten concept) and reports its balanced accuracy ``(TPR + TNR) / 2`` on a
test set, in percent: 50 is chance, whatever the class sizes. :func:`linear_probe` is the evaluation's
``residue`` probe; :func:`mlp_probe` reads what a linear one cannot (a concept folded into the features
non-linearly), so an unlearning method cannot pass by hiding it from a hyperplane alone.

A *floor* is the same probe on features that cannot know the concept: :func:`pixel_features` (the raw
pixels, resized) and the embeddings of :func:`random_init_encoder` (the artifact's architecture with
fresh weights). A residue is evidence that the encoder still knows the concept only where it stands
above both floors: if raw pixels already separate the concept (colour, layout of the synthetic
images), so does any encoder.

Everything here is deterministic for its inputs and ``seed``, runs on the CPU, and leaves the global
RNG state as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from training.artifact import Artifact
from training.encoder import SafetyEncoder
from training.errors import InputError
from training.eval.stats import balanced_accuracy
from training.images import open_image

LINEAR_L2 = 1e-3
LINEAR_STEPS = 200
PIXEL_SIZE = 32
#: The geometry head's learnable scalars, which :func:`random_init_encoder` keeps from the artifact.
HEAD_SCALARS = ("logit_scale", "curv", "visual_alpha", "textual_alpha")


@dataclass(frozen=True)
class ProbeResult:
    """What a probe scored on the test set (and, for the MLP, how early stopping chose its weights)."""

    balanced_accuracy: float | None  # percent, one decimal; None when the test set lacks a class
    pred: Tensor  # (M,) bool: the probe's answer for each test item (positive = shows the concept)
    best_epoch: int | None = None  # MLP: the epoch (0-based) whose weights were kept
    val_balanced_accuracy: float | None = None  # MLP: that epoch's balanced accuracy on the validation slice
    history: tuple[float, ...] = ()  # MLP: validation balanced accuracy (percent) after each epoch run


def _check_probe_input(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise InputError(f"probe features must be (N, D) with the same D for train and test; got "
                         f"{tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise InputError(f"one label per item: {len(train_x)} train items for {len(train_y)} labels, "
                         f"{len(test_x)} test items for {len(test_y)} labels")
    y = train_y.bool()
    if not y.any() or y.all():
        raise InputError("a probe needs both positive and negative train items; the train set has only one class")


def _class_weights(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``n / (2 n_class)`` per item: both classes weigh the same in the loss, whatever their sizes."""
    n, pos = len(y), int(y.sum())
    return torch.where(y, n / (2 * pos), n / (2 * (n - pos))).to(dtype)


# ------------------------------------------------------------------------------------------- linear
def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, l2: float = LINEAR_L2,
                 steps: int = LINEAR_STEPS) -> ProbeResult:
    """Class-balanced logistic regression: ``train_x (N, D)``, ``train_y (N,)`` bool; likewise for test.

    Features standardised with the train set's mean and deviation, each class weighted ``n / (2 n_class)``,
    an L2 penalty ``l2`` on the weights (not the bias), full-batch L-BFGS (strong Wolfe, at most ``steps``
    iterations) from zero weights in float64: no randomness, so the same inputs give the same answer.
    """
    _check_probe_input(train_x, train_y, test_x, test_y)
    x = train_x.detach().double().cpu()
    y = train_y.detach().bool().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    weight = _class_weights(y, torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y.double(), weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (((test_x.detach().double().cpu() - mean) / std) @ w + b) > 0
    return ProbeResult(balanced_accuracy(pred, test_y), pred)


# ---------------------------------------------------------------------------------------------- MLP
def _stratified_split(y: Tensor, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(fit, val)`` indices: ``fraction`` of each class, at least one item, drawn for the validation slice."""
    fit, val = [], []
    for cls in (False, True):
        idx = torch.nonzero(y == cls).flatten()
        if len(idx) < 2:
            raise InputError(f"an early-stopped probe needs at least 2 train items of each class (one to fit, one "
                             f"to validate); the train set has {len(idx)} {'positive' if cls else 'negative'}")
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        val.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def _uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> Tensor:
    return ((torch.rand(shape, generator=g) * 2 - 1) * bound).requires_grad_()


def _share_balanced(pred: Tensor, truth: Tensor) -> float:
    """Unrounded balanced accuracy (a share), for choosing the best epoch; both classes are present."""
    return (float(pred[truth].float().mean()) + float((~pred[~truth]).float().mean())) / 2


def mlp_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, hidden: int = 256,
              val_fraction: float = 0.2, seed: int = 0, max_epochs: int = 300, patience: int = 20, lr: float = 1e-3,
              weight_decay: float = 1e-4, batch_size: int = 256) -> ProbeResult:
    """A one-hidden-layer (ReLU) probe, early-stopped on a validation slice of the train set.

    ``val_fraction`` of each train class (seeded) is held out; the rest is standardised (its own mean and
    deviation, applied to every set) and fitted with class-balanced BCE (weights ``n / (2 n_class)``) by
    Adam (L2 ``weight_decay``) over shuffled minibatches of ``batch_size``. After each epoch the
    validation balanced accuracy is measured; the weights of the best epoch (the first, on ties) are
    kept, and training stops ``patience`` epochs after it or at ``max_epochs``. Initial weights (PyTorch's
    default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) and shuffles come from a generator seeded with ``seed``.
    """
    _check_probe_input(train_x, train_y, test_x, test_y)
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if min(hidden, max_epochs, patience, batch_size) < 1:
        raise InputError("hidden, max_epochs, patience and batch_size must be at least 1")
    g = torch.Generator().manual_seed(seed)
    x = train_x.detach().float().cpu()
    y = train_y.detach().bool().cpu()
    fit, val = _stratified_split(y, val_fraction, g)
    mean, std = x[fit].mean(0), x[fit].std(0).clamp_min(1e-6)
    x_fit, y_fit, x_val, y_val = (x[fit] - mean) / std, y[fit], (x[val] - mean) / std, y[val]
    target, weight = y_fit.float(), _class_weights(y_fit, torch.float32)
    d = x.shape[1]
    params = [_uniform((hidden, d), 1 / math.sqrt(d), g), _uniform((hidden,), 1 / math.sqrt(d), g),
              _uniform((1, hidden), 1 / math.sqrt(hidden), g), _uniform((1,), 1 / math.sqrt(hidden), g)]

    def logits(inputs: Tensor) -> Tensor:
        w1, b1, w2, b2 = params
        return F.linear(F.relu(F.linear(inputs, w1, b1)), w2, b2).squeeze(1)

    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state = -1.0, 0, [p.detach().clone() for p in params]
    history: list[float] = []
    for epoch in range(max_epochs):
        order = torch.randperm(len(x_fit), generator=g)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(logits(x_fit[batch]), target[batch], weight=weight[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = _share_balanced(logits(x_val) > 0, y_val)
        history.append(round(100 * score, 1))
        if score > best:
            best, best_epoch, best_state = score, epoch, [p.detach().clone() for p in params]
        elif epoch - best_epoch >= patience:
            break
    with torch.no_grad():
        for p, kept in zip(params, best_state, strict=True):
            p.copy_(kept)
        pred = logits((test_x.detach().float().cpu() - mean) / std) > 0
    return ProbeResult(balanced_accuracy(pred, test_y), pred, best_epoch=best_epoch,
                       val_balanced_accuracy=round(100 * best, 1), history=tuple(history))


# -------------------------------------------------------------------------------------------- floors
def pixel_features(paths: Sequence[str | Path], *, size: int = PIXEL_SIZE) -> Tensor:
    """The raw-pixel floor: each image (:func:`training.images.open_image`, with its limits) in RGB, resized
    to ``size x size`` (bilinear), as floats in ``[0, 1]`` flattened channel-first: ``(N, 3 * size * size)``.

    An unreadable image raises the ImageError naming it.
    """
    if size < 1:
        raise InputError(f"size must be at least 1 pixel, got {size}")
    rows = []
    for path in paths:
        image = open_image(path).resize((size, size), Image.Resampling.BILINEAR)
        rows.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).reshape(-1))
    if not rows:
        return torch.empty(0, 3 * size * size)
    return torch.stack(rows).float() / 255


def random_init_encoder(art: Artifact, *, seed: int = 0) -> Artifact:
    """The random-model floor: an artifact like ``art`` whose backbone has fresh weights, drawn with ``seed``.

    The encoder is built from ``art``'s architecture and preprocessing as :func:`training.artifact.load`
    builds it (same geometry, embedding dimension, tokenizer and transform), on ``art``'s device, in eval
    mode, so the evaluation embeds with it by the same code path (``result.encoder``). Only the open_clip
    backbone (``clip.*``) is new, initialised by open_clip under ``torch.manual_seed(seed)`` inside a
    forked RNG (the global state is untouched); the geometry head's scalars (curvature, alphas, logit
    scale) are copied from ``art``, so embeddings live in the same space and are compared the same way.
    The calibration (bounds, safety thresholds) belongs to the trained weights and is left empty; the
    fingerprint is empty too, and the provenance says what the model is.
    """
    trained = art.encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = SafetyEncoder(trained.arch, trained.geometry)
    with torch.no_grad():
        for name in HEAD_SCALARS:
            if hasattr(encoder, name):
                getattr(encoder, name).copy_(getattr(trained, name))
    encoder.to(trained.device).eval()
    source = art.fingerprint or (str(art.path) if art.path else "an artifact")
    return Artifact(encoder=encoder, provenance={"source": "random init", "method": "random init", "seed": seed,
                                                 "architecture_of": source})
