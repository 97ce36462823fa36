"""Helpers of the service tests: a tiny calibrated model, a small indexed gallery, live servers.

The model is the ``tiny`` preset, randomly initialised and then calibrated from its own distances
to the origin on the synthetic train split: bounds per class as usual, and as unsafe threshold the
median distance of each modality. A random model cannot separate safe from unsafe, so the median
is chosen to make about half of the queries and gallery items "unsafe" by the model's rule; the
rule, traversal and the payload filter then all have real cases to act on. The
gallery is the synthetic test split (images and captions) indexed by the indexer's real build code
into the embedded Qdrant Edge store. Servers are the real app under a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.app import create_app, uvicorn_options
from service.settings import Settings

INDEX = "gallery"
N_QUADS = 60  # 48 train / 6 validation / 6 test quadruplets
ADMIN = "admin-secret-token"
MODERATOR = "moderator-secret-token"


@dataclass(frozen=True)
class World:
    """Files every service test may read (never write): data, model and a built index."""

    root: Path
    data: Path
    model: Path
    index_root: Path
    thresholds: dict
    generation: str


def calibrated_tiny(data: Path, out: Path) -> dict:
    """A random ``tiny`` lorentz artifact whose bounds/thresholds come from its own train-split distances."""
    from training import architectures, artifact, traversal
    from training.data import visu
    from training.encoder import SafetyEncoder
    from training.images import open_image

    torch.manual_seed(0)
    enc = SafetyEncoder(architectures.resolve("tiny"), "lorentz").eval()
    records = visu.load_split(data, "train").records
    emb = {
        "S": enc.encode_text([q.safe for q in records]),
        "U": enc.encode_text([q.nsfw for q in records]),
        "V": enc.encode_image([open_image(q.safe_image) for q in records]),
        "G": enc.encode_image([open_image(q.nsfw_image) for q in records]),
    }
    d0 = {k: enc.dist0(v) for k, v in emb.items()}
    thresholds = {"text": float(torch.cat([d0["S"], d0["U"]]).median()),
                  "image": float(torch.cat([d0["V"], d0["G"]]).median())}
    art = artifact.Artifact(enc, bounds=traversal.calibrate_bounds(d0), safety={"unsafe_threshold": thresholds},
                            provenance=artifact.provenance("test: calibrated random tiny"))
    artifact.save(art, out)
    return thresholds


def build_index(model: Path, data: Path, root: Path, name: str = INDEX) -> str:
    """Index the test split's images and captions with the indexer's real build code; returns the generation."""
    from indexer import builder, sources
    from indexer.index import generations_for

    items = sources.collect(visu=data, split="test", captions_as_text=True)
    result = builder.build(generations_for(name, root=root), model, items, media_root=data, workers=0,
                           progress=False, device="cpu")
    return result.generation


def settings_for(world: World, tmp: Path, **overrides) -> Settings:
    base = dict(
        model=world.model, index=INDEX, index_root=world.index_root, media_root=world.data, state_dir=tmp / "state",
        admin_token=ADMIN, moderator_token=MODERATOR, data_roots=[world.root], store_retry_s=0.5, device="cpu",
    )
    base.update(overrides)
    return Settings(**base)


class LiveServer:
    """The real app under a real uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, settings: Settings):
        import uvicorn

        self.settings = settings
        self.app = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        # the options `serve` runs with (forwarded headers believed only from TRUSTED_PROXIES), quieter and quicker
        options = {**uvicorn_options(settings), "log_level": "warning", "timeout_graceful_shutdown": 5}
        config = uvicorn.Config(self.app, lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def services(self):
        return self.app.state.services

    def client(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


@contextlib.contextmanager
def live(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


def unsafe_caption(world: World, server: LiveServer) -> str:
    """A test-split unsafe caption the model's rule flags as unsafe (asked through /v1/embed)."""
    from training.data import visu

    with server.client() as c:
        for q in visu.load_split(world.data, "test").records + visu.load_split(world.data, "train").records:
            r = c.post("/v1/embed", json={"text": q.nsfw}).json()
            if r["unsafe"]:
                return q.nsfw
    pytest.fail("no unsafe caption is flagged by the calibrated model")


def copy_index(world: World, dest: Path) -> Path:
    """A private copy of the index root (tests that rebuild or swap must not touch the shared one)."""
    shutil.copytree(world.index_root, dest)
    return dest


NO_TRACE = ("Traceback", 'File "', "line ")


def assert_no_trace(response: httpx.Response) -> None:
    for marker in NO_TRACE:
        assert marker not in response.text, f"response leaks internals: {response.text[:300]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, timeout: float) -> httpx.Response | None:
    """Poll ``base/readyz`` until it answers 200, ``proc`` exits or ``timeout`` passes: the last answer, or None."""
    deadline = time.monotonic() + timeout
    ready = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(f"{base}/readyz", timeout=2)
            if ready.status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    return ready


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only), unmounted on the way out."""
    path.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: the full-disk test needs a tmpfs (run it as root, as CI does)")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test needs root with "
                    "CAP_SYS_ADMIN, as in CI")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------ servers whose collection changes
def fresh_png(seed: int, size: int = 48) -> bytes:
    """An image no gallery holds: random pixels from ``seed``."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def private_media(world: World, tmp: Path) -> Path:
    """A private media root: a copy of the gallery's images, where the uploads folder of a test's writes goes."""
    root = tmp / "media"
    shutil.copytree(world.data, root)
    return root


def make_settings(world: World, tmp: Path, media: Path, **overrides) -> Settings:
    """A server's settings over a private copy of the index, with ``media`` as its media root and a data root."""
    return settings_for(world, tmp, index_root=copy_index(world, tmp / "indexes"), media_root=media,
                        data_roots=[world.root, media], **overrides)


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression-bomb shaped file)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)
