"""Checkpoints of a training run: written without pickle, read back only into a run they fit.

A run directory (``OUT.run``, next to the artifact, never inside it) holds::

    checkpoint/                      the latest resumable state, replaced atomically
      model.safetensors              the encoder being trained (adapters unmerged)
      optimizer.safetensors          optimizer tensors, ``state.<param index>.<key>``
      rng.safetensors                torch (CPU, CUDA) and numpy generator states
      state.json                     format, identity, progress, optimizer groups, RNG scalars, config
    best.safetensors                 weights of the best epoch so far
    <name>.safetensors               each frozen model the objective holds (safeclip: reference)

A checkpoint's *identity* (method, architecture, geometry, adapters, the objective's options) must
equal the new run's, and one taken inside an epoch also needs the same batch size and process
count; anything else is a :class:`CheckpointError` that says how to resume or start afresh.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from training import artifact
from training.encoder import SafetyEncoder
from training.errors import CheckpointError
from training.objectives import Objective
from training.recipes import TrainConfig

CHECKPOINT = "checkpoint"
BEST = "best.safetensors"
STATE = "state.json"
CHECKPOINT_FORMAT = "safe-retrieval-checkpoint"


@dataclass
class Progress:
    """The loop's position and early-stopping state, stored in ``state.json``."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current (incomplete) epoch
    global_step: int = 0
    best_recall_sum: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False


# ------------------------------------------------------------------------------------------ tensors
def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors file written to a temp name and renamed (readers never see a half file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint is corrupt, start without --resume") from e


def frozen_file(name: str) -> str:
    """The run directory's file for the objective's frozen model ``name``."""
    return f"{name}.safetensors"


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors (``state.<param>.<key>``) plus JSON (groups, scalars)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"state.{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Python, numpy and torch (CPU and CUDA) generator states, without pickle."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py_version, list(py_state), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# ------------------------------------------------------------------------------------------- saving
def identity(encoder: SafetyEncoder, cfg: TrainConfig, objective: Objective) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: method, architecture, geometry, adapters, objective options."""
    return {
        "method": cfg.method,
        "architecture": {"name": encoder.arch.name, "model_cfg": encoder.arch.model_cfg},
        "geometry": encoder.geometry,
        "adapters": "full" if cfg.full_finetune else {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha},
        "objective": objective.identity(),
    }


def save_checkpoint(
    run_dir: Path, encoder: SafetyEncoder, opt: torch.optim.Optimizer, cfg: TrainConfig, progress: Progress,
    world_size: int, identity: dict[str, Any],
) -> Path:
    """Write ``run_dir/checkpoint`` atomically: model, optimizer and RNG tensors plus ``state.json``."""
    opt_tensors, opt_meta = flatten_optimizer(opt)
    rng_tensors, rng_meta = rng_state()
    state = {
        "format": CHECKPOINT_FORMAT,
        **identity,
        "progress": asdict(progress),
        "world_size": world_size,
        "optimizer": opt_meta,
        "rng": rng_meta,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "saved_at": time.time(),
    }

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in opt_tensors.items()} or {"empty": torch.zeros(0)},
                  str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")

    final = run_dir / CHECKPOINT
    artifact.atomic_dir(final, write)
    return final


def save_frozen(run_dir: Path, objective: Objective) -> None:
    """Keep the objective's frozen models in the run directory, for ``--resume``."""
    for name, module in objective.frozen().items():
        save_tensors(module.state_dict(), run_dir / frozen_file(name))


# ------------------------------------------------------------------------------------------ reading
def find_checkpoint(path: Path) -> Path:
    """``--resume`` accepts a run directory or its ``checkpoint`` directory."""
    path = Path(path)
    for cand in (path, path / CHECKPOINT):
        if (cand / STATE).is_file():
            return cand
    raise CheckpointError(f"no checkpoint found at {path} (expected {STATE} in it or in {path / CHECKPOINT}); check --resume")


def read_checkpoint_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE} is unreadable ({e}); the checkpoint is corrupt, start without --resume") from e
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{ckpt} is not a safe-retrieval training checkpoint")
    return state


def check_compatible(state: dict[str, Any], expected: dict[str, Any], ckpt: Path) -> None:
    """A clear error when a checkpoint comes from another method, architecture or adapter setup."""
    if state.get("method") != expected["method"]:
        raise CheckpointError(
            f"{ckpt} was written by a --method {state.get('method')} run, not --method {expected['method']}; "
            f"resume it with --method {state.get('method')}, or start a fresh run without --resume"
        )
    got, want = state.get("architecture", {}), expected["architecture"]
    if got.get("model_cfg") != want["model_cfg"]:
        raise CheckpointError(
            f"{ckpt} holds a {got.get('name')!r} model but --model gives {want['name']!r}; "
            "pass the --model the run started from, or start a fresh run without --resume"
        )
    for key, flag in (("geometry", "--method"), ("adapters", "--lora-rank/--full-finetune"), ("objective", "--clip-pairs")):
        if state.get(key, {}) != expected[key]:
            raise CheckpointError(
                f"{ckpt} was trained with {key} {state.get(key)!r} but this run uses {expected[key]!r}; "
                f"use the same {flag} as the original run, or start a fresh run without --resume"
            )


def check_position(state: dict[str, Any], cfg: TrainConfig, world_size: int, ckpt: Path) -> None:
    """A checkpoint taken inside an epoch resumes at a sample offset that only its batch size and process count give."""
    step = state.get("progress", {}).get("step_in_epoch", 0)
    if not step:
        return  # at an epoch boundary any batch size and process count can go on
    batch, world = state.get("config", {}).get("batch_size"), state.get("world_size")
    if batch != cfg.batch_size or (world is not None and world != world_size):
        raise CheckpointError(
            f"{ckpt} stopped inside an epoch (step {step}) with --batch-size {batch} on {world or '?'} process(es); "
            f"this run uses --batch-size {cfg.batch_size} on {world_size}. Resume with the original batch size and "
            "process count (the position in the epoch depends on both), or start a fresh run without --resume"
        )


def load_checkpoint(
    ckpt: Path, state: dict[str, Any], encoder: SafetyEncoder, opt: torch.optim.Optimizer, objective: Objective,
) -> Progress:
    """Load a checked checkpoint into the run: weights, optimizer, RNG and the objective's frozen models.

    The frozen models are read from the checkpoint's run directory; the returned :class:`Progress`
    says where the loop goes on.
    """
    artifact.load_state(encoder, load_tensors(ckpt / "model.safetensors"), str(ckpt / "model.safetensors"))
    opt_tensors = load_tensors(ckpt / "optimizer.safetensors")
    opt_tensors.pop("empty", None)
    try:
        opt.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"]))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: the optimizer state does not fit this model ({e}); start without --resume") from e
    set_rng_state(load_tensors(ckpt / "rng.safetensors"), state["rng"])
    old_run = ckpt.parent
    for name, module in objective.frozen().items():
        path = old_run / frozen_file(name)
        if not path.is_file():
            raise CheckpointError(
                f"{old_run} lacks {path.name} (the frozen {name} of {state['method']}); start without --resume"
            )
        artifact.load_state(module, load_tensors(path), str(path))
    return Progress(**state["progress"])


def carry_over(old_run: Path, run_dir: Path, objective: Objective) -> None:
    """A run resumed into another run directory takes the best weights and frozen models along."""
    if old_run.resolve() == run_dir.resolve():
        return
    for name in (BEST, *(frozen_file(n) for n in objective.frozen())):
        if (old_run / name).is_file():
            shutil.copy2(old_run / name, run_dir / name)
