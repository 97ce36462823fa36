"""Adversarial probes against a served index: what was tried, and what misbehaved, per category.

The server is the real ``safe-retrieval serve`` in its own process, serving a small HySAC-style
model (the ``tiny`` architecture fine-tuned for a few steps on the synthetic ViSU-style data, so its
bounds and thresholds are calibrated) and an embedded Qdrant Edge index of the synthetic test split.
All traffic stays on 127.0.0.1; every loop is bounded in count and time.

Categories (a probe *misbehaves* when the answer breaks a promise of the API, not merely when it is 4xx):

- ``fuzz``: schemathesis over every operation of /openapi.json, valid and invalid requests, with no
  token, a wrong one, the moderator's and the admin's (path-like strings in every job path field);
  plus generated images of any size, mode and format through the upload route. Misbehaves: a 5xx, a
  stack trace in the body, a status the schema does not document.
- ``bad_inputs``: hand-made bad requests (malformed JSON, wrong types, floats for ints, oversized and
  bomb-shaped images, bad base64, bad ids). Misbehaves: any status other than the expected 4xx.
- ``access``: admin routes with no, wrong and moderator tokens, bad bodies without a token (must be
  401, not 422), privileged search without the moderator token, and path probes in every job field
  (``..``, outside absolute paths, over-long components, symlink loops, symlinks out of the roots).
  Misbehaves: anything but the refusal (401/403/400), or a job that starts.
- ``leakage``: ordinary callers asking with unsafe captions, unsafe images and unsafe items' ids in
  every safety mode, plus item and media fetches of unsafe items. Misbehaves: a result whose id a
  moderator's ``safety=off`` sweep shows to be unsafe, or an unsafe item's payload or file served.
- ``audit``: privileged requests of two named moderators and ordinary requests. Misbehaves: a
  privileged request without exactly one audit record naming its unsafe ids, or an ordinary request
  with one.
- ``load_swaps``: closed-loop clients searching while the admin API reloads and reindexes (swaps).
  Misbehaves: a request that does not answer 200.
- ``faults``: ``kill -9`` of an ``index build`` then a re-run (no duplicates, nothing switched while it
  was dead), and jobs cancelled at every stage (before, while and after staging). Misbehaves: a
  duplicate point, a changed served pair after a job that did not succeed, a stale pair after one that did.

The second pass (issue 20) adds:

- ``burst``: forty valid 6300 x 6300 RGB PNGs of zeros (116 kB each, inside the pixel and aspect limits)
  sent at once to the upload route while a client times text queries. Misbehaves: an answer other than
  200 or 503/429 with Retry-After, a dead server, a text query over 2 s. Records the server's RSS
  before, its peak (VmHWM, reset first) and after, and the text latency before and during.
- ``oracle``: unsafe items' ids against absent ids, as an ordinary caller, on the item, media and
  item-search routes. Misbehaves: a different status or body (but for the id), medians apart by 1.5x.
- ``jobs_files``: a 3 GB sparse ``huge.png`` under a data root (the CLI's peak RSS, its recorded
  failure, the same through a reindex job); seventy concurrent forget submissions while a job runs
  (each a 409 within 2 s); twelve reindex jobs cancelled 0-2.75 s after submission, then one that
  swaps (no generation directory without its record left behind).
- ``refused_starts``: a replica with ``RUN_JOBS=false`` and no ``AUDIT_DIR``; moderator token files of
  modes 0620, 0660, 0644, 0602, and 0640 owned by an ordinary user. Misbehaves: a server that starts,
  a message that does not say what to do, a token in the message.
- ``audit_faults`` (root: mounts a tmpfs): a server whose ``AUDIT_DIR`` is a 4 MiB tmpfs, filled to the
  last byte and freed (503 while full, 200 once freed, a job submission while full creates no job,
  no half line); moderator requests rejected before their route (malformed JSON, float ``k``, 413,
  broken multipart, bad id, an admin bad body): one record each; ``X-Forwarded-For`` from a caller
  that is no configured proxy; out-of-range and numeric ``since``/``until`` and a float ``limit``.

    .venv/bin/python benchmarks/probes.py [--fuzz-examples 25] [--leakage 600] [--load-seconds 20]

Prints the table and writes benchmarks/results/probes.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "probes.json"
WORK = ROOT / "runs" / "bench-probes"
CLI = str(Path(sys.executable).parent / "safe-retrieval")
ADMIN, MOD_A, MOD_B = "probe-admin-token", "probe-moderator-alice", "probe-moderator-bob"
NO_TRACE = ("Traceback", 'File "', "MemoryError", "OverflowError")


# ------------------------------------------------------------------ tallies
class Tally:
    """Per-category counts of probes tried and misbehaved, with the first few misbehaviours kept."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def add(self, category: str, ok: bool, what: str = "") -> None:
        with self.lock:
            row = self.rows.setdefault(category, {"tried": 0, "misbehaved": 0, "examples": []})
            row["tried"] += 1
            if not ok:
                row["misbehaved"] += 1
                if len(row["examples"]) < 8:
                    row["examples"].append(what[:300])


def traced(response: httpx.Response) -> bool:
    return any(marker in response.text for marker in NO_TRACE)


# ------------------------------------------------------------------ setup: data, model, index, server
def cli(*args: Any, env: dict[str, str] | None = None, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise SystemExit(f"safe-retrieval {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def prepare(work: Path, *, steps: int) -> dict[str, Path]:
    """Synthetic data, a briefly fine-tuned tiny HySAC model, and its index (cached in ``work``)."""
    data, init, model, indexes = work / "data", work / "init", work / "model", work / "indexes"
    if not (data / "dataset.json").exists():
        cli("data", "synth", "--out", data, "--n", 160, "--seed", 3, "--unsafe-look", "generated")
    if not (init / "config.json").exists():
        cli("model", "init", "--arch", "tiny", "--geometry", "lorentz", "--out", init)
    if not (model / "config.json").exists():
        cli("train", "--method", "hysac", "--model", init, "--data", data, "--out", model, "--max-steps", steps,
            "--batch-size", 16, "--seed", 0)
    if not (indexes / "gallery" / "CURRENT").exists():
        cli("index", "build", "--model", model, "--name", "gallery", "--visu", data, "--split", "test",
            "--captions-as-text", "--media-root", data, "--root", indexes, "--no-progress")
    return {"data": data, "model": model, "indexes": indexes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``safe-retrieval serve`` as a child process on a free loopback port."""

    def __init__(self, work: Path, paths: dict[str, Path], *, name: str = "state", env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = work / name
        shutil.rmtree(self.state, ignore_errors=True)
        self.env = {
            **os.environ,
            "SAFE_RETRIEVAL_MODEL": str(paths["model"]), "SAFE_RETRIEVAL_INDEX": "gallery",
            "SAFE_RETRIEVAL_INDEX_ROOT": str(paths["indexes"]), "SAFE_RETRIEVAL_MEDIA_ROOT": str(paths["data"]),
            "SAFE_RETRIEVAL_STATE_DIR": str(self.state), "SAFE_RETRIEVAL_DATA_ROOTS": json.dumps([str(work / "roots")]),
            "SAFE_RETRIEVAL_ADMIN_TOKEN": ADMIN,
            "SAFE_RETRIEVAL_MODERATOR_TOKENS": json.dumps({"alice": MOD_A, "bob": MOD_B}),
            "SAFE_RETRIEVAL_PORT": str(self.port), "SAFE_RETRIEVAL_DEVICE": "cpu", "SAFE_RETRIEVAL_STORE_RETRY_S": "0.5",
            "SAFE_RETRIEVAL_JOB_CANCEL_GRACE_S": "5", **(env or {}),
        }
        self.log = (work / f"server-{name}.log").open("ab")
        self.proc = subprocess.Popen([CLI, "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready; see {self.log.name}")
            time.sleep(0.3)

    def client(self, token: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def wait_job(self, job_id: str, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client(ADMIN) as c:
            while True:
                job = c.get(f"/v1/admin/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                    return job
                time.sleep(0.3)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# ------------------------------------------------------------------ the categories
def fuzz(server: Server, tally: Tally, examples: int) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    for token in (None, "wrong-token", MOD_A, ADMIN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for op in operations:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                # one() runs to the end right below, inside this iteration: headers and token are the current ones
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def one(case) -> None:
                    try:
                        response = case.call(headers=headers, timeout=60)  # noqa: B023
                    except (OverflowError, ValueError, UnicodeError) as e:  # the client could not even send it
                        tally.add("fuzz_unsendable", True, f"{case.method} {case.formatted_path}: {e}")
                        return
                    try:
                        case.validate_response(response, checks=[not_a_server_error])
                        documented = str(response.status_code) in (case.operation.definition.raw.get("responses") or {})
                        ok = not traced(response) and (documented or response.status_code in (404, 405, 413, 422))
                    except Exception:  # noqa: BLE001 - a failed check is a misbehaviour to count
                        ok = False
                    tally.add("fuzz", ok, f"{case.method} {case.formatted_path} token={bool(token)} -> "  # noqa: B023
                                          f"{response.status_code} {response.text[:150]}")

                try:
                    one()
                except Unsatisfiable:
                    pass
    _cancel_jobs(server)  # a valid generated retrain may have started one
    images = _fuzz_images(examples * 8)
    with server.client() as c:
        for data in images:
            r = c.post("/v1/search/upload", files={"image": ("q.bin", data, "application/octet-stream")})
            tally.add("fuzz", r.status_code in (200, 400) and not traced(r), f"image upload -> {r.status_code} {r.text[:150]}")


def _fuzz_images(n: int) -> list[bytes]:
    """``n`` generated images of random sizes (up to 400,000-pixel strips), modes and formats, some truncated."""
    import random

    from PIL import Image

    rng = random.Random(12)
    out: list[bytes] = []
    modes = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK", "YCbCr"]
    formats = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
    while len(out) < n:
        w = rng.choice([1, 2, 7, 64, 300, 4000, 200_000, 400_000])
        h = max(1, min(rng.choice([1, 3, 64, 500, 300_000]), 2_000_000 // w))
        buf = io.BytesIO()
        try:
            Image.new(rng.choice(modes), (w, h), color=rng.randrange(256)).save(buf, rng.choice(formats))
        except (OSError, ValueError, KeyError, TypeError, OverflowError):  # PIL cannot write it: nothing to send
            continue
        data = buf.getvalue()
        out.append(data[: rng.randrange(1, len(data))] if rng.random() < 0.3 else data)
    return out


def _png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def bad_inputs(server: Server, tally: Tally) -> None:
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    cases: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = [
        ("POST", "/v1/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, (400, 422)),
        ("POST", "/v1/search", {"json": {}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": ""}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "   "}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "image": "AAAA"}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "k": 67.0}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "k": "5"}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "k": 0}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "k": 10**12}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "offset": -1}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "safety": "none"}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "target": "video"}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "x" * 100_000}}, (422,)),
        ("POST", "/v1/search", {"json": {"text": "a", "unknown": 1}}, (422,)),
        ("POST", "/v1/search", {"json": {"image": "not base64!!"}}, (400,)),
        ("POST", "/v1/search", {"json": {"image": "data:image/png,abc"}}, (400,)),
        ("POST", "/v1/search", {"json": {"image": b64(b"GIF89a")}}, (400,)),
        ("POST", "/v1/search", {"json": {"image": b64(_png((200_000, 1)))}}, (400,)),
        ("POST", "/v1/search", {"json": {"image": b64(_png((1, 1_000_000)))}}, (400,)),
        ("POST", "/v1/search", {"json": {"image": b64(_png((7000, 7000)))}}, (400,)),
        ("POST", "/v1/search", {"json": {"item_id": "not-a-uuid"}}, (404, 422)),
        ("POST", "/v1/search", {"json": {"item_id": "00000000-0000-0000-0000-000000000000"}}, (404,)),
        ("POST", "/v1/search", {"json": {"text": "a", "filter": {"tags": ["x"] * 10_000}}}, (422,)),
        ("POST", "/v1/search", {"content": b"x" * (11 * 2**20), "headers": {"content-type": "application/json"}}, (413,)),
        ("POST", "/v1/search/upload", {"files": {"image": ("a.png", _png((40_000_000, 1)), "image/png")}}, (400,)),
        ("POST", "/v1/search/upload", {"files": {"image": ("a.png", b"", "image/png")}}, (400, 422)),
        ("POST", "/v1/search/upload", {"data": {"k": "3"}}, (422,)),
        ("POST", "/v1/search/upload", {"files": {"image": ("a.png", _png((8, 8)), "image/png")}, "data": {"k": "1.5"}}, (422,)),
        ("POST", "/v1/embed", {"json": {"image": b64(_png((1_000_000, 1)))}}, (400,)),
        ("POST", "/v1/embed", {"json": {}}, (422,)),
        ("GET", "/v1/items/not-a-uuid", {}, (404, 422)),
        ("GET", "/v1/items/00000000-0000-0000-0000-000000000000", {}, (404,)),
        ("GET", "/v1/media/..%2F..%2Fetc%2Fpasswd", {}, (404, 422)),
        ("GET", "/v1/media/00000000-0000-0000-0000-000000000000", {}, (404,)),
        ("POST", "/v1/search", {"content": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}}, (400, 422)),
        ("POST", "/v1/search", {"content": b'{"text": "a"}', "headers": {"content-type": "text/plain"}}, (400, 415, 422)),
    ]
    with server.client() as c:
        for method, path, kwargs, expected in cases:
            r = c.request(method, path, **kwargs)
            tally.add("bad_inputs", r.status_code in expected and not traced(r),
                      f"{method} {path} {str(kwargs)[:80]} -> {r.status_code} {r.text[:150]}")


def access(server: Server, tally: Tally, work: Path) -> None:
    roots = work / "roots"
    inside = roots / "inside"
    shutil.rmtree(roots, ignore_errors=True)
    inside.mkdir(parents=True)
    (roots / "loop").symlink_to(roots / "loop")
    (roots / "out").symlink_to("/etc")
    (inside / "data.jsonl").write_text(json.dumps({"image": "/etc/hostname"}) + "\n")
    admin_routes = [("POST", "/v1/admin/reindex", {"json": {"source": {"images": "inside"}}}),
                    ("POST", "/v1/admin/retrain", {"json": {"data": "inside"}}),
                    ("GET", "/v1/admin/jobs", {}), ("GET", "/v1/admin/jobs/x", {}),
                    ("POST", "/v1/admin/jobs/x/cancel", {}), ("POST", "/v1/admin/reload", {}),
                    ("GET", "/v1/admin/audit", {})]
    for token in (None, "wrong", MOD_A, ADMIN + "x", ADMIN[:-1]):
        with server.client(token) as c:
            for method, path, kwargs in admin_routes:
                r = c.request(method, path, **kwargs)
                tally.add("access", r.status_code == 401, f"{method} {path} token={token!r} -> {r.status_code}")
            for body in (b"{not json", b'{"source": 5}', b"[]"):  # authenticate before validating the body
                r = c.post("/v1/admin/reindex", content=body, headers={"content-type": "application/json"})
                tally.add("access", r.status_code == 401, f"bad body token={token!r} -> {r.status_code}")
    for token in (None, "wrong"):
        with server.client(token) as c:
            r = c.post("/v1/search", json={"text": "a knife", "safety": "off"})
            tally.add("access", r.status_code == 401, f"safety=off token={token!r} -> {r.status_code}")
    long = "a" * 300
    probes = ["../", "../../etc", "/etc", "/", "inside/../../etc", long, f"inside/{long}", "loop", "loop/x", "out",
              "out/hostname", "\x00", "inside\x00/x", "~", "//etc", str(roots.parent)]
    fields: list[tuple[str, Callable[[str], dict]]] = [
        ("source.images", lambda p: {"source": {"images": p}}),
        ("source.manifest", lambda p: {"source": {"manifest": p}}),
        ("source.visu", lambda p: {"source": {"visu": p}}),
        ("source.texts", lambda p: {"source": {"images": "inside", "texts": p}}),
        ("source.media_root", lambda p: {"source": {"images": "inside", "media_root": p}}),
    ]
    with server.client(ADMIN) as c:
        for name, body in fields:
            for p in probes:
                r = c.post("/v1/admin/reindex", json=body(p))
                tally.add("access", r.status_code in (400, 422) and not traced(r),
                          f"reindex {name}={p[:40]!r} -> {r.status_code} {r.text[:120]}")
                if r.status_code == 202:
                    _cancel_jobs(server)
        for p in probes:
            r = c.post("/v1/admin/retrain", json={"data": p})
            tally.add("access", r.status_code in (400, 422) and not traced(r),
                      f"retrain data={p[:40]!r} -> {r.status_code} {r.text[:120]}")
            if r.status_code == 202:
                _cancel_jobs(server)
        # a manifest inside the roots whose row points outside: the job may run, but must not index the file
        r = c.post("/v1/admin/reindex", json={"name": "probe-outside", "source": {"manifest": "inside/data.jsonl"}})
        leaked = False
        if r.status_code == 202:
            job = server.wait_job(r.json()["id"])
            with server.client(MOD_A) as m:
                found = m.post("/v1/search", json={"text": "a", "safety": "off", "k": 100}).json().get("results", [])
            leaked = job["status"] == "succeeded" and any("/etc" in (h.get("uri") or "") for h in found)
        tally.add("access", not leaked, f"manifest row outside the roots -> job {r.status_code}")


def _cancel_jobs(server: Server) -> None:
    with server.client(ADMIN) as c:
        for job in c.get("/v1/admin/jobs").json().get("jobs", []):
            if job["status"] in ("queued", "running"):
                c.post(f"/v1/admin/jobs/{job['id']}/cancel", timeout=120)


def _unsafe_ids(server: Server) -> set[str]:
    """Every indexed item flagged unsafe, by a moderator's safety=off sweep over image and text targets."""
    with server.client(MOD_A) as c:
        ids = set()
        for target in ("image", "text"):
            for q in ("a", "graphic violence", "a knife", "a person"):
                for offset in range(0, 1000, 100):
                    r = c.post("/v1/search", json={"text": q, "safety": "off", "target": target, "k": 100,
                                                   "offset": offset})
                    r.raise_for_status()
                    ids |= {h["id"] for h in r.json()["results"] if h.get("unsafe")}
    return ids


def leakage(server: Server, tally: Tally, data: Path, n: int) -> None:
    from training.data import visu

    unsafe = _unsafe_ids(server)
    records = visu.load_split(data, "test").records + visu.load_split(data, "train").records
    queries: list[dict[str, Any]] = []
    for i in range(n):
        r = records[i % len(records)]
        mode = ("strict", "traverse", "filter")[i % 3]
        target = ("image", "text")[(i // 3) % 2]
        kind = i % 4
        if kind == 0:
            q: dict[str, Any] = {"text": r.nsfw}
        elif kind == 1:
            q = {"image": base64.b64encode(Path(r.nsfw_image).read_bytes()).decode()}
        elif kind == 2 and unsafe:
            q = {"item_id": sorted(unsafe)[i % len(unsafe)]}
        else:
            q = {"text": f"graphic {r.nsfw}"}
        queries.append({**q, "safety": mode, "target": target, "k": 20})

    def ask(body: dict[str, Any]) -> None:
        with server.client() as c:
            resp = c.post("/v1/search", json=body)
        got = {h["id"] for h in resp.json().get("results", [])} if resp.status_code == 200 else set()
        flagged = [h["id"] for h in resp.json().get("results", []) if h.get("unsafe")] if resp.status_code == 200 else []
        expected = 404 if "item_id" in body else 200  # an unsafe item does not exist for an ordinary caller
        tally.add("leakage", resp.status_code == expected and not (got & unsafe) and not flagged,
                  f"{str(body)[:80]} -> {resp.status_code} leaked {sorted(got & unsafe)[:3]}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, queries))
    with server.client() as c:
        for item in sorted(unsafe)[:50]:
            for path in (f"/v1/items/{item}", f"/v1/media/{item}"):
                r = c.get(path)  # an unsafe item looks exactly like an absent one (the oracle category times it)
                tally.add("leakage", r.status_code == 404, f"GET {path} -> {r.status_code}")
    tally.rows.setdefault("leakage", {}).setdefault("unsafe_items_in_index", len(unsafe))


def audit(server: Server, tally: Tally) -> None:
    def records() -> list[dict[str, Any]]:
        with server.client(ADMIN) as c:
            r = c.get("/v1/admin/audit", params={"limit": 10_000})
        return r.json().get("records", []) if r.status_code == 200 else []

    before = len(records())
    asked = []
    for i, (token, name) in enumerate([(MOD_A, "alice"), (MOD_B, "bob")] * 10):
        with server.client(token) as c:
            r = c.post("/v1/search", json={"text": f"graphic a knife number {i}", "safety": "off", "k": 50})
        asked.append((name, f"graphic a knife number {i}", r.json()))
    with server.client() as c:
        for i in range(20):
            c.post("/v1/search", json={"text": f"an ordinary query {i}"})
    after = records()[before:]
    tally.add("audit", len(after) == len(asked), f"{len(after)} records for {len(asked)} privileged requests")
    for name, text, response in asked:
        unsafe = sorted(h["id"] for h in response.get("results", []) if h.get("unsafe"))
        found = [r for r in after if r.get("token") == name and (r.get("query") or {}).get("text") == text
                 and sorted(r.get("unsafe_ids") or []) == unsafe]
        tally.add("audit", len(found) == 1, f"{name} {text!r}: {len(found)} records with its unsafe ids {unsafe[:3]}")
    tally.add("audit", not any("ordinary" in json.dumps(r.get("query")) for r in after), "an ordinary request was audited")


def load_swaps(server: Server, tally: Tally, seconds: float, clients: int, data: Path) -> None:
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        i = 0
        with server.client(timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post("/v1/search", json={"text": f"a red car on a street number {k}-{i}", "k": 10})
                tally.add("load_swaps", r.status_code == 200, f"search during swaps -> {r.status_code} {r.text[:120]}")
                i += 1

    roots = server.env["SAFE_RETRIEVAL_DATA_ROOTS"]
    target = Path(json.loads(roots)[0]) / "gallery-data"
    if not target.exists():
        shutil.copytree(data, target)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    swaps = 0
    with server.client(ADMIN, timeout=300) as c:
        r = c.post("/v1/admin/reindex", json={"source": {"visu": "gallery-data", "split": "test", "captions": True,
                                                          "media_root": "gallery-data"}})
        if r.status_code == 202:
            job = server.wait_job(r.json()["id"], timeout=max(30.0, stop - time.monotonic() + 120))
            swaps += job["status"] == "succeeded"
            tally.add("load_swaps", job["status"] == "succeeded", f"reindex under load -> {job['status']} {job.get('error')}")
        while time.monotonic() < stop:
            r = c.post("/v1/admin/reload")
            tally.add("load_swaps", r.status_code == 200, f"reload under load -> {r.status_code}")
            time.sleep(0.5)
    for t in threads:
        t.join()
    tally.rows["load_swaps"]["swaps"] = swaps


def faults(server: Server, tally: Tally, work: Path, paths: dict[str, Path]) -> None:
    # 1. kill -9 of a build, then the same build again: complete, no duplicates, the pointer moved once
    root = work / "fault-indexes"
    shutil.rmtree(root, ignore_errors=True)
    args = [CLI, "index", "build", "--model", paths["model"], "--name", "k9", "--visu", paths["data"], "--split", "train",
            "--captions-as-text", "--root", root, "--batch-size", 8, "--no-progress"]
    for delay in (4.0, 7.0):
        proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        tally.add("faults", not (root / "k9" / "CURRENT").exists() or proc.returncode == 0,
                  f"kill -9 after {delay}s: the pointer moved to a partial generation")
    cli(*args[1:])
    from indexer.index import open_index

    with open_index("k9", root=root) as idx:
        ids = list(idx.store.iter_ids())
        tally.add("faults", len(ids) == len(set(ids)) and idx.meta.get("state") == "complete",
                  f"resumed build: {len(ids)} points, {len(set(ids))} distinct")
    # 2. jobs cancelled at each stage leave the served pair as it was
    roots = Path(json.loads(server.env["SAFE_RETRIEVAL_DATA_ROOTS"])[0])
    target = roots / "gallery-data"
    if not target.exists():
        shutil.copytree(paths["data"], target)
    body = {"source": {"visu": "gallery-data", "split": "test", "captions": True, "media_root": "gallery-data"}}
    for delay in (0.0, 1.0, 3.0, 6.0, 10.0):
        with server.client(ADMIN, timeout=300) as c:
            served = c.get("/readyz").json()
            r = c.post("/v1/admin/reindex", json=body)
            if r.status_code != 202:
                tally.add("faults", False, f"reindex not accepted: {r.status_code} {r.text[:120]}")
                continue
            time.sleep(delay)
            job = c.post(f"/v1/admin/jobs/{r.json()['id']}/cancel").json()
            now = c.get("/readyz").json()
            restarted_pointer = (paths["indexes"] / "gallery" / "CURRENT").read_text().strip()
        same = now.get("index") == served.get("index")
        if job["status"] == "succeeded":
            ok = now.get("index", {}).get("generation") == restarted_pointer != served.get("index", {}).get("generation")
        else:
            ok = same and restarted_pointer == (served.get("index") or {}).get("generation")
        tally.add("faults", ok, f"cancel after {delay}s -> {job['status']}; served {served.get('index')} -> {now.get('index')}, "
                                f"pointer {restarted_pointer}")


# ------------------------------------------------------------------ the second pass (issue 20)
def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _mib(kb: int) -> float:
    return round(kb / 1024, 1)


def burst(server: Server, tally: Tally, n: int = 40, side: int = 6300) -> None:
    """``n`` valid side x side RGB PNGs of zeros (116 kB each, inside the pixel and aspect limits) sent at once
    to /v1/search/upload while one client times text queries: no death, bounded memory, 200 or 503 each."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG")
    png = buf.getvalue()
    pid = server.proc.pid
    cleared = True
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:
        cleared = False
    rss0 = _status_kb(pid, "VmRSS")
    done = threading.Event()
    text_ms: list[float] = []

    def texts() -> None:
        with server.client(timeout=120) as c:
            i = 0
            while not done.is_set():
                t = time.perf_counter()
                r = c.post("/v1/search", json={"text": f"a red car parked on a street {i}", "k": 10})
                text_ms.append((time.perf_counter() - t) * 1e3)
                tally.add("burst", r.status_code == 200, f"text query during the burst -> {r.status_code}")
                i += 1

    gate = threading.Barrier(n)

    def upload(_: int) -> tuple[int, bool]:
        with server.client(timeout=300) as c:
            gate.wait()
            r = c.post("/v1/search/upload", files={"image": ("zeros.png", png, "image/png")})
        return r.status_code, "retry-after" in r.headers

    t_text = threading.Thread(target=texts)
    t_text.start()
    time.sleep(0.5)  # the text client's baseline before the burst
    base = list(text_ms)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(upload, range(n)))
    burst_s = time.perf_counter() - t0
    during = text_ms[len(base):]
    done.set()
    t_text.join()
    time.sleep(2.0)
    alive = server.proc.poll() is None
    ready = alive and httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    for status, retry in answers:
        tally.add("burst", status == 200 or (status in (429, 503) and retry), f"upload -> {status} retry-after={retry}")
    tally.add("burst", alive and ready, "the server died or stopped answering after the burst")
    peak, after = _status_kb(pid, "VmHWM") if alive else 0, _status_kb(pid, "VmRSS") if alive else 0
    worst = max(during) if during else float("nan")
    tally.add("burst", worst < 2000, f"a text query took {worst:.0f} ms during the burst")
    codes: dict[str, int] = {}
    for status, _ in answers:
        codes[str(status)] = codes.get(str(status), 0) + 1
    tally.rows["burst"].update({
        "images": n, "side": side, "png_bytes": len(png), "answers": codes, "burst_seconds": round(burst_s, 2),
        "rss_before_mib": _mib(rss0), "peak_rss_mib": _mib(peak) if cleared else None, "rss_after_mib": _mib(after),
        "text_ms_before_median": round(sorted(base)[len(base) // 2], 1) if base else None,
        "text_ms_during_median": round(sorted(during)[len(during) // 2], 1) if during else None,
        "text_ms_during_max": round(worst, 1), "text_queries_during": len(during),
    })


def _records(server: Server) -> list[dict[str, Any]]:
    with server.client(ADMIN) as c:
        r = c.get("/v1/admin/audit", params={"limit": 10_000})
    return r.json().get("records", []) if r.status_code == 200 else []


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up to the last byte (unbuffered writes until ENOSPC); the filler's path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (2**16, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def audit_faults(tally: Tally, work: Path, paths: dict[str, Path]) -> None:
    """The audit trail fails closed everywhere and recovers: a server whose AUDIT_DIR is a 4 MiB tmpfs
    that fills and frees; pre-route rejections; forwarded addresses; out-of-range times."""
    mnt = work / "audit-tmpfs"
    mnt.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if not mounted:
        tally.add("audit_faults", False, "could not mount a tmpfs (needs root): the full-disk probes did not run")
        return
    indexes = work / "audit-indexes"  # its own copy: Qdrant Edge allows one process per store
    shutil.rmtree(indexes, ignore_errors=True)
    shutil.copytree(paths["indexes"], indexes, ignore=shutil.ignore_patterns(".pin-*", ".lock"))
    server = None
    try:
        server = Server(work, paths, name="state-audit", env={"SAFE_RETRIEVAL_AUDIT_DIR": str(mnt),
                                                              "SAFE_RETRIEVAL_INDEX_ROOT": str(indexes)})
        def search(token: str | None, **headers: str) -> httpx.Response:
            with server.client(token) as c:
                return c.post("/v1/search", json={"text": "a knife on a table", "safety": "strict"}, headers=headers)

        tally.add("audit_faults", search(MOD_A).status_code == 200, "a moderator search before the disk fills")
        jobs_before = len(server.client(ADMIN).get("/v1/admin/jobs").json()["jobs"])
        filler = _fill(mnt)
        # records still fit in the log's last allocated page (its block, on a disk); once that is full, 503s
        until_full = [search(MOD_A).status_code]
        while until_full[-1] == 200 and len(until_full) < 64:
            until_full.append(search(MOD_A).status_code)
        full = [search(MOD_A).status_code for _ in range(3)]
        tally.add("audit_faults", until_full[-1] == 503 and full == [503] * 3,
                  f"moderator searches on a full disk -> {until_full} then {full}")
        tally.rows["audit_faults"]["served_in_the_last_page"] = len(until_full) - 1
        tally.add("audit_faults", search(None).status_code == 200, "an ordinary search while the audit disk is full")
        with server.client(ADMIN) as c:
            r = c.post("/v1/admin/reindex", json={"source": {"images": "inside"}})
            jobs_after = len(c.get("/v1/admin/jobs").json()["jobs"])
        tally.add("audit_faults", r.status_code == 503 and jobs_after == jobs_before,
                  f"job submission on a full audit disk -> {r.status_code}, jobs {jobs_before} -> {jobs_after}")
        filler.unlink()
        recovered = [search(MOD_A).status_code for _ in range(3)]
        tally.add("audit_faults", recovered == [200] * 3, f"moderator searches once space is freed -> {recovered}")
        lines = (mnt / "audit.jsonl").read_bytes().splitlines()
        whole = all(line.startswith(b"{") and line.endswith(b"}") for line in lines)
        tally.add("audit_faults", whole, "a half-written line is left in the audit log")
        # every request that presents a moderator token leaves one record, whatever its status
        limit = int(server.env.get("SAFE_RETRIEVAL_MAX_BODY_BYTES", 10 * 2**20))
        rejected = [
            ("POST", "/v1/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, MOD_A),
            ("POST", "/v1/search", {"json": {"text": "a", "k": 67.0}}, MOD_A),
            ("POST", "/v1/search", {"content": b"x" * (limit + 1), "headers": {"content-type": "application/json"}},
             MOD_B),
            ("POST", "/v1/search/upload", {"content": b"--x\r\nbroken", "headers": {
                "content-type": "multipart/form-data; boundary=x"}}, MOD_A),
            ("POST", "/v1/search/upload", {"files": {"image": ("a.png", _png((8, 8)), "image/png")},
                                           "data": {"k": "67.0"}}, MOD_B),
            ("GET", "/v1/items/not-a-uuid", {}, MOD_A),
            ("POST", "/v1/admin/reindex", {"content": b"{not json", "headers": {"content-type": "application/json"}},
             ADMIN),
        ]
        for method, path, kwargs, token in rejected:
            before = len(_records(server))
            with server.client(token) as c:
                r = c.request(method, path, **kwargs)
            new = _records(server)[before:]
            ok = r.status_code >= 400 and len(new) == 1 and new[0].get("status") == r.status_code
            tally.add("audit_faults", ok, f"{method} {path} {token[-5:]} -> {r.status_code}, {len(new)} records "
                                          f"{[x.get('status') for x in new]}")
        # the client address: X-Forwarded-For from a loopback caller that is no configured proxy is not believed
        before = len(_records(server))
        search(MOD_A, **{"X-Forwarded-For": "6.6.6.6"})
        new = _records(server)[before:]
        tally.add("audit_faults", [x.get("client") for x in new] == ["127.0.0.1"],
                  f"X-Forwarded-For from an untrusted caller -> client {[x.get('client') for x in new]}")
        with server.client(ADMIN) as c:
            for params in ({"since": "0001-01-01T00:00:00+14:00"}, {"until": "9999-12-31T23:59:59-14:00"},
                           {"until": "0.5"}, {"since": "1e30"}, {"limit": "5.0"}):
                r = c.get("/v1/admin/audit", params=params)
                tally.add("audit_faults", r.status_code == 422 and not traced(r), f"audit {params} -> {r.status_code}")
    finally:
        if server is not None:
            server.stop()
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(indexes, ignore_errors=True)


def oracle(server: Server, tally: Tally, rounds: int = 40) -> None:
    """An unsafe item's id (computable from a guessed caption) must look exactly like an absent id to an
    ordinary caller: the same status and body on every route, and a similar time."""
    import statistics
    import uuid

    unsafe = sorted(_unsafe_ids(server))[:10]
    times: dict[str, list[float]] = {"unsafe": [], "absent": []}
    routes: list[Callable[[httpx.Client, str], httpx.Response]] = [
        lambda c, i: c.get(f"/v1/items/{i}"), lambda c, i: c.get(f"/v1/media/{i}"),
        lambda c, i: c.post("/v1/search", json={"item_id": i}),
        lambda c, i: c.post("/v1/search", json={"item_id": i, "safety": "traverse", "target": "text"}),
    ]
    with server.client() as c:
        for k in range(rounds):
            hidden = unsafe[k % len(unsafe)]
            absent = str(uuid.UUID(int=uuid.UUID(hidden).int ^ (k + 1)))
            for route in routes:
                pair = {}
                for kind, item in (("unsafe", hidden), ("absent", absent)) if k % 2 else (("absent", absent), ("unsafe", hidden)):
                    t = time.perf_counter()
                    pair[kind] = route(c, item)
                    times[kind].append(time.perf_counter() - t)
                a, b = pair["unsafe"], pair["absent"]
                same = a.status_code == b.status_code == 404 and a.text == b.text.replace(absent, hidden)
                tally.add("oracle", same, f"unsafe {a.status_code} {a.text[:80]} vs absent {b.status_code} {b.text[:80]}")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    tally.add("oracle", 0.67 < med["unsafe"] / med["absent"] < 1.5,
              f"median time unsafe {med['unsafe']:.2f} ms vs absent {med['absent']:.2f} ms")
    tally.rows["oracle"].update({"median_ms_unsafe": round(med["unsafe"], 2), "median_ms_absent": round(med["absent"], 2)})


def refused_starts(tally: Tally, work: Path, paths: dict[str, Path]) -> None:
    """Settings a security reviewer refuses: the server must not start, and say why."""
    tokens = work / "tokens"
    tokens.mkdir(exist_ok=True)
    base = {**os.environ, "SAFE_RETRIEVAL_MODEL": str(paths["model"]), "SAFE_RETRIEVAL_INDEX_ROOT": str(paths["indexes"]),
            "SAFE_RETRIEVAL_PORT": str(free_port())}
    cases: list[tuple[str, dict[str, str], str]] = []
    state = work / "replica-state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    cases.append(("replica without AUDIT_DIR", {"SAFE_RETRIEVAL_RUN_JOBS": "false", "SAFE_RETRIEVAL_STATE_DIR": str(state),
                                                "SAFE_RETRIEVAL_MODERATOR_TOKEN": MOD_A}, "AUDIT_DIR"))
    for mode, owner in ((0o620, 0), (0o660, 0), (0o644, 0), (0o602, 0), (0o640, 4321)):
        f = tokens / f"tokens-{mode:o}-{owner}"
        f.write_text("carol:carol-token\n")
        os.chmod(f, mode)
        if owner and os.getuid() == 0:
            os.chown(f, owner, owner)
        elif owner:
            continue
        cases.append((f"tokens file {mode:04o} owner {owner}", {"SAFE_RETRIEVAL_MODERATOR_TOKENS_FILE": str(f),
                                                               "SAFE_RETRIEVAL_STATE_DIR": str(work / "refused-state")},
                      "chmod 0600"))
    for what, env, words in cases:
        proc = subprocess.run([CLI, "serve"], env={**base, **env}, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        tally.add("refused_starts", proc.returncode != 0 and words in out and "carol-token" not in out,
                  f"{what}: exit {proc.returncode} {out.strip()[-160:]}")
    tally.add("refused_starts", not (state / "audit").exists(), "the refused replica wrote into the state volume")


def _maxrss_of(args: list[Any]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``args`` under a fresh interpreter that reports its children's peak RSS (KiB) on its last line."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stdout.write(p.stdout + '\\n' + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
               "sys.stderr.write(p.stderr); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True, timeout=900)
    head, _, last = proc.stdout.rpartition("\n")
    return subprocess.CompletedProcess(proc.args, proc.returncode, head, proc.stderr), int(last or 0)


def jobs_files(server: Server, tally: Tally, work: Path, paths: dict[str, Path]) -> None:
    """What a job reads and leaves: a 3 GB sparse image under a data root, cancels while the store is created,
    and seventy forget submissions while a job runs."""
    from PIL import Image

    from indexer.generations import GEN_RE, META

    roots = Path(json.loads(server.env["SAFE_RETRIEVAL_DATA_ROOTS"])[0])
    folder = roots / "huge-files"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"ok-{i}.png")
    with open(folder / "huge.png", "wb") as f:
        f.truncate(3 * 2**30)
    # the CLI a reindex job runs, its peak memory measured
    root = work / "huge-indexes"
    shutil.rmtree(root, ignore_errors=True)
    proc, maxrss = _maxrss_of([CLI, "index", "build", "--model", paths["model"], "--name", "huge", "--images", folder,
                               "--root", root, "--workers", 0, "--no-progress", "--json"])
    result = json.loads(proc.stdout) if proc.returncode == 0 else {}
    tally.add("jobs_files", result.get("failed") == 1 and result.get("indexed") == 4 and maxrss < 1.5 * 2**20,
              f"index build with a 3 GB sparse file: {proc.returncode} {str(result)[:160]} peak {maxrss // 1024} MiB")
    failures = [json.loads(x) for p in (root / "huge").rglob("failures.jsonl") for x in p.read_text().splitlines()]
    tally.add("jobs_files", any("huge.png" in json.dumps(x) for x in failures), f"failures recorded: {str(failures)[:200]}")
    # the same build without the huge file: what the CLI itself takes (torch, the model, the store)
    control = work / "huge-control"
    shutil.rmtree(control, ignore_errors=True)
    shutil.copytree(folder, control, ignore=shutil.ignore_patterns("huge.png"))
    _, baseline = _maxrss_of([CLI, "index", "build", "--model", paths["model"], "--name", "control", "--images", control,
                              "--root", root, "--workers", 0, "--no-progress", "--json"])
    tally.add("jobs_files", maxrss - baseline < 100 * 1024,
              f"the 3 GB file cost {(maxrss - baseline) // 1024} MiB over the same build without it")
    tally.rows["jobs_files"].update({"index_build_peak_rss_mib": maxrss // 1024,
                                     "without_the_file_peak_rss_mib": baseline // 1024})
    shutil.rmtree(control, ignore_errors=True)
    with server.client(ADMIN, timeout=300) as c:
        r = c.post("/v1/admin/reindex", json={"name": "probe-huge", "source": {"images": "huge-files"}})
        job = server.wait_job(r.json()["id"]) if r.status_code == 202 else {"status": r.status_code}
    tally.add("jobs_files", job.get("status") == "succeeded", f"reindex job with the 3 GB file -> {str(job)[:200]}")
    # seventy forget submissions while a job runs: each a fast 409
    target = roots / "gallery-data"
    if not target.exists():
        shutil.copytree(paths["data"], target)
    body = {"source": {"visu": "gallery-data", "split": "test", "captions": True, "media_root": "gallery-data"}}
    with server.client(ADMIN, timeout=300) as c:
        running = c.post("/v1/admin/reindex", json=body)

        def forget(_: int) -> tuple[int, float]:
            with server.client(ADMIN, timeout=60) as f:
                t = time.perf_counter()
                r = f.post("/v1/admin/forget", json={"concepts": ["graffiti"], "data": "gallery-data", "preset": "demo"})
                return r.status_code, time.perf_counter() - t

        with ThreadPoolExecutor(70) as pool:
            answers = list(pool.map(forget, range(70)))
        if running.status_code == 202:
            c.post(f"/v1/admin/jobs/{running.json()['id']}/cancel")
    slowest = max(t for _, t in answers)
    tally.add("jobs_files", all(code == 409 for code, _ in answers) and slowest < 2.0,
              f"70 forgets during a job: {sorted({code for code, _ in answers})}, slowest {slowest:.2f} s")
    tally.rows["jobs_files"]["forget_409_slowest_s"] = round(slowest, 2)
    # cancels at every instant of a job's start, store creation included, then one job that swaps (and prunes)
    with server.client(ADMIN, timeout=300) as c:
        for k in range(12):
            r = c.post("/v1/admin/reindex", json=body)
            if r.status_code == 202:
                time.sleep(0.25 * k)
                c.post(f"/v1/admin/jobs/{r.json()['id']}/cancel")
        r = c.post("/v1/admin/reindex", json=body)
        job = server.wait_job(r.json()["id"]) if r.status_code == 202 else {"status": r.status_code}
    home = paths["indexes"] / "gallery"
    orphans = [p.name for p in home.iterdir() if GEN_RE.match(p.name) and not (p / META).exists()]
    tally.add("jobs_files", job.get("status") == "succeeded" and not orphans,
              f"after 12 cancels and a swap: job {job.get('status')}, directories without a record {orphans}")


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fuzz-examples", type=int, default=25, help="schemathesis examples per operation, mode and token")
    ap.add_argument("--leakage", type=int, default=600, help="ordinary search requests with unsafe queries")
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--only", nargs="*", help="run these categories only")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    paths = prepare(WORK, steps=args.train_steps)
    tally = Tally()
    server = Server(WORK, paths)
    seconds: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], None]]] = [
        ("bad_inputs", lambda: bad_inputs(server, tally)),
        ("access", lambda: access(server, tally, WORK)),
        ("leakage", lambda: leakage(server, tally, paths["data"], args.leakage)),
        ("audit", lambda: audit(server, tally)),
        ("fuzz", lambda: fuzz(server, tally, args.fuzz_examples)),
        ("load_swaps", lambda: load_swaps(server, tally, args.load_seconds, args.clients, paths["data"])),
        ("faults", lambda: faults(server, tally, WORK, paths)),
        ("burst", lambda: burst(server, tally)),
        ("oracle", lambda: oracle(server, tally)),
        ("jobs_files", lambda: jobs_files(server, tally, WORK, paths)),
        ("refused_starts", lambda: refused_starts(tally, WORK, paths)),
        ("audit_faults", lambda: audit_faults(tally, WORK, paths)),
    ]
    try:
        for name, step in steps:
            if args.only and name not in args.only:
                continue
            s = time.monotonic()
            try:
                step()
            except Exception as e:  # noqa: BLE001 - a category that breaks is itself a finding
                traceback.print_exc()
                tally.add(name, False, f"the probe itself failed: {e.__class__.__name__}: {e}")
            seconds[name] = round(time.monotonic() - s, 1)
            print(f"{name}: {tally.rows.get(name, {}).get('tried', 0)} tried, "
                  f"{tally.rows.get(name, {}).get('misbehaved', 0)} misbehaved ({seconds[name]} s)", flush=True)
    finally:
        server.stop()
    print("\n| category | tried | misbehaved | seconds |\n|---|---|---|---|")
    for name, row in tally.rows.items():
        print(f"| {name} | {row['tried']} | {row['misbehaved']} | {seconds.get(name, '')} |")
        for example in row["examples"]:
            print(f"    {example}")
    OUT.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": vars(args), "seconds_total": round(time.monotonic() - t0, 1), "seconds": seconds,
        "categories": tally.rows,
    }, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
