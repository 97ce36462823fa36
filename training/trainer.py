"""The training loop: one objective, one encoder, one process per device.

``train(config)`` fine-tunes a :class:`~training.encoder.SafetyEncoder` with one of the objectives
(``hysac``, ``safeclip``, ``clip``) on a ViSU-layout dataset and writes an artifact (merged
weights, ``bounds.json`` and unsafe thresholds calibrated on the validation split). An unlearning
method trains on (retain pair, forget pair) rows instead; ``clip --clip-pairs all --forget`` trains
on the same data without the forget pairs (the retrain-without oracle).

This module holds the step and the loop; the rest lives by noun: the configuration and its recipes
(:mod:`training.recipes`), what trains and the learning-rate schedule (:mod:`training.optim`),
batches (:mod:`training.data.loader`), the run directory's checkpoints (:mod:`training.checkpoint`).
An objective states what it needs through :class:`~training.objectives.Objective` (geometry, unsafe
half, scalars, optimizer, frozen models, identity, provenance), so a new one adds no branch here.

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
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from training import architectures, artifact, checkpoint, distributed, lora, objectives, optim, recipes, traversal
from training.checkpoint import BEST, CHECKPOINT, Progress
from training.data import forget, loader
from training.data.roots import DataRoots
from training.encoder import SafetyEncoder
from training.errors import ArtifactError, InputError, OutOfMemory, SafeRetrievalError, TrainingInterrupted
from training.eval.common import embed_records
from training.eval.retrieval import validation_recalls
from training.objectives import Batch, Embeddings, Objective
from training.recipes import TrainConfig, resolve_config

METRICS = "metrics.jsonl"
OBJECTIVE_PROVENANCE = ("eta", "clip_pairs", "weights")  # every artifact records them, None where a method has none


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


# ---------------------------------------------------------------------------------------- the source
def source_geometry(cfg: TrainConfig, objective_cls: type[Objective]) -> str:
    """The geometry the run trains in: the objective's, or for ``any`` (unlearning) the source artifact's own.

    An unlearning method never converts its source: forgetting from a HySAC model with a Euclidean
    method would forget from another model. ``hac`` on a Euclidean artifact is refused, suggesting ``ac``.
    """
    if cfg.method not in objectives.FORGETTING:
        return objective_cls.geometry
    have = artifact.read_config(str(cfg.model))["geometry"]
    if objective_cls.geometry not in ("any", have):
        raise InputError(
            f"--method {cfg.method} unlearns in {objective_cls.geometry} space, but {cfg.model} is a {have} model; "
            + ("use --method ac (alignment calibration in Euclidean space) or cliperase" if have == "euclidean"
               else f"use a method that works on {have} models")
        )
    return have


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


def left_out(records: list, split: forget.ForgetSplit) -> frozenset[int]:
    """The positions of ``records`` whose unsafe pair is in ``split``'s forget set (what clip's oracle leaves out)."""
    gone = {p.image for p in split.forget}
    return frozenset(i for i, r in enumerate(records) if r.nsfw_image in gone)


# ------------------------------------------------------------------------------------ model and step
class TrainStep(nn.Module):
    """Encoder + objective as one module, so DDP sees a single forward per step.

    ``forward(safe_tokens (B, L), nsfw_tokens (B, L), safe_pixels (B, 3, H, W), nsfw_pixels (B, 3, H, W))``
    embeds both captions in one text pass and both images in one image pass, then returns
    ``(loss, terms)``. ``unsafe_kept (B,)``: the rows whose unsafe pair takes part (clip's oracle; None: all).
    """

    def __init__(self, encoder: SafetyEncoder, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, safe_tokens: Tensor, nsfw_tokens: Tensor, safe_pixels: Tensor, nsfw_pixels: Tensor,
                unsafe_kept: Tensor | None = None):
        enc, obj = self.encoder, self.objective
        b = safe_tokens.shape[0]
        if obj.uses_unsafe:
            text = enc.embed_tokens(torch.cat([safe_tokens, nsfw_tokens]))
            image = enc.embed_pixels(torch.cat([safe_pixels, nsfw_pixels]))
            emb = Embeddings(s=text[:b], v=image[:b], u=text[b:], g=image[b:], unsafe_kept=unsafe_kept)
        else:
            emb = Embeddings(s=enc.embed_tokens(safe_tokens), v=enc.embed_pixels(safe_pixels))
        ref = obj.reference(Batch(safe_tokens, nsfw_tokens, safe_pixels, nsfw_pixels))
        if ref is not None:
            emb.s_ref, emb.v_ref = ref
        out = obj(emb, enc)
        return out.loss, out.terms


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
    recalls = validation_recalls(encoder, records, batch_size=batch_size)
    return {**recalls, "sum": float(sum(recalls.values()))}


def calibration(encoder: SafetyEncoder, records: list, *, batch_size: int) -> tuple[dict, dict]:
    """``bounds`` (S, V, U, G) and ``safety`` thresholds from the validation split (lorentz models)."""
    if encoder.geometry != "lorentz":
        return {}, {}
    emb = embed_records(encoder, records, batch_size=batch_size)
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
            recipes.synthesize_for_recipe(cfg.preset, cfg.data, seed=cfg.seed)
        distributed.barrier(ctx)
        splits = loader.load_splits(cfg.data, self.log, self.roots)
        self.train_records = splits["train"].records
        val = splits["validation"].records
        self.val_records = val[: cfg.val_limit] if cfg.val_limit else val
        self.skipped = {k: dict(s.skipped or {}) for k, s in splits.items()}
        self.forget_split = None
        self.left_out: frozenset[int] | None = None  # clip's oracle: train positions whose unsafe pair is left out
        if cfg.method in objectives.FORGETTING:  # the train records become (retain pair, forget pair) quadruplets
            self.forget_split = forget.split(self.train_records, cfg.data, forget=cfg.forget, manifest=cfg.forget_manifest,
                                             roots=self.roots)
            self.log(self.forget_split.describe())
            self.train_records = forget.pairings(self.forget_split, seed=cfg.seed)
        elif cfg.forget:  # clip --clip-pairs all: the same records, their forget pairs left out
            self.forget_split = forget.split(self.train_records, cfg.data, forget=cfg.forget, roots=self.roots)
            self.left_out = left_out(self.train_records, self.forget_split)
            self.log(f"retraining without the forget set: the unsafe pairs of {len(self.left_out)} of "
                     f"{len(self.train_records)} train quadruplets left out ({', '.join(self.forget_split.concepts)})")

        objective_cls = objectives.objective_class(cfg.method)
        torch.manual_seed(cfg.seed)  # the same initial weights (and adapters) on every rank
        encoder, source_info = load_source(cfg.model, source_geometry(cfg, objective_cls), pretrained=cfg.pretrained)
        # built before the adapters go in: a frozen reference is the encoder as training found it
        objective = objectives.build(
            cfg.method, reference=encoder, eta=cfg.eta, gather_negatives=cfg.gather_negatives, clip_pairs=cfg.clip_pairs,
            weights=cfg.weights, params=cfg.params, options=recipes.options_dict(cfg),
        )
        if source_info.get("init") == "random":
            for name in objective.frozen():
                self.log(f"warning: {cfg.method}'s frozen {name} is a randomly initialised encoder; pass a trained --model")
        self.adapted = optim.prepare_encoder(encoder, objective_cls, cfg)
        self.source_info = source_info
        self.encoder = encoder.to(ctx.device)
        self.objective = objective
        self.step_module = TrainStep(self.encoder, objective).to(ctx.device)
        self.opt = optim.build_optimizer(self.encoder, cfg.method, cfg)
        self.identity = checkpoint.identity(self.encoder, cfg, objective)
        if self.forget_split is not None:  # a resumed run must forget the same pairs
            self.identity["forget"] = self._forget_provenance()
        self.progress = Progress()
        resume = None
        if cfg.resume is not None:  # refuse a checkpoint that does not fit before anything is written
            ckpt = checkpoint.find_checkpoint(cfg.resume)
            state = checkpoint.read_checkpoint_state(ckpt)
            checkpoint.check_compatible(state, self.identity, ckpt)
            checkpoint.check_position(state, cfg, ctx.world_size, ckpt)
            resume = ckpt, state
        if ctx.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self._resume(*resume)
        elif ctx.is_main:
            checkpoint.save_frozen(cfg.run_dir, objective)
        if cfg.resume is None or ctx.rank > 0:
            # per-rank streams (dropout, if any); a resumed rank 0 continues the stream it saved
            p = self.progress
            torch.manual_seed(cfg.seed + 1000 * ctx.rank + 7919 * p.epoch + p.step_in_epoch)
        self.model = self.step_module
        if ctx.distributed:
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

    def _resume(self, ckpt: Path, state: dict[str, Any]) -> None:
        self.progress = checkpoint.load_checkpoint(ckpt, state, self.encoder, self.opt, self.objective)
        if self.ctx.is_main:
            checkpoint.carry_over(ckpt.parent, self.cfg.run_dir, self.objective)
        self.log(f"resumed from {ckpt} at epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}")

    def _save_checkpoint(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        checkpoint.save_checkpoint(cfg.run_dir, self.encoder, self.opt, cfg, self.progress, ctx.world_size, self.identity)

    # ---------------------------------------------------------------- training
    def _batches(self, epoch: int, start_step: int) -> Iterator[Batch]:
        cfg = self.cfg
        if self.dataset is None:
            self.dataset = loader.train_dataset(self.train_records, self.encoder, epochs=cfg.epochs, cache_mb=cfg.cache_mb,
                                                 roots=self.roots, left_out=self.left_out)
        return loader.epoch_batches(
            self.dataset, self.encoder.tokenizer, self.ctx, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
            start_step=start_step, workers=cfg.workers,
        )

    def _set_lr(self, steps_per_epoch: int) -> None:
        cfg = self.cfg
        lr = optim.lr_at(self.progress.global_step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                         total_steps=cfg.epochs * steps_per_epoch)
        optim.set_lr(self.opt, lr)

    def _autocast(self):
        enabled = self.cfg.precision == "bf16"
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        batch = batch.to(self.ctx.device)
        with out_of_memory_advice("in a training step", self.cfg.batch_size):
            with self._autocast():
                loss, terms = self.model(batch.safe_tokens, batch.nsfw_tokens, batch.safe_pixels, batch.nsfw_pixels,
                                         batch.unsafe_kept)
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
        steps = loader.steps_per_epoch(len(self.train_records), ctx.world_size, cfg.batch_size)
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
                        self._save_checkpoint()
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
        # unlearning keeps the last epoch: its validation recall falls by design as the concept goes
        improved = p.best_recall_sum is None or score > p.best_recall_sum or self.objective.keep_last
        if improved:
            p.best_recall_sum, p.best_epoch, p.bad_epochs = score, p.epoch, 0
            if ctx.is_main:
                checkpoint.save_tensors(self.encoder.state_dict(), cfg.run_dir / BEST)
        else:
            p.bad_epochs += 1
            p.stopped_early = p.bad_epochs >= cfg.patience
        if ctx.is_main:
            self._save_checkpoint()
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
            self._save_checkpoint()
            self.metrics.write("interrupted", signal=name, epoch=self.progress.epoch + 1, step=self.progress.step_in_epoch)
        distributed.barrier(self.ctx)
        err = TrainingInterrupted(
            f"training interrupted by {name} at epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}; "
            f"checkpoint saved to {where}. Resume with the same command plus --resume {self.cfg.run_dir}"
        )
        err.exit_code = 128 + int(stop.signum or 2)
        raise err

    # ---------------------------------------------------------------- the artifact
    def _forget_provenance(self) -> dict[str, Any] | None:
        """What was forgotten: the concepts and the forget/retain sizes; for clip's oracle also what was left out."""
        if self.forget_split is None:
            return None
        out = self.forget_split.provenance()
        if self.left_out is not None:
            out.update(oracle="retrained without the forget pairs", left_out_pairs=len(self.left_out))
        return out

    def _finish(self) -> Path:
        """Best weights -> merged plain encoder -> bounds/thresholds on validation -> atomic artifact."""
        cfg, p = self.cfg, self.progress
        best = cfg.run_dir / BEST
        if best.is_file():
            artifact.load_state(self.encoder, checkpoint.load_tensors(best), str(best))
        trained = copy.deepcopy(self.encoder).cpu()
        lora.merge_lora(trained.clip)
        plain = trained.blank_copy()  # the erasers a source artifact carried stay in the head
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
            forget=self._forget_provenance(),
            **{**dict.fromkeys(OBJECTIVE_PROVENANCE), **self.objective.provenance()},
        )
        art = artifact.Artifact(plain.cpu(), bounds=bounds, safety=safety, provenance=prov)
        path = artifact.save(art, cfg.out)
        self.metrics.write("artifact", path=str(path), fingerprint=art.fingerprint, bounds=bounds, safety=safety)
        self.log(f"wrote {path} ({art.fingerprint})")
        return path
