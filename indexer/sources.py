"""What gets indexed: a folder of images, a manifest file, or a ViSU split, as a list of ``Item``.

- **Folder**: every file with a common image suffix (``training.images.IMAGE_SUFFIXES``, any case),
  recursively, in sorted path order.
- **Manifest** (``.csv``, ``.jsonl``, ``.parquet``): one row per image. ``image`` (a path, relative
  to the manifest's directory unless absolute) is required; ``caption`` and ``tags`` are optional.
  ``tags`` is a list (jsonl, parquet) or a string split on ``|``, ``;`` or ``,`` (csv). Every other
  column is kept as payload. Columns named like our own payload fields are refused. A ``label``
  column equal to ``unsafe`` flags the row unsafe whatever the model says (``indexer.pipeline``).
- **ViSU** (``training.data.visu.load_split``): both images of every quadruplet, captioned with
  their own caption, with ``label`` safe/unsafe, ``visu_id``, ``coco_id``, ``split`` as payload.
- **Texts**: a file with one text per line (blank lines skipped), or the captions of the images
  above (``captions_as_text``), so image -> text search has text points to find.

Order is deterministic, so every run (and every rank of a torchrun job) sees the same list.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from training.errors import DataError, InputError
from training.images import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
#: payload keys the indexer writes itself; manifest columns may not reuse them
RESERVED = frozenset({"kind", "uri", "caption", "tags", "d0", "unsafe_score", "unsafe", "model", "indexed_at", "image_uri"})


@dataclass(frozen=True)
class Item:
    """One thing to index: an image file or a text, with its caption, tags and extra payload."""

    kind: str  # "image" | "text"
    path: Path | None = None  # image file (image items), or the image a caption belongs to (text items)
    text: str | None = None  # the text itself (text items)
    caption: str | None = None
    tags: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        """How logs and failures.jsonl name the item."""
        return str(self.path) if self.kind == "image" else f"text:{(self.text or '')[:80]}"


def folder_items(folder: Path) -> list[Item]:
    """Images under ``folder`` (recursive), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}; give an existing directory to --images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return [Item("image", path=p) for p in paths]


def _tags(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                return _tags(json.loads(s))
            except json.JSONDecodeError:
                pass
        for sep in "|;,":
            s = s.replace(sep, "\x00")
        return tuple(t.strip() for t in s.split("\x00") if t.strip())
    if isinstance(value, Iterable):
        return tuple(str(t).strip() for t in value if str(t).strip())
    return (str(value),)


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n} is not valid JSON ({e}); fix or remove that line") from e
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise InputError(f"unsupported manifest {path.name}: use one of {', '.join(MANIFEST_SUFFIXES)}")


def _plain(v: Any) -> Any:
    """JSON-safe payload values (parquet gives dates, numpy scalars, ...)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def manifest_items(path: Path) -> list[Item]:
    """Image items from a csv/jsonl/parquet manifest (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}; give an existing .csv, .jsonl or .parquet file to --manifest")
    rows = _rows(path)
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    columns = set().union(*(r.keys() for r in rows))
    if "image" not in columns:
        raise DataError(f"manifest {path} has no 'image' column (found: {', '.join(sorted(columns))})")
    clash = sorted(columns & RESERVED - {"caption", "tags"})
    if clash:
        raise DataError(f"manifest {path} uses reserved column names {', '.join(clash)}; rename them")
    items = []
    for r in rows:
        image = r.get("image")
        p = Path(str(image)) if image not in (None, "") else Path(f"<row {len(items) + 1}: no image>")
        if not p.is_absolute() and image not in (None, ""):
            p = path.parent / p
        caption = r.get("caption")
        extra = {k: _plain(v) for k, v in r.items() if k not in ("image", "caption", "tags")}
        items.append(Item("image", path=p, caption=str(caption) if caption not in (None, "") else None,
                          tags=_tags(r.get("tags")), extra=extra))
    return items


def visu_items(root: Path, split: str, **load_kwargs) -> list[Item]:
    """Both images of every quadruplet of a ViSU split (real or synthetic layout)."""
    from training.data import visu

    data = visu.load_split(Path(root), split, **load_kwargs)
    items = []
    for q in data.records:
        common = {"visu_id": q.incremental_id, "coco_id": q.coco_id, "split": split}
        tags = (q.tag,) if q.tag else ()
        items.append(Item("image", path=Path(q.safe_image), caption=q.safe, tags=tags, extra={**common, "label": "safe"}))
        items.append(Item("image", path=Path(q.nsfw_image), caption=q.nsfw, tags=tags, extra={**common, "label": "unsafe"}))
    return items


def text_items(path: Path) -> list[Item]:
    """One text item per non-blank line of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"texts file not found: {path}; give a UTF-8 file with one text per line to --texts")
    texts = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise DataError(f"texts file {path} has no non-blank lines")
    return [Item("text", text=t, caption=t) for t in texts]


def caption_items(items: Sequence[Item]) -> list[Item]:
    """A text item for each captioned image (the caption, its tags and extra, and the image it belongs to)."""
    return [Item("text", path=it.path, text=it.caption, caption=it.caption, tags=it.tags, extra=dict(it.extra))
            for it in items if it.kind == "image" and it.caption]


def shard(items: Sequence[Item], rank: int, world: int) -> list[Item]:
    """The disjoint slice of ``items`` rank ``rank`` of ``world`` indexes (round-robin, so sizes differ by <= 1)."""
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is outside a world of {world}")
    return list(items[rank::world])


def collect(*, images: Path | None = None, manifest: Path | None = None, visu: Path | None = None,
            split: str | None = None, texts: Path | None = None, captions_as_text: bool = False,
            visu_kwargs: dict | None = None) -> list[Item]:
    """All items of one job from the CLI's input options (exactly one image source, or texts alone)."""
    given = [x for x in (images, manifest, visu) if x is not None]
    if len(given) > 1:
        raise InputError("give only one of --images, --manifest or --visu")
    if not given and texts is None:
        raise InputError("nothing to index: give --images DIR, --manifest FILE, --visu DIR --split S, or --texts FILE")
    items: list[Item] = []
    if images is not None:
        items = folder_items(images)
    elif manifest is not None:
        items = manifest_items(manifest)
    elif visu is not None:
        if not split:
            raise InputError("--visu needs --split (train, validation, test or heldout)")
        items = visu_items(visu, split, **(visu_kwargs or {}))
    if captions_as_text:
        items += caption_items(items)
    if texts is not None:
        items += text_items(texts)
    return items


def default_media_root(*, images: Path | None = None, manifest: Path | None = None, visu: Path | None = None) -> Path | None:
    """Where ``uri`` payloads are relative to when ``--media-root`` is not given."""
    if images is not None:
        return Path(images)
    if manifest is not None:
        return Path(manifest).parent
    return Path(visu) if visu is not None else None
