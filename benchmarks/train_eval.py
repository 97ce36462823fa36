"""Train the three demo models on synthetic ViSU-style data and evaluate them into one table.

SYNTHETIC data (``safe-retrieval data synth``), the ``tiny`` architecture: the figures check that the
methods behave as the papers say, they are not comparable with the papers' ViSU numbers.

    .venv/bin/python benchmarks/train_eval.py [--workdir runs/train_eval] [--n N] [--seed 0] [--traversal geodesic]
        [--unsafe-look plain]   # results/train_eval-plain.json
        [--fresh-n 6000 [--fresh-seed 1000]]   # also score every model, base included, on a fresh dataset's test split
        [--train-seeds 1 2 ...]   # also fine-tune each method at these training seeds from the same base: per-seed table

Runs the real commands in order (``data synth``, ``train --method clip --preset demo-base``, then
``train --preset demo --model BASE`` for clip, hysac and safeclip, ``eval --compare``), prints the
headline table and writes ``benchmarks/results/train_eval.json`` with the timings and the numbers that
``benchmarks/RESULTS.md`` records (the full report stays in WORKDIR). The same recipe as ``make gates``.

The gates' test split has 120 quadruplets, where one query is 0.83 points of R@1. ``--fresh-n`` makes a
second dataset with the same generator and another seed (new random scenes) and scores the same
models on its test split (``n / 10`` quadruplets, bounds from its validation split), so that a gap between
models can be told from sampling noise. ``--train-seeds`` separates the other noise, that of training:
each method is fine-tuned again from the same base at each extra seed (``WORKDIR/seed-S/``), every seed's
models are scored on the same test split(s), and a per-seed table with each method's mean and its mean
difference from the clip baseline is printed and written (``results/train_eval-seeds[-freshN].json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("hysac", "safeclip", "clip")
HEADLINE = ("T->V", "V->T", "T*->V∪V*", "V*->T∪T*", "T*->V*", "V*->T*")
CLI = str(Path(sys.executable).parent / "safe-retrieval")
OUT = Path(__file__).parent / "results" / "train_eval.json"


def sh(*args) -> float:
    """Run one CLI command, echo it, fail loudly; returns its wall time in seconds."""
    cmd = [CLI, *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def summarize(report: Path, traversal: str, timings: dict[str, float]) -> tuple[list[dict], dict, int]:
    """Print an ``eval`` report's headline table; its rows, hysac's medians of d0 and its n."""
    rep = json.loads((report / "report.json").read_text())
    rows = []
    for m in rep["models"]:
        for variant, var in m["variants"].items():
            tasks = var["tasks"]
            rows.append(
                {
                    "model": m["label"] + ("" if variant == "plain" else f" + traversal ({traversal})"),
                    **{f"{t} R@1": tasks[t]["R@1"] for t in HEADLINE},
                    "safety T*": tasks["T*->V∪V*"]["safety"],
                    "safety V*": tasks["V*->T∪T*"]["safety"],
                    "leakage@10 T*": tasks["T*->V∪V*"]["leakage@10"],
                }
            )
    d0 = {m["label"]: {c: m["d0"][c]["median"] for c in "SVUG"} for m in rep["models"] if m["d0"]}
    keys = [k for k in rows[0] if k != "model"]
    print(f"\nsynthetic ViSU-style data ({report.name}), split test, n={rep['dataset']['n']}  (R@1 and safety in %)")
    print(f"{'model':34s}" + "".join(f"{k:>16s}" for k in keys))
    for r in rows:
        print(f"{r['model']:34s}" + "".join(f"{(100 * r[k] if 'leakage' not in k else r[k]):16.1f}" for k in keys))
    print("\nmedian distance to the origin:", json.dumps(d0))
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return rows, d0, rep["dataset"]["n"]


TRAIN_SEED = 42  # the trainer's default, which the main models and the gates use
SEED_TASKS = ("T->V", "T*->V∪V*")


def seed_table(work: Path, data: Path, tests: dict[str, tuple[Path, Path]], seeds: list[int], traversal: str,
               timings: dict[str, float]) -> dict:
    """Fine-tune every method at every seed from WORKDIR/base, score each on each test split; print and return the table.

    ``tests``: name -> (dataset, the main models' report on it, which seed 42's rows are read from).
    """
    rows = []
    for seed in seeds:
        models = work if seed == TRAIN_SEED else work / f"seed-{seed}"
        for m in METHODS:
            if not (models / m).exists():
                timings[f"train {m} seed {seed}"] = sh("train", "--method", m, "--preset", "demo", "--model", work / "base",
                                                      "--data", data, "--out", models / m, "--seed", seed)
        for test, (test_data, main_report) in tests.items():
            report = main_report if seed == TRAIN_SEED else models / f"report-{test}"
            if seed != TRAIN_SEED:
                shutil.rmtree(report, ignore_errors=True)
                sh("eval", "--data", test_data, "--split", "test", "--traversal", traversal, "--out", report,
                   "--compare", *(models / m for m in METHODS))
            rep = json.loads((report / "report.json").read_text())
            for model in (m for m in rep["models"] if m["label"] in METHODS):  # the main fresh report also has the base
                for variant, var in model["variants"].items():
                    label = model["label"] + ("" if variant == "plain" else " + traversal")
                    rows.append({"seed": seed, "test": test, "model": label,
                                 **{t: var["tasks"][t]["R@1"] for t in SEED_TASKS}})
    print("\nR@1 (%) per training seed, fine-tuned from one base; mean and mean difference from clip")
    means = {}
    for test in tests:
        for label in dict.fromkeys(r["model"] for r in rows if r["test"] == test):
            mine = {r["seed"]: r for r in rows if r["test"] == test and r["model"] == label}
            clip = {r["seed"]: r for r in rows if r["test"] == test and r["model"] == "clip"}
            stats = {}
            for t in SEED_TASKS:
                values = [mine[s][t] for s in seeds]
                stats[t] = {"mean": sum(values) / len(values),
                            "mean_minus_clip": sum(mine[s][t] - clip[s][t] for s in seeds) / len(seeds)}
            means[f"{test}: {label}"] = stats
            cells = "  ".join(f"{t} " + " ".join(f"{100 * mine[s][t]:5.1f}" for s in seeds)
                              + f" | mean {100 * stats[t]['mean']:5.1f} ({100 * stats[t]['mean_minus_clip']:+5.1f})"
                              for t in SEED_TASKS)
            print(f"{test:6s} {label:20s} {cells}")
    return {"seeds": seeds, "rows": rows, "means": means}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/train_eval"))
    ap.add_argument("--n", type=int, default=None, help="synthetic quadruplets over all splits (default: the demo recipe's)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the synthetic data (training keeps its default seed, 42, as the gates do)")
    ap.add_argument("--traversal", default="geodesic", choices=("hysac", "geodesic"))
    ap.add_argument("--unsafe-look", default=None, choices=("plain", "generated", "generated-half"),
                    help="the synthetic data's unsafe half: plain, or with a global generated look (the demo recipe's)")
    ap.add_argument("--keep", action="store_true", help="reuse data and models already in WORKDIR")
    ap.add_argument("--fresh-n", type=int, default=0, help="also evaluate on a fresh dataset of this many quadruplets (0: off)")
    ap.add_argument("--fresh-seed", type=int, default=1000, help="seed of the fresh dataset (not --seed: new scenes)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[],
                    help="extra training seeds (the main models use 42): fine-tune every method again at each")
    args = ap.parse_args()
    if args.fresh_n and args.fresh_seed == args.seed:
        ap.error("--fresh-seed must differ from --seed: the fresh test split has to be new scenes")
    from training.recipes import RECIPES

    args.n = args.n or RECIPES["demo"]["synthetic_n"]
    recipe_look = RECIPES["demo"]["synthetic_look"]
    args.unsafe_look = args.unsafe_look or recipe_look

    work: Path = args.workdir
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    data, report = work / "data", work / "report"
    timings: dict[str, float] = {}
    if not data.exists():
        timings["data synth"] = sh("data", "synth", "--out", data, "--n", args.n, "--seed", args.seed,
                                   "--unsafe-look", args.unsafe_look)
    # the base first: the stand-in for OpenAI CLIP, which the papers fine-tune (and Safe-CLIP keeps as its
    # frozen reference); the same recipe as the quality gates' demo_models fixture
    if not (work / "base").exists():
        timings["train base"] = sh("train", "--method", "clip", "--preset", "demo-base", "--data", data, "--out", work / "base")
    for m in ("clip", "hysac", "safeclip"):
        if not (work / m).exists():
            timings[f"train {m}"] = sh("train", "--method", m, "--preset", "demo", "--model", work / "base",
                                       "--data", data, "--out", work / m)
    shutil.rmtree(report, ignore_errors=True)
    timings["eval"] = sh(
        "eval", "--data", data, "--split", "test", "--traversal", args.traversal, "--out", report,
        "--compare", *(work / m for m in METHODS),
    )

    rows, d0, n_test = summarize(report, args.traversal, timings)
    summary = {
        "data": "synthetic",
        "n_test": n_test,
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "timings_s": timings,
        "rows": rows,
        "d0_median": d0,
        "report": str(report / "report.md"),
    }
    if args.fresh_n:
        fresh, fresh_report = work / "fresh-data", work / "report-fresh"
        if not fresh.exists():
            timings["fresh data synth"] = sh("data", "synth", "--out", fresh, "--n", args.fresh_n, "--seed", args.fresh_seed,
                                             "--unsafe-look", args.unsafe_look)
        shutil.rmtree(fresh_report, ignore_errors=True)
        timings["fresh eval"] = sh(
            "eval", "--data", fresh, "--split", "test", "--traversal", args.traversal, "--out", fresh_report,
            "--compare", *(work / m for m in (*METHODS, "base")),
        )
        rows, d0, n_test = summarize(fresh_report, args.traversal, timings)
        summary["fresh"] = {"seed": args.fresh_seed, "n_test": n_test, "rows": rows, "d0_median": d0,
                            "report": str(fresh_report / "report.md")}
    if args.train_seeds:
        tests = {"own": (data, report)} | ({"fresh": (work / "fresh-data", work / "report-fresh")} if args.fresh_n else {})
        seeds = list(dict.fromkeys([TRAIN_SEED, *args.train_seeds]))
        summary["seeds"] = seed_table(work, data, tests, seeds, args.traversal, timings)
    suffix = ("-seeds" if args.train_seeds else "") + ("" if args.unsafe_look == recipe_look else f"-{args.unsafe_look}")
    suffix += f"-fresh{args.fresh_n}" if args.fresh_n else ""
    out = OUT.with_name(f"train_eval{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} and {report / 'report.md'}")


if __name__ == "__main__":
    main()
