"""The forget set and the retain set of an unlearning run, and the training records that pair them.

A dataset's *pairs* are the (caption, image) pairs of its quadruplets: every safe pair ``(T, I)``
and every unsafe pair ``(T*, I*)``. The **forget set** holds the unsafe pairs of the quadruplets
that show a forgotten concept (:mod:`training.data.concepts`), plus the pairs a manifest lists
(``--forget-manifest``: a ``.csv`` or ``.jsonl`` file with ``image`` and ``caption`` columns, images
relative to the manifest). The **retain set** is every other pair: the safe halves of all
quadruplets (the harmless look-alikes a takedown must not hurt), the unsafe pairs of the other
concepts, and nothing whose image is listed in the manifest.

A manifest may carry a ``tags`` column (a list, or one string split on ``|``, ``;`` or ``,``): its tags
are concepts too. With ``--forget``, a tagged row is forgotten only when one of its tags is named
(directly, or as a concept or tag of the dataset that ``--forget`` selects), so one takedown list can
serve several requests; an untagged row is always forgotten, since it was listed by hand. Without
``--forget`` every row is forgotten.

The trainer reads quadruplets, so :func:`pairings` builds one per retain pair: its safe half is the
retain pair and its unsafe half a forget pair, taken in a seeded order and cycled (the forget set is
usually far smaller). The unlearning objectives read them as such: ``s, v`` retain, ``u, g`` forget.
An epoch is one pass over the retain set, plus ``twin_repeats`` passes over the **twins**: each
forgotten quadruplet's own safe half (the same scene with a harmless look-alike: a painting where
the graffiti was) paired with its forget pair. The look-alikes are the retain pairs most at risk,
and a twin row shows the model exactly what must go (the object) and what must stay (the scene and
the look-alike): without them, forgetting graffiti on the demo data cost 11-18 points of zero-shot
accuracy on paintings, posters and clocks (benchmarks/RESULTS.md, "Unlearning").
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from training.data import concepts as concept_catalogue
from training.data.fields import parse_tags
from training.data.roots import DataRoots
from training.data.visu import Quadruplet
from training.errors import DataError, InputError

MANIFEST_SUFFIXES = (".csv", ".jsonl")
TWIN_REPEATS = 4  # passes over the twins per epoch (44 twins x 4 = 9 % more rows on the demo data)


@dataclass(frozen=True)
class Pair:
    caption: str
    image: Path
    tags: tuple[str, ...] = ()  # a manifest row's tags, lower-cased


@dataclass
class ForgetSplit:
    """What an unlearning run forgets and keeps."""

    concepts: tuple[str, ...]  # the concepts and manifest tags selected (empty with a manifest alone)
    forget: list[Pair]
    retain: list[Pair]
    manifest: Path | None = None
    twins: list[tuple[Pair, Pair]] = field(default_factory=list)  # (the safe half, its forget pair) per forgotten quadruplet
    from_manifest: int = 0  # forget pairs the manifest gave
    twin_lookalikes: tuple[str, ...] = ()  # the safe counterparts the twins' captions name, sorted

    def describe(self) -> str:
        what = ", ".join(self.concepts) if self.concepts else "the manifest's pairs"
        return (f"forget set: {len(self.forget)} pairs ({what}"
                + (f"; {self.from_manifest} from manifest {self.manifest}" if self.manifest and self.concepts else "")
                + f"); retain set: {len(self.retain)} pairs")

    def provenance(self) -> dict:
        out = {"concepts": list(self.concepts), "forget_pairs": len(self.forget), "retain_pairs": len(self.retain),
               "manifest": str(self.manifest) if self.manifest else None,
               # the look-alike classes training showed beside the forgotten ones: the evaluation splits
               # benign_drop into look-alikes seen and unseen by them
               "twin_lookalikes": list(self.twin_lookalikes)}
        if self.manifest:
            out["manifest_pairs"] = self.from_manifest
        return out


def read_manifest(path: Path, roots: DataRoots = DataRoots()) -> list[Pair]:
    """The (image, caption, tags) rows of a forget manifest; images relative to its folder, checked against ``roots``."""
    path = Path(path)
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise InputError(f"--forget-manifest {path}: use a {' or '.join(MANIFEST_SUFFIXES)} file with image and caption columns")
    try:
        data = roots.read(path, what="--forget-manifest")[0] if roots else path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"--forget-manifest {path} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot read --forget-manifest {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"--forget-manifest {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise InputError(f"--forget-manifest {path}, line {n}: not a JSON object") from None
    pairs = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not str(row.get("image") or "").strip() or not str(row.get("caption") or "").strip():
            raise InputError(f"--forget-manifest {path}, row {n}: every row needs a non-empty image and caption")
        image = Path(str(row["image"]).strip())
        image = image if image.is_absolute() else path.parent / image
        if roots:
            image = roots.check(image, what="a --forget-manifest image")
        if not image.is_file():
            raise InputError(f"--forget-manifest {path}, row {n}: image {image} does not exist")
        try:
            tags = tuple(t.lower() for t in parse_tags(row.get("tags")))
        except ValueError as e:
            raise InputError(f"--forget-manifest {path}, row {n}: {e}") from None
        pairs.append(Pair(str(row["caption"]).strip(), image, tags))
    if not pairs:
        raise InputError(f"--forget-manifest {path} lists no pairs; give rows with image and caption columns")
    return pairs


def split(
    records: Sequence[Quadruplet], data: Path, *, forget: Sequence[str] = (), manifest: Path | None = None,
    roots: DataRoots = DataRoots(),
) -> ForgetSplit:
    """The forget and retain sets of ``records`` (a train split) for the concepts ``forget`` and/or a manifest.

    A name that is neither a concept or tag of the dataset nor a tag of the manifest, a concept that
    nothing shows, or an empty side, is an :class:`InputError` that says what to do.
    """
    cat = concept_catalogue.catalogue(data, records, roots=roots)
    listed = read_manifest(manifest, roots) if manifest is not None else []
    names = [n.strip().lower() for n in forget]
    manifest_tags = sorted({t for p in listed for t in p.tags})
    of_dataset = [n for n in names if n in cat.concepts or n in cat.tags]
    of_manifest = list(dict.fromkeys(n for n in names if n not in of_dataset and n in manifest_tags))
    unknown = [n for n in names if n not in of_dataset and n not in of_manifest]
    if unknown:
        known = (f"this dataset's {cat.known()}" if cat.concepts else f"the dataset {data} names no concept (no concept "
                 f"list in {concept_catalogue.DATASET_SUMMARY}, no tag on its train records)")
        raise InputError(f"unknown concept {unknown[0]!r}: {known}"
                         + (f"; the manifest's tags: {', '.join(manifest_tags)}" if manifest_tags else ""))
    chosen = cat.resolve(of_dataset) if of_dataset else ()
    wanted = set(names) | {c.name for c in chosen} | {c.tag.lower() for c in chosen}
    listed = [p for p in listed if not names or not p.tags or wanted & set(p.tags)]
    listed_images = {p.image.resolve() for p in listed}
    forget_pairs: list[Pair] = []
    retain: list[Pair] = []
    twins: list[tuple[Pair, Pair]] = []
    lookalikes: set[str] = set()
    shown: dict[str, int] = {c.name: sum(1 for p in listed if {c.name, c.tag.lower()} & set(p.tags)) for c in chosen}

    def kept(image: Path) -> bool:  # resolved only when a manifest lists images: no syscall per record otherwise
        return not listed_images or image.resolve() not in listed_images

    for r in records:
        c = next((c for c in chosen if c.shown_by(r)), None)
        safe_kept = kept(r.safe_image)
        if c is not None:
            shown[c.name] += 1
            forget_pairs.append(Pair(r.nsfw, r.nsfw_image))
            if safe_kept:
                twins.append((Pair(r.safe, r.safe_image), forget_pairs[-1]))
                if (lookalike := c.counterpart_in(r.safe)) is not None:
                    lookalikes.add(lookalike)
        elif kept(r.nsfw_image):
            retain.append(Pair(r.nsfw, r.nsfw_image))
        if safe_kept:
            retain.append(Pair(r.safe, r.safe_image))
    missing = [n for n, k in shown.items() if not k]
    if missing:
        raise InputError(f"no training pair shows {', '.join(missing)}: nothing to forget; this dataset's {cat.known()}")
    forget_pairs += listed
    if not forget_pairs:
        raise InputError("the forget set is empty: name concepts with --forget or pairs with --forget-manifest")
    if not retain:
        raise InputError("the retain set is empty: everything would be forgotten; forget fewer concepts, or train on a "
                         "dataset that also holds pairs to keep")
    return ForgetSplit(tuple(c.name for c in chosen) + tuple(of_manifest), forget_pairs, retain, manifest, twins,
                       from_manifest=len(listed), twin_lookalikes=tuple(sorted(lookalikes)))


def pairings(fs: ForgetSplit, *, seed: int, twin_repeats: int = TWIN_REPEATS) -> list[Quadruplet]:
    """One training quadruplet per retain pair: safe half = the retain pair, unsafe half = a forget pair;
    then ``twin_repeats`` rows per twin: safe half = the forgotten quadruplet's own safe half.

    Forget pairs follow a seeded permutation, cycled, so every one is used before any repeats.
    """
    if not fs.forget or not fs.retain:
        raise DataError("pairings need a non-empty forget set and retain set")
    order = list(range(len(fs.forget)))
    random.Random(seed).shuffle(order)
    out = []
    for i, keep in enumerate(fs.retain):
        gone = fs.forget[order[i % len(order)]]
        out.append(Quadruplet(incremental_id=i, coco_id=i, safe=keep.caption, nsfw=gone.caption, tag="",
                              safe_image=keep.image, nsfw_image=gone.image))
    for keep, gone in fs.twins * twin_repeats:
        i = len(out)
        out.append(Quadruplet(incremental_id=i, coco_id=i, safe=keep.caption, nsfw=gone.caption, tag="",
                              safe_image=keep.image, nsfw_image=gone.image))
    return out
