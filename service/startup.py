"""What ``safe-retrieval serve`` checks before it loads anything, so a broken start is one clear line.

Mistakes an operator can only fix by restarting (a bad setting, an incomplete installation, a model
directory that is not an artifact, a port taken by another process) stop the command with an error
from the project's hierarchy; the CLI prints it without a traceback and exits non-zero. Conditions
that can heal by themselves (the store down, no index yet, no model written yet) do not stop it: the
service starts, ``/readyz`` says what is missing, and the supervisor retries.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.settings import Settings
from training import artifact as artifacts
from training.errors import ArtifactError, InputError, SafeRetrievalError

PAGE_FILES = ("index.html", "app.js", "style.css")


class InstallationError(SafeRetrievalError):
    """The installed package lacks a file it ships (package data left out of the wheel or deleted)."""


def settings_from(given: dict[str, Any]) -> Settings:
    """``Settings`` from command-line values and the environment; a bad value names its option and variable."""
    try:
        return Settings(**given)
    except ValidationError as e:  # each field and why, never the value given (it may be a token)
        problems = []
        for err in e.errors():
            loc = [str(part) for part in err["loc"]]
            name = loc[0] if loc else "?"
            problems.append(f"{_names(name)} ({'.'.join(loc) or 'settings'}): {err['msg']}")
        raise InputError("bad setting " + "; ".join(problems)) from None
    except SettingsError as e:  # an environment value that is not valid JSON for a list or mapping field
        match = re.search(r'field "(\w+)"', str(e))
        name = match.group(1) if match else "?"
        raise InputError(f"bad setting {_names(name)}: not valid JSON; write a list like "
                         f"SAFE_RETRIEVAL_DATA_ROOTS='[\"/data\"]' or a mapping like "
                         f"SAFE_RETRIEVAL_MODERATOR_TOKENS='{{\"alice\": \"...\"}}'") from None


SERVE_OPTIONS = {"model", "index", "qdrant_url", "index_root", "media_root", "host", "port"}  # serve's flags


def _names(field: str) -> str:
    flag = f"--{field.replace('_', '-')} / " if field in SERVE_OPTIONS else ""
    return f"{flag}SAFE_RETRIEVAL_{field.upper()}"


def check_page(static: Path) -> None:
    """The web page's files are package data; without them the installation is incomplete."""
    missing = [name for name in PAGE_FILES if not (static / name).is_file()]
    if missing:
        raise InstallationError(f"the web page's files are missing from {static} ({', '.join(missing)}); "
                                "the installation is incomplete: reinstall safe-retrieval from its wheel")


def check_model(settings: Settings) -> None:
    """A configured model that exists must be an artifact; one not written yet is waited for (``/readyz``)."""
    path = settings.model
    if path is None or not path.exists():
        return
    try:
        artifacts.read_config(path)
    except ArtifactError as e:
        raise ArtifactError(f"cannot serve the model {path}: {e}") from None
    except OSError as e:
        raise ArtifactError(f"cannot read the model {path}: {e.strerror}; check the path and its permissions "
                            "(--model / SAFE_RETRIEVAL_MODEL)") from None


def check_state_dir(settings: Settings) -> None:
    """The job runner writes job records, models and the served-pair record: its state directory must be writable."""
    if not settings.run_jobs:
        return
    path = settings.state_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise InputError(f"cannot write the state directory {path} ({e.strerror}): give this user (uid {os.getuid()}) "
                         "write access, or set SAFE_RETRIEVAL_STATE_DIR (SAFE_RETRIEVAL_RUN_JOBS=false on "
                         "replicas that only search)") from None


def check_audit_dir(settings: Settings) -> None:
    """A replica without jobs writes nothing to the shared state volume, its audit log included: one that
    could write audit records (a moderator or admin token is set) needs an ``AUDIT_DIR`` of its own."""
    if settings.run_jobs or not (settings.moderators() or settings.token("admin")):
        return
    state = settings.state_dir.resolve()
    audit = settings.audit_dir.resolve() if settings.audit_dir is not None else None
    if audit is None or audit == state or audit.is_relative_to(state):
        raise InputError(f"this replica runs no jobs (SAFE_RETRIEVAL_RUN_JOBS=false) but would write its audit log "
                         f"into the job runner's state directory {state} (two writers on one log); set "
                         "SAFE_RETRIEVAL_AUDIT_DIR to a directory of this replica's own, outside SAFE_RETRIEVAL_STATE_DIR")


def listen(host: str, port: int) -> socket.socket:
    """Bind the server socket before anything is loaded, so a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host!r}: {e.strerror}; set --host / SAFE_RETRIEVAL_HOST to an "
                         "address of this machine") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use by another process: stop it, or choose another "
                             "--port / SAFE_RETRIEVAL_PORT") from None
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --host/--port") from None
    return sock
