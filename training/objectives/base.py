"""What every training objective sees and returns.

A batch of B ViSU quadruplets is embedded by the model being trained into ``s`` (safe text T),
``u`` (unsafe text T*), ``v`` (safe image I) and ``g`` (unsafe generated image I*), each ``(B, D)``:
space components on the hyperboloid (lorentz) or unit vectors (euclidean). Objectives are plain
math over these; the trainer does the encoding, and ``training.distributed`` the gathering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import distributed


@dataclass
class Batch:
    """Tokenised and preprocessed quadruplets on the training device."""

    safe_tokens: Tensor  # (B, L)
    nsfw_tokens: Tensor  # (B, L)
    safe_pixels: Tensor  # (B, 3, H, W)
    nsfw_pixels: Tensor  # (B, 3, H, W)
    unreadable: tuple[int, ...] = ()  # train-split positions whose images could not be read (skipped for this batch)
    unsafe_kept: Tensor | None = None  # (B,) bool, False where a row's unsafe pair is left out (clip's oracle); None: all

    def __len__(self) -> int:
        return int(self.safe_tokens.shape[0])

    def to(self, device: torch.device) -> "Batch":
        tensors = (self.safe_tokens, self.nsfw_tokens, self.safe_pixels, self.nsfw_pixels)
        kept = None if self.unsafe_kept is None else self.unsafe_kept.to(device, non_blocking=True)
        return Batch(*(t.to(device, non_blocking=True) for t in tensors), unreadable=self.unreadable, unsafe_kept=kept)


@dataclass
class Embeddings:
    """One batch's embeddings ``(B, D)``; the unsafe ones are None for objectives that ignore them."""

    s: Tensor
    v: Tensor
    u: Tensor | None = None
    g: Tensor | None = None
    s_ref: Tensor | None = None  # the frozen reference encoder's s (Safe-CLIP)
    v_ref: Tensor | None = None  # the frozen reference encoder's v (Safe-CLIP)
    unsafe_kept: Tensor | None = None  # (B,) bool: the batch's mask of kept unsafe pairs (clip's oracle); None: all


@dataclass
class LossOutput:
    """The scalar to minimise and its named, unweighted terms (for logging)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: ``forward(embeddings, encoder) -> LossOutput``.

    Class attributes say what the trainer must prepare: the encoder ``geometry`` (``any``: the source
    artifact's own), whether the unsafe half of each quadruplet is embedded (``uses_unsafe``), which of
    the encoder's learnable scalars (``logit_scale``, ``curv``, ``visual_alpha``, ``textual_alpha``) this
    objective trains, which ``optimizer`` its reference uses, and whether the last epoch is kept
    (``keep_last``). The methods below are how an objective tells the trainer what
    else it owns, so that a new objective needs no branch in the loop.
    """

    name: ClassVar[str]
    geometry: ClassVar[str]
    uses_unsafe: ClassVar[bool] = True
    trained_scalars: ClassVar[tuple[str, ...]] = ()
    terms: ClassVar[tuple[str, ...]] = ()  # names of the weighted loss terms, in the order ``--weights`` takes them
    optimizer: ClassVar[str] = "adamw"  # "adamw" (decay on weight matrices only) or "adam" (no decay)
    keep_last: ClassVar[bool] = False  # the artifact is the last epoch's weights, not the best validation recall's

    def __init__(self, *, gather_negatives: bool = False):
        super().__init__()
        self.gather_negatives = gather_negatives

    def reference(self, batch: Batch) -> tuple[Tensor, Tensor] | None:
        """Targets from a frozen reference model, ``(s_ref, v_ref)``; None unless the objective has one."""
        return None

    def frozen(self) -> dict[str, nn.Module]:
        """The frozen models this objective holds, by name (e.g. ``reference``); none by default.

        The trainer keeps each as ``<name>.safetensors`` in the run directory, written when a run
        starts and read back on ``--resume``, so a resumed run compares against the same model.
        """
        return {}

    def identity(self) -> dict[str, Any]:
        """Options beyond the method that change what is optimised: a checkpoint resumes only under the same."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """What the artifact's provenance records about this loss (its options and term weights)."""
        return {}

    def gather(self, *xs: Tensor) -> tuple[list[Tensor], int]:
        """Every rank's rows of each ``x (B, D)`` (one collective for all) and this rank's row offset.

        Identity (offset 0) unless ``gather_negatives`` and running distributed.
        """
        if not self.gather_negatives:
            return list(xs), 0
        stacked, offset = distributed.gather_with_grad(torch.stack(xs, dim=1))  # (W*B, len(xs), D)
        return list(stacked.unbind(dim=1)), offset


def symmetric_cross_entropy(logits_a: Tensor, logits_b: Tensor, offset: int = 0) -> Tensor:
    """``(CE(logits_a, y) + CE(logits_b, y)) / 2`` with targets ``y = offset + arange(B)``.

    ``logits_a (B, N)`` scores the local rows of one side against N candidates of the other side,
    ``logits_b (B, N)`` the reverse; the positive of local row i is candidate ``offset + i``.
    """
    target = torch.arange(logits_a.shape[0], device=logits_a.device) + offset
    return 0.5 * (F.cross_entropy(logits_a, target) + F.cross_entropy(logits_b, target))


def weighted_mean(terms: list[Tensor], weights: list[float]) -> Tensor:
    """The reference combination: weights normalised to sum 1, then the dot product divided by the term count."""
    w = torch.tensor(weights, dtype=torch.float32, device=terms[0].device)
    w = w / w.sum()
    return (w * torch.stack([t.float() for t in terms])).sum() / len(terms)
