"""What the retrieval and the unlearning evaluations share: embedding a split once, and ranking in its space.

Every record of a split is a quadruplet, index-aligned across four classes:
S = safe caption (T), V = safe image, U = unsafe caption (T*), G = unsafe image (V*).

Lorentz models rank by geodesic distance, computed as the Lorentz inner product (monotone in it);
Euclidean models rank by cosine similarity. Ties are broken by gallery order, as a stable
descending sort would, so a degenerate model cannot score a perfect recall by tying everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from training import lorentz
from training.errors import DataError, InputError
from training.images import open_image

KS: tuple[int, ...] = (1, 5, 10, 20)
LEAKAGE_DEPTH = 10
CLASSES: tuple[str, ...] = ("S", "V", "U", "G")
MODALITY = {"S": "text", "U": "text", "V": "image", "G": "image"}
SAFE_CLASSES = frozenset({"S", "V"})
SYNTHETIC_MARKER = "dataset.json"
#: Texts per forward pass: larger batches encode captions faster on a CPU, and a caption batch is small on a GPU.
TEXT_BATCH = 256


# --------------------------------------------------------------------------------------- embeddings
@dataclass
class Space:
    """Where embeddings live and how to rank and traverse in it."""

    geometry: str  # "lorentz" | "euclidean"
    curvature: float = 0.0
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, float | None] = field(default_factory=dict)  # modality -> unsafe threshold


@dataclass
class Embeddings:
    """The four index-aligned classes of one split, each ``(N, D)`` float32."""

    by_class: dict[str, Tensor]

    def __getitem__(self, cls: str) -> Tensor:
        return self.by_class[cls]

    def __len__(self) -> int:
        return len(self.by_class["S"])


def _image_chunks(paths: Sequence[Path], size: int) -> Iterable[list]:
    for i in range(0, len(paths), size):
        yield [open_image(p) for p in paths[i : i + size]]


def embed_images(encoder, paths: Sequence[Path], *, batch_size: int = 64, head: bool = True) -> Tensor:
    """Open and embed image files chunk by chunk, so only one chunk is decoded at a time: ``(N, D)``
    (``head=False``: the features the geometry head takes)."""
    outs = [encoder.encode_image(chunk, batch_size=batch_size, head=head)
            for chunk in _image_chunks(list(paths), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, encoder.arch.embed_dim)


def embed_texts(encoder, texts: Sequence[str], *, batch_size: int = 64, head: bool = True) -> Tensor:
    """Embed captions at least ``TEXT_BATCH`` at a time, rows in the order of ``texts``: ``(N, D)``
    (``head=False``: the features the geometry head takes).

    They are encoded shortest first, so each batch holds captions of about one length (the encoder
    cuts a batch to its longest sequence); the rows are put back in order.
    """
    if not texts:
        return torch.empty(0, encoder.arch.embed_dim)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = encoder.encode_text([texts[i] for i in order], batch_size=max(batch_size, TEXT_BATCH), head=head)
    return out[torch.argsort(torch.tensor(order, device=out.device))]


def embed_records(encoder, records: Sequence, *, batch_size: int = 64) -> Embeddings:
    """Embed a split's quadruplets once: S, V, U, G rows aligned with ``records``.

    ``encoder`` is a :class:`training.encoder.SafetyEncoder`; ``records`` are ``Quadruplet``s.
    """
    if not records:
        raise DataError("nothing to evaluate: the split has no records")
    return Embeddings(
        {
            "S": embed_texts(encoder, [r.safe for r in records], batch_size=batch_size),
            "V": embed_images(encoder, [r.safe_image for r in records], batch_size=batch_size),
            "U": embed_texts(encoder, [r.nsfw for r in records], batch_size=batch_size),
            "G": embed_images(encoder, [r.nsfw_image for r in records], batch_size=batch_size),
        }
    )


def distances_to_origin(emb: Embeddings, space: Space) -> dict[str, Tensor]:
    """``d0`` of every row per class (lorentz only): class -> ``(N,)``."""
    if space.geometry != "lorentz":
        return {}
    return {c: lorentz.dist0(emb[c], space.curvature) for c in CLASSES}


# ------------------------------------------------------------------------------------------ ranking
def similarity(q: Tensor, g: Tensor, space: Space) -> Tensor:
    """Larger is nearer: Lorentz inner product (lorentz) or cosine (euclidean). ``(B, D), (M, D) -> (B, M)``."""
    if space.geometry == "lorentz":
        return lorentz.pairwise_inner(q, g, space.curvature)
    return F.normalize(q.float(), dim=-1) @ F.normalize(g.float(), dim=-1).T


@dataclass
class Ranking:
    """Where each query's target landed, and what came first."""

    ranks: Tensor  # (B,) 0 = the target came first
    top: Tensor  # (B, depth) gallery indices of the nearest items, nearest first


def rank_targets(
    queries: Tensor, gallery: Tensor, targets: Tensor, space: Space, *, depth: int = LEAKAGE_DEPTH, chunk: int = 1024
) -> Ranking:
    """Rank the gallery for each query and find the target's position.

    ``queries (B, D)``, ``gallery (M, D)``, ``targets (B,)`` gallery indices. The query side is
    processed ``chunk`` rows at a time so memory stays ``O(chunk * M)``. A tie with an earlier
    gallery item counts against the query (stable descending order).
    """
    if len(queries) != len(targets):
        raise InputError(f"{len(queries)} queries but {len(targets)} targets")
    gallery = gallery.to(queries.device)
    targets = targets.to(queries.device)
    order = torch.arange(len(gallery), device=queries.device)
    ranks, tops = [], []
    for i in range(0, len(queries), chunk):
        sim = similarity(queries[i : i + chunk], gallery, space)
        t = targets[i : i + chunk]
        ts = sim.gather(1, t[:, None])
        ahead = (sim > ts) | ((sim == ts) & (order[None, :] < t[:, None]))
        ranks.append(ahead.sum(1))
        # topk does not promise an order among ties; argmax (first maximum) does, so top-1 uses it
        top = sim.topk(min(depth, len(gallery)), dim=1).indices
        top[:, 0] = sim.argmax(dim=1)
        tops.append(top)
    empty = torch.empty(0, dtype=torch.long, device=queries.device)
    return Ranking(torch.cat(ranks) if ranks else empty, torch.cat(tops) if tops else empty.view(0, 0))


def recall_at(ranks: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """``R@K`` = share of queries whose target ranks below K."""
    n = max(len(ranks), 1)
    return {f"R@{k}": float((ranks < k).sum()) / n for k in ks}


# ------------------------------------------------------------------------------------ the artifact
def space_of(art, bounds: dict | None = None, thresholds: dict | None = None) -> Space:
    """The :class:`Space` of a loaded artifact (bounds/thresholds override the artifact's own)."""
    if art.geometry != "lorentz":
        return Space("euclidean")
    thr = thresholds if thresholds is not None else {m: art.unsafe_threshold(m) for m in ("text", "image")}
    return Space("lorentz", art.curvature, dict(bounds if bounds is not None else art.bounds), thr)


def dataset_info(root: Path, split) -> dict[str, Any]:
    """What a report says about the data; ``synthetic`` comes from ``dataset.json`` at the root."""
    info: dict[str, Any] = {"root": str(root), "split": split.name, "n": len(split.records), "skipped": dict(split.skipped)}
    marker = Path(root) / SYNTHETIC_MARKER
    meta: dict[str, Any] = {}
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text())
        except json.JSONDecodeError:
            meta = {}
    info["synthetic"] = bool(meta.get("synthetic") or meta.get("kind") == "synthetic" or meta.get("generator"))
    info["name"] = meta.get("name") or ("synthetic ViSU-style" if info["synthetic"] else "ViSU")
    return info
