"""Closed-form concept erasure: LEACE fitted on an encoder's features and folded into its head.

LEACE (Belrose et al. 2023, arXiv 2306.03819) is the least-squares affine edit of features ``x`` after
which no linear classifier predicts a label ``z`` better than a constant: with ``Sigma`` the covariance
of ``x``, ``W = (Sigma^1/2)^+`` the whitening, and ``P`` the orthogonal projection onto the column space
of ``W Sigma_xz``,

    r(x) = x - W^+ P W (x - mean(x))

which leaves ``Cov(r(x), z) = 0`` on the data it was fitted on, and moves ``x`` as little as any edit
that does so (in the Mahalanobis norm). One column of ``z`` per forgotten concept: a rank-``k`` edit for
``k`` concepts. As a row-vector map it is ``x @ weight + bias`` (``weight = I - M^T``, ``bias = mean M^T``,
``M = W^+ P W``), stored as the tower's :class:`training.encoder.Eraser`: for a Lorentz artifact in the
tangent space at the origin (before ``alpha`` and ``exp_map0``), for a Euclidean one before
normalisation. A second erasure folds into the first (``x W1 W2 + b1 W2 + b2``), so forget requests stack.

For a Euclidean artifact the edit also projects out the direction of the features' common mean. LEACE
leaves both classes with the same mean, but not the same norm (forgotten-concept images had smaller
features: 12.1 against 15.3 on the demo base), and the head's normalisation divides that shared mean by
each class's own norm: a probe on the unit vectors then read the concept back at 74-94 % (balanced
accuracy) where it read 55-60 % before the head. With the shared mean's direction gone, both classes
are centred on zero and dividing by a norm cannot move a class mean (benchmarks/RESULTS.md, "The
eraser"). A Lorentz artifact keeps LEACE alone: its tangent vectors' norms are distances to the origin,
which carry the safety ordering, and at those radii ``exp_map0`` is close to linear.

An estimate of where a concept sits from fewer examples than the features have dimensions does not
carry to new images (the demo base: 44 graffiti images left a probe 74 % on fresh ones, 176 left 58 %),
so :func:`plan` asks for at least ``dim`` images of each concept.

:func:`erase` fits it on a dataset split (the train split by default): for the image tower, every safe
image of the split and every unsafe one, an unsafe image of a forgotten concept labelled with its concept;
for the text tower the same with the safe and unsafe captions. It then recalibrates the artifact's
distance-to-origin bounds and unsafe thresholds on the validation split (Lorentz artifacts; the edit moves
embeddings) and writes a new artifact whose config records what was erased (``erasure``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from training import artifact
from training.data import concepts as concept_catalogue
from training.data import visu
from training.data.roots import DataRoots
from training.encoder import TOWERS
from training.errors import DataError, InputError
from training.methods import FORGETTING

#: Eigenvalues of the covariance below this share of the largest are treated as zero (a rank-deficient Sigma)
RANK_TOL = 1e-6
DEFAULT_TOWERS: tuple[str, ...] = ("image",)


@dataclass
class Edit:
    """One fitted affine edit ``x -> x @ weight + bias`` of ``(N, D)`` features, and the rank it removes."""

    weight: Tensor  # (D, D)
    bias: Tensor  # (D,)
    rank: int

    def __call__(self, x: Tensor) -> Tensor:
        return x.to(self.weight) @ self.weight + self.bias


def fit_leace(x: Tensor, z: Tensor) -> Edit:
    """The LEACE edit of features ``x (N, D)`` for labels ``z (N, K)`` (0/1 or real), computed in float64.

    Raises :class:`~training.errors.InputError` when there are no more rows than dimensions (the covariance
    cannot be estimated) or a column of ``z`` is constant (nothing to erase).
    """
    if x.ndim != 2 or z.ndim not in (1, 2) or len(x) != len(z):
        raise InputError(f"fit_leace takes features (N, D) and labels (N, K) of the same N, not {tuple(x.shape)} "
                         f"and {tuple(z.shape)}")
    n, d = x.shape
    if n <= d:
        raise InputError(f"an eraser for {d}-d features needs more than {d} rows to estimate their covariance; "
                         f"got {n}")
    x = x.double()
    z = z.double().reshape(n, -1)
    if bool((z.std(dim=0) == 0).any()):
        raise InputError("a label column is constant: every row is, or none is, the concept; nothing to erase")
    mean = x.mean(dim=0)
    xc = x - mean
    sigma = xc.T @ xc / n
    eigval, eigvec = torch.linalg.eigh(sigma)
    keep = eigval > RANK_TOL * eigval.max().clamp_min(torch.finfo(torch.float64).tiny)
    vec, val = eigvec[:, keep], eigval[keep]
    sqrt = (vec * val.sqrt()) @ vec.T  # Sigma^1/2
    whiten = (vec / val.sqrt()) @ vec.T  # W = (Sigma^1/2)^+
    cross = xc.T @ (z - z.mean(dim=0)) / n  # Sigma_xz (D, K)
    u, s, _ = torch.linalg.svd(whiten @ cross, full_matrices=False)
    rank = int((s > RANK_TOL * s.max()).sum()) if float(s.max()) > 0 else 0
    q = u[:, :rank]
    m = sqrt @ q @ q.T @ whiten  # r(x) = x - M (x - mean)
    eye = torch.eye(d, dtype=torch.float64)
    return Edit(weight=(eye - m.T).float(), bias=(mean @ m.T).float(), rank=rank)


def without_mean_direction(edit: Edit, x: Tensor) -> Edit:
    """``edit`` followed by the projection that removes the direction of ``edit(x)``'s mean (module docstring)."""
    mean = edit(x).double().mean(dim=0)
    u = mean / mean.norm().clamp_min(torch.finfo(torch.float64).tiny)
    proj = torch.eye(len(u), dtype=torch.float64) - torch.outer(u, u)
    return Edit(weight=(edit.weight.double() @ proj).float(), bias=(edit.bias.double() @ proj).float(), rank=edit.rank + 1)


def linear_covariance(x: Tensor, z: Tensor) -> Tensor:
    """``Cov(x, z)`` ``(D, K)``: what LEACE zeroes on the rows it was fitted on (a check, and the tests' measure)."""
    x, z = x.double(), z.double().reshape(len(z), -1)
    return (x - x.mean(dim=0)).T @ (z - z.mean(dim=0)) / len(x)


# ------------------------------------------------------------------------------------------ the fit
@dataclass
class Plan:
    """What one erasure fits on: the split's records and, per forgotten concept, the records that show it."""

    data: Path
    split: str
    records: list
    concepts: tuple[str, ...]
    positives: dict[str, list[int]]  # concept -> positions in records


def plan(data: Path, forget: Sequence[str], *, dim: int, split: str = "train", roots: DataRoots = DataRoots()) -> Plan:
    """Read ``split`` of ``data`` and find each forgotten concept's records (at least ``dim`` each: the features'
    dimension); every problem is an error here, before anything is embedded or written."""
    records = visu.load_split(data, split, roots=roots).records
    cat = concept_catalogue.catalogue(data, records, roots=roots)
    chosen = cat.resolve(list(forget))
    positives = {c.name: [i for i, r in enumerate(records) if c.shown_by(r)] for c in chosen}
    empty = [name for name, rows in positives.items() if not rows]
    if empty:
        raise DataError(f"no image of {', '.join(empty)} in the {split} split of {data}: the eraser is fitted on "
                        "examples of the concept; give a dataset (or --erase-split) that shows it")
    few = {name: len(rows) for name, rows in positives.items() if len(rows) < dim}
    if few:
        got = ", ".join(f"{name} {k}" for name, k in few.items())
        raise DataError(f"too few examples to fit an eraser in the {split} split of {data} ({got} images): it needs "
                        f"at least {dim} images of each concept, as many as the features have dimensions, to estimate "
                        "where the concept sits; add records of it (e.g. 'data synth --boost CONCEPT --boost-split "
                        "train'), or fit on a larger split")
    return Plan(Path(data), split, records, tuple(c.name for c in chosen), positives)


def labels(p: Plan) -> Tensor:
    """``(2N, K)``: the rows ``[safe halves; unsafe halves]`` of the split, one column per forgotten concept."""
    n = len(p.records)
    z = torch.zeros(2 * n, len(p.concepts))
    for k, name in enumerate(p.concepts):
        z[torch.tensor(p.positives[name], dtype=torch.long) + n, k] = 1.0
    return z


def features(encoder, p: Plan, tower: str, *, batch_size: int = 64) -> Tensor:
    """``(2N, D)`` float32: the head inputs of the split's safe then unsafe images (or captions)."""
    from training.eval.common import embed_images, embed_texts

    rs = p.records
    if tower == "image":
        return embed_images(encoder, [r.safe_image for r in rs] + [r.nsfw_image for r in rs], batch_size=batch_size,
                            head=False).cpu()
    return embed_texts(encoder, [r.safe for r in rs] + [r.nsfw for r in rs], batch_size=batch_size, head=False).cpu()


def check_towers(towers: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(t.strip().lower() for t in towers if t.strip()))
    bad = [t for t in chosen if t not in TOWERS]
    if not chosen or bad:
        raise InputError(f"--erase-towers takes {' or '.join(TOWERS)} (comma-separated), not {','.join(towers)!r}")
    return chosen


def erase(model: str | Path, data: Path, forget: Sequence[str], out: Path, *, towers: Sequence[str] = DEFAULT_TOWERS,
          split: str = "train", roots: DataRoots = DataRoots(), batch_size: int = 64, device: str = "auto",
          overwrite: bool = False) -> dict[str, Any]:
    """Fit an eraser per tower on ``split`` of ``data`` and write ``model`` with it folded in to ``out``.

    Every input is checked before anything is embedded; ``out`` is written atomically, or not at all.
    Returns the erasure record (also in the artifact's config under ``erasure``).
    """
    from training.trainer import calibration  # the same calibration a trained artifact gets

    towers = check_towers(towers)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another --out or remove it first")
    dim = int(artifact.read_config(model)["embed_dim"])
    p = plan(data, forget, dim=dim, split=split, roots=roots)
    art = artifact.load(model, device=device)
    enc = art.encoder
    t0 = time.perf_counter()
    z = labels(p)
    ranks = {}
    for tower in towers:
        x = features(enc, p, tower, batch_size=batch_size)
        edit = fit_leace(x, z)
        if enc.geometry == "euclidean":
            edit = without_mean_direction(edit, x)
        enc.add_eraser(tower, edit.weight, edit.bias)
        ranks[tower] = edit.rank
    how = "leace" if enc.geometry == "lorentz" else "leace, then the common mean's direction projected out"
    record = {"method": how, "towers": list(towers), "concepts": list(p.concepts), "data": str(p.data),
              "split": p.split, "rows": 2 * len(p.records),
              "positives": {name: len(rows) for name, rows in p.positives.items()}, "rank": ranks}
    enc.erasure = [*enc.erasure, record]
    bounds, safety = art.bounds, art.safety
    if enc.geometry == "lorentz":
        val = visu.load_split(data, "validation", roots=roots).records
        bounds, safety = calibration(enc, val, batch_size=max(batch_size, 64))
    fit_s = round(time.perf_counter() - t0, 2)
    before = art.provenance
    method = before.get("method")
    prov = artifact.provenance(
        "erase", method=f"{method}+erase" if method in FORGETTING else "erase", data=before.get("data") or str(data),
        base={"source": str(model), "source_fingerprint": art.fingerprint, "method": method},
        forget=before.get("forget") or {"concepts": list(p.concepts)}, erased=record, fit_seconds=fit_s, before=before)
    new = artifact.Artifact(enc.cpu(), bounds=bounds, safety=safety, provenance=prov)
    artifact.save(new, out, overwrite=overwrite)
    return {**record, "out": str(out), "fingerprint": new.fingerprint, "fit_seconds": fit_s}


def erase_after(trained: Path, data: Path, forget: Sequence[str], out: Path, **kw: Any) -> dict[str, Any]:
    """``--then-erase``: erase from the artifact just trained at ``trained`` into ``out``, then remove ``trained``."""
    result = erase(trained, data, forget, out, **kw)
    shutil.rmtree(trained, ignore_errors=True)
    return result
