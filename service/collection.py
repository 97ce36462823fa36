"""Online item writes: add an item and take one down through the API, kept across every restart, reindex, retrain
and forget (invariant 8).

An add: the caller's image is checked against the takedown list (409), embedded with the served model (through the
batcher, with the search's image limits and memory budget), stored content-addressed under the uploads folder, then,
under the swap lock, written to the journal (fsync'd) and upserted into the served generation's store: searchable
once the 201 is sent. A takedown: under the swap lock, written to the journal, then deleted from the store (and,
with ``purge``, its uploaded file from disk). The journal (:mod:`indexer.journal`) comes first, so an acknowledged
write is never lost: every pair the service installs (at start-up, after a reload, at a job's commit, where the
staged generation is opened before the pointer moves) first gets the whole journal replayed onto it
(:meth:`Collection.replay`): taken-down ids deleted, added items that the generation lacks embedded with *its* model
and upserted. A write that arrives while a job commits waits for the swap lock and then goes to the new pair.

The journal's takedowns are the takedown list: ``index build|add`` of every job get ``--takedowns`` and skip listed
content; a new upload of it is refused. With ``NEAR_DUPLICATE_DISTANCE`` set, so is an upload whose embedding lies
that close to a taken-down image's (a re-encoded, resized or recompressed copy), unless the admin overrides that
refusal (``allow_near_duplicate``: audited; never for the exact content): each image takedown records the
image's embedding under the served model, and at every install the taken-down images are embedded again by a new
model from their files where those still exist. Only the service that runs jobs writes (a replica without jobs
answers 403).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from indexer.journal import ADD, TAKEDOWN, Journal
from indexer.pipeline import payloads
from indexer.sources import Item
from indexer.store import SPACE, VECTOR
from service.errors import ConflictError, ForbiddenError, NotFoundError, StorageFullError, UnavailableError
from service.settings import Settings
from training import lorentz
from training.errors import ImageError, SafeRetrievalError
from training.images import preprocess_bytes, read_header

#: a ``service.state.ServedPair`` (not imported: that module imports this one)
ServedPair = Any

log = logging.getLogger("safe_retrieval.collection")

JOURNAL = Path("collection") / "journal.jsonl"
_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
           "TIFF": ".tif"}
REPLAY_BATCH = 256


def journal_path(state_dir: Path) -> Path:
    """The journal of the collection served from ``state_dir`` (also ``--takedowns`` of the jobs' index steps)."""
    return Path(state_dir) / JOURNAL


def _durable(what: str, e: OSError) -> StorageFullError:
    return StorageFullError(f"{what} could not be written ({e.strerror or e}), so nothing was changed; free space on "
                            "the state volume (SAFE_RETRIEVAL_STATE_DIR) or the upload folder, or make it writable, "
                            "then send the request again")


class Collection:
    """The online writes of one service: its journal, its uploads folder, the lock that orders writes with swaps."""

    def __init__(self, settings: Settings, swap_lock: threading.Lock, current: Callable[[], Any]):
        self.settings = settings
        self.journal = Journal(journal_path(settings.state_dir))
        self.uploads = settings.uploads()
        self.swap_lock = swap_lock  # Services.swap_lock: a write and a swap never interleave
        self.current = current  # the served pair of the moment (read under the swap lock)
        # the taken-down images' embeddings under one model: (fingerprint, ids, (N, D)); built by replay
        self._near: tuple[str, list[str], torch.Tensor] | None = None

    # -------------------------------------------------------------- adds
    def check_not_taken_down(self, pid: str) -> None:
        entry = self.journal.takedowns.get(pid)
        if entry is not None:
            raise ConflictError(f"this content was taken down at {entry.get('at')} (item {pid}) and may not be added "
                                "again, not even with allow_near_duplicate; the takedown list keeps it out of every "
                                "upload and build")

    def stored_file(self, data: bytes) -> Path:
        """Write an uploaded image under the uploads folder as ``sha256[:2]/sha256.ext`` (fsync'd, atomically) and
        return its path; the same bytes always land in the same file. Blocking."""
        if self.uploads is None:
            raise ForbiddenError("image uploads need a media root (SAFE_RETRIEVAL_MEDIA_ROOT): uploaded images are "
                                 "stored under it (SAFE_RETRIEVAL_UPLOAD_DIR, default MEDIA_ROOT/uploads) and served "
                                 "from it")
        digest = hashlib.sha256(data).hexdigest()
        fmt = read_header(data, name="image", max_pixels=self.settings.max_image_pixels,
                          max_aspect=self.settings.max_image_aspect).format
        path = self.uploads / digest[:2] / (digest + _SUFFIX.get(fmt or "", ".img"))
        if path.is_file() and path.stat().st_size == len(data):
            return path
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _durable("the uploaded image", e) from e
        return path

    def add(self, pid: str, item: Item, vector: torch.Tensor, fingerprint: str, *, by: str,
            data: bytes | None = None) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        """Journal then store one item embedded as ``vector`` by the model ``fingerprint`` (re-embedded when another
        model is served by now). Returns ``(payload, created, index ref)``; ``created`` is False when the content is
        already in the served generation (nothing is written). Blocking: call it from a worker thread."""
        with self.swap_lock:
            self.check_not_taken_down(pid)
            pair = self._served()
            store = pair.index.store
            found = store.retrieve([pid])
            if found:  # the same content is there already (from a build or an earlier add): nothing to write
                return found[0].payload, False, pair.ref
            if data is not None:
                item = Item(kind="image", path=self.stored_file(data), caption=item.caption, tags=item.tags)
            fields = {"id": pid, "kind": item.kind, "caption": item.caption if item.kind == "image" else None,
                      "text": item.text, "tags": list(item.tags), "by": by,
                      "file": str(item.path.relative_to(self.uploads)) if item.path is not None and self.uploads else None}
            try:
                self.journal.append(ADD, **fields)
            except OSError as e:
                raise _durable("the journal of online changes", e) from e
            if pair.artifact.fingerprint != fingerprint:
                vector = self._embed(pair, [item])[0]
            payload = self._upsert(pair, [pid], [item], vector[None])[0]
            return payload, True, pair.ref

    # -------------------------------------------------------------- takedowns
    def take_down(self, item_id: str, *, reason: str, by: str, purge: bool) -> dict[str, Any]:
        """Take an item down: journal, then delete from the served store (and the uploaded file, with ``purge``).
        An id taken down before answers its first takedown (``already``); an id never seen is a 404. Blocking."""
        try:
            pid = str(uuid.UUID(item_id))
        except ValueError:
            raise NotFoundError(f"no item {item_id!r}; ids are the UUIDs returned in search results") from None
        with self.swap_lock:
            first = self.journal.takedowns.get(pid)
            if first is not None:
                return _takedown(first, already=True)
            pair = self._served()
            found = pair.index.store.retrieve([pid], with_vectors=True, fields=["kind", "uri"])
            added = self.journal.adds.get(pid)
            if not found and added is None:
                raise NotFoundError(f"no item {item_id!r} in index {pair.info.get('name')}")
            payload = found[0].payload if found else {}
            vector = _query_vector(pair, found[0].vectors) if found and payload.get("kind") == "image" else None
            upload = self._upload_of(added)
            try:
                entry = self.journal.append(TAKEDOWN, id=pid, reason=reason, by=by, kind=payload.get("kind"),
                                            uri=payload.get("uri"), purged=bool(purge and upload is not None),
                                            model=pair.artifact.fingerprint if vector is not None else None,
                                            vector=vector)
            except OSError as e:
                raise _durable("the journal of online changes", e) from e
            pair.index.store.delete([pid])
            if vector is not None:
                self._remember(pair, pid, torch.tensor([vector], dtype=torch.float32))
        if purge and upload is not None:
            upload.unlink(missing_ok=True)
        return _takedown(entry, already=False)

    def _upload_of(self, added: dict[str, Any] | None) -> Path | None:
        """The managed upload file of an item added through the API (None for items from a build or texts)."""
        if added is None or not added.get("file") or self.uploads is None:
            return None
        path = (self.uploads / added["file"]).resolve()
        return path if path.is_relative_to(self.uploads.resolve()) else None

    # -------------------------------------------------------------- replay
    def replay(self, pair: ServedPair) -> dict[str, Any]:
        """Bring ``pair``'s generation in line with the journal before it is served: delete every taken-down id,
        embed (with the pair's model) and upsert every added item it lacks. Idempotent. Blocking; call it under the
        swap lock. Raises when the store fails (the pair is then not served: never one missing a takedown)."""
        store = pair.index.store
        down = list(self.journal.takedowns)
        for start in range(0, len(down), REPLAY_BATCH):
            store.delete(down[start:start + REPLAY_BATCH])
        adds = list(self.journal.adds.values())
        added, missing = 0, []
        for start in range(0, len(adds), REPLAY_BATCH):
            chunk = adds[start:start + REPLAY_BATCH]
            present = {p.id for p in store.retrieve([e["id"] for e in chunk], fields=["kind"])}
            ready: list[tuple[dict[str, Any], Item]] = []
            for entry in chunk:
                if entry["id"] in present:
                    continue
                item = self._item(entry)
                if item.kind == "text" or (item.path is not None and item.path.is_file()):
                    ready.append((entry, item))
                else:
                    missing.append(entry["id"])
            for kind in ("image", "text"):
                group = [(e["id"], it) for e, it in ready if it.kind == kind]
                if group:
                    items = [it for _, it in group]
                    self._upsert(pair, [pid for pid, _ in group], items, self._embed(pair, items))
                    added += len(group)
        if missing:
            log.warning("replaying the journal: %d added item(s) have no file any more and were left out: %s",
                        len(missing), ", ".join(missing[:10]))
        unmatched = self._embed_taken_down(pair)
        return {"removed": len(down), "added": added, "missing": missing, "unmatched_takedowns": unmatched}

    # -------------------------------------------------------------- near-duplicates of taken-down images
    def check_not_near_duplicate(self, pair: ServedPair, vector: torch.Tensor, *,
                                 allow: bool = False) -> dict[str, Any] | None:
        """Refuse (409) an image whose embedding ``vector`` (under ``pair``'s model) lies within
        ``NEAR_DUPLICATE_DISTANCE`` of a taken-down image's; nothing to check without the setting. With ``allow`` (an
        admin's override of a false refusal) nothing is refused: the match is returned instead, ``{"id", "distance"}``
        of the nearest such image, for the audit record (None when none is that close)."""
        threshold = self.settings.near_duplicate_distance
        near = self._near
        if threshold is None or near is None or near[0] != pair.artifact.fingerprint or not near[1]:
            return None
        d = distances(pair, vector, near[2])
        i = int(d.argmin())
        if float(d[i]) > threshold:
            return None
        pid, distance = near[1][i], float(d[i])
        if allow:
            return {"id": pid, "distance": distance}
        at = self.journal.takedowns.get(pid, {}).get("at")
        raise ConflictError(f"this image is a near-duplicate of item {pid}, taken down at {at} (distance "
                            f"{distance:.4f}, at most {threshold:g} refused: NEAR_DUPLICATE_DISTANCE), so it may not "
                            "be added; look at it beside the taken-down item, and if it is not that content, send it "
                            "again with allow_near_duplicate=true (the audit log records the override)")

    def _remember(self, pair: ServedPair, pid: str, x: torch.Tensor) -> None:
        near = self._near
        if near is not None and near[0] == pair.artifact.fingerprint:
            self._near = (near[0], [*near[1], pid], torch.cat([near[2].reshape(-1, x.shape[1]), x]))

    def _embed_taken_down(self, pair: ServedPair) -> int:
        """Hold the taken-down images' embeddings under ``pair``'s model: recorded ones, else embedded again from their
        files. Returns how many have neither (exact copies of them are still refused)."""
        fp, ids, rows, unmatched = pair.artifact.fingerprint, [], [], 0
        for pid, entry in self.journal.takedowns.items():
            if entry.get("kind") != "image":
                continue
            x: torch.Tensor | None
            if entry.get("model") == fp and entry.get("vector"):
                x = torch.tensor([entry["vector"]], dtype=torch.float32)
            else:
                path = self._file_of(entry)
                try:
                    x = self._embed(pair, [Item(kind="image", path=path)]) if path is not None else None
                except SafeRetrievalError:
                    x = None
            if x is None:
                unmatched += 1
            else:
                ids.append(pid)
                rows.append(x)
        self._near = (fp, ids, torch.cat(rows) if rows else torch.zeros(0))
        if unmatched:
            log.warning("%d taken-down image(s) have no file to embed with model %s: only exact copies of them are "
                        "refused", unmatched, fp)
        return unmatched

    def _file_of(self, entry: dict[str, Any]) -> Path | None:
        """The file a taken-down image was indexed from (its uri under the media root), if it still exists."""
        uri, root = entry.get("uri"), self.settings.media_root
        if not uri:
            return None
        path = Path(uri) if Path(uri).is_absolute() or root is None else root / uri
        return path if path.is_file() else None

    def _item(self, entry: dict[str, Any]) -> Item:
        if entry.get("kind") == "text":
            return Item(kind="text", text=entry.get("text"), tags=tuple(entry.get("tags") or ()))
        path = self.uploads / entry["file"] if self.uploads is not None and entry.get("file") else None
        return Item(kind="image", path=path, caption=entry.get("caption"), tags=tuple(entry.get("tags") or ()))

    def _embed(self, pair: ServedPair, items: list[Item]) -> torch.Tensor:
        """Embed ``items`` (all images or all texts) with the pair's model, off the batcher (a replay, a rare re-embed)."""
        enc = pair.artifact.encoder
        if items[0].kind == "text":
            return enc.encode_text([it.text or "" for it in items], batch_size=len(items)).float().cpu()
        pixels = []
        for it in items:
            assert it.path is not None, "an image item has its file"
            try:
                pixels.append(preprocess_bytes(it.path.read_bytes(), enc.transform, name=str(it.path),
                                               max_pixels=self.settings.max_image_pixels,
                                               max_aspect=self.settings.max_image_aspect))
            except (OSError, ImageError) as e:
                raise SafeRetrievalError(f"an added image could not be read again to embed it ({e}); "
                                         "restore the file under the uploads folder, or take the item down") from e
        return enc.encode_image(torch.stack(pixels), batch_size=len(pixels)).float().cpu()

    def _upsert(self, pair: ServedPair, ids: list[str], items: list[Item], x: torch.Tensor) -> list[dict[str, Any]]:
        """Upsert ``items`` (all of one kind) as points, with the indexer's own payloads (the served unsafe rule, the
        uri relative to the media root); returns the payloads."""
        docs = payloads(pair.artifact, items, x, self.settings.media_root)
        for doc in docs:
            doc["source"] = "api"
        store = pair.index.store
        store.upsert(ids, store.schema.point_vectors(x.numpy()), docs)
        return docs

    def _served(self) -> ServedPair:
        pair = self.current()
        if pair is None:
            raise UnavailableError("the service is not ready (no model and index are served yet); retry shortly")
        return pair


def _query_vector(pair: ServedPair, vectors: dict[str, list[float]] | None) -> list[float] | None:
    """The stored embedding of a point as the encoder gave it (``space`` components, or the unit ``vector``)."""
    name = SPACE if pair.index.schema.geometry == "lorentz" else VECTOR
    return list((vectors or {}).get(name) or []) or None


def distances(pair: ServedPair, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Distances ``(N,)`` from the embedding ``q (D,)`` to ``x (N, D)`` under ``pair``'s geometry: geodesic (lorentz)
    or ``1 - cosine`` (euclidean)."""
    q = q.reshape(1, -1).float()
    if pair.artifact.geometry == "lorentz":
        return lorentz.pairwise_dist(q, x.float(), pair.artifact.curvature)[0]
    return 1 - torch.nn.functional.normalize(x.float(), dim=-1) @ torch.nn.functional.normalize(q, dim=-1)[0]


def _takedown(entry: dict[str, Any], *, already: bool) -> dict[str, Any]:
    return {"id": entry["id"], "reason": entry.get("reason", ""), "by": entry.get("by", ""), "at": entry.get("at", ""),
            "purged": bool(entry.get("purged")), "already": already}

