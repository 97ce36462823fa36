"""Helpers of the indexer tests: a calibrated tiny artifact, small image folders, hyperboloid points,
a data root that leaks. Everything is made here (no downloads) and kept tiny."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.pipeline import payloads
from indexer.sources import Item
from indexer.store import VectorStore
from training import architectures, artifact, lorentz
from training.encoder import SafetyEncoder

# distances to the origin: safe images sit near 1.0, the unsafe rule fires above 1.5
BOUNDS = {c: {"mean": m, "p05": m - 0.2, "p50": m, "p95": m + 0.2} for c, m in
          {"S": 0.8, "V": 1.0, "U": 2.0, "G": 2.2}.items()}
THRESHOLDS = {"text": 1.5, "image": 1.5}


def make_artifact(out: Path, *, seed: int = 0, geometry: str = "lorentz", calibrated: bool = True) -> artifact.Artifact:
    torch.manual_seed(seed)
    enc = SafetyEncoder(architectures.resolve("tiny"), geometry)
    art = artifact.Artifact(enc, bounds=BOUNDS if calibrated and geometry == "lorentz" else {},
                            safety={"unsafe_threshold": THRESHOLDS} if calibrated and geometry == "lorentz" else {},
                            provenance=artifact.provenance("test", seed=seed))
    artifact.save(art, out)
    return art


def write_images(folder: Path, n: int, *, start: int = 0) -> list[Path]:
    """``n`` distinct 64x64 PNGs (a colour and a stripe pattern per index), some in a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        a = np.empty((64, 64, 3), dtype=np.uint8)
        a[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
        a[:, :: 2 + i % 5] = rng.integers(0, 256, size=3, dtype=np.uint8)
        p = folder / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def hyperboloid(n: int, dim: int, c: float, *, radii=(0.5, 2.5), seed: int = 0) -> torch.Tensor:
    """``n`` points ``(n, dim)`` at geodesic distances to the origin uniform in ``radii``, random directions."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    r = radii[0] + (radii[1] - radii[0]) * torch.rand(n, generator=g)
    return lorentz.move_to_dist0(d, r, c)


def fill(store: VectorStore, art: artifact.Artifact, x: torch.Tensor, kind: str = "image", tags=None) -> list[str]:
    """Upsert points ``x (N, D)`` with the pipeline's payloads; ids ``p0000...``-style UUIDs in row order."""
    ids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(len(x))]
    items = [Item(kind, path=Path(f"/media/p{i}.png") if kind == "image" else None, text=None if kind == "image" else f"t{i}",
                  caption=f"c{i}", tags=tuple(tags[i]) if tags else ()) for i in range(len(x))]
    store.upsert(ids, store.schema.point_vectors(x.numpy()), payloads(art, items, x, Path("/media")))
    return ids


def row(pid: str) -> int:
    return int(pid.rsplit("-", 1)[1])


@dataclass(frozen=True)
class Leaky:
    """A data root whose folder, manifest and links point outside it (see ``leaky_root``)."""

    root: Path
    outside: Path
    secret: Path
    manifest: Path
    good: Path


def leaky_root(base: Path) -> Leaky:
    """``base/root``: 3 images and a symlink to an image in ``base/outside``, and a manifest (``list.jsonl``) of
    5 rows: a good one, the outside image by absolute path, by ``../`` and by the symlink (all 4 captioned),
    and a row that is not an object. ``texts.txt`` and ``link.jsonl`` are symlinks to files outside."""
    root, outside = base / "root", base / "outside"
    paths = write_images(root / "imgs", 3)
    secret = write_images(outside, 1, start=50)[0]
    (root / "imgs" / "leak.png").symlink_to(secret)
    rows = [{"image": "imgs/img001.png", "caption": "a kept image"},
            {"image": str(secret), "caption": "an absolute escape"},
            {"image": "../outside/img050.png", "caption": "a dotdot escape"},
            {"image": "imgs/leak.png", "caption": "a symlink escape"},
            [1, 2]]
    manifest = root / "list.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (outside / "texts.txt").write_text("a secret text\n")
    (root / "texts.txt").symlink_to(outside / "texts.txt")
    (outside / "list.jsonl").write_text(json.dumps({"image": str(secret)}) + "\n")
    (root / "link.jsonl").symlink_to(outside / "list.jsonl")
    return Leaky(root, outside, secret, manifest, paths[1])


def leaked(payloads: list[dict], leaky: Leaky) -> list[dict]:
    """Payloads that name a file outside the data root (by uri or image_uri), or carry an outside caption."""
    bad = []
    for p in payloads:
        for key in ("uri", "image_uri"):
            uri = p.get(key)
            if uri is not None and (uri.startswith("/") or ".." in uri.split("/") or str(leaky.outside) in uri):
                bad.append(p)
        if p.get("caption") in ("an absolute escape", "a dotdot escape", "a symlink escape", "a secret text"):
            bad.append(p)
    return bad
