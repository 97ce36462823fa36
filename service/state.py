"""The served (artifact, index generation) pair, and how it is replaced without failing a request.

A request *leases* the current pair for its whole life: it encodes with that pair's model and
searches that pair's index. A swap installs a new pair for the requests that start afterwards; the
old pair is closed only when its last lease ends, so in-flight requests finish on the old pair and
none fails. The two halves are always swapped together, and a pair is only built after checking
that the index was made with the model (``indexer.index.check_model``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from indexer.index import Index, check_model, open_index
from service.errors import UnavailableError
from service.settings import Settings
from training import artifact as artifacts
from training.artifact import Artifact
from training.errors import SafeRetrievalError

log = logging.getLogger("safe_retrieval.service")

SERVED_RECORD = "served.json"


@dataclass(eq=False)
class ServedPair:
    """A model and the index generation built with it, served together."""

    artifact: Artifact
    index: Index
    info: dict[str, Any]
    model_path: Path
    leases: int = field(default=0, repr=False)
    retired: bool = field(default=False, repr=False)

    @property
    def ref(self) -> dict[str, Any]:
        """``{name, generation, model}`` for responses."""
        return {"name": self.info.get("name"), "generation": self.info.get("generation"), "model": self.artifact.fingerprint}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.index.close()


class ServedState:
    """Holds the current pair (or the reason there is none) and hands out leases on it."""

    def __init__(self, retry_after: float = 5.0):
        self._pair: ServedPair | None = None
        self._lock = threading.Lock()
        self.problem: str | None = "starting: the model and index are not loaded yet"
        self.retry_after = retry_after

    @property
    def current(self) -> ServedPair | None:
        return self._pair

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedPair]:
        """Use the current pair until the block ends; 503 (UnavailableError) when none is served."""
        with self._lock:
            pair = self._pair
            if pair is None:
                raise UnavailableError(f"the service is not ready: {self.problem}", self.retry_after)
            pair.leases += 1
        try:
            yield pair
        finally:
            with self._lock:
                pair.leases -= 1
                done = pair.retired and pair.leases == 0
            if done:
                _close_later(pair)

    def swap(self, new: ServedPair) -> ServedPair | None:
        """Serve ``new`` from now on; the old pair closes when its last request finishes."""
        with self._lock:
            old, self._pair = self._pair, new
            self.problem = None
            done = False
            if old is not None and old is not new:
                old.retired = True
                done = old.leases == 0
        if done:
            _close_later(old)
        return old

    def withdraw(self, reason: str) -> None:
        """Stop serving (e.g. the index vanished); requests get 503 with ``reason`` until the next swap."""
        with self._lock:
            old, self._pair = self._pair, None
            self.problem = reason
            done = False
            if old is not None:
                old.retired = True
                done = old.leases == 0
        if done:
            _close_later(old)

    def close(self) -> None:
        self.withdraw("the service is shutting down")


def _close_later(pair: ServedPair) -> None:
    # closing flushes the store; never do it on the event loop or inside the lock
    threading.Thread(target=pair.close, name="close-pair", daemon=True).start()


# ------------------------------------------------------------------ loading a pair
def open_served_index(settings: Settings, name: str | None = None) -> Any:
    """Open the current generation of the served index (embedded store or Qdrant server)."""
    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    return open_index(name or settings.index, root=settings.index_root, url=settings.qdrant_url, api_key=api_key)


def model_candidates(settings: Settings) -> list[Path]:
    """Artifacts that may be served, in order of preference.

    The one a job last swapped in (so a restart keeps serving it), then ``--model``, then the other
    retrained artifacts, newest first: if the service stopped between a job's acceptance switching
    the index and recording the swap, the model that index was built with is among them.
    """
    out: list[Path] = []
    record = read_served_record(settings.state_dir)
    if record and record.get("index") == settings.index and record.get("model"):
        out.append(Path(record["model"]))
    if settings.model is not None:
        out.append(settings.model)
    models = settings.state_dir / "models"
    if models.is_dir():
        out += sorted((p for p in models.iterdir() if (p / artifacts.CONFIG).is_file()), reverse=True)
    return list(dict.fromkeys(out))


class PairLoader:
    """Builds checked pairs; keeps loaded artifacts so retries after a store outage do not reload them."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._artifacts: dict[tuple[str, str], Artifact] = {}
        self._lock = threading.Lock()

    def artifact(self, path: Path) -> Artifact:
        fingerprint = artifacts.read_config(path).get("fingerprint", "")
        key = (str(Path(path).resolve()), fingerprint)
        with self._lock:
            art = self._artifacts.get(key)
            if art is None:
                art = artifacts.load(path, device=self.settings.device)
                self._artifacts = {key: art}  # keep only the newest: old models are freed after a swap
            return art

    def load(self, model_path: Path | None = None, *, index: Any | None = None) -> ServedPair:
        """Open the index and pick the model it was built with (``model_path`` or the candidates)."""
        paths = [model_path] if model_path is not None else model_candidates(self.settings)
        if not paths:
            raise UnavailableError("no model configured: start with --model ARTIFACT or set SAFE_RETRIEVAL_MODEL")
        index = index if index is not None else open_served_index(self.settings)
        try:
            info = dict(index.info)
            wanted = info.get("fingerprint")
            chosen = next((p for p in paths if _fingerprint(p) == wanted), paths[0])
            art = self.artifact(chosen)
            check_model(index, art)
        except BaseException:
            with contextlib.suppress(Exception):
                index.close()
            raise
        return ServedPair(artifact=art, index=index, info=info, model_path=Path(chosen))


def _fingerprint(path: Path) -> str | None:
    try:
        return artifacts.read_config(path).get("fingerprint")
    except SafeRetrievalError:
        return None


# ------------------------------------------------------------------ what was swapped in last
def read_served_record(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / SERVED_RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_served_record(state_dir: Path, *, model: Path, index: str, generation: str | None) -> None:
    """Remember the swapped-in pair, so a restarted service serves it rather than the original ``--model``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{SERVED_RECORD}.tmp"
    tmp.write_text(json.dumps({"model": str(model), "index": index, "generation": generation}, indent=2) + "\n")
    os.replace(tmp, state_dir / SERVED_RECORD)
