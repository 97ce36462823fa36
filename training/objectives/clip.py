"""The baseline: plain CLIP contrastive fine-tuning on the safe caption/image pairs.

Euclidean (unit vectors), logits ``exp(logit_scale) * cos``. With ``pairs="safe"`` (the default) the
unsafe half of each quadruplet is never seen, which is exactly what makes it the "CLIP fine-tuned on
the same data" row. ``pairs="all"`` also contrasts the unsafe pairs ``(T*, I*)`` (each caption's
negatives then include its quadruplet's other image): a stand-in for web-scale pretraining, which
has seen unsafe content, used to make a base model that the safety methods fine-tune.
"""

from __future__ import annotations

from typing import Any

import torch

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
        if self.pairs == "all":
            if emb.u is None or emb.g is None:
                raise ValueError("clip with pairs='all' needs the unsafe caption and image of every quadruplet")
            text, image = torch.cat([emb.s, emb.u]), torch.cat([emb.v, emb.g])
        scale = encoder.logit_scale.exp()
        (text_all, image_all), off = self.gather(text, image)
        loss = symmetric_cross_entropy(scale * text @ image_all.T, scale * image @ text_all.T, off)
        return LossOutput(loss, {"contrastive_TI" if self.pairs == "safe" else "contrastive_all": loss.detach()})
