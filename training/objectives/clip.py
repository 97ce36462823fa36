"""The baseline: plain CLIP contrastive fine-tuning on the safe caption/image pairs.

Euclidean (unit vectors), logits ``exp(logit_scale) * cos``. With ``pairs="safe"`` (the default) the
unsafe half of each quadruplet is never seen, which is exactly what makes it the "CLIP fine-tuned on
the same data" row. ``pairs="all"`` also contrasts the unsafe pairs ``(T*, I*)`` (each caption's
negatives then include its quadruplet's other image): a stand-in for web-scale pretraining, which
has seen unsafe content, used to make a base model that the safety methods fine-tune.

With ``pairs="all"`` and a batch mask ``unsafe_kept`` (``train --method clip --clip-pairs all --forget
CONCEPTS``), the unsafe pairs of the masked rows are left out: neither a positive nor a negative.
That run is the "retrain without the forget data" oracle of unlearning benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from training import distributed
from training.errors import InputError
from training.objectives.base import Embeddings, LossOutput, Objective, symmetric_cross_entropy

PAIRS = ("safe", "all")


class ClipObjective(Objective):
    name = "clip"
    geometry = "euclidean"
    uses_unsafe = False
    trained_scalars = ("logit_scale",)

    def __init__(self, *, pairs: str = "safe", gather_negatives: bool = False):
        super().__init__(gather_negatives=gather_negatives)
        if pairs not in PAIRS:
            raise InputError(f"unknown clip pairs {pairs!r}; use one of {', '.join(PAIRS)}")
        self.pairs = pairs
        self.uses_unsafe = pairs == "all"

    def identity(self) -> dict[str, Any]:
        return {"clip_pairs": self.pairs}

    def provenance(self) -> dict[str, Any]:
        return {"clip_pairs": self.pairs}

    def forward(self, emb: Embeddings, encoder) -> LossOutput:
        text, image = emb.s, emb.v
        kept = None  # (2B,) bool: the pairs that take part; None: all
        if self.pairs == "all":
            if emb.u is None or emb.g is None:
                raise ValueError("clip with pairs='all' needs the unsafe caption and image of every quadruplet")
            text, image = torch.cat([emb.s, emb.u]), torch.cat([emb.v, emb.g])
            if emb.unsafe_kept is not None:
                kept = torch.cat([torch.ones_like(emb.unsafe_kept, dtype=torch.bool), emb.unsafe_kept.bool()])
        scale = encoder.logit_scale.exp()
        (text_all, image_all), off = self.gather(text, image)
        if kept is not None:
            text, image, text_all, image_all, off = self._keep(kept, text, image, text_all, image_all, off)
        loss = symmetric_cross_entropy(scale * text @ image_all.T, scale * image @ text_all.T, off)
        return LossOutput(loss, {"contrastive_TI" if self.pairs == "safe" else "contrastive_all": loss.detach()})

    def _keep(self, kept: Tensor, text: Tensor, image: Tensor, text_all: Tensor, image_all: Tensor, off: int):
        """The kept rows of the local and the gathered pairs, and the local rows' offset among the gathered kept ones."""
        kept_all = kept
        if self.gather_negatives:  # every rank has a mask (the dataset flags every item), so the collectives match
            kept_all = distributed.gather_with_grad(kept.float()[:, None])[0][:, 0] > 0.5
        off = int(kept_all[:off].sum())
        return text[kept], image[kept], text_all[kept_all], image_all[kept_all], off
