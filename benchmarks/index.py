"""Indexing throughput: the pipeline (``indexer.builder.build``) vs a one-image-at-a-time loop.

Both index the same synthetic JPEGs with the same ``tiny`` model into a fresh Qdrant Edge store,
in one run on the same machine:

- loop: for each file, read it, decode it, preprocess it, encode it alone, upsert it alone;
  ``optimize()`` at the end.
- pipeline: the real ``index build`` job: DataLoader worker processes decode and preprocess,
  batched encoding, batched upserts, ``optimize()``, generation record and switch.

    .venv/bin/python benchmarks/index.py --n 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer import builder, sources  # noqa: E402
from indexer.edge_store import EdgeStore  # noqa: E402
from indexer.generations import LocalGenerations  # noqa: E402
from indexer.pipeline import payloads  # noqa: E402
from indexer.store import content_id  # noqa: E402
from training import architectures, artifact  # noqa: E402
from training.encoder import SafetyEncoder  # noqa: E402
from training.images import open_image  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` distinct JPEGs (smooth gradients plus noise, like photos compress)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        rng = np.random.default_rng(i)
        base = rng.uniform(0, 255, size=3)
        img = np.stack([(base[c] + 60 * np.sin(xx / (20 + 7 * c + i % 13) + yy / (30 + i % 7))) for c in range(3)], -1)
        img += rng.normal(0, 8, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def loop(art: artifact.Artifact, files: list[Path], path: Path) -> float:
    """One image at a time, start to end; returns seconds."""
    schema = builder.schema_for(art)
    t0 = time.perf_counter()
    store = EdgeStore.create(path, schema)
    for f in files:
        it = sources.Item("image", path=f)
        pid = content_id(f.read_bytes())
        x = art.encoder.encode_image([open_image(f)])
        store.upsert([pid], schema.point_vectors(x.cpu().numpy()), payloads(art, [it], x, f.parent))
    store.optimize()
    store.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", default="400x300", help="image size WxH")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "index.json")
    args = ap.parse_args()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_index_", dir=args.workdir))
    size = tuple(int(v) for v in args.size.split("x"))
    make_images(work / "imgs", args.n, size)
    torch.manual_seed(0)
    art = artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), "lorentz"), provenance=artifact.provenance("bench"))
    artifact.save(art, work / "tiny")
    art = artifact.load(work / "tiny", device="cpu")
    files = sorted((work / "imgs").glob("*.jpg"))

    t_loop = loop(art, files, work / "loop")
    t0 = time.perf_counter()
    res = builder.build(LocalGenerations("bench", work / "idx"), art, sources.folder_items(work / "imgs"),
                        media_root=work / "imgs", batch_size=args.batch_size, workers=args.workers, progress=False)
    t_pipe = time.perf_counter() - t0
    assert res.points == args.n, res.to_dict()

    report = {
        "data": f"{args.n} synthetic {args.size} JPEGs", "model": "tiny (random init)", "device": "cpu",
        "loop_s": t_loop, "loop_images_per_s": args.n / t_loop,
        "pipeline_s": t_pipe, "pipeline_images_per_s": args.n / t_pipe, "speedup": t_loop / t_pipe,
        "batch_size": args.batch_size, "workers": args.workers,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "platform": platform.platform(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "command": "python " + " ".join(sys.argv),
    }
    print(f"indexing {args.n} {args.size} JPEGs with the tiny model on CPU")
    print(f"{'method':<34} {'seconds':>8} {'images/s':>9}")
    print(f"{'one image at a time':<34} {t_loop:>8.1f} {args.n / t_loop:>9.1f}")
    print(f"{f'pipeline (batch {args.batch_size}, {args.workers} workers)':<34} {t_pipe:>8.1f} {args.n / t_pipe:>9.1f}")
    print(f"speedup: {t_loop / t_pipe:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
