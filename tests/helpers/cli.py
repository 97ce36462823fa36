"""Running the real `safe-retrieval` console script, also on a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "safe-retrieval")


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `safe-retrieval` console script; fail with its output when `check` and it fails."""
    proc = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        pytest.fail(f"safe-retrieval {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def on_a_full_disk(argv: list[str], mount: Path, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``argv`` with a 64 KiB tmpfs mounted at ``mount`` (an empty directory), so that writing there
    really fails with ENOSPC. The mount lives in a user and mount namespace of the command's own
    (util-linux's ``unshare``); where the sandbox forbids that, the test is skipped."""
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux's unshare to mount a small tmpfs")
    script = f'mount -t tmpfs -o size=64k none "{mount}" && exec "$@"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).parents[2])
    if proc.returncode != 0 and ("mount:" in proc.stderr or "unshare:" in proc.stderr):
        pytest.skip(f"this sandbox cannot mount a tmpfs: {proc.stderr.strip()}")
    return proc
