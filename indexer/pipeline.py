"""The indexing pipeline: read -> hash -> decode -> preprocess (worker processes) -> encode (batched) -> upsert.

- DataLoader worker processes read each image, hash its bytes into the point id, and decode and
  preprocess it. Items whose id is already stored are not decoded again, so a resumed run spends
  its time on what is missing.
- The main process encodes each batch on the model's device and upserts it as one batch.
- An unreadable, corrupt, missing or oversized image (over ``max_pixels``, or a file over ``max_bytes``,
  refused from its size before it is read) never stops the job: it is counted as failed and written to
  ``failures.jsonl`` (rewritten by each run, so it lists exactly the current failures).
  So is a malformed manifest row (``Item.error``) and, with data roots, a file that is outside them:
  the check is made on the file the worker actually opened, and ``uri`` is that file's real path.
- Ids are content hashes and stored ids are skipped, so a run killed at any point (even ``kill -9``)
  and re-run ends with the same points and no duplicates. Two items with the same content become
  one point: the first in input order wins.
- Content on the takedown list (``blocked``: content ids from ``indexer.journal.taken_down``) is never indexed:
  each such item is a recorded failure that says so.
- Progress: a tqdm bar (items/s, ETA) and ``progress.json`` with live counters (read by ``index info``).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from indexer.generations import write_json_atomic
from indexer.sources import Item
from indexer.store import VectorStore, content_id
from training import lorentz, traversal
from training.artifact import Artifact
from training.data.roots import DataRoots
from training.errors import ImageError, InputError, OutsideRootsError
from training.images import MAX_FILE_BYTES, MAX_PIXELS, preprocess_bytes, read_image_file

DEFAULT_BATCH = 64
TAKEN_DOWN = "taken down: this content is on the collection's takedown list, so it is not indexed again"


@dataclass
class Summary:
    """What a job did: points written, items skipped (already stored or duplicate), items failed."""

    indexed: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed_s: float = 0.0

    @property
    def items_per_s(self) -> float:
        return (self.indexed + self.skipped + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        return (f"indexed {self.indexed}, skipped {self.skipped}, failed {self.failed} "
                f"in {self.elapsed_s:.1f} s ({self.items_per_s:.1f} items/s)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_per_s": self.items_per_s}


class ImageReader(Dataset):
    """Worker-side half of the pipeline: ``i -> {i, id, pixels (3, H, W) | None, error | None, real}``."""

    def __init__(self, items: Sequence[Item], transform, *, known: frozenset[str] = frozenset(),
                 max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_FILE_BYTES, roots: DataRoots = DataRoots(),
                 blocked: frozenset[str] = frozenset()):
        self.items, self.transform, self.known, self.max_pixels = items, transform, known, max_pixels
        self.max_bytes, self.roots, self.blocked = max_bytes, roots, blocked

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        assert item.path is not None, "the dataset holds image items only"
        try:
            try:
                data, real = read_image_file(item.path, max_bytes=self.max_bytes, roots=self.roots)
            except OutsideRootsError as e:
                raise ImageError(str(e)) from e
            except FileNotFoundError as e:
                raise ImageError(f"image not found: {item.path}") from e
            except OSError as e:
                raise ImageError(f"cannot read {item.path}: {e.strerror or e}") from e
            pid = content_id(data)
            if pid in self.blocked:
                raise ImageError(f"{item.path}: {TAKEN_DOWN}")
            if pid in self.known:
                return {"i": i, "id": pid, "pixels": None, "error": None}
            pixels = preprocess_bytes(data, self.transform, name=str(item.path), max_pixels=self.max_pixels)
            return {"i": i, "id": pid, "pixels": pixels, "error": None, "real": str(real)}
        except ImageError as e:
            return {"i": i, "id": None, "pixels": None, "error": str(e)}
        except Exception as e:  # a transform failure on one odd file must not stop the job either
            return {"i": i, "id": None, "pixels": None, "error": f"{item.path}: {e.__class__.__name__}: {e}"}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, _worker_id: int = 0) -> None:
    """A DataLoader worker's init: be killed (SIGKILL) when the indexing process dies, even by ``kill -9``.

    Without it the workers notice only when their queue breaks, seconds later, still holding files
    and memory. Linux only (prctl); elsewhere the DataLoader's own watchdog remains. The signal
    follows the *thread* that forked the worker, which is the one iterating the loader (``Job.run``).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the worker still ends when its queue breaks
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep per-row metadata as lists; stack the pixels of the rows that need encoding."""
    todo = [r for r in rows if r["pixels"] is not None]
    return {
        "rows": [{k: r.get(k) for k in ("i", "id", "error", "real")} | {"encode": r["pixels"] is not None} for r in rows],
        "pixels": torch.stack([r["pixels"] for r in todo]) if todo else None,
    }


def relative_uri(path: Path | None, media_root: Path | None) -> str | None:
    """``path`` relative to ``media_root`` (POSIX), or absolute when it lies outside it."""
    if path is None:
        return None
    p = Path(path).resolve()
    if media_root is not None:
        try:
            return p.relative_to(Path(media_root).resolve()).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def unsafe_rule(art: Artifact, x: torch.Tensor, modality: str) -> tuple[list, list, list]:
    """Three columns, one value per row of ``x (N, D)``: ``(d0, unsafe_score, unsafe)`` under the artifact's rule
    for ``modality``.

    lorentz: ``d0`` = distance to the origin, ``unsafe`` by ``training.traversal.is_unsafe`` (None without a threshold).
    euclidean: no geometric rule exists yet, so score and flag are None.
    """
    n = len(x)
    if art.geometry != "lorentz":
        return [None] * n, [None] * n, [None] * n
    d0 = lorentz.dist0(x.float().cpu(), art.curvature)
    unsafe = traversal.is_unsafe(d0, art.unsafe_threshold(modality))
    flags = [None] * n if unsafe is None else [bool(v) for v in unsafe]
    return [float(v) for v in d0], [None] * n, flags


def labelled_unsafe(item: Item) -> bool:
    """Whether the item's source says it is unsafe: ViSU's NSFW half, or a manifest ``label`` of ``unsafe``."""
    return str(item.extra.get("label", "")).strip().lower() == "unsafe"


def payloads(art: Artifact, items: Sequence[Item], x: torch.Tensor, media_root: Path | None) -> list[dict[str, Any]]:
    """The payload of each point: extra columns first, then our own fields (which win).

    ``unsafe`` is true when the source labels the item unsafe *or* the model's rule flags it: a known
    label is never overruled by a model that misplaces the item (the filter is the last line of defence).
    """
    kind = items[0].kind
    d0, score, flags = unsafe_rule(art, x, kind)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = []
    for j, it in enumerate(items):
        p: dict[str, Any] = dict(it.extra)
        p.update(kind=kind, uri=relative_uri(it.path, media_root) if kind == "image" else None,
                 caption=it.caption if kind == "image" else it.text, tags=list(it.tags),
                 unsafe=True if labelled_unsafe(it) else flags[j],
                 model=art.fingerprint, indexed_at=now)
        if art.geometry == "lorentz":
            p["d0"] = d0[j]
        else:
            p["unsafe_score"] = score[j]
        if kind == "text" and it.path is not None:
            p["image_uri"] = relative_uri(it.path, media_root)
        out.append(p)
    return out


class Job:
    """One pass of the pipeline over a list of items into one store."""

    def __init__(self, art: Artifact, store: VectorStore, *, media_root: Path | None = None, batch_size: int = DEFAULT_BATCH,
                 workers: int = 2, failures_path: Path | None = None, progress_path: Path | None = None,
                 progress: bool = True, desc: str = "indexing", max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_FILE_BYTES, roots: DataRoots = DataRoots(),
                 blocked: frozenset[str] = frozenset()):
        self.art, self.store, self.media_root, self.max_pixels = art, store, media_root, max_pixels
        self.max_bytes, self.roots, self.blocked = max_bytes, roots, blocked
        self.batch_size, self.workers = max(1, batch_size), max(0, workers)
        self.failures_path, self.progress_path = failures_path, progress_path
        self.show, self.desc = progress, desc
        self.summary = Summary()
        self.seen: set[str] = set()
        self._failures: TextIO | None = None
        self._bar: tqdm | None = None
        self._t0 = 0.0
        self._total = 0

    # ------------------------------------------------------------------ public
    def run(self, items: Sequence[Item]) -> Summary:
        """Index ``items`` (images through worker processes, texts in the main process)."""
        self._t0 = time.perf_counter()
        self._total = len(items)
        # ids already in the store; a non-empty store means a resumed (or incremental) job
        self.seen = set(self.store.iter_ids()) if self.store.count() else set()
        if self.failures_path is not None:
            self.failures_path.parent.mkdir(parents=True, exist_ok=True)
            self._failures = self.failures_path.open("w", encoding="utf-8")
        self._bar = bar = tqdm(total=len(items), unit="item", desc=self.desc, disable=not self.show, dynamic_ncols=True)
        try:
            bad = [(it, it.error) for it in items if it.error is not None]
            for it, error in bad:
                self._fail(it, error)
            if bad:
                self._advance(len(bad))
            images = [it for it in items if it.kind == "image" and it.error is None]
            texts = [it for it in items if it.kind == "text" and it.error is None]
            if images:
                self._images(images)
            if texts:
                self._texts(texts)
        finally:
            bar.close()
            if self._failures is not None:
                self._failures.close()
            self.summary.elapsed_s = time.perf_counter() - self._t0
        self._write_progress(done=True)
        return self.summary

    # ----------------------------------------------------------------- stages
    def _images(self, items: Sequence[Item]) -> None:
        enc = self.art.encoder
        reader = ImageReader(items, enc.transform, known=frozenset(self.seen), max_pixels=self.max_pixels,
                             max_bytes=self.max_bytes, roots=self.roots, blocked=self.blocked)
        loader = DataLoader(reader, batch_size=self.batch_size, num_workers=self.workers, collate_fn=collate,
                            pin_memory=enc.device.type == "cuda", worker_init_fn=functools.partial(die_with_parent, os.getpid()))
        for batch in loader:
            rows, j = batch["rows"], -1
            sel: list[int] = []  # rows of batch["pixels"] to encode
            ids: list[str] = []
            chosen: list[Item] = []
            for r in rows:
                j += r["encode"]
                if r["error"] is not None:
                    self._fail(items[r["i"]], r["error"])
                elif not r["encode"] or r["id"] in self.seen:  # stored before, or a duplicate earlier in this run
                    self.summary.skipped += 1
                else:
                    self.seen.add(r["id"])
                    sel.append(j)
                    ids.append(r["id"])
                    chosen.append(replace(items[r["i"]], path=Path(r["real"])))  # uri: the file actually read
            if sel:
                self._upsert(ids, chosen, enc.encode_image(batch["pixels"][sel], batch_size=len(sel)))
            self._advance(len(rows))

    def _texts(self, items: Sequence[Item]) -> None:
        enc = self.art.encoder
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            ids: list[str] = []
            chosen: list[Item] = []
            texts: list[str] = []
            for it in chunk:
                text = it.text or ""
                if not text.strip():
                    self._fail(it, "empty text")
                    continue
                if it.path is not None and self.roots:  # a caption's image_uri must not name an outside file
                    try:
                        self.roots.check(it.path, what="image")
                    except InputError as e:
                        self._fail(it, str(e))
                        continue
                pid = content_id(text)
                if pid in self.blocked:
                    self._fail(it, TAKEN_DOWN)
                    continue
                if pid in self.seen:
                    self.summary.skipped += 1
                    continue
                self.seen.add(pid)
                ids.append(pid)
                chosen.append(it)
                texts.append(text)
            if chosen:
                self._upsert(ids, chosen, enc.encode_text(texts, batch_size=len(chosen)))
            self._advance(len(chunk))

    def _upsert(self, ids: list[str], items: list[Item], x: torch.Tensor) -> None:
        x = x.float().cpu()
        self.store.upsert(ids, self.store.schema.point_vectors(x.numpy()), payloads(self.art, items, x, self.media_root))
        self.summary.indexed += len(ids)

    # ---------------------------------------------------------------- helpers
    def _fail(self, item: Item, error: str) -> None:
        self.summary.failed += 1
        if self._failures is not None:
            rec = {"item": item.label, "kind": item.kind, "error": error,
                   "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            self._failures.write(json.dumps(rec) + "\n")
            self._failures.flush()

    def _advance(self, n: int) -> None:
        s = self.summary
        if self._bar is not None:  # run() opened it
            self._bar.update(n)
            self._bar.set_postfix(indexed=s.indexed, skipped=s.skipped, failed=s.failed, refresh=False)
        self._write_progress(done=False)

    def _write_progress(self, *, done: bool) -> None:
        if self.progress_path is None:
            return
        s = self.summary
        elapsed = time.perf_counter() - self._t0
        write_json_atomic(self.progress_path, {"total": self._total, "indexed": s.indexed, "skipped": s.skipped,
                                               "failed": s.failed, "elapsed_s": round(elapsed, 3), "done": done})
