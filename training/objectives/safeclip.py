"""Safe-CLIP: redirect unsafe embeddings onto a frozen reference's safe ones, preserve the safe ones.

With ``s0, v0`` the *frozen original* encoder's embeddings of the safe caption and image (the
public code accidentally uses the model being trained as its own reference; here it is a real
deep copy taken before training), the eight terms are

    cd(s, s0)  cd(u, s0)  cd(v, v0)  cd(g, v0)          cosine distance 1 - cos, batch mean
    nce(s, v0) nce(u, v0) nce(s0, v) nce(s0, g)         symmetric InfoNCE at a fixed logit scale

weighted (0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5) by default, normalised to sum 1 and divided by 8.
Negatives are the local batch, as in the reference.

The logit scale is fixed at the frozen reference encoder's own learned scale. The public code
hard-codes ``exp(4.6052) = 100``, which is exactly OpenAI CLIP's learned scale, so on CLIP the two
agree. On an encoder trained to another scale (the tiny demo base learns 25), a fixed 100 makes the
InfoNCE terms four times sharper than the geometry they compare against: they then reshape the safe
embeddings instead of redirecting the unsafe ones (benchmarks/RESULTS.md, "Safe-CLIP").
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.objectives.base import Batch, Embeddings, LossOutput, Objective, symmetric_cross_entropy, weighted_mean

DEFAULT_WEIGHTS = (0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5)
CLIP_LOGIT_SCALE = 100.0  # OpenAI CLIP's learned scale, the value the public code hard-codes
TERMS = ("cd_S_Sref", "cd_U_Sref", "cd_V_Vref", "cd_G_Vref", "nce_S_Vref", "nce_U_Vref", "nce_Sref_V", "nce_Sref_G")


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean ``1 - cos(a_i, b_i)`` over matching rows of ``(B, D)`` tensors: a scalar."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def info_nce(a: Tensor, b: Tensor, scale: Tensor | float = CLIP_LOGIT_SCALE) -> Tensor:
    """Symmetric InfoNCE between matching rows of ``a (B, D)`` and ``b (B, D)``, L2-normalised inside."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = scale * a @ b.T
    return symmetric_cross_entropy(logits, logits.T)


class SafeClipObjective(Objective):
    name = "safeclip"
    geometry = "euclidean"
    uses_unsafe = True
    trained_scalars = ()
    terms = TERMS
    optimizer = "adam"  # the reference's: Adam without weight decay

    def __init__(
        self,
        reference,
        *,
        weights: tuple[float, ...] = DEFAULT_WEIGHTS,
        logit_scale: float | None = None,
        gather_negatives: bool = False,
    ):
        """``reference`` is the encoder *before* training; a frozen deep copy of it is kept here.

        ``logit_scale``: the InfoNCE terms' fixed scale; ``None`` takes the reference's own.
        """
        super().__init__(gather_negatives=False)  # the reference uses local negatives only
        if len(weights) != len(TERMS):
            raise ValueError(f"Safe-CLIP takes {len(TERMS)} weights, got {len(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.ref = copy.deepcopy(reference).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.fixed_scale = None if logit_scale is None else float(logit_scale)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ref.eval()  # the reference never leaves eval mode (no dropout noise in the targets)
        return self

    def frozen(self) -> dict[str, nn.Module]:
        return {"reference": self.ref}

    def provenance(self) -> dict[str, Any]:
        return {"weights": list(self.weights)}

    @property
    def logit_scale(self) -> Tensor | float:
        """The InfoNCE scale: the given one, else the reference's (read each time: ``--resume`` reloads it)."""
        return self.ref.logit_scale.detach().exp() if self.fixed_scale is None else self.fixed_scale

    @torch.no_grad()
    def reference(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.ref.embed_tokens(batch.safe_tokens), self.ref.embed_pixels(batch.safe_pixels)

    def forward(self, emb: Embeddings, encoder=None) -> LossOutput:
        s, u, v, g, s0, v0 = emb.s, emb.u, emb.v, emb.g, emb.s_ref, emb.v_ref
        if u is None or g is None or s0 is None or v0 is None:
            raise ValueError("Safe-CLIP needs unsafe embeddings and the reference's safe embeddings")
        scale = self.logit_scale
        values = [
            cosine_distance(s, s0),
            cosine_distance(u, s0),
            cosine_distance(v, v0),
            cosine_distance(g, v0),
            info_nce(s, v0, scale),
            info_nce(u, v0, scale),
            info_nce(s0, v, scale),
            info_nce(s0, g, scale),
        ]
        loss = weighted_mean(values, list(self.weights))
        return LossOutput(loss, dict(zip(TERMS, (t.detach() for t in values), strict=True)))
