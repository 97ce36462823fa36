"""What gets indexed: a folder of images, a manifest file, or a ViSU split, as a list of ``Item``.

- **Folder**: every file with a common image suffix (``training.images.IMAGE_SUFFIXES``, any case),
  recursively, in sorted path order.
- **Manifest** (``.csv``, ``.jsonl``, ``.parquet``, UTF-8): one row per image. ``image`` (a path,
  relative to the manifest's directory unless absolute) is required; ``caption`` and ``tags`` are optional.
  ``tags`` is a list (jsonl, parquet) or a string split on ``|``, ``;`` or ``,`` (csv). Every other
  column is kept as payload. Columns named like our own payload fields are refused. A ``label``
  column equal to ``unsafe`` flags the row unsafe whatever the model says (``indexer.pipeline``).
  A row that cannot be used (not an object, no image, an image that is not text, odd tags) becomes an
  item with an ``error``: the job counts it as failed and records it with its line number.
- **ViSU** (``training.data.visu.load_split``): both images of every quadruplet, captioned with
  their own caption, with ``label`` safe/unsafe, ``visu_id``, ``coco_id``, ``split`` as payload.
- **Texts**: a file with one text per line (blank lines skipped), or the captions of the images
  above (``captions_as_text``), so image -> text search has text points to find.

Order is deterministic, so every run (and every rank of a torchrun job) sees the same list.
With data roots (``training.data.roots``), every file read here (folder, manifest, texts, ViSU layout)
must lie under them; image files are checked again when the pipeline opens them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from training.data.fields import json_kind as _kind
from training.data.fields import parse_tags as _tags
from training.data.roots import DataRoots
from training.errors import DataError, InputError, OutsideRootsError
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
    error: str | None = None  # why it cannot be indexed (a malformed manifest row): a counted failure
    origin: str | None = None  # where a malformed row sits, "list.jsonl:3" (line; parquet: row)

    @property
    def label(self) -> str:
        """How logs and failures.jsonl name the item."""
        if self.origin is not None:
            return self.origin
        return str(self.path) if self.kind == "image" else f"text:{(self.text or '')[:80]}"


def _is(path: Path, kind: str, what: str) -> bool:
    """``path.is_dir()`` / ``is_file()``, with the OS's refusals (a name too long) as InputError."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError as e:
        raise InputError(f"{what} {str(path)[:200]!r} cannot be used ({e.strerror or e}); give a plain existing path") from e


def _read(path: Path, roots: DataRoots, what: str) -> bytes:
    """A whole input file, read only if it lies under the data roots."""
    try:
        return roots.read(path, what=what)[0]
    except OutsideRootsError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from e


def _decode(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's CSV) is not part of the first column name
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e


def folder_items(folder: Path, roots: DataRoots = DataRoots()) -> list[Item]:
    """Images under ``folder`` (recursive), sorted by path."""
    folder = Path(folder)
    roots.check(folder, what="image folder")
    if not _is(folder, "dir", "image folder"):
        raise DataError(f"image folder not found: {folder}; give an existing directory to --images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return [Item("image", path=p) for p in paths]


def _rows(path: Path, data: bytes) -> list[tuple[int, Any]]:
    """``(line, row)`` of every row (csv, jsonl: line number; parquet: row number); rows may be any JSON value."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_decode(data, path, "manifest"), newline=""))
        rows = []
        try:
            for r in reader:
                rows.append((reader.line_num, r))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num} is not valid CSV ({e}); fix that line") from e
        return rows
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(_decode(data, path, "manifest").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except (json.JSONDecodeError, RecursionError) as e:
                    why = e if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise DataError(f"{path}:{n} is not valid JSON ({why}); fix or remove that line") from e
        return rows
    if suffix == ".parquet":
        # pyarrow takes a quarter second to load: only parquet manifests pay for it
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(pa.BufferReader(data)).to_pylist(), 1))
        except (pa.ArrowException, OSError, ValueError, OverflowError) as e:
            raise DataError(f"{path} is not a readable Parquet file ({e}); re-export it") from e
    raise InputError(f"unsupported manifest {path.name}: use one of {', '.join(MANIFEST_SUFFIXES)}")


def _plain(v: Any) -> Any:
    """JSON-safe payload values (parquet gives dates, numpy scalars, ...; NaN and infinities become null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return _plain(v.item())
    return str(v)


def manifest_items(path: Path, roots: DataRoots = DataRoots()) -> list[Item]:
    """Image items from a csv/jsonl/parquet manifest (see the module docstring)."""
    path = Path(path)
    if not _is(path, "file", "manifest"):
        raise DataError(f"manifest not found: {path}; give an existing .csv, .jsonl or .parquet file to --manifest")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise InputError(f"unsupported manifest {path.name}: use one of {', '.join(MANIFEST_SUFFIXES)}")
    rows = _rows(path, _read(path, roots, "manifest"))
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    objects = [r for _, r in rows if isinstance(r, dict)]
    if not objects:
        n, first = rows[0]
        raise DataError(f"manifest {path} has no row that is an object (line {n} is {_kind(first)}); "
                        "give one JSON object per line, with an 'image' field")
    columns = {str(k) for r in objects for k in r if k is not None}
    if "image" not in columns:
        raise DataError(f"manifest {path} has no 'image' column (found: {', '.join(sorted(columns))})")
    clash = sorted(columns & RESERVED - {"caption", "tags"})
    if clash:
        raise DataError(f"manifest {path} uses reserved column names {', '.join(clash)}; rename them")
    return [_row_item(path, n, r) for n, r in rows]


def _row_item(manifest: Path, n: int, row: Any) -> Item:
    """One manifest row as an image item, or as an item with an ``error`` saying what is wrong with it."""
    where = f"{manifest}:{n}"

    def bad(why: str) -> Item:
        return Item("image", error=f"{why}; fix or remove that row", origin=where)

    if not isinstance(row, dict):
        return bad(f"the row is {_kind(row)}, not an object")
    if None in row:
        return bad("the row has more fields than the header")
    image, caption = row.get("image"), row.get("caption")
    if image is None or image == "":
        return bad("no image")
    if not isinstance(image, str):
        return bad(f"image must be a path (a string), not {_kind(image)}")
    if "\x00" in image:
        return bad("image contains a NUL byte")
    if caption is not None and not isinstance(caption, (str, int, float)):
        return bad(f"caption must be text, not {_kind(caption)}")
    try:
        tags = _tags(row.get("tags"))
        extra = {str(k): _plain(v) for k, v in row.items() if k not in ("image", "caption", "tags")}
    except ValueError as e:
        return bad(str(e))
    except RecursionError:
        return bad("a value is nested too deeply")
    p = Path(image)
    if not p.is_absolute():
        p = manifest.parent / p
    return Item("image", path=p, caption=str(caption) if caption not in (None, "") else None, tags=tags, extra=extra)


def visu_items(root: Path, split: str, roots: DataRoots = DataRoots(), **load_kwargs) -> list[Item]:
    """Both images of every quadruplet of a ViSU split (real or synthetic layout)."""
    # ViSU's loader brings torch (3 s): folder and manifest inputs are read without it
    from training.data import visu

    data = visu.load_split(Path(root), split, roots=roots, **load_kwargs)
    items = []
    for q in data.records:
        common = {"visu_id": q.incremental_id, "coco_id": q.coco_id, "split": split}
        tags = (q.tag,) if q.tag else ()
        items.append(Item("image", path=Path(q.safe_image), caption=q.safe, tags=tags, extra={**common, "label": "safe"}))
        items.append(Item("image", path=Path(q.nsfw_image), caption=q.nsfw, tags=tags, extra={**common, "label": "unsafe"}))
    return items


def text_items(path: Path, roots: DataRoots = DataRoots()) -> list[Item]:
    """One text item per non-blank line of a UTF-8 file."""
    path = Path(path)
    if not _is(path, "file", "texts file"):
        raise DataError(f"texts file not found: {path}; give a UTF-8 file with one text per line to --texts")
    text = _decode(_read(path, roots, "texts file"), path, "texts file")
    texts = [t.strip() for t in text.splitlines() if t.strip()]
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
            visu_kwargs: dict | None = None, roots: DataRoots = DataRoots()) -> list[Item]:
    """All items of one job from the CLI's input options (exactly one image source, or texts alone).

    With ``roots``, every input file must lie under them (OutsideRootsError otherwise).
    """
    given = [x for x in (images, manifest, visu) if x is not None]
    if len(given) > 1:
        raise InputError("give only one of --images, --manifest or --visu")
    if not given and texts is None:
        raise InputError("nothing to index: give --images DIR, --manifest FILE, --visu DIR --split S, or --texts FILE")
    items: list[Item] = []
    if images is not None:
        items = folder_items(images, roots)
    elif manifest is not None:
        items = manifest_items(manifest, roots)
    elif visu is not None:
        if not split:
            raise InputError("--visu needs --split (train, validation, test or heldout)")
        items = visu_items(visu, split, roots, **(visu_kwargs or {}))
    if captions_as_text:
        items += caption_items(items)
    if texts is not None:
        items += text_items(texts, roots)
    return items


def default_media_root(*, images: Path | None = None, manifest: Path | None = None, visu: Path | None = None) -> Path | None:
    """Where ``uri`` payloads are relative to when ``--media-root`` is not given."""
    if images is not None:
        return Path(images)
    if manifest is not None:
        return Path(manifest).parent
    return Path(visu) if visu is not None else None
