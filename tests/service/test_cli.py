"""``safe-retrieval serve`` as a real process configured by SAFE_RETRIEVAL_* variables, and the demo's steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx

from service import demo
from tests.helpers.service import INDEX, copy_index, free_port, wait_ready


def test_serve_command_reads_the_environment_and_stops_cleanly(world, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_RETRIEVAL_")}
    env.update(SAFE_RETRIEVAL_MODEL=str(world.model), SAFE_RETRIEVAL_INDEX=INDEX,
               SAFE_RETRIEVAL_INDEX_ROOT=str(copy_index(world, tmp_path / "idx")),
               SAFE_RETRIEVAL_STATE_DIR=str(tmp_path / "state"), SAFE_RETRIEVAL_DEVICE="cpu")
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; main(sys.argv[1:])", "serve", "--port", str(port)]
    log = (tmp_path / "serve.log").open("wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_ready(proc, f"http://127.0.0.1:{port}", 90)
        assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()
        assert ready.json()["index"]["name"] == INDEX
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"text": "a cat"}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        log.close()
    assert rc == 0
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()


def test_demo_steps_are_cached(world, tmp_path):
    work = tmp_path / "demo"
    shutil.copytree(world.data, work / "data")  # data and model "from an earlier run": no training here
    shutil.copytree(world.model, work / "model")
    (work / "recipe.json").write_text(json.dumps({"recipe": demo.RECIPE}))
    settings = demo.prepare(work)
    assert settings.model == work / "model" and settings.index == demo.INDEX
    assert settings.media_root == work / "data" and settings.data_roots == [work.resolve()]
    from indexer.index import generations_for

    gens = generations_for(demo.INDEX, root=work / "indexes")
    first = gens.current()
    meta = gens.read_meta(first)
    assert meta["points"] == 24  # 6 test quadruplets: 12 images and their 12 captions
    started = time.monotonic()
    demo.prepare(work)  # second run: everything cached
    assert gens.current() == first
    assert time.monotonic() - started < 5
    # an index written by an older format (unsafe flags from the model alone) is rebuilt
    gens.write_meta(first, {**meta, "format_version": 1})
    demo.prepare(work)
    assert gens.current() != first
    from service.admin.plans import read_source

    assert read_source(settings.state_dir) == demo.source(work / "data")


def test_demo_remakes_data_and_models_of_an_older_recipe(tmp_path):
    work = tmp_path / "demo"
    for name in ("data", "base", "model", "service"):
        (work / name).mkdir(parents=True)
        (work / name / "kept.txt").write_text("from an earlier run")
    demo.check_recipe(work)  # no stamp: made before recipes were recorded
    assert sorted(p.name for p in work.iterdir()) == ["recipe.json", "service"]  # the job state stays
    assert json.loads((work / "recipe.json").read_text()) == {"recipe": demo.RECIPE}
    (work / "data").mkdir()
    demo.check_recipe(work)  # the current recipe: nothing removed
    assert (work / "data").is_dir()
    (work / "recipe.json").write_text(json.dumps({"recipe": demo.RECIPE - 1}))
    demo.check_recipe(work)
    assert not (work / "data").exists()


def test_serve_refuses_a_malformed_moderator_tokens_file_at_start_up(tmp_path):
    tokens = tmp_path / "moderators"
    tokens.write_text("alice:alice-token\nbob bob-token\n")
    tokens.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_RETRIEVAL_")}
    env.update(SAFE_RETRIEVAL_MODERATOR_TOKENS_FILE=str(tokens), SAFE_RETRIEVAL_STATE_DIR=str(tmp_path / "state"))
    cmd = [sys.executable, "-c", "import sys; from service.cli import main; main(sys.argv[1:])", "serve", "--port", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"line 2 of the moderator tokens file {tokens}" in done.stderr
    assert "Traceback" not in done.stderr and "alice-token" not in done.stderr
    env["SAFE_RETRIEVAL_MODERATOR_TOKENS"] = '{"alice": ["zebra-secret"]}'
    del env["SAFE_RETRIEVAL_MODERATOR_TOKENS_FILE"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "moderator_tokens.alice" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "zebra-secret" not in done.stderr
