"""Low-rank adapters (LoRA) for open_clip models, as weight parametrizations.

HySAC and Safe-CLIP adapt, with rank ``r = 16`` and ``alpha = 1`` (scale ``alpha / r``), the attention
*key and value* projections, the attention output projection, both MLP layers and the vision patch
embedding; the query projection is left alone. open_clip fuses q, k and v into one
``nn.MultiheadAttention.in_proj_weight`` of shape ``(3W, W)``, which ``peft`` can only adapt as a
whole, so we adapt its k and v row slices ourselves.

Each adapted weight ``W (out, in...)`` becomes ``W + scale * B @ A`` per adapted row slice, through
``torch.nn.utils.parametrize``: the module's own forward (``F.multi_head_attention_forward``,
``F.linear``, ``F.conv2d``) keeps working unchanged, the base weight stays at
``parametrizations.<name>.original`` (frozen), and merging is just evaluating the parametrization
once. For the patch embedding, ``B @ A`` with ``A (r, 3*p*p)`` reshaped to the kernel is the same
as peft's conv-LoRA (a ``p x p`` conv to ``r`` channels followed by a ``1 x 1`` conv).

peft's ``lora_dropout`` acts on the adapter's *input activations*, which a weight-space adapter
does not see; it is therefore not reproduced (the adapters here are dropout-free).
"""

from __future__ import annotations

import math

import torch
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn

#: Rank and alpha of the reference configuration (peft ``LoraConfig(r=16, lora_alpha=1)``).
DEFAULT_RANK = 16
DEFAULT_ALPHA = 1.0


class LowRankDelta(nn.Module):
    """Parametrization ``W -> W + scale * delta`` with a rank-``r`` delta on chosen row slices of ``W``.

    ``W`` has shape ``(out, *in_shape)``; each slice ``(start, stop)`` of its rows gets its own pair
    ``A (r, prod(in_shape))`` (Kaiming-uniform, as in peft) and ``B (stop - start, r)`` (zeros, so the
    adapted model starts equal to the base model). Rows outside every slice are never changed.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], slices: list[tuple[int, int]], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.shape = tuple(shape)
        self.slices = [(int(a), int(b)) for a, b in slices]
        self.scale = alpha / rank
        fan_in = math.prod(self.shape[1:])
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for start, stop in self.slices:
            a = torch.empty(rank, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(stop - start, rank)))

    def delta(self) -> Tensor:
        """The full-shape update ``scale * [0 | B_1 A_1 | 0 | B_2 A_2 | ...]``: ``shape``."""
        out = self.shape[0]
        blocks: list[Tensor] = []
        row = 0
        ref = self.lora_A[0]
        for (start, stop), a, b in zip(self.slices, self.lora_A, self.lora_B, strict=True):
            if start > row:
                blocks.append(ref.new_zeros(start - row, a.shape[1]))
            blocks.append(b @ a)
            row = stop
        if row < out:
            blocks.append(ref.new_zeros(out - row, ref.shape[1]))
        return (torch.cat(blocks) * self.scale).reshape(self.shape)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, slices={self.slices}, rank={self.lora_A[0].shape[0]}, scale={self.scale:g}"


def _adapt(module: nn.Module, name: str, slices: list[tuple[int, int]], rank: int, alpha: float) -> None:
    weight = getattr(module, name)
    delta = LowRankDelta(weight.shape, slices, rank, alpha).to(device=weight.device, dtype=weight.dtype)
    parametrize.register_parametrization(module, name, delta)


def targets(model: nn.Module) -> list[tuple[str, nn.Module, str, list[tuple[int, int]]]]:
    """Where the reference configuration puts adapters: ``(path, module, tensor name, row slices)``.

    - every ``nn.MultiheadAttention``: the k and v thirds of ``in_proj_weight`` (not q), and ``out_proj.weight``;
    - every transformer MLP (``c_fc``, ``c_proj``);
    - the vision patch embedding ``visual.conv1``.
    """
    found = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
                raise ValueError(f"{path}: LoRA expects a fused in_proj_weight (q, k and v of one width)")
            w = mod.embed_dim
            found.append((path, mod, "in_proj_weight", [(w, 2 * w), (2 * w, 3 * w)]))
            found.append((f"{path}.out_proj", mod.out_proj, "weight", [(0, mod.out_proj.out_features)]))
        elif isinstance(mod, nn.Linear) and path.rsplit(".", 1)[-1] in ("c_fc", "c_proj"):
            found.append((path, mod, "weight", [(0, mod.out_features)]))
        elif isinstance(mod, nn.Conv2d) and (path == "visual.conv1" or path.endswith(".visual.conv1")):
            found.append((path, mod, "weight", [(0, mod.out_channels)]))
    return found


def apply_lora(model: nn.Module, *, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA) -> list[str]:
    """Add adapters to ``model`` (an open_clip CLIP) in place and freeze everything else in it.

    Returns the adapted tensor paths, e.g. ``visual.transformer.resblocks.0.attn.in_proj_weight``.
    """
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for path, mod, name, slices in targets(model):
        _adapt(mod, name, slices, rank, alpha)
        adapted.append(f"{path}.{name}")
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return adapted


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankDelta) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight in place (``W <- W + scale * B A``); returns how many.

    Afterwards the model has its original parameter names and no trace of the adapters, so its
    ``state_dict`` loads into a plain model of the same architecture.
    """
    merged = 0
    for mod in list(model.modules()):
        if not parametrize.is_parametrized(mod):
            continue
        for name in list(mod.parametrizations.keys()):
            if any(isinstance(p, LowRankDelta) for p in mod.parametrizations[name]):
                requires_grad = mod.parametrizations[name].original.requires_grad
                parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
                getattr(mod, name).requires_grad_(requires_grad)
                merged += 1
    return merged
