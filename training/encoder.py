"""SafetyEncoder: an open_clip backbone with a hyperbolic (HySAC/MERU) or Euclidean (Safe-CLIP) head.

``lorentz``: features are scaled by a learnable ``alpha`` (one per modality, stored as a log, init
``embed_dim ** -0.5``, clamped to ``alpha <= 1``) and lifted with ``exp_map0`` onto the hyperboloid
of learnable curvature ``c`` (stored as a log, init 1, clamped to ``[0.1, 10]``). No L2 normalisation.
``euclidean``: L2-normalised CLIP features.

A tower may carry an *eraser* (:mod:`training.erasure`): a fixed affine edit ``x @ weight + bias`` of its
features just before the head (for ``lorentz``, in the tangent space at the origin, before ``alpha`` and
``exp_map0``; for ``euclidean``, before normalisation). It is a pair of buffers in the state dict
(``erasers.<tower>.weight``/``.bias``), so it travels in the artifact and acts wherever the encoder embeds.

Either way ``encode_*`` return one row per input: space components (lorentz) or unit vectors
(euclidean), always float32 on the CPU-or-GPU device of the model.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from training import lorentz
from training.architectures import Architecture, build_clip, build_tokenizer, build_transform
from training.errors import InputError

Geometry = Literal["lorentz", "euclidean"]
GEOMETRIES: tuple[str, ...] = ("lorentz", "euclidean")

CURV_RANGE = (0.1, 10.0)
LOGIT_SCALE_RANGE = (1 / 0.07, 100.0)


TOWERS: tuple[str, ...] = ("image", "text")


class Eraser(nn.Module):
    """A fixed affine edit of one tower's ``(B, E)`` features: ``x @ weight + bias``, in fp32 (identity when new)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.eye(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.weight + self.bias


class SafetyEncoder(nn.Module):
    """open_clip model + geometry head. Parameters: ``clip.*``, ``curv``, ``visual_alpha``,
    ``textual_alpha`` (lorentz only) and ``logit_scale`` (the contrastive scale, stored as a log)."""

    def __init__(self, arch: Architecture, geometry: Geometry = "lorentz", *, curv_init: float = 1.0):
        super().__init__()
        if geometry not in GEOMETRIES:
            raise InputError(f"unknown geometry {geometry!r}; use one of {', '.join(GEOMETRIES)}")
        self.arch = arch
        self.geometry: Geometry = geometry
        self.clip = build_clip(arch)
        self.tokenizer = build_tokenizer(arch)
        self.transform = build_transform(arch)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if geometry == "lorentz":
            alpha0 = math.log(arch.embed_dim**-0.5)
            self.curv = nn.Parameter(torch.tensor(math.log(curv_init)))
            self.visual_alpha = nn.Parameter(torch.tensor(alpha0))
            self.textual_alpha = nn.Parameter(torch.tensor(alpha0))
        self.erasers = nn.ModuleDict()  # tower -> Eraser; empty (no state keys) until one is fitted
        self.erasure: list[dict] = []  # what each fitted eraser took out (the artifact's config records it)

    # ----------------------------------------------------------------- scalars
    @property
    def curvature(self) -> float:
        """``c`` (the space has curvature ``-c``); 0 for Euclidean models."""
        return float(self.curv.detach().exp()) if self.geometry == "lorentz" else 0.0

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @torch.no_grad()
    def clamp_scalars(self) -> None:
        """Keep the learnable scalars in their ranges; the trainer calls this after every step."""
        self.logit_scale.clamp_(math.log(LOGIT_SCALE_RANGE[0]), math.log(LOGIT_SCALE_RANGE[1]))
        if self.geometry == "lorentz":
            self.curv.clamp_(math.log(CURV_RANGE[0]), math.log(CURV_RANGE[1]))
            self.visual_alpha.clamp_(max=0.0)
            self.textual_alpha.clamp_(max=0.0)

    # ----------------------------------------------------------------- erasers
    def add_eraser(self, tower: str, weight: Tensor | None = None, bias: Tensor | None = None) -> None:
        """Fold ``x -> x @ weight + bias`` into ``tower``'s head, after any eraser it already has (no weights: an
        identity placeholder, filled by loading a state dict)."""
        if tower not in TOWERS:
            raise InputError(f"unknown tower {tower!r}; use one of {', '.join(TOWERS)}")
        dim = self.arch.embed_dim
        if weight is not None and (tuple(weight.shape) != (dim, dim) or bias is None or tuple(bias.shape) != (dim,)):
            raise InputError(f"an eraser for this encoder maps {dim}-d features: weight {dim}x{dim} and bias {dim}, "
                             f"not {tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
        if tower not in self.erasers:
            self.erasers[tower] = Eraser(dim).to(self.device)
        if weight is None:
            return
        old = self.erasers[tower]
        w, b = weight.to(old.weight), bias.to(old.bias)
        with torch.no_grad():  # (x W1 + b1) W2 + b2 = x (W1 W2) + (b1 W2 + b2)
            old.bias.copy_(old.bias @ w + b)
            old.weight.copy_(old.weight @ w)

    def blank_copy(self) -> "SafetyEncoder":
        """A new encoder of the same architecture and geometry, with identity erasers on the same towers and the
        same erasure record: what a state dict of this one loads into."""
        out = SafetyEncoder(self.arch, self.geometry)
        for tower in self.erasers:
            out.add_eraser(tower)
        out.erasure = [dict(r) for r in self.erasure]
        return out

    def head_input(self, features: Tensor, tower: Literal["text", "image"]) -> Tensor:
        """``(B, E)`` tower features as the geometry head takes them: fp32, through the tower's eraser if any."""
        return self.erasers[tower](features) if tower in self.erasers else features.float()

    # ------------------------------------------------------- differentiable path
    def text_features(self, tokens: Tensor) -> Tensor:
        """Projected text features ``(B, E)`` before the geometry head.

        The batch is cut to its longest real sequence: with a causal mask and EOT pooling the pooled
        output does not depend on trailing padding, and attention cost falls with the length.
        """
        clip = self.clip
        if not hasattr(clip, "token_embedding") or clip.attn_mask is None or clip.text_pool_type != "argmax":
            return clip.encode_text(tokens)
        length = max(int((tokens != 0).sum(-1).max()), 1)
        tokens = tokens[:, :length]
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def image_features(self, pixels: Tensor) -> Tensor:
        """Projected image features ``(B, E)`` before the geometry head."""
        return self.clip.encode_image(pixels)

    def lift(self, features: Tensor, modality: Literal["text", "image"]) -> Tensor:
        """Geometry head: ``(B, E)`` features -> ``(B, E)`` embeddings (space components or unit vectors)."""
        features = self.head_input(features, modality)
        if self.geometry == "euclidean":
            return F.normalize(features, dim=-1)
        alpha = self.textual_alpha if modality == "text" else self.visual_alpha
        return lorentz.exp_map0(features * alpha.exp(), self.curv.exp())

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.lift(self.text_features(tokens), "text")

    def embed_pixels(self, pixels: Tensor) -> Tensor:
        return self.lift(self.image_features(pixels), "image")

    # ------------------------------------------------------------- inference API
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"text #{i} is empty; give a non-empty query or caption")
        return self.tokenizer(list(texts))

    def preprocess(self, images: Iterable[Image.Image]) -> Tensor:
        return torch.stack([self.transform(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256, head: bool = True) -> Tensor:
        """Embed captions/queries: ``list[str] -> (N, E)`` float32 (``head=False``: the features the head takes)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(texts)
        fn = self.embed_tokens if head else (lambda t: self.head_input(self.text_features(t), "text"))
        return self._batched(tokens, fn, batch_size)

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image] | Tensor, *, batch_size: int = 64, head: bool = True) -> Tensor:
        """Embed images: PIL images (preprocessed here) or an already-preprocessed ``(N, 3, H, W)`` batch
        (``head=False``: the features the head takes)."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, Tensor):
            pixels = images
        else:
            pixels = self.preprocess(images) if len(images) else torch.empty(0, 3, 1, 1)
        fn = self.embed_pixels if head else (lambda p: self.head_input(self.image_features(p), "image"))
        return self._batched(pixels, fn, batch_size)

    def _batched(self, inputs: Tensor, fn, batch_size: int) -> Tensor:
        was_training = self.training
        self.eval()
        try:
            outs = [fn(inputs[i : i + batch_size].to(self.device)).float() for i in range(0, len(inputs), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, self.arch.embed_dim, device=self.device)

    def dist0(self, x: Tensor) -> Tensor:
        """Distance of each embedding from the origin (lorentz only)."""
        if self.geometry != "lorentz":
            raise InputError("distance to the origin is defined for lorentz models only")
        return lorentz.dist0(x, self.curvature)
