"""Not ready -> 503 with Retry-After and the reason; recovery without a restart once the store is back."""

from __future__ import annotations

import socket
import time

from tests.helpers.service import build_index, copy_index, live, settings_for


def wait_ready(client, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"never became ready: {r.text}")


def test_missing_index_is_503_until_it_is_built_then_recovers(world, tmp_path):
    root = tmp_path / "indexes"  # nothing built here yet
    with live(settings_for(world, tmp_path, index_root=root)) as s, s.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False and "index build" in ready.json()["reason"]
        assert int(ready.headers["retry-after"]) >= 1
        search = c.post("/v1/search", json={"text": "a cat"})
        assert search.status_code == 503 and int(search.headers["retry-after"]) >= 1
        assert "not ready" in search.json()["detail"]
        assert c.get("/healthz").status_code == 200  # alive all the same

        build_index(world.model, world.data, root)  # the store "comes back"
        wait_ready(c)
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 200


def test_unreachable_qdrant_server_is_503_with_the_url(world, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with live(settings_for(world, tmp_path, qdrant_url=url)) as s, s.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and url in ready.json()["reason"]
        r = c.post("/v1/search", json={"text": "a cat"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "Traceback" not in r.text


def test_an_index_built_by_another_model_is_never_served(world, tmp_path):
    import torch

    from training import architectures, artifact
    from training.encoder import SafetyEncoder

    torch.manual_seed(1)
    other = artifact.Artifact(SafetyEncoder(architectures.resolve("tiny"), "lorentz"),
                              provenance=artifact.provenance("test: another model"))
    artifact.save(other, tmp_path / "other")
    settings = settings_for(world, tmp_path, model=tmp_path / "other", index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "reindex with this model" in ready.json()["reason"]
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 503
