"""Calibrate ``NEAR_DUPLICATE_DISTANCE``: how far a model puts an image's copies from it, and how close distinct images
come to each other.

For each image of a gallery (a ViSU-layout split), copies a re-uploader would make: JPEG at quality 50, 70 and 90,
resized to 75 % and 50 % (then JPEG 75), a 90 % centre crop (JPEG 75) and a PNG re-save. Their distances to the
original under the model (geodesic for lorentz, 1 - cosine for euclidean) are the positives; the distances between
distinct images of the gallery are the negatives. For candidate thresholds it reports the share of copies refused
(recall) and two false-positive rates: of distinct image pairs within the threshold, and of gallery images whose
nearest other image is within it (an upload refused because an unrelated image it resembles was taken down).

    .venv/bin/python benchmarks/near_duplicates.py --model ARTIFACT --data VISU_DIR [--split test] [--limit 400]

Prints a table and writes benchmarks/results/near_duplicates-<model name>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def copies(data: bytes) -> dict[str, bytes]:
    im = Image.open(io.BytesIO(data)).convert("RGB")

    def jpeg(image: Image.Image, quality: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    def scaled(f: float) -> Image.Image:
        return im.resize((max(1, int(im.width * f)), max(1, int(im.height * f))))

    w, h = im.size
    crop = im.crop((int(0.05 * w), int(0.05 * h), int(0.95 * w), int(0.95 * h)))
    png = io.BytesIO()
    im.save(png, "PNG")
    return {"jpeg q50": jpeg(im, 50), "jpeg q70": jpeg(im, 70), "jpeg q90": jpeg(im, 90),
            "resize 75%": jpeg(scaled(0.75), 75), "resize 50%": jpeg(scaled(0.5), 75), "crop 90%": jpeg(crop, 75),
            "png re-save": png.getvalue()}


def pairwise(art, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from training import lorentz

    if art.geometry == "lorentz":
        return lorentz.pairwise_dist(x, y, art.curvature)
    return 1 - torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="A ViSU-layout dataset (the gallery's images).")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=400, help="At most this many images.")
    args = ap.parse_args()
    from indexer import sources
    from indexer.store import content_id
    from training import artifact
    from training.images import preprocess_bytes

    art = artifact.load(args.model, device="cpu")
    files, seen = [], set()
    for it in sources.collect(visu=args.data, split=args.split):
        if it.kind == "image" and it.path is not None:
            data = it.path.read_bytes()
            if content_id(data) not in seen:  # distinct content only: a file listed twice is not a negative
                seen.add(content_id(data))
                files.append(data)
        if len(files) >= args.limit:
            break

    @torch.no_grad()
    def embed(blobs: list[bytes]) -> torch.Tensor:
        pixels = torch.stack([preprocess_bytes(b, art.encoder.transform) for b in blobs])
        return art.encoder.encode_image(pixels, batch_size=64).float()

    x = embed(files)
    kinds = list(copies(files[0]))
    positives: dict[str, torch.Tensor] = {}
    per_copy = [copies(d) for d in files]
    for kind in kinds:
        c = embed([p[kind] for p in per_copy])
        positives[kind] = torch.diagonal(pairwise(art, x, c))
    neg = pairwise(art, x, x)
    neg.fill_diagonal_(float("inf"))
    nearest = neg.min(1).values
    pairs = neg[torch.triu(torch.ones_like(neg, dtype=torch.bool), diagonal=1)]
    allpos = torch.cat(list(positives.values()))
    rows = []
    candidates = {"max of copies": float(allpos.max()), "p99 of copies": float(allpos.quantile(0.99)),
                  "p95 of copies": float(allpos.quantile(0.95)), "min of distinct": float(nearest.min())}
    for name, t in candidates.items():
        rows.append({"threshold": name, "value": t, "copies_refused": float((allpos <= t).float().mean()),
                     "distinct_pairs_within": float((pairs <= t).float().mean()),
                     "images_with_a_neighbour_within": float((nearest <= t).float().mean())})
    out = {"model": str(args.model), "geometry": art.geometry, "images": len(files), "data": str(args.data),
           "split": args.split, "copies": {k: {"max": float(v.max()), "p99": float(v.quantile(0.99)),
                                               "median": float(v.median())} for k, v in positives.items()},
           "distinct_nearest": {"min": float(nearest.min()), "p01": float(nearest.quantile(0.01)),
                                "median": float(nearest.median())},
           "thresholds": rows, "loadavg": os.getloadavg()}
    print(f"{args.model.name} ({art.geometry}), {len(files)} distinct images")
    for k, v in out["copies"].items():
        print(f"  copy {k:<12} median {v['median']:.4f}  p99 {v['p99']:.4f}  max {v['max']:.4f}")
    d = out["distinct_nearest"]
    print(f"  nearest distinct image: min {d['min']:.4f}  p01 {d['p01']:.4f}  median {d['median']:.4f}")
    for r in rows:
        print(f"  threshold {r['threshold']:<16} {r['value']:.4f}: copies refused {100 * r['copies_refused']:.1f} %, "
              f"distinct pairs within {100 * r['distinct_pairs_within']:.3f} %, images with a neighbour within "
              f"{100 * r['images_with_a_neighbour_within']:.1f} %")
    path = ROOT / "benchmarks" / "results" / f"near_duplicates-{args.model.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
