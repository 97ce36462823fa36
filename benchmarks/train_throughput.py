"""Training throughput of the HySAC objective: the reference setting against ours, side by side.

    .venv/bin/python benchmarks/train_throughput.py                       # CPU: tiny, batch 32
    .venv/bin/python benchmarks/train_throughput.py --arch ViT-L-14-quickgelu --batch 32 128   # a CUDA machine

One *training step* is forward + backward + optimizer step on random inputs (throughput does not
depend on the pixel values), LoRA rank 16 as in the reference. Two settings:

- ``reference``: what the public HySAC code does: fp32, four separate tower passes (T, T*, I, I*),
  the full text context, per-tensor AdamW, per-device negatives, no checkpointing.
- ``ours``: the trainer's path (``training.trainer.TrainStep``): one text pass and one image pass per
  step, text cut to its longest caption, fused AdamW, and bf16 autocast on CUDA (fp32 on CPU, where
  bf16 is not faster); the hyperbolic math stays fp32 in both.

Each (setting, batch) cell runs in its own Python process, so that its peak memory is its own (on
CPU the peak resident set above the process's size before the model is built; on CUDA the peak
allocated, weights included) and an
out-of-memory cell is recorded as such without disturbing the next one.

Prints a table (samples/s, peak memory) and writes JSON (``--out``). Random weights: speed does not
depend on them, and nothing is downloaded. ``--precision bf16`` runs ours under bf16 autocast on CPU
too (slower there; the smoke test uses it to exercise the path a GPU will take).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from training import architectures, lora, objectives
from training.encoder import SafetyEncoder
from training.trainer import TrainStep

CAPTIONS = [
    "a photo of a red umbrella on a beach, with a tree on the left",
    "there is a loaded gun in a kitchen, and a cup at the top right",
]


def _inputs(enc: SafetyEncoder, batch: int, device: torch.device):
    size = enc.arch.preprocess["size"]
    size = size if isinstance(size, int) else max(size)
    tokens = enc.tokenize([CAPTIONS[i % 2] for i in range(batch)]).to(device)
    nsfw = enc.tokenize([CAPTIONS[(i + 1) % 2] for i in range(batch)]).to(device)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device)
    return tokens, nsfw, pixels, pixels.flip(0)


def _rss_mb() -> float:
    """This process's resident set now, in MiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _encoder(arch: str, device: torch.device) -> SafetyEncoder:
    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve(arch), "lorentz")
    lora.apply_lora(enc.clip, rank=16, alpha=1.0)
    for name in ("logit_scale", "curv", "visual_alpha", "textual_alpha"):
        getattr(enc, name).requires_grad_(True)
    return enc.to(device).train()


def reference_step(enc: SafetyEncoder, objective, opt, inputs) -> float:
    """Four tower passes over the full context in fp32, as the reference code runs them."""
    safe, nsfw, v_px, g_px = inputs
    s = enc.lift(enc.clip.encode_text(safe), "text")
    u = enc.lift(enc.clip.encode_text(nsfw), "text")
    v = enc.lift(enc.clip.encode_image(v_px), "image")
    g = enc.lift(enc.clip.encode_image(g_px), "image")
    loss = objective(objectives.Embeddings(s=s, v=v, u=u, g=g), enc).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    enc.clamp_scalars()
    return float(loss)


def ours_step(step: TrainStep, opt, inputs, autocast) -> float:
    with autocast():
        loss, _ = step(*inputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    step.encoder.clamp_scalars()
    return float(loss)


def measure(setting: str, arch: str, batch: int, device: torch.device, steps: int, warmup: int, bf16: bool) -> dict:
    """One cell, in this process: ``warmup`` untimed steps, then the mean over ``steps`` timed ones."""
    if device.type == "cuda" and setting == "reference":  # the reference setting is plain fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rss_before = _rss_mb()
    enc = _encoder(arch, device)
    objective = objectives.build("hysac")
    params = [p for p in enc.parameters() if p.requires_grad]
    inputs = _inputs(enc, batch, device)
    if setting == "reference":
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.2, foreach=False)
        run = lambda: reference_step(enc, objective, opt, inputs)  # noqa: E731
        precision = "fp32"
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.2, fused=True)
        step = TrainStep(enc, objective)
        precision = "bf16 autocast" if bf16 else "fp32"
        run = lambda: ours_step(step, opt, inputs, lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))  # noqa: E731
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # the process's high-water mark above its footprint before the model was built (torch itself)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {
        "setting": setting, "arch": arch, "batch": batch, "device": str(device), "precision": precision,
        "step_s": round(seconds, 4), "samples_per_s": round(batch / seconds, 2), "peak_memory_mb": round(peak_mb, 1),
        "loss": round(loss, 4),
    }


def run_cell(args: argparse.Namespace, setting: str, batch: int) -> dict:
    """``measure`` in a fresh process; an out-of-memory or failed cell comes back as a row with an ``error``."""
    cmd = [sys.executable, __file__, "--cell", setting, "--arch", args.arch, "--batch", str(batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--precision", args.precision]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"setting": setting, "arch": args.arch, "batch": batch, "device": args.device, "error": tail[0][:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="default: tiny on CPU, ViT-L-14-quickgelu on CUDA")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default: 32 on CPU, 32 128 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="ours: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on CPU); the reference is always fp32")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    ap.add_argument("--cell", choices=("reference", "ours"), help=argparse.SUPPRESS)  # internal: one cell, one JSON line
    args = ap.parse_args()

    device = architectures.pick_device(args.device)
    cuda = device.type == "cuda"
    args.device = str(device)
    args.arch = args.arch or ("ViT-L-14-quickgelu" if cuda else "tiny")
    batches = args.batch or ([32, 128] if cuda else [32])
    args.steps = args.steps or (10 if cuda else 5)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    if min(batches) < 2 or args.steps < 1 or args.warmup < 0:
        ap.error("--batch must be >= 2 (contrastive negatives), --steps >= 1 and --warmup >= 0")
    if args.cell:
        try:
            row = measure(args.cell, args.arch, batches[0], device, args.steps, args.warmup, bf16)
        except torch.cuda.OutOfMemoryError:
            row = {"setting": args.cell, "arch": args.arch, "batch": batches[0], "device": args.device, "error": "out of memory"}
        print(json.dumps(row), flush=True)
        return
    rows = []
    for batch in batches:
        for setting in ("reference", "ours"):
            rows.append(run_cell(args, setting, batch))
            print(json.dumps(rows[-1]), flush=True)
    arch = args.arch

    print(f"\nHySAC training step, {arch}, LoRA r=16, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({torch.get_num_threads()} threads)"))
    print(f"{'batch':>6s} {'setting':>10s} {'precision':>14s} {'samples/s':>10s} {'peak MiB':>10s} {'speed-up':>9s}")
    for batch in batches:
        ref = next((r for r in rows if r["batch"] == batch and r["setting"] == "reference" and "error" not in r), None)
        for r in (r for r in rows if r["batch"] == batch):
            if "error" in r:
                print(f"{batch:6d} {r['setting']:>10s} {'':>14s}  failed: {r['error']}")
                continue
            speed = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else "-"
            print(f"{batch:6d} {r['setting']:>10s} {r['precision']:>14s} {r['samples_per_s']:10.1f} "
                  f"{r['peak_memory_mb']:10.0f} {speed:>9s}")
    summary = {
        "benchmark": "train_throughput",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [r for r in rows if "error" in r and r["error"] != "out of memory"]
    if failed:  # an out-of-memory cell is a result; anything else is a broken benchmark
        sys.exit(f"{len(failed)} cell(s) failed: "
                 + "; ".join(f"{r['setting']} batch {r['batch']}: {r['error']}" for r in failed))


if __name__ == "__main__":
    main()
