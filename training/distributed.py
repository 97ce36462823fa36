"""Process-group setup for ``torchrun`` and the one cross-rank helper the objectives need.

``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``) starts one
process per device; ``setup`` joins them into a group (``nccl`` on CUDA, ``gloo`` on CPU). Without
those variables everything runs as a single process and the helpers are identities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from training.architectures import pick_device
from training.errors import InputError


@dataclass(frozen=True)
class Context:
    """Where this process sits: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, checkpoints and writes the artifact."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Context:
    """Read the launcher's environment, pick this rank's device and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if world <= 1:
        return Context(device=dev)
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise InputError(
                f"LOCAL_RANK {local} has no GPU (this node has {torch.cuda.device_count()}); "
                "start torchrun with --nproc-per-node equal to the number of GPUs"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Context(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows of ``x (B, D)`` stacked in rank order: ``(world * B, D)``, and this rank's offset.

    Gradients flow back to every rank's rows (open_clip's ``gather_with_grad``), so each rank's
    loss over the gathered negatives trains all ranks' encoders. Every rank must pass the same ``B``
    (the trainer drops the last incomplete batch). Single process: ``(x, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    # only in a multi-process run: the autograd-aware collectives need an initialised process group
    import torch.distributed.nn.functional as dist_nn

    parts = dist_nn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a signal that reached only some)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_float(value: float, ctx: Context) -> float:
    """Rank 0's ``value`` on every rank (e.g. a validation score only rank 0 computed)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0)
    return float(t.item())


def union_size(positions: set[int], n: int, ctx: Context) -> int:
    """How many distinct positions in ``range(n)`` any rank has in ``positions``."""
    if not ctx.distributed:
        return len(positions)
    t = torch.zeros(n, dtype=torch.float32, device=ctx.device)
    if positions:
        t[list(positions)] = 1.0
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.sum().item())


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
