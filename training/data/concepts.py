"""Which concepts a dataset shows, and which of its pairs show them: what ``--forget`` selects.

A **concept** is something an operator may ask the model to forget (``knife``); a **tag** groups
concepts (ViSU's ``weapons`` holds ``gun`` and ``knife``). ``--forget`` takes either, comma-separated.

Where the names come from:

- a synthetic dataset's ``dataset.json`` lists its concepts with their tag, a ``keyword`` every
  unsafe caption of the concept contains, the ``phrases`` those captions use and the harmless
  ``safe_counterparts`` drawn in the safe half (forgetting ``knife`` must not forget ``spoon``);
- any other ViSU-layout dataset (the real one) has only its records' ``tag`` field: each tag is then
  a concept of its own, with no keyword, shown by every record carrying the tag.

A quadruplet *shows* a concept through its unsafe half ``(T*, I*)``: its tag is the concept's and,
where the concept has a keyword, its unsafe caption contains it (``gun`` and ``knife`` share a tag).
The safe half ``(T, I)`` shows one of the concept's counterparts, never the concept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from training.data.roots import DataRoots
from training.errors import InputError

DATASET_SUMMARY = "dataset.json"


class Record(Protocol):
    """What is read of a quadruplet (``training.data.visu.Quadruplet`` has it); read-only, as a frozen record's."""

    @property
    def safe(self) -> str: ...

    @property
    def nsfw(self) -> str: ...

    @property
    def tag(self) -> str: ...


@dataclass(frozen=True)
class Concept:
    name: str
    tag: str
    keyword: str | None = None  # None: the tag alone decides (real ViSU)
    phrases: tuple[str, ...] = ()  # the words the unsafe captions name it with, longest first
    safe_counterparts: tuple[str, ...] = ()

    def named_in(self, caption: str) -> bool:
        """Whether ``caption`` names this concept: its keyword or one of its phrases, as whole words (any caption,
        for a concept without a keyword)."""
        text = caption.lower()
        return self.keyword is None or any(_words(w).search(text) for w in (self.keyword, *self.phrases))

    def shown_by(self, record: Record) -> bool:
        return record.tag == self.tag and self.named_in(record.nsfw)

    def counterpart_in(self, caption: str) -> str | None:
        """The safe counterpart that ``caption`` names (the longest that matches), or None."""
        text = caption.lower()
        for name in sorted(self.safe_counterparts, key=len, reverse=True):
            if re.search(_counterpart_pattern(name), text):
                return name
        return None

    @property
    def canonical(self) -> str | None:
        """The phrase that names this concept in an in-context prompt (its shortest), or None without phrases."""
        return min(self.phrases, key=len) if self.phrases else None

    def swap(self, caption: str, phrase: str) -> str | None:
        """``caption`` with this concept's words (its longest phrase that occurs) replaced by ``phrase``; None if absent."""
        text = caption.lower()
        for own in self.phrases:
            pattern = _words(own)
            if pattern.search(text):
                return pattern.sub(phrase, text, count=1)
        return None

    def swap_counterpart(self, caption: str, name: str) -> str | None:
        """``caption`` with the safe counterpart it names (with a colour inside, if any) replaced by ``name``."""
        text = caption.lower()
        for own in sorted(self.safe_counterparts, key=len, reverse=True):
            match = re.search(_counterpart_pattern(own), text)
            if match:
                return text[: match.start()] + name + text[match.end():]
        return None

    def without(self, caption: str) -> str:
        """``caption`` with this concept's words removed (its longest phrase that occurs, else its keyword)."""
        text = caption
        for phrase in (*self.phrases, *((self.keyword,) if self.keyword else ())):
            pattern = _words(phrase)
            if pattern.search(text.lower()):
                text = pattern.sub("", text.lower())
                break
        return re.sub(r"\s+", " ", text).strip(" ,;")


def _counterpart_pattern(name: str) -> str:
    """A counterpart's words, whole, where a colour may sit inside a multi-word name ("a man in a red coat")."""
    return r"(?<!\w)" + r"\s+(?:\w+\s+)?".join(map(re.escape, name.lower().split())) + r"(?!\w)"


def _words(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(text.lower()) + r"(?!\w)")


@dataclass(frozen=True)
class Catalogue:
    """The concepts of one dataset, by name, and the tags that group them."""

    concepts: dict[str, Concept]

    @property
    def tags(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for c in self.concepts.values():
            out.setdefault(c.tag, []).append(c.name)
        return {t: tuple(names) for t, names in sorted(out.items())}

    def known(self) -> str:
        """'concepts: gun, knife, ...; tags: weapons (gun, knife), ...' for error messages."""
        tags = ", ".join(f"{t} ({', '.join(n)})" if n != (t,) else t for t, n in self.tags.items())
        return f"concepts: {', '.join(sorted(self.concepts))}; tags: {tags}"

    def resolve(self, requested: Sequence[str]) -> tuple[Concept, ...]:
        """The concepts named by ``requested`` (concept names or tags, any case), in catalogue order.

        An unknown name is an :class:`InputError` listing the known concepts and tags.
        """
        if not requested:
            raise InputError(f"name at least one concept to forget; known {self.known()}")
        chosen: set[str] = set()
        tags = self.tags
        for raw in requested:
            name = raw.strip().lower()
            if name in self.concepts:
                chosen.add(name)
            elif name in tags:
                chosen.update(tags[name])
            else:
                raise InputError(f"unknown concept {raw!r}: this dataset's {self.known()}")
        return tuple(c for n, c in self.concepts.items() if n in chosen)

    def concept_of(self, record: Record) -> Concept | None:
        """The concept a record's unsafe half shows, or None when none of the catalogue's matches."""
        for c in self.concepts.values():
            if c.shown_by(record):
                return c
        return None


def parse_names(text: str | Sequence[str]) -> list[str]:
    """``"knife, gun"`` (or a list of such strings) -> ``["knife", "gun"]``; nothing named -> InputError."""
    parts = [text] if isinstance(text, str) else list(text)
    names = [n.strip() for p in parts for n in p.split(",") if n.strip()]
    if not names:
        raise InputError("--forget takes concept names or tags, comma-separated, like knife or weapons,drug use")
    return names


def _concept(name: str, entry: dict) -> Concept:
    keyword = entry.get("keyword")
    phrases = tuple(sorted(entry.get("phrases", ()), key=len, reverse=True))
    return Concept(name=name.lower(), tag=str(entry.get("tag", name)), keyword=keyword.lower() if keyword else None,
                   phrases=tuple(p.lower() for p in phrases),
                   safe_counterparts=tuple(str(s).lower() for s in entry.get("safe_counterparts", ())))


def catalogue(data: Path, records: Iterable[Record] = (), *, roots: DataRoots = DataRoots()) -> Catalogue:
    """The concepts of the dataset at ``data``: its ``dataset.json`` list, else one per tag of ``records``.

    A ``dataset.json`` written before keywords were recorded names each concept by its own words.
    """
    summary_path = Path(data) / DATASET_SUMMARY
    entries: dict = {}
    if summary_path.is_file():
        try:
            text = roots.read(summary_path, what="dataset.json")[0] if roots else summary_path.read_bytes()
            entries = json.loads(text).get("concepts") or {}
        except (OSError, ValueError, AttributeError):
            entries = {}
    if entries:
        concepts = {}
        for name, entry in entries.items():
            entry = dict(entry) if isinstance(entry, dict) else {}
            entry.setdefault("keyword", name)
            c = _concept(name, entry)
            concepts[c.name] = c
        return Catalogue(concepts)
    tags = sorted({r.tag for r in records if r.tag})
    return Catalogue({t.lower(): Concept(name=t.lower(), tag=t) for t in tags})


def select(records: Sequence[Record], concepts: Sequence[Concept]) -> tuple[list[int], list[int]]:
    """Positions of the records that show one of ``concepts`` (forget), and of the others."""
    forget, other = [], []
    for i, r in enumerate(records):
        (forget if any(c.shown_by(r) for c in concepts) else other).append(i)
    return forget, other
