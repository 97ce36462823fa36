"""Confidence intervals for the evaluation's percentages: seeded percentile bootstrap over test items.

A figure such as ``f_acc`` is the mean of one value per test item (a 0/1 hit, a 0/1 correct class).
Its interval resamples the items with replacement ``resamples`` times, recomputes the figure on each
resample and takes the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those figures (the
*percentile bootstrap*). Every function takes a ``seed`` and draws from its own ``torch.Generator``,
so the same inputs give the same interval and the global RNG is left alone.

What an interval covers: the sampling of the *test items* only, i.e. how much the figure would move on
another test set of the same size from the same distribution. It says nothing about the variance over
training seeds (which the benchmark's several seeds measure); a model-vs-model gap should exceed both.

Every figure and bound is a percentage (values x 100) rounded to one decimal; a figure with no items
to count is None, as is its interval.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from training.errors import InputError

RESAMPLES = 1000
LEVEL = 0.95

Values = Tensor | Sequence[float] | Sequence[bool]
Interval = tuple[float, float]


def _as_values(values: Values, name: str = "values") -> Tensor:
    """``(N,)`` float64 on the CPU; bools become 0/1."""
    t = torch.as_tensor(values).detach().cpu()
    if t.dim() != 1:
        raise InputError(f"{name} must be one value per item, a 1-D sequence; got shape {tuple(t.shape)}")
    return t.double()


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise InputError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise InputError(f"level must lie strictly between 0 and 1 (0.95 for a 95% interval), got {level}")


def _percent(x: Tensor | float) -> float:
    return round(100 * float(x), 1)


def _percentiles(figures: Tensor, level: float) -> Interval:
    """The two-sided percentile interval of bootstrap ``figures (R,)`` (shares, not percent)."""
    tail = (1 - level) / 2
    lo, hi = torch.quantile(figures, torch.tensor([tail, 1 - tail], dtype=figures.dtype))
    return _percent(lo), _percent(hi)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bootstrap_mean(values: Values, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval | None:
    """Percentile-bootstrap interval of the mean of per-item ``values (N,)``, in percent; None for no items.

    One ``(resamples, N)`` draw of item indices, so the cost is a gather and a mean, not a Python loop.
    """
    _check(resamples, level)
    v = _as_values(values)
    if not len(v):
        return None
    idx = torch.randint(len(v), (resamples, len(v)), generator=_generator(seed))
    return _percentiles(v[idx].mean(dim=1), level)


def bootstrap_difference(a: Values, b: Values, *, resamples: int = RESAMPLES, seed: int = 0,
                         level: float = LEVEL) -> Interval | None:
    """Paired interval of ``mean(a) - mean(b)`` in percent points; ``a (N,)`` and ``b (N,)`` score the same items.

    Each resample draws items, not values, so an item keeps its ``a`` and ``b`` together (e.g. a look-alike
    image classified before and after unlearning): the interval reflects the change, not two independent noises.
    None for no items.
    """
    va, vb = _as_values(a, "a"), _as_values(b, "b")
    if len(va) != len(vb):
        raise InputError(f"a paired difference needs one a and one b per item; got {len(va)} and {len(vb)} values")
    return bootstrap_mean(va - vb, resamples=resamples, seed=seed, level=level)


def balanced_accuracy(pred: Tensor, truth: Tensor) -> float | None:
    """``(TPR + TNR) / 2`` in percent of boolean ``pred (N,)`` against ``truth (N,)``; None without both classes."""
    p, t = pred.detach().bool().cpu(), truth.detach().bool().cpu()
    if len(p) != len(t):
        raise InputError(f"{len(p)} predictions for {len(t)} labels; give one prediction per item")
    if not t.any() or t.all():
        return None
    tpr = float(p[t].double().mean())
    tnr = float((~p[~t]).double().mean())
    return _percent((tpr + tnr) / 2)


def bootstrap_balanced_accuracy(pred: Tensor, truth: Tensor, *, resamples: int = RESAMPLES, seed: int = 0,
                                level: float = LEVEL) -> Interval | None:
    """Percentile-bootstrap interval of :func:`balanced_accuracy`, in percent; None without both classes.

    Stratified: each resample draws the positives among the positives and the negatives among the
    negatives (as many of each as the test set has), so every resample keeps both classes and the
    class sizes fixed, as a balanced accuracy assumes.
    """
    _check(resamples, level)
    p, t = pred.detach().bool().cpu(), truth.detach().bool().cpu()
    if len(p) != len(t):
        raise InputError(f"{len(p)} predictions for {len(t)} labels; give one prediction per item")
    figures = _balanced_resamples(p, t, resamples, _generator(seed))
    return None if figures is None else _percentiles(figures, level)


def _balanced_resamples(p: Tensor, t: Tensor, resamples: int, g: torch.Generator) -> Tensor | None:
    """``(R,)`` balanced accuracies (shares) of stratified resamples; None without both classes."""
    hit_pos, hit_neg = p[t].double(), (~p[~t]).double()
    if not len(hit_pos) or not len(hit_neg):
        return None
    tpr = hit_pos[torch.randint(len(hit_pos), (resamples, len(hit_pos)), generator=g)].mean(dim=1)
    tnr = hit_neg[torch.randint(len(hit_neg), (resamples, len(hit_neg)), generator=g)].mean(dim=1)
    return (tpr + tnr) / 2


def bootstrap_mean_balanced_accuracy(preds: Sequence[Tensor], truths: Sequence[Tensor], *, resamples: int = RESAMPLES,
                                     seed: int = 0, level: float = LEVEL) -> Interval | None:
    """Interval of the mean of several balanced accuracies (one probe per class, on the same test items): each
    resample draws every probe's positives and negatives as :func:`bootstrap_balanced_accuracy` does, and the
    figure is the mean over the probes; None when no probe has both classes."""
    _check(resamples, level)
    g = _generator(seed)
    per_probe = []
    for pred, truth in zip(preds, truths, strict=True):
        figures = _balanced_resamples(pred.detach().bool().cpu(), truth.detach().bool().cpu(), resamples, g)
        if figures is not None:
            per_probe.append(figures)
    if not per_probe:
        return None
    return _percentiles(torch.stack(per_probe).mean(dim=0), level)


def interval_text(value: float | None, ci: Interval | None) -> str:
    """A figure and its interval for reports: ``"67.9 [58.1, 76.2]"``; ``"–"`` for no figure."""
    if value is None:
        return "–"
    if ci is None:
        return f"{value:.1f}"
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
