"""Artifacts: a directory holding everything needed to embed with a trained encoder.

```
ARTIFACT/
  model.safetensors   all weights, LoRA merged (SafetyEncoder.state_dict())
  config.json         architecture, geometry, scalars, preprocessing, safety thresholds, provenance, fingerprint
  bounds.json         per class S/V/U/G: mean, p05, p50, p95 of distance to the origin ({} if unknown)
```
Written to a temporary sibling directory and renamed into place, so a reader never sees half an
artifact. Loading never unpickles. The fingerprint hashes the weights (by name, dtype, shape and
bytes), the behaviour-relevant config and the bounds, so any change that alters embeddings or the
unsafe rule changes it.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.architectures import Architecture, from_config, pick_device
from training.encoder import SafetyEncoder
from training.errors import ArtifactError, CheckpointError, key_summary

FORMAT = "safe-retrieval-artifact"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BOUNDS = "bounds.json"
CLASSES = ("S", "V", "U", "G")  # safe text, safe image, unsafe text, unsafe (generated) image
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
# config keys that describe where an artifact came from, not how it behaves
_NOT_FINGERPRINTED = ("provenance", "fingerprint")


@dataclass
class Artifact:
    """A loaded artifact: the encoder plus the calibration that travels with it."""

    encoder: SafetyEncoder
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)
    safety: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    path: Path | None = None

    @property
    def geometry(self) -> str:
        return self.encoder.geometry

    @property
    def curvature(self) -> float:
        return self.encoder.curvature

    def unsafe_threshold(self, modality: str) -> float | None:
        """The calibrated distance-to-origin above which an embedding of ``modality`` counts as unsafe."""
        return (self.safety.get("unsafe_threshold") or {}).get(modality)


def config_dict(artifact: Artifact) -> dict[str, Any]:
    enc = artifact.encoder
    cfg: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": enc.arch.name, "model_cfg": enc.arch.model_cfg},
        "preprocess": enc.arch.preprocess,
        "geometry": enc.geometry,
        "embed_dim": enc.arch.embed_dim,
        "logit_scale": float(enc.logit_scale.detach().exp()),
        "safety": artifact.safety,
        "provenance": artifact.provenance,
    }
    if enc.erasure:  # only then: an artifact without erasers keeps the config (and fingerprint) it always had
        cfg["erasure"] = enc.erasure
    if enc.geometry == "lorentz":
        cfg["curvature"] = enc.curvature
        cfg["visual_alpha"] = float(enc.visual_alpha.detach().exp())
        cfg["textual_alpha"] = float(enc.textual_alpha.detach().exp())
    return cfg


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def fingerprint(state: dict[str, torch.Tensor], config: dict[str, Any], bounds: dict[str, Any]) -> str:
    """``sha256:<hex>`` over the tensors (sorted by name), the behaviour config and the bounds."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(_canonical([name, str(t.dtype), list(t.shape)]))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(_canonical({k: v for k, v in config.items() if k not in _NOT_FINGERPRINTED}))
    h.update(_canonical(bounds))
    return "sha256:" + h.hexdigest()


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``final`` with ``write(tmp)``, then swap it into place by rename.

    A reader sees the old directory or the new one, never a half-written one; on any failure the
    temporary directory is removed and ``final`` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        write(tmp)
        if final.exists():  # move the old one aside first, so the swap itself is two renames
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise ArtifactError(
                f"the disk holding {final.parent} is full, so {final.name} was not written"
                f" ({'the previous one is kept' if final.exists() else 'nothing was left behind'});"
                " free some space there or write somewhere else, then run the command again"
            ) from e
        raise


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, as Python raises it or as safetensors' Rust writer reports it."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    return isinstance(e, SafetensorError) and f"os error {errno.ENOSPC})" in str(e)


def save(artifact: Artifact, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``artifact`` to directory ``out`` atomically (temp dir + rename); returns the path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or remove it first")
    state = {k: v.detach().contiguous().cpu() for k, v in artifact.encoder.state_dict().items()}
    cfg = config_dict(artifact)
    artifact.fingerprint = cfg["fingerprint"] = fingerprint(state, cfg, artifact.bounds)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "fingerprint": cfg["fingerprint"]})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / BOUNDS).write_text(json.dumps(artifact.bounds, indent=2) + "\n")

    atomic_dir(out, write)
    artifact.path = out
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """Read and check an artifact's ``config.json`` without loading the weights."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ArtifactError(
            f"{path} is a raw PyTorch checkpoint, not an artifact; convert it first with "
            f"'safe-retrieval model convert --weights {path} --out DIR'"
        )
    if not path.is_dir():
        raise ArtifactError(f"artifact directory not found: {path} "
                            "(create one with 'safe-retrieval model init' or 'model convert')")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise ArtifactError(f"{path} has no {CONFIG}; it is not an artifact (see 'safe-retrieval model convert')")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{cfg_path} is not valid JSON: {e}") from e
    if cfg.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path} is not a safe-retrieval artifact config (format={cfg.get('format')!r})")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} uses artifact format {cfg['format_version']}; upgrade safe-retrieval to read it")
    return cfg


def load_state(encoder: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state``, explaining missing, unexpected and mis-shaped keys."""
    expected = encoder.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {key_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {key_summary(unexpected)}")
        raise CheckpointError(
            f"{source} does not match the architecture ({'; '.join(parts)}); "
            f"expected keys like {key_summary(list(expected), 3)}. Check --arch / --format"
        )
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source}: {len(bad)} tensors have the wrong shape, e.g. {k} is {tuple(state[k].shape)} "
            f"but the architecture expects {tuple(expected[k].shape)}. Check --arch"
        )
    encoder.load_state_dict(state, strict=True)


def load(path: str | Path, *, device: str | torch.device | None = "auto", verify: bool = True) -> Artifact:
    """Load an artifact directory onto ``device`` (auto: cuda if available)."""
    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path} has no {WEIGHTS}; the artifact is incomplete, re-create it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{weights} is unreadable ({e}); the artifact is corrupt, re-create it") from e
    bounds_path = path / BOUNDS
    bounds = json.loads(bounds_path.read_text()) if bounds_path.is_file() else {}
    if verify and cfg.get("fingerprint") and fingerprint(state, cfg, bounds) != cfg["fingerprint"]:
        raise ArtifactError(f"{path}: weights or config do not match the recorded fingerprint; "
                            "the artifact was altered or is corrupt")
    arch: Architecture = from_config(cfg["architecture"]["name"], cfg["architecture"]["model_cfg"], cfg.get("preprocess"))
    encoder = SafetyEncoder(arch, cfg["geometry"])
    _add_erasers(encoder, cfg.get("erasure") or [], state, path)
    load_state(encoder, state, str(weights))
    encoder.to(pick_device(device)).eval()
    return Artifact(
        encoder=encoder,
        bounds=bounds,
        safety=cfg.get("safety", {}),
        provenance=cfg.get("provenance", {}),
        fingerprint=cfg.get("fingerprint", ""),
        path=path,
    )


def _add_erasers(encoder: SafetyEncoder, erasure: list, state: dict[str, torch.Tensor], path: Path) -> None:
    """Placeholders for the erasers ``config.json`` records, after checking the weights hold them at the right size."""
    dim = encoder.arch.embed_dim
    towers = {t for record in erasure for t in (record.get("towers") or [])}
    for tower in sorted(towers):
        shapes = {k: tuple(state[f"erasers.{tower}.{k}"].shape) if f"erasers.{tower}.{k}" in state else None
                  for k in ("weight", "bias")}
        if shapes != {"weight": (dim, dim), "bias": (dim,)}:
            raise ArtifactError(
                f"{path}: config.json records an eraser on the {tower} tower, but its weights hold "
                f"{shapes['weight'] or 'no matrix'} / {shapes['bias'] or 'no bias'} where this {dim}-d encoder needs "
                f"({dim}, {dim}) / ({dim},); the artifact is inconsistent: re-create it from its source with "
                "'safe-retrieval train --method erase'")
        encoder.add_eraser(tower)
    encoder.erasure = [dict(r) for r in erasure]


def provenance(source: str, **extra: Any) -> dict[str, Any]:
    """A provenance record: where the weights came from and when the artifact was made."""
    try:
        ours = version("safe-retrieval")
    except PackageNotFoundError:
        ours = "unknown"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"source": source, "created_at": now, "safe_retrieval_version": ours, **extra}
