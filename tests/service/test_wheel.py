"""What users install is what is tested: the built wheel, installed non-editable, serves on its own.

The wheel is built from a clean copy of the sources (so no stale ``build/`` directory can hide a file
the package data forgets), installed with ``pip install --target`` into a fresh directory, and run as
the real ``safe-retrieval`` console script with that directory as the only PYTHONPATH and a working
directory outside the checkout. The dependencies come from the test environment (``--no-deps``).
Start-up failures are run through the same installed CLI: each one must print one ``error:`` line
and exit non-zero, with no traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.service import INDEX, copy_index, free_port, wait_ready

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "training", "indexer", "service")

pytestmark = pytest.mark.slow


def pip(*args: str, cwd: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def install(wheel: Path, target: Path) -> Path:
    pip("install", "--no-deps", "--no-index", "--no-compile", "--target", str(target), str(wheel), cwd=target.parent)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("wheel-src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(src), cwd=src)
    (built,) = out.glob("safe_retrieval-*.whl")
    return built


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory) -> Path:
    return install(wheel, tmp_path_factory.mktemp("installed") / "site")


def installed_env(target: Path, **settings: str) -> dict[str, str]:
    """This environment minus any SAFE_RETRIEVAL_* and PYTHONPATH, with only the installed copy importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_RETRIEVAL_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), PYTHONDONTWRITEBYTECODE="1", SAFE_RETRIEVAL_DEVICE="cpu", **settings)
    return env


def cli(target: Path) -> list[str]:
    script = target / "bin" / "safe-retrieval"
    assert script.is_file(), "the wheel installs no safe-retrieval console script"
    return [str(script)]


def test_the_wheel_holds_every_file_read_at_run_time(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for package, sub in (("service", "static"), ("training", "presets")):
        wanted = {f"{package}/{sub}/{p.name}" for p in (REPO / package / sub).iterdir() if p.is_file()}
        assert wanted and wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"


def test_the_installed_package_is_the_one_imported(target, tmp_path):
    run = subprocess.run([sys.executable, "-c", "import service, training, indexer; "
                          "print(service.__file__); print(training.__file__); print(indexer.__file__)"],
                         cwd=tmp_path, env=installed_env(target), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for line in run.stdout.split():
        assert Path(line).resolve().is_relative_to(target.resolve()), f"{line} is not the installed copy"


def test_the_installed_cli_serves_the_page_and_searches(world, target, tmp_path):
    port = free_port()
    env = installed_env(target, SAFE_RETRIEVAL_MODEL=str(world.model), SAFE_RETRIEVAL_INDEX=INDEX,
                        SAFE_RETRIEVAL_INDEX_ROOT=str(copy_index(world, tmp_path / "idx")),
                        SAFE_RETRIEVAL_MEDIA_ROOT=str(world.data), SAFE_RETRIEVAL_STATE_DIR=str(tmp_path / "state"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([*cli(target), "serve", "--port", str(port)], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(proc, base, 120)
        assert ready is not None and ready.status_code == 200, log_path.read_text()
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        for asset in ("app.js", "style.css"):
            assert httpx.get(f"{base}/static/{asset}", timeout=10).status_code == 200, asset
        r = httpx.post(f"{base}/v1/search", json={"text": "a cat", "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["results"], "the installed server found nothing in a non-empty index"
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        log.close()
    assert rc == 0, log_path.read_text()


# ------------------------------------------------------------------ start-up failures
def assert_one_error_line(run: subprocess.CompletedProcess, *words: str) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def serve_once(target: Path, cwd: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cli(target), "serve", *args], cwd=cwd, env=installed_env(target, **settings),
                          capture_output=True, text=True, timeout=120)


def test_a_bad_setting_is_one_line_naming_it(target, world, tmp_path):
    run = serve_once(target, tmp_path, SAFE_RETRIEVAL_PORT="99999")
    assert_one_error_line(run, "SAFE_RETRIEVAL_PORT")
    run = serve_once(target, tmp_path, SAFE_RETRIEVAL_DATA_ROOTS="/data")  # a list must be JSON
    assert_one_error_line(run, "SAFE_RETRIEVAL_DATA_ROOTS")


def test_an_unreadable_model_is_one_line(target, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    run = serve_once(target, tmp_path, "--model", str(broken), "--port", str(free_port()))
    assert_one_error_line(run, str(broken))


def test_an_unwritable_state_directory_is_one_line(target, world, tmp_path):
    (tmp_path / "file").write_text("")  # not a directory: refused even to root
    run = serve_once(target, tmp_path, "--model", str(world.model), "--port", str(free_port()),
                     SAFE_RETRIEVAL_STATE_DIR=str(tmp_path / "file" / "state"))
    assert_one_error_line(run, "state directory", "SAFE_RETRIEVAL_STATE_DIR")


def test_a_port_in_use_is_one_line(target, world, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve_once(target, tmp_path, "--model", str(world.model), "--index-root", str(tmp_path / "idx"),
                         "--port", str(port))
    assert_one_error_line(run, str(port), "in use")


def test_missing_package_files_are_one_line(wheel, world, tmp_path):
    broken = install(wheel, tmp_path / "site")
    shutil.rmtree(broken / "service" / "static")
    run = serve_once(broken, tmp_path, "--model", str(world.model), "--port", str(free_port()))
    assert_one_error_line(run, "static", "reinstall")
