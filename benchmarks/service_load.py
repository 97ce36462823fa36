"""Service load benchmark: QPS and latency over loopback, dynamic batching on/off, text trimming, cache, bf16/int8.

A closed-loop load generator: C concurrent clients, each sending its next text->image search as
soon as the previous one answers, for T seconds; every query text is distinct, so the cache never
hits. The server is the real ``safe-retrieval serve`` in its own process (uvicorn, one worker),
searching an embedded Qdrant Edge index of N synthetic points (space components drawn around the
model's own embeddings, HNSW built). Run with the ``tiny`` architecture (the demo model's) and with
``ViT-B-32`` (random init: the cost of a real CLIP). Side by side in one run:

- batching on vs off (``max_batch 1``) at each client count;
- the naive rate: one query at a time, padded to the full context (77 tokens for ViT-B-32), the
  way clip-retrieval's back end encodes;
- the encode time of one trimmed query (the floor of 1-client latency);
- text trimming: a batch of queries cut to its longest real query vs padded to the full context;
- the query-embedding cache: latency of a repeated query vs a new one;
- bf16 autocast and int8 dynamic quantization on CPU: speed and accuracy against fp32.

    .venv/bin/python benchmarks/service_load.py [--archs tiny ViT-B-32] [--points 100000] [--clients 1 32] [--seconds 10]
        [--torch-threads 1]

Prints tables and writes benchmarks/results/service.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "service.json"
WORK = ROOT / "runs" / "bench-service"
SUBJECTS = ["a dog", "a red car", "two people", "a wooden table", "an old bicycle", "a green parrot", "a blue house",
            "a small boat", "a cat", "a kitchen", "a man with a hat", "a child", "a bowl of fruit", "a tall tree"]
PLACES = ["on a beach", "in a park", "in an office", "at night", "under the rain", "in a desert", "near a lake",
          "on a street", "in a bedroom", "in the snow"]


def query_text(i: int) -> str:
    """Distinct, realistic-length queries (8-20 tokens)."""
    r = random.Random(i)
    return f"{r.choice(SUBJECTS)} {r.choice(PLACES)} with {r.choice(SUBJECTS)} number {i}"


# ------------------------------------------------------------------ model and index
def make_model(arch: str, out: Path) -> Path:
    """A random-init lorentz artifact of ``arch``, calibrated on random texts (thresholds at the median)."""
    from training import architectures, artifact, traversal
    from training.encoder import SafetyEncoder

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve(arch), "lorentz").eval()
    texts = [query_text(i) for i in range(64)]
    with torch.no_grad():
        d0 = enc.dist0(enc.encode_text(texts))
    half = len(d0) // 2
    bounds = traversal.calibrate_bounds({"S": d0[:half], "U": d0[half:], "V": d0[:half], "G": d0[half:]})
    thr = float(d0.median())
    art = artifact.Artifact(enc, bounds=bounds, safety={"unsafe_threshold": {"text": thr, "image": thr}},
                            provenance=artifact.provenance("benchmark: random init", arch=arch))
    artifact.save(art, out)
    return out


def make_index(model: Path, root: Path, name: str, points: int) -> str:
    """N points around the model's own text embeddings, written through the indexer's store and generations."""
    from indexer import builder
    from indexer.generations import now_iso
    from indexer.index import generations_for
    from indexer.store import content_id
    from training import artifact, lorentz

    gens = generations_for(name, root=root)
    cur = gens.current()
    art = artifact.load(model, device="cpu")
    if cur is not None:
        meta = gens.read_meta(cur)
        if meta.get("points") == points and meta.get("fingerprint") == art.fingerprint:
            return cur
    schema = builder.schema_for(art)
    with torch.no_grad():
        centres = art.encoder.encode_text([query_text(10_000_000 + i) for i in range(256)]).numpy()
    rng = np.random.default_rng(0)
    gen = gens.new_name()
    with gens.lock():
        store = gens.create_store(gen, schema, builder.index_record(art, name=name, generation=gen, sources="synthetic"))
        scale = float(np.linalg.norm(centres, axis=1).mean()) * 0.15
        thr = art.unsafe_threshold("image")
        t0 = time.perf_counter()
        for start in range(0, points, 5000):
            n = min(5000, points - start)
            x = (centres[rng.integers(0, len(centres), n)] + rng.normal(0, scale / np.sqrt(schema.dim), (n, schema.dim)))
            x = x.astype(np.float32)
            d0 = lorentz.dist0(torch.from_numpy(x), art.curvature).numpy()
            ids = [content_id(f"bench point {start + i}") for i in range(n)]
            payloads = [{"kind": "image", "uri": None, "caption": f"synthetic point {start + i}", "tags": [],
                         "d0": float(d0[i]), "unsafe": bool(d0[i] > thr), "model": art.fingerprint} for i in range(n)]
            store.upsert(ids, schema.point_vectors(x), payloads)
        build = time.perf_counter() - t0
        store.optimize()
        count = store.count()
        store.close()
        meta = gens.read_meta(gen)
        meta.update(state="complete", points=count, completed_at=now_iso(), last_job={"elapsed_s": build})
        gens.write_meta(gen, meta)
        gens.switch(gen)
        gens.prune(1, protect={gen})
    return gen


# ------------------------------------------------------------------ in-process encoder measurements
def timed(fn, repeat: int, rounds: int = 5) -> float:
    """Seconds per call: the best of ``rounds`` rounds of ``repeat`` calls (other load only ever adds time)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def padded_text_features(enc, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's own path: every query padded to the full context length (no trimming)."""
    return enc.clip.encode_text(tokens)


def encoder_figures(model: Path, batch: int = 32) -> dict:
    from training import artifact

    art = artifact.load(model, device="cpu")
    enc = art.encoder
    texts = [query_text(i) for i in range(batch)]
    tokens = enc.tokenize(texts)
    one = enc.tokenize(texts[:1])
    with torch.inference_mode():
        naive_1 = timed(lambda: padded_text_features(enc, one), 20)
        trimmed_1 = timed(lambda: enc.encode_text(texts[:1]), 20)
        padded_b = timed(lambda: padded_text_features(enc, tokens), 5)
        trimmed_b = timed(lambda: enc.text_features(tokens), 5)
        diff = float((padded_text_features(enc, tokens) - enc.text_features(tokens)).abs().max())
        ref = enc.encode_text(texts)
        fp32_b = timed(lambda: enc.encode_text(texts), 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = enc.encode_text(texts)
            bf16_b = timed(lambda: enc.encode_text(texts), 5)
    out = {
        "context_length": int(tokens.shape[1]),
        "longest_query_tokens": int((tokens != 0).sum(-1).max()),
        "naive_one_query_ms": naive_1 * 1e3,
        "naive_qps": 1 / naive_1,
        "trimmed_one_query_ms": trimmed_1 * 1e3,
        "batch": batch,
        "padded_batch_ms": padded_b * 1e3,
        "trimmed_batch_ms": trimmed_b * 1e3,
        "trim_speedup": padded_b / trimmed_b,
        "trim_max_abs_diff": diff,
        "fp32_batch_ms": fp32_b * 1e3,
        "bf16": precision_report(art, ref, bf16, fp32_b, bf16_b),
        "int8": int8_report(art, texts, ref, fp32_b),
    }
    return out


def precision_report(art, ref: torch.Tensor, other: torch.Tensor, t_ref: float, t_other: float) -> dict:
    """Speed and accuracy of a cheaper forward pass against fp32: vectors, d0, unsafe flags, neighbours."""
    enc = art.encoder
    d_ref, d_other = enc.dist0(ref), enc.dist0(other.float())
    thr = art.unsafe_threshold("text")
    # neighbour agreement: top-5 of each query among the other queries, by geodesic distance
    from training import lorentz

    def top(x):
        dist = lorentz.pairwise_dist(x, x, art.curvature)
        dist.fill_diagonal_(float("inf"))
        return dist.topk(5, largest=False).indices

    a, b = top(ref), top(other.float())
    overlap = float(np.mean([len(set(a[i].tolist()) & set(b[i].tolist())) / 5 for i in range(len(a))]))
    return {
        "batch_ms": t_other * 1e3,
        "speedup": t_ref / t_other,
        "max_abs_diff": float((ref - other.float()).abs().max()),
        "max_d0_diff": float((d_ref - d_other).abs().max()),
        "unsafe_flag_agreement": float(((d_ref > thr) == (d_other > thr)).float().mean()) if thr is not None else None,
        "top5_overlap": overlap,
    }


def int8_report(art, texts: list[str], ref: torch.Tensor, t_ref: float) -> dict:
    import copy

    try:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        from torch.ao.quantization import quantize_dynamic

        q = copy.deepcopy(art)
        q.encoder = quantize_dynamic(art.encoder, {torch.nn.Linear}, dtype=torch.qint8)
        # open_clip reads the cast dtype from an MLP weight, which quantized layers no longer expose
        q.encoder.clip.transformer.get_cast_dtype = lambda: torch.float32
        with torch.inference_mode():
            out = q.encoder.encode_text(texts)
            t = timed(lambda: q.encoder.encode_text(texts), 5)
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the benchmark measures what exists
        return {"error": f"{e.__class__.__name__}: {e}"[:300]}
    return precision_report(art, ref, out, t_ref, t)


# ------------------------------------------------------------------ the server and the load
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: Path, root: Path, name: str, *, max_batch: int, wait_ms: float, cache: int, threads: int,
           env_extra: dict[str, str] | None = None, work: Path = WORK):
    """The real ``safe-retrieval serve`` in a process of its own, on a free port: its URL until the block ends.
    ``env_extra``: more ``SAFE_RETRIEVAL_*`` settings (tokens, roots); ``work``: where its state and log go."""
    import httpx

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_RETRIEVAL_")}
    env.update(SAFE_RETRIEVAL_MODEL=str(model), SAFE_RETRIEVAL_INDEX=name, SAFE_RETRIEVAL_INDEX_ROOT=str(root),
               SAFE_RETRIEVAL_STATE_DIR=str(work / "state"), SAFE_RETRIEVAL_DEVICE="cpu",
               SAFE_RETRIEVAL_BATCH_MAX_SIZE=str(max_batch), SAFE_RETRIEVAL_BATCH_MAX_WAIT_MS=str(wait_ms),
               SAFE_RETRIEVAL_CACHE_SIZE=str(cache), SAFE_RETRIEVAL_TORCH_THREADS=str(threads), **(env_extra or {}))
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; main(sys.argv[1:])", "serve", "--port", str(port)]
    log = open(work / f"server-{port}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def percentile_ms(lat: list[float], p: float) -> float:
    """The ``p`` quantile of the sorted latencies ``lat`` (seconds), in milliseconds (nan when there are none)."""
    return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")


async def load(url: str, clients: int, seconds: float, offset: int, k: int = 10) -> dict:
    """Closed loop: ``clients`` tasks, each with one request in flight, for ``seconds``."""
    import httpx

    latencies: list[float] = []
    encode_ms: list[float] = []  # the server's own encode time (queue wait + forward pass) per request
    errors = 0
    counter = offset
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        for i in range(min(clients, 8)):  # warm-up, not counted
            await http.post("/v1/search", json={"text": query_text(offset - 1 - i), "k": k})
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal counter, errors
            while time.perf_counter() < stop:
                counter += 1
                t0 = time.perf_counter()
                r = await http.post("/v1/search", json={"text": query_text(counter), "k": k})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    encode_ms.append(r.json()["timings_ms"]["encode"])
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "qps": len(lat) / elapsed,
            "p50_ms": percentile_ms(lat, 0.50), "p95_ms": percentile_ms(lat, 0.95), "p99_ms": percentile_ms(lat, 0.99),
            "server_encode_p50_ms": statistics.median(encode_ms) if encode_ms else float("nan")}


async def cache_figures(url: str, repeats: int = 30) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        miss, hit = [], []
        for i in range(repeats):
            text = query_text(50_000_000 + i)
            t0 = time.perf_counter()
            await http.post("/v1/search", json={"text": text})
            miss.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await http.post("/v1/search", json={"text": text})
            hit.append(time.perf_counter() - t0)
    return {"miss_p50_ms": statistics.median(miss) * 1e3, "hit_p50_ms": statistics.median(hit) * 1e3}


def bench(arch: str, points: int, clients: list[int], seconds: float, wait_ms: float, max_batch: int,
          threads: int) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    model = make_model(arch, WORK / f"model-{arch}")
    root, name = WORK / "indexes", f"bench-{arch.lower()}"
    t0 = time.perf_counter()
    gen = make_index(model, root, name, points)
    index_s = time.perf_counter() - t0
    enc = encoder_figures(model)
    runs = []
    offset = 1_000_000
    for batching, (mb, wait) in (("on", (max_batch, wait_ms)), ("off", (1, 0.0))):
        # the cache is on only in the batching-on server; load queries are all distinct, so it never hits there
        with server(model, root, name, max_batch=mb, wait_ms=wait, cache=4096 if batching == "on" else 0,
                    threads=threads) as url:
            for c in clients:
                offset += 1_000_000
                row = asyncio.run(load(url, c, seconds, offset))
                row.update(batching=batching)
                runs.append(row)
                print(f"  {arch:<9} batching {batching:<3} clients {c:>3}: {row['qps']:8.1f} q/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  errors {row['errors']}", flush=True)
            if batching == "on":
                cache = asyncio.run(cache_figures(url))
    return {"arch": arch, "points": points, "generation": gen, "index_prepare_s": index_s, "encoder": enc,
            "load": runs, "cache": cache, "batch_max_size": max_batch, "batch_max_wait_ms": wait_ms}


def report(results: list[dict]) -> None:
    print()
    print(f"{'arch':<9} {'batching':<8} {'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for r in results:
        for row in r["load"]:
            print(f"{r['arch']:<9} {row['batching']:<8} {row['clients']:>7} {row['qps']:>8.1f} {row['p50_ms']:>8.1f} "
                  f"{row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['errors']:>6}")
    print()
    for r in results:
        e, load_rows = r["encoder"], {(x["batching"], x["clients"]): x for x in r["load"]}
        top = max(x["clients"] for x in r["load"])
        on, off = load_rows[("on", top)], load_rows[("off", top)]
        one = load_rows.get(("on", 1))
        print(f"{r['arch']}: {r['points']} points; naive 1-query padded to {e['context_length']} tokens "
              f"{e['naive_one_query_ms']:.1f} ms = {e['naive_qps']:.1f} q/s; trimmed 1 query {e['trimmed_one_query_ms']:.1f} ms")
        print(f"  batching on/off at {top} clients: {on['qps'] / off['qps']:.2f}x;  service at {top} clients / naive: "
              f"{on['qps'] / e['naive_qps']:.2f}x")
        if one:
            print(f"  1 client: p50 latency {one['p50_ms']:.1f} ms, of which the server's encode p50 "
                  f"{one['server_encode_p50_ms']:.1f} ms (+{one['p50_ms'] - one['server_encode_p50_ms']:.1f} ms for "
                  f"HTTP, search and JSON); in-process trimmed encode {e['trimmed_one_query_ms']:.1f} ms")
        print(f"  text trim, batch {e['batch']}: padded {e['padded_batch_ms']:.1f} ms, trimmed {e['trimmed_batch_ms']:.1f} ms "
              f"= {e['trim_speedup']:.2f}x (max |diff| {e['trim_max_abs_diff']:.1e})")
        print(f"  cache: miss p50 {r['cache']['miss_p50_ms']:.1f} ms, hit p50 {r['cache']['hit_p50_ms']:.1f} ms")
        for kind in ("bf16", "int8"):
            p = e[kind]
            if "error" in p:
                print(f"  {kind}: unavailable ({p['error']})")
            else:
                print(f"  {kind}: {p['speedup']:.2f}x, max |diff| {p['max_abs_diff']:.3g}, max d0 diff {p['max_d0_diff']:.3g}, "
                      f"unsafe flags agree {p['unsafe_flag_agreement']:.3f}, top-5 overlap {p['top5_overlap']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["tiny", "ViT-B-32"])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=2.0)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads, here and in the server (on a shared machine 1 is faster and steadier: "
                         "OpenMP threads spin while a sibling is descheduled)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    results = [bench(a, args.points, args.clients, args.seconds, args.wait_ms, args.max_batch, args.torch_threads)
               for a in args.archs]
    report(results)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "loadavg_at_end": os.getloadavg()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2) + "\n")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
