"""Figures of an evaluation report, drawn with matplotlib's object API (Agg canvas, no pyplot state).

- ``d0_<model>.png``: histogram of distance to the origin per class S, V, U, G (lorentz models);
- ``sweep_<model>.png``: R@1 and safety score against the traversal trigger threshold, one panel per
  query modality, with the artifact's own threshold marked;
- ``forget_vs_retain.png`` (``eval --unlearning``): zero-shot accuracy on the forgotten concepts (x)
  against the retained ones (y), one labelled point per artifact; the top left corner is best.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

CLASS_STYLE = {
    "S": ("safe text (S)", "tab:blue"),
    "V": ("safe image (V)", "tab:green"),
    "U": ("unsafe text (U)", "tab:orange"),
    "G": ("unsafe image (G)", "tab:red"),
}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def d0_histogram(d0: dict[str, np.ndarray], path: Path, *, title: str) -> Path:
    """One histogram per class of ``d0`` (class -> ``(N,)``) on shared bins; returns ``path``."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    pooled = np.concatenate([np.asarray(v, dtype=float) for v in d0.values()])
    bins = np.linspace(pooled.min(), pooled.max() if pooled.max() > pooled.min() else pooled.min() + 1e-3, 40)
    for cls, values in d0.items():
        name, color = CLASS_STYLE.get(cls, (cls, None))
        ax.hist(values, bins=bins, alpha=0.45, color=color, label=f"{name}, median {np.median(values):.3f}")
    ax.set_xlabel("geodesic distance to the origin")
    ax.set_ylabel("embeddings")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def sweep_plot(sweep: dict[str, list[dict[str, float]]], path: Path, *, title: str,
               marks: dict[str, float] | None = None) -> Path:
    """R@1 and safety (y, %) against the trigger threshold (x), one panel per query modality."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(sweep), squeeze=False)[0]
    for ax, (modality, rows) in zip(axes, sweep.items(), strict=True):
        x = [r["threshold"] for r in rows]
        for key in rows[0]:
            if key == "threshold":
                continue
            style = "--" if "moved" in key else "-"
            ax.plot(x, [100 * r[key] for r in rows], style, marker="." if style == "-" else None, label=key)
        if marks and marks.get(modality) is not None:
            ax.axvline(marks[modality], color="grey", linestyle=":", label="model's threshold")
        ax.set_xlabel(f"trigger threshold on {modality} queries' distance to the origin")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{modality} queries")
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def forget_retain_plot(points: dict[str, tuple[float | None, float | None]], path: Path, *, title: str) -> Path:
    """One labelled point per artifact: ``label -> (f_acc, r_acc)`` in percent (a None coordinate is left out)."""
    fig = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for label, (x, y) in points.items():
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=36)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("forget accuracy f_acc, % (lower is better)")
    ax.set_ylabel("retain accuracy r_acc, % (higher is better)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.savefig(path, dpi=110, format="png")
    return path


def write_all(results: Sequence[Any], out: Path, *, synthetic: bool) -> list[str]:
    """Draw every figure for ``results`` (``evaluate.ModelResult``s) into ``out``; names relative to it."""
    tag = " (synthetic data)" if synthetic else ""
    names: list[str] = []
    for res in results:
        rep = res.report
        slug = _slug(rep["label"])
        if res.d0:
            name = f"d0_{slug}.png"
            d0_histogram(res.d0, Path(out) / name, title=f"{rep['label']}: distance to the origin{tag}")
            names.append(name)
        if rep.get("sweep"):
            name = f"sweep_{slug}.png"
            marks = rep["traversal"].get("thresholds") or {}
            title = f"{rep['label']}: traversal threshold sweep ({rep['traversal']['method']}){tag}"
            sweep_plot(rep["sweep"], Path(out) / name, title=title, marks=marks)
            names.append(name)
    return names
