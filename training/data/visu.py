"""The ViSU dataset on disk: ViSU-Text JSON records, COCO 2017 safe images, regenerated NSFW images.

A quadruplet is (safe caption, safe image, NSFW caption, NSFW image). The public release is text only
(``ViSU-Text_{split}.json``); safe images come from COCO 2017 by ``coco_id`` and NSFW images must be
regenerated locally, so their layout is configurable. Default layout of a dataset root ``DIR``
(also what :mod:`training.data.synthetic` writes)::

    DIR/ViSU-Text_{split}.json                 records: incremental_id, coco_id, safe, nsfw, tag
    DIR/coco/{train2017|val2017|test2017}/{coco_id:012d}.jpg
    DIR/nsfw/{split}/{incremental_id}/0.jpg
    DIR/visu.json                              optional: text_file, coco_root, nsfw_root, nsfw_layout

A real download is described once in ``DIR/visu.json`` (relative paths are taken from ``DIR``), e.g.
``{"coco_root": "/data/coco2017", "nsfw_root": "/data/visu_nsfw", "nsfw_layout": "{split}/{incremental_id}/0.jpg"}``;
keyword arguments of :func:`load_split` override it. The JSON may be a list of records, a dict keyed by
id, or either wrapped as ``{"info": ..., "data": ...}``. Records with an empty caption or a missing
image are skipped and counted per reason rather than failing the run.

The synthetic generator's ``multi`` split (``data synth --multi K``) has the same layout and reads like any
split; :func:`load_multi` also returns the two concepts each of its unsafe images shows.

With data roots (``training.data.roots``) the dataset root, ``visu.json``, the text file and both image
roots must lie under them, and a record whose image resolves outside them is skipped
(``outside_data_roots``); readers of the images check again when they open them.
"""

from __future__ import annotations

import json
import logging
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import Tensor
from torch.utils.data import Dataset

from training.data.roots import DataRoots
from training.errors import DataError, ImageError, OutsideRootsError
from training.images import decode_image, open_image, read_image_file

log = logging.getLogger(__name__)

DEFAULTS: dict[str, str] = {
    "text_file": "ViSU-Text_{split}.json",
    "coco_root": "coco",
    "nsfw_root": "nsfw",
    "nsfw_layout": "{split}/{incremental_id}/0.jpg",
}
CONFIG_FILE = "visu.json"
#: Keys of ``visu.json`` that describe the dataset for people rather than the loader.
CONFIG_NOTES = ("info", "description", "comment")
COCO_FOLDERS = ("train2017", "val2017", "test2017")
LAYOUT_FIELDS = ("split", "incremental_id", "coco_id", "tag")
#: Skip reasons, in the order they are checked; each skipped record counts under its first reason.
SKIP_REASONS = ("malformed", "duplicate_id", "empty_safe_caption", "empty_nsfw_caption", "missing_safe_image",
                "missing_nsfw_image", "outside_data_roots")


@dataclass(frozen=True)
class Quadruplet:
    """One ViSU record with the resolved paths of its two images."""

    incremental_id: int
    coco_id: int
    safe: str
    nsfw: str
    tag: str
    safe_image: Path
    nsfw_image: Path


@dataclass
class VisuSplit:
    """The usable records of one split, and how many were skipped for which reason (non-zero counts only)."""

    name: str
    records: list[Quadruplet]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def tags(self) -> dict[str, int]:
        """Number of records per tag, sorted by tag."""
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.tag] = counts.get(r.tag, 0) + 1
        return dict(sorted(counts.items()))


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files are: resolved from defaults, ``visu.json`` and explicit arguments."""

    text_file: Path
    coco_root: Path
    nsfw_root: Path
    nsfw_layout: str


def read_config(root: Path, roots: DataRoots = DataRoots()) -> dict[str, str]:
    """``root/visu.json`` as a dict (empty when absent); unknown keys are an error, to catch typos."""
    path = root / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(roots.read(path, what="ViSU config")[0].decode("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix it or delete it to use the default layout") from e
    if not isinstance(cfg, dict):
        raise DataError(f"{path} must hold a JSON object with keys {', '.join(DEFAULTS)}")
    unknown = sorted(k for k in cfg if k not in DEFAULTS and k not in CONFIG_NOTES and not k.startswith("_"))
    if unknown:
        raise DataError(f"{path} has unknown keys {', '.join(unknown)}; the known keys are {', '.join(DEFAULTS)}")
    return {k: str(v) for k, v in cfg.items() if k in DEFAULTS and v is not None}


def resolve_layout(
    root: Path,
    split: str,
    *,
    text_file: str | Path | None = None,
    coco_root: str | Path | None = None,
    nsfw_root: str | Path | None = None,
    nsfw_layout: str | None = None,
    roots: DataRoots = DataRoots(),
) -> Layout:
    """Explicit arguments, then ``root/visu.json``, then the defaults; relative paths start at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"ViSU dataset root {root} does not exist; pass the directory holding ViSU-Text_{{split}}.json "
            "(or make one with `safe-retrieval data synth --out DIR`)"
        )
    given = {"text_file": text_file, "coco_root": coco_root, "nsfw_root": nsfw_root, "nsfw_layout": nsfw_layout}
    cfg = {**DEFAULTS, **read_config(root, roots), **{k: str(v) for k, v in given.items() if v is not None}}
    _check_layout(cfg["nsfw_layout"])
    try:
        text = cfg["text_file"].format(split=split)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"text_file {cfg['text_file']!r} may only use the field {{split}}") from e
    return Layout(
        text_file=root / Path(text).expanduser(),
        coco_root=root / Path(cfg["coco_root"]).expanduser(),
        nsfw_root=root / Path(cfg["nsfw_root"]).expanduser(),
        nsfw_layout=cfg["nsfw_layout"],
    )


def _check_layout(layout: str) -> None:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(layout) if f is not None}
    except ValueError as e:
        raise DataError(f"nsfw_layout {layout!r} is not a valid pattern ({e})") from e
    bad = {n.split(".")[0].split("[")[0].split(":")[0] for n in names} - set(LAYOUT_FIELDS)
    if bad or "" in names:
        raise DataError(f"nsfw_layout {layout!r} uses {', '.join(sorted(bad)) or 'a positional field'}; "
                        f"it may use only {', '.join('{' + f + '}' for f in LAYOUT_FIELDS)}")


def read_records(path: Path, roots: DataRoots = DataRoots()) -> list[dict[str, Any]]:
    """The raw records of a ViSU-Text file: a list, a dict keyed by id, either one under ``"data"``, or JSON lines."""
    try:
        text = roots.read(path, what="ViSU-Text file")[0].decode("utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    try:
        if path.suffix == ".jsonl":
            data: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-download the ViSU-Text file") from e
    if isinstance(data, dict) and "data" in data and isinstance(data["data"], (list, dict)):
        data = data["data"]
    if isinstance(data, dict):
        # Keyed by id: the key stands in for a missing incremental_id.
        return [{"incremental_id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    if isinstance(data, list):
        return data
    raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of ViSU records or a dict keyed by id")


class CocoIndex:
    """Finds a COCO 2017 image by id in ``train2017/``, ``val2017/``, ``test2017/`` (in that order).

    Each folder is listed once, so a lookup is a set membership test rather than three ``stat`` calls.
    """

    def __init__(self, root: Path):
        self.root = root
        self.names = {d: set(os.listdir(root / d)) if (root / d).is_dir() else set() for d in COCO_FOLDERS}

    def find(self, coco_id: int) -> Path | None:
        name = f"{coco_id:012d}.jpg"
        for d in COCO_FOLDERS:
            if name in self.names[d]:
                return self.root / d / name
        return None


def load_split(
    root: Path,
    split: str,
    *,
    text_file: str | Path | None = None,
    coco_root: str | Path | None = None,
    nsfw_root: str | Path | None = None,
    nsfw_layout: str | None = None,
    roots: DataRoots = DataRoots(),
) -> VisuSplit:
    """Read one split (``train``, ``validation``, ``test``, or ``heldout`` for synthetic data).

    ``text_file`` is a path or a pattern with ``{split}``; ``nsfw_layout`` is a pattern under ``nsfw_root``
    with ``{split}``, ``{incremental_id}``, ``{coco_id}`` and ``{tag}``. Every record read ends up either
    in ``records`` or counted once in ``skipped`` (under its first problem, see ``SKIP_REASONS``).
    Raises DataError when the root, the JSON or an image root is missing, or no record is usable, and
    OutsideRootsError when one of them lies outside ``roots``.
    """
    try:
        return _load_split(root, split, roots, text_file=text_file, coco_root=coco_root, nsfw_root=nsfw_root,
                           nsfw_layout=nsfw_layout)
    except (OSError, UnicodeDecodeError) as e:  # a name too long, a symlink loop, a text file that is not UTF-8
        raise DataError(f"cannot read split {split!r} of the ViSU dataset {str(root)[:200]} ({e}); check its layout") from e


def _load_split(root: Path, split: str, roots: DataRoots, **layout_kwargs: Any) -> VisuSplit:
    roots.check(root, what="ViSU dataset root")
    layout = resolve_layout(root, split, roots=roots, **layout_kwargs)
    for what, path in (("ViSU-Text file", layout.text_file), ("COCO image root", layout.coco_root),
                       ("NSFW image root", layout.nsfw_root)):
        roots.check(path, what=what)
    if not layout.text_file.is_file():
        found = sorted(p.name for p in Path(root).glob("ViSU-Text_*.json*"))
        raise DataError(
            f"no ViSU-Text file for split {split!r}: {layout.text_file} does not exist"
            + (f" (found: {', '.join(found)})" if found else "")
            + "; pass text_file=... or set text_file in visu.json"
        )
    for what, path, hint in (
        ("COCO image root", layout.coco_root, "the folder holding train2017/ and val2017/"),
        ("NSFW image root", layout.nsfw_root, "the folder of the regenerated NSFW images (ViSU does not release them)"),
    ):
        if not path.is_dir():
            key = "coco_root" if what.startswith("COCO") else "nsfw_root"
            raise DataError(f"{what} {path} does not exist; pass {key}=... ({hint}) or set {key} in {Path(root) / CONFIG_FILE}")

    raw = read_records(layout.text_file, roots)
    coco = CocoIndex(layout.coco_root)
    records: list[Quadruplet] = []
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    seen: set[int] = set()
    for rec in raw:
        reason, quad = _quadruplet(rec, split, layout, coco, seen)
        if quad is not None and roots and not all(roots.contains(Path(os.path.realpath(p)))
                                                  for p in (quad.safe_image, quad.nsfw_image)):
            reason, quad = "outside_data_roots", None
        if quad is None:
            skipped[reason] += 1
        else:
            records.append(quad)
    skipped = {k: v for k, v in skipped.items() if v}
    if skipped:
        log.warning("ViSU %s: skipped %d of %d records (%s)", split, sum(skipped.values()), len(raw), _counts(skipped))
    if not records:
        raise DataError(
            f"split {split!r} of {root} has no usable records ({len(raw)} read"
            + (f"; skipped: {_counts(skipped)}" if skipped else "")
            + f"); check coco_root ({layout.coco_root}), nsfw_root ({layout.nsfw_root}) and nsfw_layout ({layout.nsfw_layout!r})"
        )
    return VisuSplit(split, records, skipped)


def _counts(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in skipped.items())


def _quadruplet(rec: Any, split: str, layout: Layout, coco: CocoIndex, seen: set[int]) -> tuple[str, Quadruplet | None]:
    """The record as a Quadruplet, or the reason it is skipped."""
    try:
        iid, cid = int(rec["incremental_id"]), int(rec["coco_id"])
        safe, nsfw = rec["safe"], rec["nsfw"]
        tag = rec.get("tag") or ""
    except (KeyError, TypeError, ValueError, AttributeError):
        return "malformed", None
    if not isinstance(safe, (str, type(None))) or not isinstance(nsfw, (str, type(None))) or not isinstance(tag, str):
        return "malformed", None
    if iid in seen:
        return "duplicate_id", None
    seen.add(iid)
    safe, nsfw = (safe or "").strip(), (nsfw or "").strip()
    if not safe:
        return "empty_safe_caption", None
    if not nsfw:
        return "empty_nsfw_caption", None
    safe_image = coco.find(cid)
    if safe_image is None:
        return "missing_safe_image", None
    nsfw_image = layout.nsfw_root / layout.nsfw_layout.format(split=split, incremental_id=iid, coco_id=cid, tag=tag)
    if not nsfw_image.is_file():
        return "missing_nsfw_image", None
    return "", Quadruplet(iid, cid, safe, nsfw, tag, safe_image, nsfw_image)


MULTI_SPLIT = "multi"


@dataclass(frozen=True)
class MultiRecord:
    """A record of the ``multi`` split: an unsafe image showing two concepts, ``concepts[0]`` in the main box and
    ``concepts[1]`` in a prop slot, named in ``caption`` by ``phrases``; the safe half shows a counterpart of each."""

    incremental_id: int
    caption: str
    image: Path
    concepts: tuple[str, str]
    phrases: tuple[str, str]
    safe_caption: str
    safe_image: Path


def load_multi(root: Path, roots: DataRoots | None = None) -> list[MultiRecord]:
    """The usable records of the ``multi`` split at ``root``, read as :func:`load_split` reads a split (same layout,
    data roots and skip rules); a record without two concept names and phrases is skipped, with a warning.

    Raises DataError when the dataset has no multi split or none of its records is usable.
    """
    roots = roots or DataRoots()
    try:
        roots.check(root, what="ViSU dataset root")
        layout = resolve_layout(root, MULTI_SPLIT, roots=roots)
        if not layout.text_file.is_file():
            raise DataError(f"{root} has no multi-concept split ({layout.text_file.name}); generate a dataset with "
                            "`safe-retrieval data synth --multi K`")
        split = load_split(root, MULTI_SPLIT, roots=roots)
        raw = read_records(layout.text_file, roots)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the multi split of {str(root)[:200]} ({e}); check its layout") from e
    pairs: dict[int, tuple[tuple[str, str], tuple[str, str]]] = {}
    for rec in raw:
        try:
            iid, names, phrases = int(rec["incremental_id"]), rec["concepts"], rec["phrases"]
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, str) and v for v in x) for x in (names, phrases)):
            pairs.setdefault(iid, (tuple(names), tuple(phrases)))
    out = [MultiRecord(q.incremental_id, q.nsfw, q.nsfw_image, *pairs[q.incremental_id], q.safe, q.safe_image)
           for q in split.records if q.incremental_id in pairs]
    if len(out) < len(split.records):
        log.warning("ViSU multi: skipped %d records without two concepts and phrases", len(split.records) - len(out))
    if not out:
        raise DataError(f"the multi split of {root} has no record naming two concepts and phrases; regenerate it "
                        "with `safe-retrieval data synth --multi K`")
    return out


class QuadDataset(Dataset):
    """Quadruplets as training examples: ``dict(safe_image, nsfw_image, safe, nsfw, tag, index)``.

    Images are ``transform(PIL image)``, e.g. ``(3, H, W)`` float tensors from the encoder's transform.
    An image that cannot be read (deleted, truncated, not an image) is logged once and the example is
    replaced by the next readable one, so one bad file never stops a training run; ``index`` is always the
    position of the record actually returned, so pairing stays correct, and ``requested`` the position
    asked for: the positions between them were unreadable. ``failed`` holds the positions found
    unreadable by this process (each DataLoader worker keeps its own).
    """

    def __init__(self, records: Sequence[Quadruplet] | VisuSplit, transform: Callable[[Any], Tensor], *, max_tries: int = 16,
                 roots: DataRoots = DataRoots()):
        self.records = list(records.records if isinstance(records, VisuSplit) else records)
        self.roots = roots  # checked again on the file actually opened (a symlink may change after listing)
        if not self.records:
            raise DataError("QuadDataset needs at least one record; load a non-empty split")
        self.transform = transform
        self.max_tries = max_tries
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        index %= n
        for k in range(min(self.max_tries, n)):
            i = (index + k) % n
            if i in self.failed:
                continue
            r = self.records[i]
            try:
                safe_image, nsfw_image = self._open(r.safe_image), self._open(r.nsfw_image)
            except (ImageError, OutsideRootsError) as e:
                self.failed.add(i)
                log.warning("skipping ViSU record %d (incremental_id %d): %s", i, r.incremental_id, e)
                continue
            return {
                "safe_image": self.transform(safe_image),
                "nsfw_image": self.transform(nsfw_image),
                "safe": r.safe,
                "nsfw": r.nsfw,
                "tag": r.tag,
                "index": i,
                "requested": index,  # every position from here up to ``index`` (cyclically) was unreadable
            }
        raise DataError(
            f"{min(self.max_tries, n)} consecutive ViSU records from position {index} have unreadable images "
            f"(first: {self.records[index].safe_image}); check the image roots"
        )

    def _open(self, path: Path):
        if not self.roots:
            return open_image(path)
        try:
            data = read_image_file(path, roots=self.roots)[0]  # the default byte limit, checked before reading
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from e
        return decode_image(data, name=str(path))
