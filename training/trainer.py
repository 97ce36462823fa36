"""The training loop: one objective, one encoder, one process per device.

``train(config)`` fine-tunes a :class:`~training.encoder.SafetyEncoder` with one of the objectives
(``hysac``, ``safeclip``, ``clip``) on a ViSU-layout dataset and writes an artifact (merged
weights, ``bounds.json`` and unsafe thresholds calibrated on the validation split).

Engineering, in the order a step meets it:
- LoRA adapters (``training.lora``) or full fine-tuning; the encoder's learnable scalars are trained
  only where the objective uses them and are clamped after every step.
- ``torchrun`` gives one process per device (DDP); each rank reads its shard through a
  ``DistributedSampler``; only rank 0 logs, validates, checkpoints and writes the artifact.
- CUDA autocast to bf16 (``--precision bf16``); the hyperbolic math is fp32 regardless.
- Gradient checkpointing of the transformer blocks (``--grad-checkpointing``).
- A checkpoint directory (model, optimizer, epoch, step, RNG, early-stopping state) written without
  pickle (safetensors + JSON) after every epoch and when SIGTERM/SIGINT arrives.
- Early stopping on the validation recall sum; the best epoch's weights become the artifact.

Run layout, next to the artifact (never inside it, so a crash leaves nothing where it goes)::

    OUT.run/
      checkpoint/{model,optimizer,rng}.safetensors + state.json   resumable state (latest)
      best.safetensors                                           weights of the best epoch so far
      reference.safetensors                                      safeclip: the frozen reference
      metrics.jsonl                                              one JSON object per log event
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from training import architectures, artifact, distributed, lora, objectives, traversal
from training.data.roots import DataRoots
from training.encoder import SafetyEncoder
from training.errors import ArtifactError, CheckpointError, DataError, InputError, SafeRetrievalError
from training.objectives import Batch, Embeddings, Objective

PRECISIONS = ("fp32", "bf16")
CHECKPOINT = "checkpoint"
BEST = "best.safetensors"
REFERENCE = "reference.safetensors"
METRICS = "metrics.jsonl"
STATE = "state.json"
CHECKPOINT_FORMAT = "safe-retrieval-checkpoint"
UNUSED_CLIP_PARAMETERS = ("logit_scale", "logit_bias")

# Reference hyper-parameters per method (HySAC: AdamW 1e-4, bs 32; Safe-CLIP: Adam 1e-3, bs 16).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "hysac": {"lr": 1e-4, "batch_size": 32, "epochs": 50},
    "safeclip": {"lr": 1e-3, "batch_size": 16, "epochs": 50},
    "clip": {"lr": 1e-4, "batch_size": 32, "epochs": 50},
}

# The demo presets, sized for two CPU cores, on the synthetic benchmark (n = 1200 when the data has to
# be generated: 30 steps an epoch, the unsafe half with the "generated" look, as ViSU's unsafe images
# are generated). They follow the papers' set-up, fine-tuning a CLIP that has already seen unsafe content:
# - ``demo-base`` is the stand-in for OpenAI CLIP: a tiny CLIP trained from scratch on *all* the pairs,
#   safe and unsafe (24 epochs; its validation recall rises until about epoch 20; lr 4e-3 collapses).
# - ``demo`` fine-tunes that base (``--model``): hysac and the clip baseline for 24 epochs each (hysac
#   ~2.5 minutes; its recall on a larger fresh test set rose from 8 to 16 to 24 epochs, and the
#   baseline gets the same budget, which it also gains from) with eta 2 for hysac (the reference
#   leaves it open; at 1 unsafe captions stay nearer the origin than safe images, U < V), Safe-CLIP
#   for 16 at the reference's lr 1e-3 and batch 16 (~2 minutes; 12 redirect less, 24 no more).
# Measured quality and its limits: benchmarks/RESULTS.md.
_DEMO_SCHEDULE: dict[str, Any] = {
    "full_finetune": True, "batch_size": 32, "patience": 8, "workers": 0, "warmup_steps": 10, "schedule": "cosine",
    "synthetic_n": 1200, "synthetic_look": "generated",
}
PRESETS: dict[str, dict[str, Any]] = {
    "demo-base": {
        **_DEMO_SCHEDULE, "model": "tiny", "epochs": 24, "lr": 2e-3, "clip_pairs": "all", "methods": ("clip",),
    },
    "demo": {
        **_DEMO_SCHEDULE, "epochs": 24, "needs_model": True,
        "by_method": {
            "hysac": {"lr": 2e-3, "eta": 2.0}, "clip": {"lr": 2e-3},
            "safeclip": {"lr": 1e-3, "batch_size": 16, "epochs": 16},
        },
    },
}
PRESET_DATA_KEYS = ("synthetic_n", "synthetic_look")  # how the preset's synthetic data is made, not training options


def synthesize_for_preset(preset: str, out: Path, *, seed: int) -> dict[str, Any]:
    """Generate the synthetic dataset a preset is sized for (its n and unsafe look) in ``out``; its summary."""
    from training.data import synthetic

    p = PRESETS[preset]
    return synthetic.generate(out, n=p["synthetic_n"], seed=seed, unsafe_look=p["synthetic_look"])


class TrainingInterrupted(SafeRetrievalError):
    """SIGTERM/SIGINT arrived; the checkpoint was saved and the run can be resumed."""

    exit_code = 130


class OutOfMemory(SafeRetrievalError):
    """The accelerator ran out of memory."""

    exit_code = 3


@contextmanager
def out_of_memory_advice(where: str, batch_size: int):
    """Turn CUDA's out-of-memory error into :class:`OutOfMemory`, with what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemory(
            f"out of GPU memory {where} at batch size {batch_size} ({str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "lower --batch-size, add --grad-checkpointing, or use --precision bf16. The last checkpoint, if any, "
            "is in the run directory: add --resume to go on from it"
        ) from None


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means "the method's (or preset's) default"."""

    method: str = "hysac"
    data: Path | None = None
    out: Path | None = None
    model: str | None = None
    pretrained: str | None = None
    preset: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lora_rank: int = lora.DEFAULT_RANK
    lora_alpha: float = lora.DEFAULT_ALPHA
    full_finetune: bool | None = None
    eta: float | None = None  # hysac: weight of the entailment terms (1, or the preset's)
    clip_pairs: str | None = None  # clip: "safe" (default) or "all", which also contrasts the unsafe pairs (a base)
    weights: tuple[float, ...] | None = None  # hysac/safeclip: every loss term's weight (None: the reference's)
    weight_decay: float = 0.2
    precision: str | None = None
    grad_checkpointing: bool = False
    resume: Path | None = None
    seed: int = 42
    gather_negatives: bool = False
    patience: int | None = None
    workers: int | None = None
    device: str = "auto"
    run_dir: Path | None = None
    val_limit: int | None = 2000
    log_every: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps in total (smoke tests, benchmarks)
    warmup_steps: int = 0  # linear warm-up of the learning rate (the references use none)
    schedule: str = "constant"  # "constant" (the references) or "cosine" decay to 0 over all epochs
    cache_mb: int = 1024  # keep preprocessed training images in memory when they fit in this many MiB
    progress: bool = True
    data_roots: tuple[str, ...] = ()  # read files only under these directories (the service's jobs); () reads anywhere


@dataclass
class TrainResult:
    artifact: Path | None
    run_dir: Path
    epochs_completed: int
    steps: int
    best_epoch: int | None
    best_recall_sum: float | None
    stopped_early: bool
    seconds: float
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["artifact"] = str(self.artifact) if self.artifact else None
        d["run_dir"] = str(self.run_dir)
        return d


# ------------------------------------------------------------------------------------- configuration
def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill in preset and method defaults and check the options; explicit values always win."""
    objectives.objective_class(cfg.method)  # unknown method -> InputError
    if cfg.weights is not None and cfg.eta is not None:
        raise InputError("give --eta or --weights, not both: --weights also sets the three entailment terms' weights")
    preset: dict[str, Any] = {}
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise InputError(f"unknown preset {cfg.preset!r}; use one of {', '.join(PRESETS)}")
        preset = dict(PRESETS[cfg.preset])
        preset.update(preset.pop("by_method", {}).get(cfg.method, {}))
        for key in PRESET_DATA_KEYS:
            preset.pop(key, None)
        methods = preset.pop("methods", None)
        if methods is not None and cfg.method not in methods:
            raise InputError(f"--preset {cfg.preset} trains --method {' or '.join(methods)}, not {cfg.method}")
        if preset.pop("needs_model", False) and cfg.model is None:
            raise InputError(
                f"--preset {cfg.preset} fine-tunes a base model, as the papers fine-tune a pretrained CLIP; give it as "
                "--model: for example train one first with 'safe-retrieval train --method clip --preset demo-base "
                "--data DIR --out runs/demo-base', then pass --model runs/demo-base"
            )
    defaults = {**METHOD_DEFAULTS[cfg.method], "model": "tiny", "full_finetune": False, "patience": 5, "workers": 2,
                "eta": 1.0, "clip_pairs": "safe"}
    values = {}
    for f in fields(TrainConfig):
        current = getattr(cfg, f.name)
        if f.name in defaults:  # None means "not given": preset, then method default
            values[f.name] = current if current is not None else preset.get(f.name, defaults[f.name])
        elif f.name in preset and current == f.default:  # other fields: the preset replaces untouched defaults
            values[f.name] = preset[f.name]
    cfg = replace(cfg, **values)
    if cfg.precision is None:
        cfg = replace(cfg, precision="bf16" if architectures.pick_device(cfg.device).type == "cuda" else "fp32")
    if cfg.precision not in PRECISIONS:
        raise InputError(f"unknown precision {cfg.precision!r}; use one of {', '.join(PRECISIONS)}")
    if cfg.data is None or cfg.out is None:
        raise InputError("give --data (a ViSU-layout dataset directory) and --out (the artifact directory to create)")
    checks = [
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.batch_size >= 2, "--batch-size must be >= 2 (contrastive losses need negatives)"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.lora_rank >= 1, "--lora-rank must be >= 1"),
        (cfg.patience >= 1, "--patience must be >= 1"),
        (cfg.workers >= 0, "--workers must be >= 0"),
        (cfg.eta >= 0, "--eta must be >= 0"),
        (cfg.schedule in ("constant", "cosine"), "schedule must be constant or cosine"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)
    if cfg.weights is not None:
        cfg = replace(cfg, weights=check_weights(cfg.weights, cfg.method))
    run_dir = cfg.run_dir or cfg.out.with_name(cfg.out.name + ".run")
    return replace(cfg, data=Path(cfg.data), out=Path(cfg.out), run_dir=Path(run_dir))


def check_weights(weights: Sequence[float], method: str) -> tuple[float, ...]:
    """``--weights`` as a tuple, or an :class:`InputError` that names the method's terms in order."""
    terms = objectives.objective_class(method).terms
    if len(terms) < 2:
        raise InputError(f"--weights applies to --method hysac or safeclip; {method} has a single loss term, so drop it")
    if len(weights) != len(terms) or any(not math.isfinite(w) or w < 0 for w in weights) or not sum(weights):
        raise InputError(
            f"--weights for {method} takes {len(terms)} non-negative numbers, not all zero, one per loss term in the "
            f"order {' '.join(terms)}; got {','.join(f'{w:g}' for w in weights)}. The reference's: "
            f"{','.join(f'{w:g}' for w in objectives.reference_weights(method))}"
        )
    return tuple(float(w) for w in weights)


# ---------------------------------------------------------------------------------------- the source
def load_source(source: str, geometry: str, *, pretrained: str | None = None) -> tuple[SafetyEncoder, dict[str, Any]]:
    """The encoder training starts from, with the geometry the method needs.

    ``source`` is an artifact directory, a preset, an open_clip architecture name (weights from
    ``pretrained``: an open_clip tag or a local file; random otherwise) or a model-config JSON file.
    An artifact of the other geometry contributes its CLIP weights and contrastive scale.
    """
    path = Path(source)
    if path.is_dir():
        art = artifact.load(path, device="cpu")
        if art.geometry == geometry:
            enc = art.encoder
        else:
            enc = SafetyEncoder(art.encoder.arch, geometry)
            enc.clip.load_state_dict(art.encoder.clip.state_dict())
            with torch.no_grad():
                enc.logit_scale.copy_(art.encoder.logit_scale)
        return enc.train(), {"source": str(path), "source_fingerprint": art.fingerprint}
    arch = architectures.resolve(source)
    enc = SafetyEncoder(arch, geometry)
    info: dict[str, Any] = {"source": source}
    if pretrained:
        import open_clip

        try:
            model = open_clip.create_model(source, pretrained=pretrained, device="cpu")
        except Exception as e:  # open_clip raises RuntimeError/ValueError/OSError for unknown tags and offline hubs
            raise ArtifactError(
                f"could not load pretrained weights {pretrained!r} for {source!r} ({e}); give a local weights file, "
                "an open_clip tag that is cached, or convert the weights first with 'safe-retrieval model convert'"
            ) from e
        artifact.load_state(enc.clip, model.state_dict(), f"{source} ({pretrained})")
        if hasattr(model, "logit_scale"):
            with torch.no_grad():
                enc.logit_scale.copy_(model.logit_scale.detach().reshape(()))
        info["pretrained"] = pretrained
    else:
        info["init"] = "random"
    return enc.train(), info


# -------------------------------------------------------------------------------------------- data
class Collate:
    """Stacks images and tokenises captions inside the loader workers: dicts -> :class:`Batch`."""

    def __init__(self, tokenizer, n_records: int | None = None):
        self.tokenizer = tokenizer
        self.n = n_records  # the dataset's length: with it, the batch lists the unreadable positions skipped

    def unreadable(self, items: list[dict[str, Any]]) -> tuple[int, ...]:
        if self.n is None:
            return ()
        return tuple((it["requested"] + k) % self.n for it in items for k in range((it["index"] - it["requested"]) % self.n))

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        return Batch(
            safe_tokens=self.tokenizer([it["safe"] for it in items]),
            nsfw_tokens=self.tokenizer([it["nsfw"] for it in items]),
            safe_pixels=torch.stack([it["safe_image"] for it in items]),
            nsfw_pixels=torch.stack([it["nsfw_image"] for it in items]),
            unreadable=self.unreadable(items),
        )


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; workers leave it to the main process, which saves a checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_splits(data: Path, log: Callable[[str], None], roots: DataRoots = DataRoots()):
    """The train and validation splits; skipped records are reported, an empty split is a DataError.

    With ``roots``, records whose images lie outside them are skipped (``outside_data_roots``).
    """
    from training.data import visu

    if not data.is_dir():
        raise DataError(f"dataset directory not found: {data}; create a synthetic one with 'safe-retrieval data synth --out {data}'")
    splits = {}
    for name in ("train", "validation"):
        split = visu.load_split(data, name, roots=roots)
        if not split.records:
            raise DataError(f"the {name} split of {data} is empty; check the dataset layout")
        skipped = {k: int(v) for k, v in (split.skipped or {}).items() if v}
        if skipped:
            log(f"{name}: skipped {sum(skipped.values())} records ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})")
        splits[name] = split
    return splits


class CachedQuads(torch.utils.data.Dataset):
    """A dataset's items computed once and kept in memory: small datasets stop re-decoding images every epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def cache_fits(records: int, image_size: int, limit_bytes: int) -> bool:
    """Whether two float32 images per record fit in ``limit_bytes``."""
    return records * 2 * 3 * image_size * image_size * 4 <= limit_bytes


def epoch_order(n: int, ctx: distributed.Context, *, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for ``epoch``: a DistributedSampler shard (same on every run)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


# ------------------------------------------------------------------------------------ model and step
class TrainStep(nn.Module):
    """Encoder + objective as one module, so DDP sees a single forward per step.

    ``forward(safe_tokens (B, L), nsfw_tokens (B, L), safe_pixels (B, 3, H, W), nsfw_pixels (B, 3, H, W))``
    embeds both captions in one text pass and both images in one image pass, then returns
    ``(loss, terms)``.
    """

    def __init__(self, encoder: SafetyEncoder, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, safe_tokens: Tensor, nsfw_tokens: Tensor, safe_pixels: Tensor, nsfw_pixels: Tensor):
        enc, obj = self.encoder, self.objective
        b = safe_tokens.shape[0]
        if obj.uses_unsafe:
            text = enc.embed_tokens(torch.cat([safe_tokens, nsfw_tokens]))
            image = enc.embed_pixels(torch.cat([safe_pixels, nsfw_pixels]))
            emb = Embeddings(s=text[:b], v=image[:b], u=text[b:], g=image[b:])
        else:
            emb = Embeddings(s=enc.embed_tokens(safe_tokens), v=enc.embed_pixels(safe_pixels))
        ref = obj.reference(Batch(safe_tokens, nsfw_tokens, safe_pixels, nsfw_pixels))
        if ref is not None:
            emb.s_ref, emb.v_ref = ref
        out = obj(emb, enc)
        return out.loss, out.terms


def prepare_encoder(encoder: SafetyEncoder, objective_cls: type[Objective], cfg: TrainConfig) -> list[str]:
    """Add adapters (or unfreeze everything) and set which scalars train; returns the adapted tensors."""
    adapted: list[str] = []
    if cfg.full_finetune:
        for name, p in encoder.clip.named_parameters():
            # open_clip's own logit scale/bias are unused: the encoder carries the scale the objectives read
            p.requires_grad_(name not in UNUSED_CLIP_PARAMETERS)
    else:
        adapted = lora.apply_lora(encoder.clip, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    for name in ("logit_scale", "curv", "visual_alpha", "textual_alpha"):
        if hasattr(encoder, name):
            getattr(encoder, name).requires_grad_(name in objective_cls.trained_scalars)
    if cfg.grad_checkpointing:
        encoder.clip.set_grad_checkpointing(True)
    return adapted


def _no_decay(name: str, p: Tensor) -> bool:
    """Biases, norm gains, the learnable scalars and embedding tables are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or "embedding" in leaf or leaf in ("logit_scale", "curv", "visual_alpha", "textual_alpha")


def build_optimizer(encoder: SafetyEncoder, method: str, cfg: TrainConfig) -> torch.optim.Optimizer:
    """HySAC/CLIP: AdamW, betas (0.9, 0.98), weight decay except biases/norms/scalars. Safe-CLIP: Adam, no decay."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    if not named:
        raise InputError("nothing to train: every parameter is frozen")
    # The fused kernels (CPU and CUDA) are several times faster than the per-tensor loop.
    fused = {"fused": True} if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in named) else {}
    if method == "safeclip":
        return torch.optim.Adam([p for _, p in named], lr=cfg.lr, **fused)
    decay = [p for n, p in named if not _no_decay(n, p)]
    rest = [p for n, p in named if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, **fused)


# -------------------------------------------------------------------------------------- checkpoints
def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors file written to a temp name and renamed (readers never see a half file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint is corrupt, start without --resume") from e


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


def identity(encoder: SafetyEncoder, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: method, architecture, geometry and adapters."""
    return {
        "method": cfg.method,
        "architecture": {"name": encoder.arch.name, "model_cfg": encoder.arch.model_cfg},
        "geometry": encoder.geometry,
        "adapters": "full" if cfg.full_finetune else {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha},
        "objective": {"clip_pairs": cfg.clip_pairs} if cfg.method == "clip" else {},
    }


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


def save_checkpoint(
    run_dir: Path, encoder: SafetyEncoder, opt: torch.optim.Optimizer, cfg: TrainConfig, progress: Progress, world_size: int
) -> Path:
    """Write ``run_dir/checkpoint`` atomically: model, optimizer and RNG tensors plus ``state.json``."""
    opt_tensors, opt_meta = flatten_optimizer(opt)
    rng_tensors, rng_meta = rng_state()
    state = {
        "format": CHECKPOINT_FORMAT,
        **identity(encoder, cfg),
        "progress": asdict(progress),
        "world_size": world_size,
        "optimizer": opt_meta,
        "rng": rng_meta,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "saved_at": time.time(),
    }

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in opt_tensors.items()} or {"empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")

    final = run_dir / CHECKPOINT
    artifact.atomic_dir(final, write)
    return final


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


# ------------------------------------------------------------------------------------------ logging
class Metrics:
    """Appends JSON lines to ``run_dir/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, event: str, **values: Any) -> None:
        if self.path is None:
            return
        rec = {"event": event, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return float(v.detach().float().item()) if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one is not deferred

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    @property
    def requested(self) -> bool:
        return self.signum is not None


# ------------------------------------------------------------------------------------- validation
def validation_scores(encoder: SafetyEncoder, records: list, *, batch_size: int) -> dict[str, float]:
    """R@1 per validation pair (S->V, V->S, S->G, G->S, U->V, V->U) and their ``sum``."""
    from training import evaluate

    recalls = evaluate.validation_recalls(encoder, records, batch_size=batch_size)
    return {**recalls, "sum": float(sum(recalls.values()))}


def calibration(encoder: SafetyEncoder, records: list, *, batch_size: int) -> tuple[dict, dict]:
    """``bounds`` (S, V, U, G) and ``safety`` thresholds from the validation split (lorentz models)."""
    if encoder.geometry != "lorentz":
        return {}, {}
    from training import evaluate

    emb = evaluate.embed_records(encoder, records, batch_size=batch_size)
    d0 = {c: encoder.dist0(emb[c]) for c in artifact.CLASSES}
    return traversal.calibrate_bounds(d0), {"unsafe_threshold": traversal.calibrate_thresholds(d0)}


# ----------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run one training job end to end (see the module docstring); returns where things went."""
    cfg = resolve_config(cfg)
    ctx = distributed.setup(cfg.device)
    try:
        return _Run(cfg, ctx, log).run()
    finally:
        distributed.teardown(ctx)


class _Run:
    def __init__(self, cfg: TrainConfig, ctx: distributed.Context, log: Callable[[str], None] | None):
        self.cfg, self.ctx = cfg, ctx
        self._log = log
        self.started = time.time()
        self.dataset: torch.utils.data.Dataset | None = None
        self.unreadable: set[int] = set()  # train positions whose images failed to decode (this rank's)

    def log(self, msg: str) -> None:
        if self.ctx.is_main:
            from tqdm import tqdm

            if self._log is not None:
                self._log(msg)
            else:
                tqdm.write(msg, file=sys.stderr)

    # ---------------------------------------------------------------- set-up
    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        self.roots = DataRoots.of(cfg.data_roots)
        self.roots.check(cfg.data, what="--data")
        if cfg.out.exists():
            raise ArtifactError(f"{cfg.out} already exists; choose another --out or remove it first")
        if cfg.preset is not None and not cfg.data.exists() and ctx.is_main:
            self.log(f"{cfg.data} does not exist: generating the synthetic benchmark there")
            synthesize_for_preset(cfg.preset, cfg.data, seed=cfg.seed)
        distributed.barrier(ctx)
        splits = load_splits(cfg.data, self.log, self.roots)
        self.train_records = splits["train"].records
        val = splits["validation"].records
        self.val_records = val[: cfg.val_limit] if cfg.val_limit else val
        self.skipped = {k: dict(s.skipped or {}) for k, s in splits.items()}

        objective_cls = objectives.objective_class(cfg.method)
        torch.manual_seed(cfg.seed)  # the same initial weights (and adapters) on every rank
        encoder, source_info = load_source(cfg.model, objective_cls.geometry, pretrained=cfg.pretrained)
        reference = copy.deepcopy(encoder).eval() if cfg.method == "safeclip" else None
        if reference is not None and source_info.get("init") == "random":
            self.log("warning: safeclip's frozen reference is a randomly initialised encoder; pass a trained --model")
        self.adapted = prepare_encoder(encoder, objective_cls, cfg)
        self.source_info = source_info
        self.encoder = encoder.to(ctx.device)
        objective = objectives.build(
            cfg.method, reference=reference, eta=cfg.eta, gather_negatives=cfg.gather_negatives, clip_pairs=cfg.clip_pairs,
            weights=cfg.weights,
        )
        self.loss_weights = getattr(objective, "weights", None)
        self.step_module = TrainStep(self.encoder, objective).to(ctx.device)
        self.opt = build_optimizer(self.encoder, cfg.method, cfg)
        self.progress = Progress()
        resume = None
        if cfg.resume is not None:  # refuse a checkpoint that does not fit before anything is written
            ckpt = find_checkpoint(cfg.resume)
            state = read_checkpoint_state(ckpt)
            check_compatible(state, identity(self.encoder, cfg), ckpt)
            check_position(state, cfg, ctx.world_size, ckpt)
            resume = ckpt, state
        if ctx.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self._resume(*resume, objective)
        elif ctx.is_main and reference is not None:
            _save_tensors(reference.state_dict(), cfg.run_dir / REFERENCE)
        if cfg.resume is None or ctx.rank > 0:
            # per-rank streams (dropout, if any); a resumed rank 0 continues the stream it saved
            p = self.progress
            torch.manual_seed(cfg.seed + 1000 * ctx.rank + 7919 * p.epoch + p.step_in_epoch)
        self.model = self.step_module
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                self.step_module,
                device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.metrics = Metrics(cfg.run_dir / METRICS if ctx.is_main else None)
        n_train = sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
        self.metrics.write(
            "start", method=cfg.method, world_size=ctx.world_size, device=str(ctx.device), precision=cfg.precision,
            train_records=len(self.train_records), validation_records=len(self.val_records), skipped=self.skipped,
            trainable_parameters=n_train, adapters=len(self.adapted), resumed_at_epoch=self.progress.epoch,
            resumed_at_step=self.progress.step_in_epoch,
        )
        self.log(
            f"{cfg.method}: {len(self.train_records)} train / {len(self.val_records)} validation quadruplets, "
            f"{n_train:,} trainable parameters ({'full fine-tune' if cfg.full_finetune else f'LoRA rank {cfg.lora_rank}'}), "
            f"{ctx.world_size} process(es) on {ctx.device}, {cfg.precision}"
        )
        return self._loop()

    def _resume(self, ckpt: Path, state: dict[str, Any], objective: Objective) -> None:
        cfg = self.cfg
        artifact.load_state(self.encoder, _load_tensors(ckpt / "model.safetensors"), str(ckpt / "model.safetensors"))
        opt_tensors = _load_tensors(ckpt / "optimizer.safetensors")
        opt_tensors.pop("empty", None)
        try:
            self.opt.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"]))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt}: the optimizer state does not fit this model ({e}); start without --resume") from e
        set_rng_state(_load_tensors(ckpt / "rng.safetensors"), state["rng"])
        self.progress = Progress(**state["progress"])
        old_run = ckpt.parent
        if cfg.method == "safeclip":
            ref_path = old_run / REFERENCE
            if not ref_path.is_file():
                raise CheckpointError(f"{old_run} lacks {REFERENCE} (the frozen Safe-CLIP reference); start without --resume")
            artifact.load_state(objective.ref, _load_tensors(ref_path), str(ref_path))
        if self.ctx.is_main and old_run.resolve() != cfg.run_dir.resolve():
            for name in (BEST, REFERENCE):
                if (old_run / name).is_file():
                    shutil.copy2(old_run / name, cfg.run_dir / name)
        self.log(f"resumed from {ckpt} at epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}")

    # ---------------------------------------------------------------- training
    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        from torch.utils.data import DataLoader

        from training.data import visu

        cfg = self.cfg
        order = epoch_order(len(self.train_records), self.ctx, seed=cfg.seed, epoch=epoch)[start_step * cfg.batch_size :]
        if self.dataset is None:
            self.dataset = visu.QuadDataset(self.train_records, self.encoder.transform, roots=self.roots)
            size = int(self.encoder.arch.preprocess["size"] if isinstance(self.encoder.arch.preprocess["size"], int)
                       else max(self.encoder.arch.preprocess["size"]))
            if cfg.epochs > 1 and cache_fits(len(self.train_records), size, cfg.cache_mb << 20):
                self.dataset = CachedQuads(self.dataset)
        dataset = self.dataset
        workers = 0 if isinstance(dataset, CachedQuads) else cfg.workers  # nothing left to decode
        loader = DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=order, drop_last=True, num_workers=workers,
            collate_fn=Collate(self.encoder.tokenizer, len(dataset)), pin_memory=self.ctx.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None, persistent_workers=False,
        )
        return iter(loader)

    def steps_per_epoch(self) -> int:
        per_rank = len(self.train_records) // self.ctx.world_size
        steps = per_rank // self.cfg.batch_size
        if steps < 1:
            raise DataError(
                f"the train split has {len(self.train_records)} quadruplets: fewer than one batch of "
                f"{self.cfg.batch_size} per process; lower --batch-size"
            )
        return steps

    def _set_lr(self, steps_per_epoch: int) -> None:
        """Learning rate of the next step: warm-up, then constant or cosine decay (a pure function of the step)."""
        cfg, step = self.cfg, self.progress.global_step
        factor = 1.0
        if cfg.warmup_steps and step < cfg.warmup_steps:
            factor = (step + 1) / cfg.warmup_steps
        elif cfg.schedule == "cosine":
            total = max(cfg.epochs * steps_per_epoch - cfg.warmup_steps, 1)
            factor = 0.5 * (1 + math.cos(math.pi * min((step - cfg.warmup_steps) / total, 1.0)))
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * factor

    def _autocast(self):
        enabled = self.cfg.precision == "bf16"
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        batch = batch.to(self.ctx.device)
        with out_of_memory_advice("in a training step", self.cfg.batch_size):
            with self._autocast():
                loss, terms = self.model(batch.safe_tokens, batch.nsfw_tokens, batch.safe_pixels, batch.nsfw_pixels)
            if not torch.isfinite(loss):
                raise SafeRetrievalError(
                    f"the loss became {float(loss)} at step {self.progress.global_step}; lower --lr"
                    + (" or use --precision fp32" if self.cfg.precision == "bf16" else "")
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.encoder.clamp_scalars()
        return loss.detach(), terms

    def _loop(self) -> TrainResult:
        cfg, ctx, p = self.cfg, self.ctx, self.progress
        steps = self.steps_per_epoch()
        samples_per_step = cfg.batch_size * ctx.world_size
        with StopSignal() as stop:
            while p.epoch < cfg.epochs and not p.stopped_early:
                if cfg.max_steps is not None and p.global_step >= cfg.max_steps:
                    break
                self.step_module.train()
                bar = self._bar(steps, p.step_in_epoch)
                t0, done, loss_sum = time.time(), 0, 0.0
                for batch in self._batches(p.epoch, p.step_in_epoch):
                    self.unreadable.update(batch.unreadable)
                    self._set_lr(steps)
                    loss, terms = self._step(batch)
                    p.step_in_epoch += 1
                    p.global_step += 1
                    done += 1
                    loss_sum += float(loss)
                    rate = done * samples_per_step / max(time.time() - t0, 1e-9)
                    if bar is not None:  # tqdm's own ETA is the epoch's; run_eta adds the epochs still to come
                        left = (cfg.epochs - p.epoch - 1) * steps + steps - p.step_in_epoch
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(loss):.4f}", samples_s=f"{rate:.1f}",
                                        run_eta=_clock(left * samples_per_step / max(rate, 1e-9)))
                    if p.global_step % cfg.log_every == 0 or p.step_in_epoch == steps:
                        self.metrics.write(
                            "step", epoch=p.epoch + 1, step=p.step_in_epoch, global_step=p.global_step, loss=loss,
                            terms=terms, lr=self.opt.param_groups[0]["lr"], samples_per_s=round(rate, 2),
                            **self._scalars(),
                        )
                    interrupted = distributed.any_rank(stop.requested, ctx)
                    if interrupted or (cfg.max_steps is not None and p.global_step >= cfg.max_steps):
                        break
                if bar is not None:
                    bar.close()
                if distributed.any_rank(stop.requested, ctx):
                    self._interrupt(stop)
                if p.step_in_epoch < steps:  # max_steps ended the epoch early: keep the position
                    if ctx.is_main:
                        save_checkpoint(cfg.run_dir, self.encoder, self.opt, cfg, p, ctx.world_size)
                    break
                self._end_epoch(loss_sum / max(done, 1), time.time() - t0)
                if distributed.any_rank(stop.requested, ctx):
                    self._interrupt(stop)
            path = self._finish() if ctx.is_main else None
            distributed.barrier(ctx)
        return TrainResult(
            artifact=path, run_dir=cfg.run_dir, epochs_completed=p.epoch, steps=p.global_step, best_epoch=p.best_epoch,
            best_recall_sum=p.best_recall_sum, stopped_early=p.stopped_early, seconds=round(time.time() - self.started, 2),
            skipped=self.skipped,
        )

    def _bar(self, steps: int, start: int):
        if not (self.ctx.is_main and self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, initial=start, desc=f"epoch {self.progress.epoch + 1}/{self.cfg.epochs}",
                    unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def _scalars(self) -> dict[str, float]:
        enc = self.encoder
        out = {"logit_scale": float(enc.logit_scale.detach().exp())}
        if enc.geometry == "lorentz":
            out.update(curvature=enc.curvature, visual_alpha=float(enc.visual_alpha.detach().exp()),
                       textual_alpha=float(enc.textual_alpha.detach().exp()))
        return out

    def _end_epoch(self, train_loss: float, seconds: float) -> None:
        """Validate (rank 0), update early stopping, save best weights and the checkpoint."""
        cfg, ctx, p = self.cfg, self.ctx, self.progress
        p.epoch += 1
        p.step_in_epoch = 0
        scores: dict[str, float] = {}
        if ctx.is_main:
            self.step_module.eval()
            batch = max(cfg.batch_size, 64)
            with torch.no_grad(), self._autocast(), out_of_memory_advice("while validating", batch):
                scores = validation_scores(self.encoder, self.val_records, batch_size=batch)
            self.step_module.train()
        score = distributed.broadcast_float(scores.get("sum", 0.0), ctx)
        unreadable = distributed.union_size(self.unreadable, len(self.train_records), ctx)
        if unreadable:  # skipped like the records load_splits skipped, and counted with them
            self.skipped.setdefault("train", {})["unreadable image"] = unreadable
        improved = p.best_recall_sum is None or score > p.best_recall_sum
        if improved:
            p.best_recall_sum, p.best_epoch, p.bad_epochs = score, p.epoch, 0
            if ctx.is_main:
                _save_tensors(self.encoder.state_dict(), cfg.run_dir / BEST)
        else:
            p.bad_epochs += 1
            p.stopped_early = p.bad_epochs >= cfg.patience
        if ctx.is_main:
            save_checkpoint(cfg.run_dir, self.encoder, self.opt, cfg, p, ctx.world_size)
            self.metrics.write(
                "epoch", epoch=p.epoch, train_loss=train_loss, validation=scores, recall_sum=score,
                best_recall_sum=p.best_recall_sum, best_epoch=p.best_epoch, patience_left=cfg.patience - p.bad_epochs,
                seconds=round(seconds, 2), unreadable_images=unreadable, **self._scalars(),
            )
            self.log(
                f"epoch {p.epoch}/{cfg.epochs}: loss {train_loss:.4f}, validation recall sum {score:.3f} "
                f"(best {p.best_recall_sum:.3f} at epoch {p.best_epoch}), {seconds:.1f}s"
                + (f"; stopping early after {p.bad_epochs} epochs without improvement" if p.stopped_early else "")
                + (f"; {unreadable} train quadruplet(s) with unreadable images skipped so far" if unreadable else "")
            )
        distributed.barrier(ctx)

    def _interrupt(self, stop: StopSignal) -> None:
        name = signal.Signals(stop.signum).name if stop.signum else "a signal"
        where = self.cfg.run_dir / CHECKPOINT
        if self.ctx.is_main:
            save_checkpoint(self.cfg.run_dir, self.encoder, self.opt, self.cfg, self.progress, self.ctx.world_size)
            self.metrics.write("interrupted", signal=name, epoch=self.progress.epoch + 1, step=self.progress.step_in_epoch)
        distributed.barrier(self.ctx)
        err = TrainingInterrupted(
            f"training interrupted by {name} at epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}; "
            f"checkpoint saved to {where}. Resume with the same command plus --resume {self.cfg.run_dir}"
        )
        err.exit_code = 128 + int(stop.signum or 2)
        raise err

    # ---------------------------------------------------------------- the artifact
    def _finish(self) -> Path:
        """Best weights -> merged plain encoder -> bounds/thresholds on validation -> atomic artifact."""
        cfg, p = self.cfg, self.progress
        best = cfg.run_dir / BEST
        if best.is_file():
            artifact.load_state(self.encoder, _load_tensors(best), str(best))
        trained = copy.deepcopy(self.encoder).cpu()
        lora.merge_lora(trained.clip)
        plain = SafetyEncoder(trained.arch, trained.geometry)
        artifact.load_state(plain, trained.state_dict(), "the trained encoder")
        plain.to(self.ctx.device).eval()
        batch = max(cfg.batch_size, 64)
        with out_of_memory_advice("while calibrating the artifact's bounds", batch):
            bounds, safety = calibration(plain, self.val_records, batch_size=batch)
        prov = artifact.provenance(
            f"train:{cfg.method}", method=cfg.method, data=str(cfg.data), base=self.source_info,
            epochs=p.epoch, best_epoch=p.best_epoch, best_validation_recall_sum=p.best_recall_sum,
            adapters="full" if cfg.full_finetune else f"lora r={cfg.lora_rank} alpha={cfg.lora_alpha:g}",
            lr=cfg.lr, batch_size=cfg.batch_size, world_size=self.ctx.world_size, seed=cfg.seed,
            gather_negatives=cfg.gather_negatives, preset=cfg.preset,
            eta=cfg.eta if cfg.method == "hysac" and cfg.weights is None else None,
            clip_pairs=cfg.clip_pairs if cfg.method == "clip" else None,
            weights=list(self.loss_weights) if self.loss_weights is not None else None,
        )
        art = artifact.Artifact(plain.cpu(), bounds=bounds, safety=safety, provenance=prov)
        path = artifact.save(art, cfg.out)
        self.metrics.write("artifact", path=str(path), fingerprint=art.fingerprint, bounds=bounds, safety=safety)
        self.log(f"wrote {path} ({art.fingerprint})")
        return path
