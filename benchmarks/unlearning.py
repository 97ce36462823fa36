"""Every unlearning method forgetting one synthetic concept, and two at once, at several seeds: the seven metrics.

SYNTHETIC data (the demo recipe's ``data synth``), the ``tiny`` architecture: the figures compare the
methods with each other on this data; they are not comparable with the papers' numbers.

    .venv/bin/python benchmarks/unlearning.py [--workdir runs/unlearning] [--seeds 0 1 2]
        [--forget knife --forget knife,pills] [--methods cliperase ac hac ga graddiff kl]

Runs the real commands: ``data synth`` (demo recipe, seed 0), ``train --method clip --preset demo-base``
(the base, standing in for a pretrained CLIP) and ``train --method hysac --preset demo --model BASE``
(the HySAC model ``hac`` forgets from), once; then, for every seed and forget set, ``train --method M
--preset demo --model BASE --forget CONCEPTS --seed S`` for each method (``hac`` from the HySAC model)
and ``eval --unlearning --compare BEFORE AFTER...`` on the test split of a *fresh* dataset of the same generator
(``--eval-n 6000``, seed 1: 600 test quadruplets, about 27 images per concept, where the demo data's 120 give 5 or 6,
so one image moves a forget figure by 17-20 points). The seed is the unlearning
run's (its data order); base, HySAC model and data stay fixed, so the spread is that of the unlearning.
Prints a table of each method's mean and standard deviation over the seeds and writes
``benchmarks/results/unlearning.json`` (every run's metrics and timings).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from train_eval import sh  # one way to run a CLI step in every benchmark (this folder is on sys.path)

from training.unlearning_eval import BETTER, METRICS

METHODS = ("cliperase", "ac", "hac", "ga", "graddiff", "kl")
OUT = Path(__file__).parent / "results" / "unlearning.json"


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/unlearning"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--forget", action="append", help="a forget set (comma-separated); repeatable")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--eval-n", type=int, default=6000, help="size of the fresh evaluation dataset (its test split: n / 10)")
    ap.add_argument("--probe-limit", type=int, default=960, help="train quadruplets the residue probe is fitted on")
    args = ap.parse_args()
    forget_sets = args.forget or ["knife", "knife,pills"]
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data, base, hysac, fresh = work / "visu", work / "base", work / "hysac", work / f"fresh{args.eval_n}"
    timings: dict[str, float] = {}
    if not data.exists():
        timings["data"] = sh("data", "synth", "--out", data, "--n", 1200, "--seed", 0, "--unsafe-look", "generated")
    if not fresh.exists():
        timings["fresh data"] = sh("data", "synth", "--out", fresh, "--n", args.eval_n, "--seed", 1, "--unsafe-look",
                                   "generated")
    if not base.exists():
        timings["base"] = sh("train", "--method", "clip", "--preset", "demo-base", "--data", data, "--out", base)
    if "hac" in args.methods and not hysac.exists():
        timings["hysac"] = sh("train", "--method", "hysac", "--preset", "demo", "--model", base, "--data", data,
                              "--out", hysac)
    runs: list[dict] = []
    for forget in forget_sets:
        for seed in args.seeds:
            folder = work / f"{forget.replace(',', '+')}-seed{seed}"
            for method in args.methods:
                out = folder / method
                if not out.exists():
                    source = hysac if method == "hac" else base
                    timings[f"{folder.name}/{method}"] = sh(
                        "train", "--method", method, "--preset", "demo", "--model", source, "--data", data,
                        "--forget", forget, "--seed", seed, "--out", out)
            groups = {"euclidean": (base, [m for m in args.methods if m != "hac"]),
                      "lorentz": (hysac, [m for m in args.methods if m == "hac"])}
            for geometry, (before, methods) in groups.items():
                if not methods:
                    continue
                report = folder / f"eval-{geometry}"
                if not (report / "report.json").exists():
                    timings[f"{folder.name}/eval-{geometry}"] = sh(
                        "eval", "--unlearning", "--forget", forget, "--data", fresh, "--split", "test", "--out", report,
                        "--probe-limit", args.probe_limit,
                        "--compare", before, *(folder / m for m in methods))
                table = json.loads((report / "report.json").read_text())
                for name, metrics in table.items():
                    method = "base" if name == before.name and geometry == "euclidean" else (
                        "hysac" if name == before.name else name)
                    runs.append({"forget": forget, "seed": seed, "method": method, **{k: metrics.get(k) for k in METRICS}})
    lines = []
    for forget in forget_sets:
        lines += [f"\nforget {forget} (mean ± std over seeds {', '.join(map(str, args.seeds))}; synthetic data)\n",
                  "| model | " + " | ".join(f"{m} {BETTER[m]}" for m in METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for method in ("base", "hysac", *args.methods):
            rows = [r for r in runs if r["forget"] == forget and r["method"] == method]
            if rows:
                lines.append(f"| {method} | " + " | ".join(fmt([r[m] for r in rows]) for m in METRICS) + " |")
    print("\n".join(lines))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "synthetic": True, "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "seeds": args.seeds, "forget_sets": forget_sets, "runs": runs, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "table": lines,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
