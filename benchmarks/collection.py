"""A live collection under load (issue 23): add latency, batched adds, search beside writes, a takedown storm.

The server is the real ``safe-retrieval serve`` (uvicorn, one worker, 2 cores) with the demo model's architecture
(``tiny``, random init, calibrated as in ``service_load.py``) over an embedded Qdrant Edge index of a gallery of
small synthetic PNG images (random pixels; synthetic, so nothing here measures retrieval quality). Measured in one
run:

- **add latency**: one client uploading fresh images one after another (``POST /v1/items/upload``), p50/p99 of
  the 201; and the time until the item is found by a search (a "more like this" search for its id, rank 1);
- **batched adds**: 8 clients uploading at once (the batcher embeds concurrent uploads together): adds per second;
- **search beside writes**: 16 search clients for ``--seconds``, alone, then with 10 adds/s and 1 takedown/s
  beside them; p50/p99 of each and their ratio;
- **a takedown storm**: 1,000 takedowns (and adds) while a reindex job rebuilds the gallery; after its commit,
  how many taken-down items are still found (must be 0) and how many adds were kept (must be all), counted.

    .venv/bin/python benchmarks/collection.py [--gallery 4000] [--seconds 20] [--storm 1000]

With ``--backend server-local`` the same writes go through the Qdrant-server backend's calls, on qdrant-client's
local mode (``QdrantClient(":memory:")``; no Qdrant server runs here), in this process and without HTTP: the
collection's own add and takedown (one at a time, timed), and the storm: takedowns and adds on the served
collection while a build of a new generation runs in another thread, then the commit's replay onto it.

Prints a table and writes benchmarks/results/collection.json (``collection-server-local.json`` for the second
backend), with the load average at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from service_load import load, make_model, percentile_ms, server  # the same server runner and search load

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "collection.json"
WORK = ROOT / "runs" / "bench-collection"
ADMIN, MODERATOR = "bench-admin-token", "bench-moderator-token"
NAME = "live"


def png(seed: int, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_gallery(folder: Path, n: int) -> Path:
    """``n`` PNG files of random pixels (seeds 0..n-1), written once."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{i:06d}.png"
        if not path.exists():
            path.write_bytes(png(i))
    return folder


def headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def upload(http, seed: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = await http.post("/v1/items/upload", files={"image": ("x.png", png(seed), "image/png")},
                        data={"caption": f"added {seed}"}, headers=headers(ADMIN))
    if r.status_code != 201:
        raise RuntimeError(f"upload {seed}: {r.status_code} {r.text[:200]}")
    return time.perf_counter() - t0, r.json()


async def found(http, item_id: str) -> bool:
    r = await http.post("/v1/search", json={"item_id": item_id, "safety": "off", "k": 1}, headers=headers(MODERATOR))
    return r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [item_id]


async def add_latency(url: str, n: int, seed0: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for i in range(5):  # warm-up
            await upload(http, seed0 - 1 - i)
        lat, visible = [], []
        for i in range(n):
            t0 = time.perf_counter()
            took, body = await upload(http, seed0 + i)
            lat.append(took)
            while not await found(http, body["id"]):
                if time.perf_counter() - t0 > 5:
                    raise RuntimeError(f"item {body['id']} not searchable 5 s after its add")
            visible.append(time.perf_counter() - t0)
    lat.sort()
    visible.sort()
    return {"adds": n, "p50_ms": percentile_ms(lat, 0.5), "p99_ms": percentile_ms(lat, 0.99),
            "searchable_p50_ms": percentile_ms(visible, 0.5), "searchable_max_ms": visible[-1] * 1e3}


async def batched_adds(url: str, clients: int, seconds: float, seed0: int) -> dict:
    import httpx

    done = 0
    counter = seed0
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done, counter
            while time.perf_counter() < stop:
                counter += 1
                await upload(http, counter)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "adds": done, "adds_per_s": done / elapsed}


async def writes_beside(url: str, seconds: float, victims: list[str], seed0: int, adds_per_s: float = 10,
                        takedowns_per_s: float = 1) -> dict:
    """Adds and takedowns at fixed rates for ``seconds`` (open loop: one every 1/rate s, each on its own task)."""
    import httpx

    took: dict[str, list[float]] = {"add": [], "takedown": []}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def one_add(i: int) -> None:
            took["add"].append((await upload(http, seed0 + i))[0])

        async def one_takedown(pid: str) -> None:
            t0 = time.perf_counter()
            r = await http.request("DELETE", f"/v1/items/{pid}", json={"reason": "benchmark"}, headers=headers(MODERATOR))
            if r.status_code != 200:
                raise RuntimeError(f"takedown {pid}: {r.status_code} {r.text[:200]}")
            took["takedown"].append(time.perf_counter() - t0)

        tasks = []
        t0 = time.perf_counter()
        n_add = n_down = 0
        while (now := time.perf_counter() - t0) < seconds:
            if n_add <= now * adds_per_s:
                tasks.append(asyncio.create_task(one_add(n_add)))
                n_add += 1
            if n_down <= now * takedowns_per_s and n_down < len(victims):
                tasks.append(asyncio.create_task(one_takedown(victims[n_down])))
                n_down += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
    return {kind: {"n": len(v), "p50_ms": percentile_ms(sorted(v), 0.5), "p99_ms": percentile_ms(sorted(v), 0.99)}
            for kind, v in took.items()}


async def search_with_and_without_writes(url: str, seconds: float, victims: list[str], seed0: int) -> dict:
    alone = await load(url, 16, seconds, offset=70_000_000)
    loaded, writes = await asyncio.gather(load(url, 16, seconds, offset=80_000_000),
                                          writes_beside(url, seconds, victims, seed0))
    return {"alone": alone, "with_writes": loaded, "writes": writes,
            "p50_ratio": loaded["p50_ms"] / alone["p50_ms"], "p99_ratio": loaded["p99_ms"] / alone["p99_ms"],
            "qps_ratio": loaded["qps"] / alone["qps"]}


async def storm(url: str, gallery: Path, victims: list[str], seed0: int, adds: int) -> dict:
    """Takedowns of ``victims`` and ``adds`` uploads while a reindex of the gallery runs; then count."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=16)) as http:
        r = await http.post("/v1/admin/reindex", json={"source": {"images": str(gallery)}}, headers=headers(ADMIN))
        if r.status_code != 202:
            raise RuntimeError(f"reindex: {r.status_code} {r.text[:300]}")
        job = r.json()["id"]
        sem = asyncio.Semaphore(8)
        t0 = time.perf_counter()

        async def take(pid: str) -> None:
            async with sem:
                r = await http.request("DELETE", f"/v1/items/{pid}", json={"reason": "storm"},
                                       headers=headers(MODERATOR))
                if r.status_code != 200:
                    raise RuntimeError(f"takedown {pid}: {r.status_code} {r.text[:200]}")

        async def add(i: int) -> str:
            async with sem:
                return (await upload(http, seed0 + i))[1]["id"]

        results = await asyncio.gather(*(take(p) for p in victims), *(add(i) for i in range(adds)))
        writes_s = time.perf_counter() - t0
        added = [r for r in results if isinstance(r, str)]
        status = (await http.get(f"/v1/admin/jobs/{job}", headers=headers(ADMIN))).json()
        running_after_writes = status["status"] == "running"
        while status["status"] in ("queued", "running"):
            await asyncio.sleep(1)
            status = (await http.get(f"/v1/admin/jobs/{job}", headers=headers(ADMIN))).json()
        if status["status"] != "succeeded":
            raise RuntimeError(f"the reindex job ended {status['status']}: {status.get('error')}")
        returned = [p for p in victims if (await http.get(f"/v1/items/{p}", headers=headers(MODERATOR))).status_code != 404]
        kept = [p for p in added if (await http.get(f"/v1/items/{p}", headers=headers(MODERATOR))).status_code == 200]
    return {"takedowns": len(victims), "adds": len(added), "writes_s": writes_s,
            "job_still_running_after_writes": running_after_writes, "job_s": _job_seconds(status),
            "taken_down_still_found": len(returned), "adds_kept": len(kept)}


def _job_seconds(job: dict) -> float | None:
    from datetime import datetime

    try:
        return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def gallery_ids(gallery: Path, n: int) -> list[str]:
    """The ids of the gallery's first ``n`` images (content ids, as the index has them)."""
    from indexer.store import content_id

    return [content_id(p.read_bytes()) for p in sorted(gallery.glob("*.png"))[:n]]


def server_local(model: Path, gallery: Path, media: Path, run: Path, *, adds: int, storm: int) -> dict:
    """The writes and the storm through the server backend's calls on qdrant-client's local mode."""
    import threading

    import torch
    from qdrant_client import QdrantClient

    from indexer import builder, sources
    from indexer.index import open_index
    from indexer.server_store import ServerGenerations
    from indexer.sources import Item
    from indexer.store import content_id
    from service.collection import Collection
    from service.settings import Settings
    from service.state import ServedPair
    from training import artifact
    from training.images import preprocess_bytes

    art = artifact.load(model, device="cpu")
    client = QdrantClient(":memory:")
    gens = ServerGenerations(NAME, client, run / "jobs")
    items = sources.folder_items(gallery)
    t0 = time.perf_counter()
    first = builder.build(gens, art, items, media_root=media, workers=1, progress=False).generation
    build_s = time.perf_counter() - t0

    def serve(gen: str) -> ServedPair:
        index = open_index(NAME, client=client, generation=gen)
        return ServedPair(artifact=art, index=index, info=dict(index.info), model_path=model)

    served = [serve(first)]
    settings = Settings(state_dir=run / "state", media_root=media, upload_dir=media / f"uploads-{run.name}")
    lock = threading.Lock()
    collection = Collection(settings, lock, lambda: served[-1])

    def add(seed: int) -> tuple[float, str]:
        data = png(seed)
        t = time.perf_counter()
        with torch.no_grad():
            x = art.encoder.encode_image(preprocess_bytes(data, art.encoder.transform)[None])[0]
        pid = content_id(data)
        collection.add(pid, Item(kind="image", caption=f"added {seed}"), x, art.fingerprint, by="admin", data=data)
        return time.perf_counter() - t, pid

    add_s = sorted(add(50_000_000 + i)[0] for i in range(adds))
    ids = gallery_ids(gallery, storm + 20)
    down_s = []
    for pid in ids[:20]:
        t = time.perf_counter()
        collection.take_down(pid, reason="benchmark", by="moderator", purge=False)
        down_s.append(time.perf_counter() - t)
    down_s.sort()
    # the storm: a new generation built in another thread (what a reindex job's step does) while writes go on
    victims, staged_gen = ids[20:20 + storm], []
    builder_thread = threading.Thread(target=lambda: staged_gen.append(builder.build(
        gens, art, items, media_root=media, workers=0, progress=False, switch=False,
        blocked=frozenset(collection.journal.takedowns)).generation))
    t0 = time.perf_counter()
    builder_thread.start()
    added = []
    for i, pid in enumerate(victims):
        collection.take_down(pid, reason="storm", by="moderator", purge=False)
        if i % 10 == 0:
            added.append(add(60_000_000 + i)[1])
    writes_s = time.perf_counter() - t0
    still_building = builder_thread.is_alive()
    builder_thread.join()
    staged = serve(staged_gen[0])
    with lock:  # the commit: replay onto the staged generation, then serve it
        replayed = collection.replay(staged)
        gens.switch(staged_gen[0])
        served.append(staged)
    index = served[-1].index
    return {"backend": "qdrant-client local mode", "gallery": len(items), "build_s": build_s,
            "add": {"n": adds, "p50_ms": percentile_ms(add_s, 0.5), "p99_ms": percentile_ms(add_s, 0.99)},
            "takedown": {"n": len(down_s), "p50_ms": percentile_ms(down_s, 0.5), "p99_ms": percentile_ms(down_s, 0.99)},
            "storm": {"takedowns": len(victims), "adds": len(added), "writes_s": writes_s,
                      "build_still_running_after_writes": still_building, "replayed": {
                          k: v for k, v in replayed.items() if k != "missing"},
                      "taken_down_still_found": sum(index.retrieve(p) is not None for p in victims + ids[:20]),
                      "adds_kept": sum(index.retrieve(p) is not None for p in added)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gallery", type=int, default=4000, help="Images in the gallery (at least --storm + 200).")
    ap.add_argument("--seconds", type=float, default=20.0, help="Seconds of each search load.")
    ap.add_argument("--adds", type=int, default=200, help="Sequential adds timed one by one.")
    ap.add_argument("--storm", type=int, default=1000, help="Takedowns during the reindex.")
    ap.add_argument("--backend", choices=["edge", "server-local"], default="edge",
                    help="edge: the real server over Qdrant Edge; server-local: the server backend's calls on "
                         "qdrant-client's local mode, in process.")
    args = ap.parse_args()
    if args.gallery < args.storm + 200:
        ap.error("--gallery must hold at least --storm + 200 images (each takedown takes a distinct one)")
    load_start = os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    model = make_model("tiny", WORK / "model-tiny")
    media = WORK / "media"
    gallery = make_gallery(media / "gallery", args.gallery)
    run = WORK / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir()
    if args.backend == "server-local":
        local = server_local(model, gallery, media, run, adds=args.adds, storm=args.storm)
        local["machine"] = {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
        print(json.dumps(local, indent=2))
        path = OUT.with_name("collection-server-local.json")
        path.write_text(json.dumps(local, indent=2) + "\n")
        print(f"wrote {path}")
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(media / f"uploads-{run.name}", ignore_errors=True)
        return
    env = {"SAFE_RETRIEVAL_ADMIN_TOKEN": ADMIN, "SAFE_RETRIEVAL_MODERATOR_TOKEN": MODERATOR,
           "SAFE_RETRIEVAL_MEDIA_ROOT": str(media), "SAFE_RETRIEVAL_DATA_ROOTS": json.dumps([str(WORK)]),
           "SAFE_RETRIEVAL_UPLOAD_DIR": str(media / f"uploads-{run.name}")}
    from indexer import builder, sources
    from indexer.index import generations_for

    t0 = time.perf_counter()
    built = builder.build(generations_for(NAME, root=run / "indexes"), model, sources.folder_items(gallery),
                          media_root=media, workers=1, progress=False, device="cpu")
    build_s = time.perf_counter() - t0
    print(f"gallery of {built.points} images indexed in {build_s:.1f} s", flush=True)
    ids = gallery_ids(gallery, args.gallery)
    results: dict = {"gallery": built.points, "build_s": build_s}
    with server(model, run / "indexes", NAME, max_batch=32, wait_ms=5.0, cache=4096, threads=1, env_extra=env,
                work=run) as url:
        results["add_latency"] = asyncio.run(add_latency(url, args.adds, seed0=10_000_000))
        print("add latency:", results["add_latency"], flush=True)
        results["batched_adds"] = asyncio.run(batched_adds(url, 8, 10.0, seed0=20_000_000))
        print("batched adds:", results["batched_adds"], flush=True)
        results["search_beside_writes"] = asyncio.run(search_with_and_without_writes(
            url, args.seconds, ids[: int(args.seconds) + 5], seed0=30_000_000))
        s = results["search_beside_writes"]
        print(f"search alone p50 {s['alone']['p50_ms']:.1f} p99 {s['alone']['p99_ms']:.1f} ms; with writes p50 "
              f"{s['with_writes']['p50_ms']:.1f} p99 {s['with_writes']['p99_ms']:.1f} ms (x{s['p50_ratio']:.2f} / "
              f"x{s['p99_ratio']:.2f}); writes {s['writes']}", flush=True)
        storm_victims = ids[int(args.seconds) + 5: int(args.seconds) + 5 + args.storm]
        results["storm"] = asyncio.run(storm(url, gallery, storm_victims, seed0=40_000_000, adds=100))
        print("storm:", results["storm"], flush=True)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": load_start,
                          "loadavg_end": os.getloadavg(), "synthetic": True, "arch": "tiny"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(media / f"uploads-{run.name}", ignore_errors=True)


if __name__ == "__main__":
    main()
