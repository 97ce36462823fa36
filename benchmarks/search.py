"""Search benchmark: prefetch + exact Lorentz rescoring on Qdrant Edge vs an exact torch scan.

Synthetic data (label it so): clustered points on the hyperboloid of curvature ``-c``. Cluster
centres are random directions at tangent radius 1.5-3 (the distance to the origin), points scatter
around them, and ``exp_map0`` lifts them. Queries are fresh points drawn from the same clusters.

Measured, for each oversample factor: recall@k of the store's search (``indexer.store.Schema.query``
on an optimized ``EdgeStore``) against the exact Lorentz top-k from ``training.lorentz``, and the
median single-query latency. The baseline is the reference implementation's way of searching: a
torch ``pairwise_dist`` of the query against the whole gallery and a top-k, timed per query. Also
recorded: build time (upsert, optimize), the shard's size on disk at the end and at its largest during
the build, and the memory of a serving process: the queries run in a child process that only opens the
shard and searches, and its anonymous and resident memory are read after the last query.

    .venv/bin/python benchmarks/search.py --n 100000 --dim 512 [--storage compact|fast]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.edge_store import EdgeStore, disk_bytes  # noqa: E402
from indexer.store import DEFAULT_STORAGE, STORAGE_MODES, Match, Schema  # noqa: E402
from training import lorentz  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def rss_mb() -> float:
    """Current resident set size of this process in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryPeaks(threading.Thread):
    """Samples this process's anonymous and file-backed resident memory (MB) twice a second.

    File-backed pages (the memmapped data, the shard's mmapped segments) are page cache the
    kernel can drop; anonymous memory is what the process really holds.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.anon = self.file = 0.0

    def run(self) -> None:
        while True:
            now = memory_mb()
            self.anon = max(self.anon, now["anon"])
            self.file = max(self.file, now["file"])
            time.sleep(0.5)


def memory_mb() -> dict[str, float]:
    """This process's anonymous and file-backed resident memory now (MB)."""
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    return {"anon": int(kv["RssAnon"].split()[0]) / 1024, "file": int(kv["RssFile"].split()[0]) / 1024}


class DiskPeak:
    """Samples the bytes a directory takes on disk twice a second from a child process (the engine's ``optimize()``
    holds this process's GIL, so a thread here would not run while the optimizer copies segments)."""

    CODE = ("import sys, time, pathlib; sys.path.insert(0, sys.argv[3]); from indexer.edge_store import disk_bytes\n"
            "peak = 0\nwhile True:\n    peak = max(peak, disk_bytes(pathlib.Path(sys.argv[1])))\n"
            "    pathlib.Path(sys.argv[2]).write_text(str(peak))\n    time.sleep(0.5)\n")

    def __init__(self, path: Path, out: Path):
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(path), str(out),
                                      str(Path(__file__).resolve().parents[1])])

    def stop(self) -> int:
        """The largest size seen, in bytes."""
        time.sleep(1.0)  # one more sample after the last write
        self.proc.terminate()
        self.proc.wait()
        return int(self.out.read_text()) if self.out.is_file() else 0


class Clusters:
    """Deterministic clustered hyperboloid points: ``chunk(i)`` always returns the same rows."""

    def __init__(self, n_clusters: int, dim: int, curvature: float, seed: int):
        rng = np.random.default_rng(seed)
        dirs = rng.standard_normal((n_clusters, dim))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.centres = dirs * rng.uniform(1.5, 3.0, size=(n_clusters, 1))  # tangent vectors at the origin
        self.dim, self.curvature, self.seed = dim, curvature, seed

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``(n, dim)`` float32 space components."""
        rng = np.random.default_rng([self.seed, seed])
        which = rng.integers(0, len(self.centres), size=n)
        radial = rng.uniform(0.7, 1.2, size=(n, 1))  # spread along the hierarchy (depth)
        scale = 0.35 * np.linalg.norm(self.centres[which], axis=1, keepdims=True) / np.sqrt(self.dim)
        noise = rng.standard_normal((n, self.dim)) * scale  # isotropic: every dimension carries noise
        v = torch.from_numpy(self.centres[which] * radial + noise).float()
        return lorentz.exp_map0(v, self.curvature).numpy()


def unsafe(i: int, filtered: bool) -> bool:
    """With ``--filter``, every third point is flagged unsafe (the service's searches exclude them)."""
    return filtered and i % 3 == 0


def build(store: EdgeStore, data: np.ndarray, chunk: int, filtered: bool = False) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(data), chunk):
        ids = [str(_uuid(j)) for j in range(i, min(i + chunk, len(data)))]
        rows = np.asarray(data[i : i + chunk])
        flags = [unsafe(j, filtered) for j in range(i, i + len(ids))]
        store.upsert(ids, store.schema.point_vectors(rows), [{"kind": "image", "unsafe": f} for f in flags])
    return time.perf_counter() - t0


def _uuid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012x}"


def exact_topk(x: torch.Tensor, q: torch.Tensor, c: float, k: int, chunk: int = 200_000, euclid: bool = False) -> np.ndarray:
    """Exact top-k row indices ``(Q, k)``, chunked over the gallery: by Lorentz inner product, or
    (``euclid``) by Euclidean distance of the space components, i.e. a perfect ``space`` prefetch."""
    best_v = torch.full((len(q), k), -float("inf"))
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    for s in range(0, len(x), chunk):
        inner = -torch.cdist(q, x[s : s + chunk]) if euclid else lorentz.pairwise_inner(q, x[s : s + chunk], c)
        v, i = torch.cat([best_v, inner], 1), torch.cat([best_i, torch.arange(s, s + inner.shape[1]).expand(len(q), -1)], 1)
        top = v.topk(k, dim=1)
        best_v, best_i = top.values, torch.gather(i, 1, top.indices)
    return best_i.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--curvature", type=float, default=0.1, help="c; trained MERU/HySAC models settle near the 0.1 floor")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=20, help="queries timed on the torch exact scan")
    ap.add_argument("--oversample", default="1,2,4,8")
    ap.add_argument("--hnsw-ef", default="0", help="comma list; 0 = the engine's default ef")
    ap.add_argument("--chunk", type=int, default=10_000, help="rows generated at a time")
    ap.add_argument("--batch", type=int, default=1000,
                    help="points per upsert (the WAL keeps its last operations, and opening a shard reads them into "
                         "memory: 10,000-point upserts left 1 GB of it at 20,000 x 768, 1,000-point ones 130 MB)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the shard and the data memmap go (temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--storage", choices=STORAGE_MODES, default=DEFAULT_STORAGE)
    ap.add_argument("--filter", action="store_true",
                    help="search as the service does: images only, unsafe excluded (every third point is unsafe)")
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)  # the child: search a built shard
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args)
    torch.manual_seed(args.seed)
    load_start = os.getloadavg()
    peaks = MemoryPeaks()
    peaks.start()
    work = Path(tempfile.mkdtemp(prefix="bench_search_", dir=args.workdir))
    settings = [(int(o), int(e)) for o in args.oversample.split(",") for e in args.hnsw_ef.split(",")]
    schema = Schema("lorentz", args.dim, args.curvature, args.storage)
    gen = Clusters(max(args.n // 1000, 10), args.dim, args.curvature, args.seed)

    # 1. data to a memmap (the gallery never has to sit in RAM twice), upserted chunk by chunk
    data = np.lib.format.open_memmap(work / "data.npy", mode="w+", dtype=np.float32, shape=(args.n, args.dim))
    for i in range(0, args.n, args.chunk):
        data[i : i + args.chunk] = gen.sample(min(args.chunk, args.n - i), seed=1 + i // args.chunk)
    data.flush()
    queries = gen.sample(args.queries, seed=10**9)
    rss0 = rss_mb()
    disk = DiskPeak(work / "shard", work / "disk_peak")
    store = EdgeStore.create(work / "shard", schema)
    t_upsert = build(store, data, args.batch, args.filter)
    t0 = time.perf_counter()
    store.optimize()
    t_opt = time.perf_counter() - t0
    indexed = store.indexed_vectors()
    store.close()
    disk_mb = disk_bytes(work / "shard") / 2**20
    peak_disk_mb = max(disk.stop() / 2**20, disk_mb)
    print(f"built {args.n} x {args.dim} ({args.storage}): upsert {t_upsert:.1f} s, optimize {t_opt:.1f} s, {disk_mb:.0f} MB "
          f"on disk (at most {peak_disk_mb:.0f} MB during the build), {indexed} vectors in HNSW graphs", flush=True)

    # 2. the store's search, in a child process that only opens the shard and searches (a serving process)
    np.save(work / "queries.npy", queries)
    np.save(work / "warmup.npy", gen.sample(100, seed=10**9 + 1))
    child = [sys.executable, __file__, "--serve", str(work), "--dim", str(args.dim), "--curvature", str(args.curvature),
             "--k", str(args.k), "--oversample", args.oversample, "--hnsw-ef", args.hnsw_ef,
             "--exact-queries", str(args.exact_queries), "--storage", args.storage, *(["--filter"] if args.filter else [])]
    subprocess.run(child, check=True)
    served = json.loads((work / "served.json").read_text())
    results = {tuple(int(v) for v in k.split(",")): r for k, r in served["results"].items()}
    lat = {tuple(int(v) for v in k.split(",")): r for k, r in served["latency"].items()}
    t_exact_store = served["exact"]

    # 3. the exact torch scan: ground truth for every query, and per-query latency
    x = torch.from_numpy(np.ascontiguousarray(data))
    qt = torch.from_numpy(queries)
    keep = np.array([i for i in range(args.n) if not unsafe(i, args.filter)])  # what the filter lets through
    if args.filter:
        x = x[torch.from_numpy(keep)]
    truth = keep[exact_topk(x, qt, args.curvature, args.k)]
    # the best any prefetch on `space` could do: exact Euclidean candidates, then exact rescoring
    max_os = max(o for o, _ in settings)
    euclid = keep[exact_topk(x, qt, args.curvature, args.k * max_os, euclid=True)]
    t_torch = []
    lorentz.pairwise_dist(qt[:1], x, args.curvature).topk(args.k, largest=False)  # warm-up, untimed
    for q in qt[: args.exact_queries]:
        t0 = time.perf_counter()
        lorentz.pairwise_dist(q[None], x, args.curvature).topk(args.k, largest=False)
        t_torch.append(time.perf_counter() - t0)
    med_torch = statistics.median(t_torch)

    rows = []
    for os_, ef in settings:
        recall = float(np.mean([len(set(r) & set(t)) / args.k for r, t in zip(results[os_, ef], truth, strict=True)]))
        ceiling = float(np.mean([len(set(e[: args.k * os_]) & set(t)) / args.k for e, t in zip(euclid, truth, strict=True)]))
        med = statistics.median(lat[os_, ef])
        rows.append({"oversample": os_, "hnsw_ef": ef or "default", "prefetch_limit": args.k * os_,
                     f"recall@{args.k}": recall, "exact_prefetch_recall": ceiling,
                     "median_ms": med * 1e3, "p95_ms": float(np.percentile(lat[os_, ef], 95)) * 1e3,
                     "speedup_vs_torch": med_torch / med})
    report = {
        "data": "synthetic clustered hyperboloid points (benchmarks/search.py Clusters)",
        "n": args.n, "dim": args.dim, "curvature": args.curvature, "k": args.k, "queries": args.queries,
        "upsert_s": t_upsert, "optimize_s": t_opt, "build_s": t_upsert + t_opt,
        "storage": args.storage, "filter": args.filter, "indexed_vectors": indexed, "disk_mb": disk_mb,
        "peak_disk_mb": peak_disk_mb,
        "serving_memory_mb": served["memory"], "serving_memory_open_mb": served["memory_open"],
        "serving_memory_start_mb": served["memory_start"],
        "rss_before_build_mb": rss0, "peak_rss_mb": peak_rss_mb(), "peak_anon_mb": peaks.anon, "peak_file_mb": peaks.file,
        "torch_exact_median_ms": med_torch * 1e3, "edge_exact_median_ms": statistics.median(t_exact_store) * 1e3,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "command": "python " + " ".join(sys.argv),
    }
    print(f"\nrecall@{args.k} and median latency, {args.n} x {args.dim}, c={args.curvature} (synthetic)")
    print(f"{'oversample':>10} {'hnsw_ef':>8} {'prefetch':>8} {'recall':>8} {'ceiling':>8} {'median ms':>10} "
          f"{'p95 ms':>8} {'x torch':>8}")
    for r in rows:
        print(f"{r['oversample']:>10} {r['hnsw_ef']:>8} {r['prefetch_limit']:>8} {r[f'recall@{args.k}']:>8.4f} "
              f"{r['exact_prefetch_recall']:>8.4f} {r['median_ms']:>10.2f} {r['p95_ms']:>8.2f} {r['speedup_vs_torch']:>8.1f}")
    print("ceiling = recall with an exact Euclidean prefetch of the same size (what HNSW approximates)")
    print(f"torch exact scan (pairwise_dist + topk): median {med_torch * 1e3:.1f} ms; Edge exact=True: "
          f"{report['edge_exact_median_ms']:.1f} ms; build {report['build_s']:.1f} s; disk {disk_mb:.0f} MB; "
          f"peak RSS {report['peak_rss_mb']:.0f} MB: anonymous {peaks.anon:.0f} MB, file-backed {peaks.file:.0f} MB "
          f"(page cache: the {args.n * args.dim * 4 / 2**20:.0f} MB memmapped gallery and the shard's segments)")
    print(f"serving process after its queries: anonymous {served['memory']['anon']:.0f} MB, resident "
          f"{served['memory']['anon'] + served['memory']['file']:.0f} MB; disk {disk_mb:.0f} MB, at most {peak_disk_mb:.0f} MB "
          f"during the build ({peak_disk_mb / disk_mb:.2f}x)")
    out = args.out or RESULTS / f"search_{args.n}_{args.dim}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


def serve(args) -> None:
    """The child: open the shard as the service would, run every setting's queries, write ``served.json``."""
    work = args.serve
    schema = Schema("lorentz", args.dim, args.curvature, args.storage)
    queries = np.load(work / "queries.npy")
    settings = [(int(o), int(e)) for o in args.oversample.split(",") for e in args.hnsw_ef.split(",")]
    match = Match(kinds=("image",), exclude_unsafe=True) if args.filter else None
    start = memory_mb()  # the interpreter, numpy, torch (which the service loads too, for its model)
    store = EdgeStore.open(work / "shard", schema)
    opened = memory_mb()
    results: dict[str, list[list[int]]] = {}
    lat: dict[str, list[float]] = {}
    warm = np.load(work / "warmup.npy")
    for os_, ef in settings:  # warm-up (thread pool, the graph's pages) on other queries than the timed ones, for
        for q in warm:  # every setting before any is timed, so that no setting pays for coming first
            store.query(schema.query(q, k=args.k, oversample=os_, hnsw_ef=ef or None, match=match))
    for os_, ef in settings:
        key = f"{os_},{ef}"
        results[key], lat[key] = [], []
        for q in queries:
            t0 = time.perf_counter()
            hits = store.query(schema.query(q, k=args.k, oversample=os_, hnsw_ef=ef or None, match=match))
            lat[key].append(time.perf_counter() - t0)
            results[key].append([int(h.id.replace("-", ""), 16) for h in hits])
    after = memory_mb()  # before the exact scans, which read every vector
    exact = []
    for q in queries[: args.exact_queries]:
        t0 = time.perf_counter()
        store.query(schema.query(q, k=args.k, exact=True, match=match))
        exact.append(time.perf_counter() - t0)
    store.close()
    (work / "served.json").write_text(json.dumps({"results": results, "latency": lat, "exact": exact, "memory": after,
                                                  "memory_open": opened, "memory_start": start}))


if __name__ == "__main__":
    main()
