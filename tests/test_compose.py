"""docker/compose.yaml and docker/Dockerfile as an operator meets them: checked without a Docker engine.

PyYAML reads the compose file (anchors and merge keys resolved); where Debian's ``docker-compose``
is installed it validates the file too. The image is built and run by ``make docker-smoke``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SETTINGS = {f"SAFE_RETRIEVAL_{name.upper()}" for name in Settings.model_fields}
CLUSTER_NODES = ("qdrant-node1", "qdrant-node2", "qdrant-node3")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_profiles(compose):
    services = compose["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert {n for n, p in profiles.items() if not p} == {"qdrant", "api"}  # `docker compose up -d` on one machine
    assert profiles["trainer"] == ("train",)
    assert {n for n, p in profiles.items() if p == ("cluster",)} == {*CLUSTER_NODES, "api-jobs", "api-read", "proxy"}
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_every_safe_retrieval_variable_is_a_setting(compose):
    named = set()
    for service in compose["services"].values():
        named |= {k for k in (service.get("environment") or {}) if k.startswith("SAFE_RETRIEVAL_")}
    named |= set(re.findall(r"\b(SAFE_RETRIEVAL_[A-Z_]+)=", DOCKERFILE.read_text()))
    assert named, "no SAFE_RETRIEVAL_* variable found"
    assert named <= SETTINGS, f"not settings (typos are ignored silently): {sorted(named - SETTINGS)}"


def test_published_ports_are_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_named_volumes_are_declared_and_used(compose):
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
            else:
                assert (COMPOSE.parent / source).exists() or source == "../data", f"{volume}: no such file"
    assert used == declared


def test_images_are_pinned(compose):
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    for name, service in compose["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: image {image} is not pinned to a version"
        if "build" in service:
            assert tag == version, f"{name}: the built image is tagged {tag}, the package is {version}"


def test_the_cluster_bootstraps_from_one_node_with_storage_per_node(compose):
    services = compose["services"]
    nodes = {n: services[n] for n in CLUSTER_NODES}
    for name, node in nodes.items():
        assert node["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert node["image"] == services["qdrant"]["image"]
        assert f"--uri http://{name}:6335" in " ".join(node["command"])
    bootstraps = {n: " ".join(s["command"]) for n, s in nodes.items() if "--bootstrap" in s["command"]}
    assert sorted(bootstraps) == ["qdrant-node2", "qdrant-node3"]
    assert all("--bootstrap http://qdrant-node1:6335" in c for c in bootstraps.values())
    storage = [next(v for v in s["volumes"] if v.endswith(":/qdrant/storage")) for s in nodes.values()]
    assert len(set(storage)) == 3, "the nodes share a storage volume"
    # every node snapshots the shards it holds: each needs a snapshots volume of its own
    snapshots = [next((v for v in s["volumes"] if v.endswith(":/qdrant/snapshots")), None) for s in nodes.values()]
    assert None not in snapshots and len(set(snapshots)) == 3, snapshots
    # the API services talk to the cluster; only one of them runs jobs and writes the state volume
    for name in ("api-jobs", "api-read"):
        url = services[name]["environment"]["SAFE_RETRIEVAL_QDRANT_URL"]
        assert re.fullmatch(r"http://qdrant-node\d:6333", url)
    assert services["api-jobs"]["environment"]["SAFE_RETRIEVAL_RUN_JOBS"] == "true"
    assert services["api-read"]["environment"]["SAFE_RETRIEVAL_RUN_JOBS"] == "false"
    assert "state:/state:ro" in services["api-read"]["volumes"]
    assert "ports" not in services["api-read"], "replicas cannot share a published port; the proxy has it"
    assert "api-read" in (COMPOSE.parent / "Caddyfile.cluster").read_text()


def test_the_file_names_its_project_for_compose_v1_and_v2(compose):
    # Compose v1.29 (Debian's docker-compose) refuses a top-level `name`; both read docker/.env beside the file
    assert "name" not in compose
    env = dict(line.split("=", 1) for line in (COMPOSE.parent / ".env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert env == {"COMPOSE_PROJECT_NAME": "safe-retrieval"}  # the volumes keep their names across versions


def test_examples_index_with_a_media_root_and_the_cluster_comment_matches_the_guide():
    text = COMPOSE.read_text()
    comments = "".join(line.strip().lstrip("#") for line in text.splitlines() if line.strip().startswith("#"))
    commands = [c for c in comments.replace("\\", " ").split("docker compose") if " index build " in c]
    assert len(commands) == 2 and all("--media-root /data" in c for c in commands), commands
    guide = (REPO / "docs" / "deploy.md").read_text()
    assert "--profile cluster up -d api-jobs proxy" in text and "--profile cluster up -d api-jobs proxy" in guide
    assert not re.search(r"--profile cluster up -d\s*(#|$)", text, re.M), "`up -d` alone would start qdrant and api too"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_accepts_the_file(compose, tmp_path):
    # the file as it is; docker-compose lists every service whatever the profile, so profiles are checked
    # above with PyYAML
    env = {**os.environ, "QDRANT_API_KEY": "k"}
    run = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "--services"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert set(run.stdout.split()) == set(compose["services"])
    del env["QDRANT_API_KEY"]  # required: the store must not run open
    missing = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert missing.returncode != 0 and "QDRANT_API_KEY" in missing.stderr


def test_the_dockerfile_runs_unprivileged_checks_readiness_and_sends_a_small_context():
    text = DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage
    assert re.search(r"^USER (?!root\b|0\b)\S+", final, re.M), "the runtime stage runs as root"
    assert "HEALTHCHECK" in final and "/readyz" in final
    assert "TORCH_INDEX_URL" in text  # where the CPU-only wheel index goes
    # the classic builder reads only <context>/.dockerignore: it must exclude everything but the sources
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("**")] == "**" and not (REPO / "docker" / "Dockerfile.dockerignore").exists()
    copied = {src for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M) for src in line.split()[:-1]}
    assert {"pyproject.toml", "README.md", "training", "indexer", "service"} <= copied
    for source in copied:
        assert f"!{source}" in ignore or f"!{source}/**" in ignore, f"{source} is copied but ignored"
