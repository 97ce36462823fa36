"""Encoder throughput: texts/s and images/s at batch 1 and 64, for the `tiny` preset and ViT-B-32.

Random initialisation (no weights can be downloaded here); throughput does not depend on the
weights' values. Runs on CUDA too when present (`--device cuda`).

    .venv/bin/python benchmarks/encode.py [--device auto] [--archs tiny ViT-B-32] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from training import architectures
from training.encoder import SafetyEncoder

OUT = Path(__file__).parent / "results" / "encode.json"
WORDS = "a red ball next to a small wooden box on a green table under the window".split()


def rate(fn, n_items: int, seconds: float) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += n_items
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def bench(arch_name: str, device: str, seconds: float) -> list[dict]:
    enc = SafetyEncoder(architectures.resolve(arch_name), "lorentz").to(architectures.pick_device(device)).eval()
    size = enc.arch.preprocess["size"]
    rows = []
    for batch in (1, 64):
        texts = [" ".join(WORDS[: 4 + i % 10]) for i in range(batch)]
        pixels = enc.preprocess([Image.new("RGB", (size, size), (i % 255, 80, 160)) for i in range(batch)])
        # rate() calls each lambda at once, inside this iteration, so the loop variables are the current ones
        rows.append({"arch": arch_name, "device": str(enc.device), "batch": batch,
                     "texts_per_s": rate(lambda: enc.encode_text(texts, batch_size=batch), batch, seconds),  # noqa: B023
                     "images_per_s": rate(lambda: enc.encode_image(pixels, batch_size=batch), batch, seconds)})  # noqa: B023
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["tiny", "ViT-B-32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rows = [r for a in args.archs for r in bench(a, args.device, args.seconds)]
    print(f"{'arch':<10} {'device':<7} {'batch':>5} {'texts/s':>10} {'images/s':>10}")
    for r in rows:
        print(f"{r['arch']:<10} {r['device']:<7} {r['batch']:>5} {r['texts_per_s']:>10.1f} {r['images_per_s']:>10.1f}")
    OUT.parent.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
