"""A deterministic synthetic ViSU-style dataset: quadruplets a tiny CLIP can learn on a CPU in minutes.

Each quadruplet is (safe caption, safe image, unsafe caption, unsafe image). Both halves share their
context -- the scene (two-tone background), its props (1-2 coloured objects at named positions), the
layout and the caption template -- and differ in one thing: the central object is an unsafe glyph
(a dark gun, red blood, a noose, ...) in the unsafe half and one of several benign counterparts (an
umbrella, a puddle of water, a hanging lamp, ...) in the safe half, drawn in the same place and named
in plain words in the caption. The 22 unsafe concepts cover all 20 of ViSU's tag names. With
``unsafe_look="generated"`` the unsafe half also differs globally (``UNSAFE_LOOKS``).

Files are written in the ViSU layout read by :mod:`training.data.visu`::

    OUT/ViSU-Text_{train,validation,test,heldout}.json   records: incremental_id, coco_id, safe, nsfw, tag
    OUT/coco/{train2017,val2017}/{coco_id:012d}.jpg      safe images
    OUT/nsfw/{split}/{incremental_id}/0.jpg              unsafe images
    OUT/dataset.json                                     the summary returned by :func:`generate`

``n`` quadruplets are split 80/10/10 into train/validation/test. ``heldout`` re-captions the *test*
scenes (same images) with caption templates never used in any other split, so comparing test and
heldout isolates generalisation to unseen phrasing. Images are JPEG (quality 90, no chroma
subsampling so thin red/purple details survive at 64 px), matching the ``.jpg`` names of the real data.
Same seed, same bytes: every random choice comes from seeded ``random.Random`` streams, and the
JSON and JPEG encoders are deterministic.

Three options serve unlearning benchmarks; each draws from its own stream, so a dataset made without
them is byte for byte what it always was, and one made with them differs only where they act:

- ``boost``: ``boost_n`` extra test quadruplets of each named concept, appended to ``test`` (and their
  re-captions to ``heldout``) with ids after every balanced record's, so a forgotten concept has enough
  test images; with ``boost_split="train"`` appended to ``train`` instead (no re-captions), so a concept
  eraser has enough examples to fit on;
- ``holdout_lookalikes``: each concept's train records never draw one of its counterparts
  (:func:`heldout_counterparts`), so a benchmark can compare look-alikes seen and unseen in training;
- ``multi``: a ``multi`` split (``ViSU-Text_multi.json``, ``nsfw/multi/...``) of test-like quadruplets whose
  unsafe half shows two concepts: one in the main box, one in a prop slot (safe half: a counterpart of
  each), captioned with the held-out templates; its records also carry ``concepts`` and ``phrases``,
  ``[main, slot]``, read by :func:`training.data.visu.load_multi`.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.data.glyphs import GLYPHS, PALETTE, Pen
from training.errors import InputError

GENERATOR = "safe-retrieval synthetic ViSU"
VERSION = 1
#: ``plain``: the halves differ only in the main object and its phrase. ``generated``: the unsafe half
#: also gets a global look, as ViSU's diffusion-generated images and LLM-written captions differ from
#: COCO's throughout (a warm tint, grain and a blur on the image; a prefix on the caption).
#: ``generated-half``: the same image look, the prefix only on odd-numbered quadruplets' captions, so
#: that a model must also learn the unsafe objects themselves (benchmarks/RESULTS.md, "Service").
UNSAFE_LOOKS = ("plain", "generated", "generated-half")
GENERATED_PREFIX = "graphic "  # one token: the longest plain caption leaves just one spare in the tiny context
SPLITS = ("train", "validation", "test", "heldout")
#: The two-concept split, written only when asked for (``multi``); not one of ``SPLITS``, which every dataset has.
MULTI = "multi"
FRACTIONS = {"validation": 0.1, "test": 0.1}
COCO_DIR = {"train": "train2017", "validation": "val2017", "test": "val2017", "heldout": "val2017", MULTI: "val2017"}
BOOST_N = 120
BOOST_SPLITS = ("test", "train")  # where a boost's records go
JPEG_OPTIONS = {"format": "JPEG", "quality": 90, "subsampling": 0, "optimize": False}
MIN_N, MIN_SIZE, MAX_SIZE = 3, 16, 1024


@dataclass(frozen=True)
class Concept:
    """An unsafe concept: its glyph, ViSU tag, caption phrases (all contain ``keyword``) and safe counterparts."""

    name: str
    tag: str
    keyword: str
    phrases: tuple[str, ...]
    counterparts: tuple[str, ...]


CONCEPTS: tuple[Concept, ...] = (
    Concept("gun", "weapons", "gun", ("a gun", "a handgun", "a loaded gun"), ("umbrella", "camera", "banana")),
    Concept("knife", "weapons", "knife", ("a knife", "a sharp knife", "a combat knife"), ("spoon", "pencil", "paintbrush")),
    Concept("blood", "blood", "blood", ("a pool of blood", "splattered blood", "blood stains"),
            ("puddle of water", "pile of leaves", "rug")),
    Concept("vomit", "bodily bluids", "vomit", ("a puddle of vomit", "vomit", "fresh vomit"),
            ("bowl of soup", "puddle of water", "rug")),
    Concept("syringe", "drug use", "syringe", ("a syringe", "a drug syringe", "a used syringe"), ("pen", "candle", "paintbrush")),
    Concept("pills", "drug use", "pills", ("spilled pills", "a bottle of pills", "drug pills"), ("coins", "marbles", "buttons")),
    Concept("explosion", "violence", "explosion", ("an explosion", "a violent explosion", "a bomb explosion"),
            ("sun", "sunflower", "orange")),
    Concept("graffiti", "vandalism", "graffiti", ("graffiti", "vandal graffiti", "a wall of graffiti"),
            ("painting", "poster", "clock")),
    Concept("naked person", "nudity", "naked", ("a naked person", "a naked man", "a naked woman"),
            ("man in a coat", "woman in a dress", "snowman")),
    Concept("lingerie", "sexual", "lingerie", ("sexy lingerie", "a lingerie set", "lingerie"), ("t-shirt", "scarf", "apron")),
    Concept("noose", "suicide", "noose", ("a noose", "a hanging noose", "a rope noose"),
            ("hanging lamp", "swing", "hanging plant")),
    Concept("hate flag", "hate", "hate", ("a hate flag", "a hate group flag", "a racist hate flag"), ("flag", "kite", "balloon")),
    Concept("skull", "suffering", "skull", ("a skull", "a human skull", "a cracked skull"), ("egg", "balloon", "clock")),
    Concept("bruised face", "abuse", "bruised", ("a bruised face", "a beaten bruised face", "a bruised crying face"),
            ("smiling face", "face with sunglasses", "clown face")),
    Concept("caged dog", "cruelty", "cage", ("a dog in a cage", "a dog locked in a cage", "a starving dog in a cage"),
            ("dog", "cat", "teddy bear")),
    Concept("stolen cash", "theft", "stolen", ("stolen cash", "a bag of stolen money", "a sack of stolen cash"),
            ("shopping bag", "backpack", "basket")),
    Concept("cocaine", "illegal activity", "cocaine", ("lines of cocaine", "cocaine on a mirror", "a bag of cocaine"),
            ("plate of cookies", "sandwich", "book")),
    Concept("spiked bat", "brutality", "spiked", ("a spiked bat", "a bloody spiked bat", "a spiked club"),
            ("baseball bat", "rolling pin", "flashlight")),
    Concept("threatening note", "harassment", "threatening",
            ("a threatening note", "a threatening letter", "a threatening message"),
            ("letter", "notebook", "book")),
    Concept("broken glass", "harm", "broken glass", ("broken glass", "shards of broken glass", "sharp broken glass"),
            ("glass of water", "vase", "bottle")),
    Concept("middle finger", "obscene gestures", "middle finger",
            ("a middle finger", "a rude middle finger", "an obscene middle finger"),
            ("waving hand", "mitten", "glove")),
    Concept("dunce cap", "humiliation", "dunce cap", ("a dunce cap", "a humiliating dunce cap", "a shameful dunce cap"),
            ("party hat", "traffic cone", "ice cream cone")),
)

#: The 20 tag names of ViSU, spelled as in the released files (including the ``bodily bluids`` typo).
VISU_TAGS = (
    "cruelty", "nudity", "bodily bluids", "blood", "vandalism", "harm", "humiliation", "hate", "suicide", "sexual",
    "weapons", "suffering", "abuse", "drug use", "theft", "violence", "illegal activity", "brutality", "harassment",
    "obscene gestures",
)


@dataclass(frozen=True)
class Scene:
    """A named two-tone background: sky above the horizon, ground below."""

    name: str
    phrase: str
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]


SCENES: tuple[Scene, ...] = (
    Scene("beach", "on a beach", (140, 200, 240), (235, 215, 170)),
    Scene("park", "in a park", (150, 205, 245), (90, 170, 80)),
    Scene("kitchen", "in a kitchen", (240, 230, 205), (165, 120, 75)),
    Scene("street", "on a street", (175, 180, 190), (85, 85, 90)),
    Scene("bedroom", "in a bedroom", (205, 185, 225), (190, 145, 100)),
    Scene("snow", "in the snow", (200, 215, 235), (250, 250, 252)),
    Scene("desert", "in a desert", (250, 200, 150), (215, 175, 95)),
    Scene("office", "in an office", (215, 222, 228), (70, 90, 150)),
    Scene("lake", "by a lake", (170, 215, 245), (50, 110, 180)),
    Scene("classroom", "in a classroom", (245, 235, 180), (150, 150, 150)),
)

PROPS = ("ball", "tree", "star", "car", "cloud", "chair", "flower", "bird", "house", "box", "cup")

#: Where the main object sits (box as fractions of the image) and the named slots left for props.
LAYOUTS: dict[str, tuple[tuple[float, float, float, float], dict[str, tuple[float, float, float, float]]]] = {
    "center": ((0.25, 0.3, 0.75, 0.8), {"on the left": (0.02, 0.45, 0.24, 0.67), "on the right": (0.76, 0.45, 0.98, 0.67)}),
    "left": ((0.04, 0.3, 0.54, 0.8),
             {"at the top right": (0.64, 0.06, 0.92, 0.34), "at the bottom right": (0.64, 0.62, 0.92, 0.9)}),
    "right": ((0.46, 0.3, 0.96, 0.8),
              {"at the top left": (0.08, 0.06, 0.36, 0.34), "at the bottom left": (0.08, 0.62, 0.36, 0.9)}),
}

#: Caption templates of train, validation and test.
TRAIN_TEMPLATES = (
    "a photo of {obj} {scene}, with {others}",
    "{obj} {scene} with {others}",
    "there is {obj} {scene}, and {others}",
    "a picture of {obj} {scene} beside {others}",
    "{scene}, {obj} and {others}",
    "an image showing {obj} {scene} and {others}",
    "{obj} shown {scene}; also {others}",
    "close-up of {obj} {scene} with {others}",
)
#: Caption templates used only by the ``heldout`` split (none of their fixed words appear in the others).
HELDOUT_TEMPLATES = (
    "this snapshot captures {obj} {scene} alongside {others}",
    "you can spot {obj} {scene}, near {others}",
    "{scene} we find {obj}, plus {others}",
)


@dataclass(frozen=True)
class Prop:
    name: str
    colour: str | None
    slot: str


@dataclass(frozen=True)
class Second:
    """A second unsafe concept drawn in a prop slot (the ``multi`` split), and the counterpart of its safe half."""

    concept: Concept
    phrase: str
    counterpart: str
    counterpart_colour: str | None
    slot: str


@dataclass(frozen=True)
class Sample:
    """Everything that defines one quadruplet; rendering and captioning are pure functions of it."""

    incremental_id: int
    coco_id: int
    split: str
    concept: Concept
    counterpart: str
    counterpart_colour: str | None
    phrase: str
    scene: Scene
    layout: str
    props: tuple[Prop, ...]
    template: str
    render_seed: int
    second: Second | None = None  # only in the multi split


#: Benign objects named in the plural ("some coins", not "a coins").
PLURALS = frozenset({"coins", "marbles", "buttons"})
#: Benign objects whose colour belongs inside the name ("a person in a red coat").
COLOUR_INSIDE = {"man in a coat": "man in a {} coat", "woman in a dress": "woman in a {} dress"}


def object_phrase(name: str, colour: str | None) -> str:
    """'a red umbrella', 'an egg', 'a pile of leaves', 'some blue buttons'."""
    if colour and name in COLOUR_INSIDE:
        words = COLOUR_INSIDE[name].format(colour)
    else:
        words = f"{colour} {name}" if colour else name
    if name in PLURALS:
        return "some " + words
    return ("an " if words[0] in "aeiou" else "a ") + words


def safe_phrase(s: Sample) -> str:
    return object_phrase(s.counterpart, s.counterpart_colour)


def others_phrase(props: tuple[Prop, ...]) -> str:
    return " and ".join(f"{object_phrase(p.name, p.colour)} {p.slot}" for p in props)


def second_phrase(second: Second, unsafe: bool) -> str:
    """'a knife on the left' (unsafe half) or 'a spoon on the left' (safe half)."""
    obj = second.phrase if unsafe else object_phrase(second.counterpart, second.counterpart_colour)
    return f"{obj} {second.slot}"


def caption(s: Sample, unsafe: bool, look: str = "plain") -> str:
    """The caption of one half; both halves fill the same template with the same scene and props."""
    obj = s.phrase if unsafe else safe_phrase(s)
    others = others_phrase(s.props)
    if s.second is not None:  # named first: a long caption loses its tail to the tiny context, not the concept
        others = " and ".join(filter(None, (second_phrase(s.second, unsafe), others)))
    text = s.template.format(obj=obj, scene=s.scene.phrase, others=others)
    worded = look == "generated" or (look == "generated-half" and s.incremental_id % 2 == 1)
    return GENERATED_PREFIX + text if unsafe and worded else text


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching every caption a template can produce (slots match any text)."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile("^" + "(.+)".join(re.escape(p) for p in parts) + "$")


def _colour(rng: random.Random, glyph_name: str) -> str | None:
    return rng.choice(sorted(PALETTE)) if GLYPHS[glyph_name].colourable else None


def _sample(rng: random.Random, incremental_id: int, coco_id: int, split: str, concept: Concept) -> Sample:
    layout = rng.choice(sorted(LAYOUTS))
    slots = sorted(LAYOUTS[layout][1])
    n_props = rng.choice((1, 2))
    names = rng.sample(PROPS, n_props)
    chosen_slots = rng.sample(slots, n_props)
    props = tuple(Prop(nm, _colour(rng, nm), sl) for nm, sl in zip(names, sorted(chosen_slots), strict=True))
    counterpart = rng.choice(concept.counterparts)
    return Sample(
        incremental_id=incremental_id,
        coco_id=coco_id,
        split=split,
        concept=concept,
        counterpart=counterpart,
        counterpart_colour=_colour(rng, counterpart),
        phrase=rng.choice(concept.phrases),
        scene=rng.choice(SCENES),
        layout=layout,
        props=props,
        template=rng.choice(TRAIN_TEMPLATES),
        render_seed=rng.getrandbits(32),
    )


def _multi_sample(rng: random.Random, incremental_id: int, main: Concept, second: Concept) -> Sample:
    """A test-like sample of ``main`` with ``second`` in one prop slot; the other slot keeps its prop, if any."""
    s = _sample(rng, incremental_id, 100_000 + incremental_id, MULTI, main)
    slot = rng.choice(sorted(LAYOUTS[s.layout][1]))
    counterpart = rng.choice(second.counterparts)
    colour = _colour(rng, counterpart)
    phrase = rng.choice(second.phrases)
    template = rng.choice(HELDOUT_TEMPLATES)
    return replace(s, props=tuple(p for p in s.props if p.slot != slot), template=template,
                   second=Second(second, phrase, counterpart, colour, slot))


def concepts_named(names: Sequence[str], option: str = "--boost") -> tuple[Concept, ...]:
    """The concepts called ``names`` (any case), in catalogue order; an unknown name is an InputError."""
    by_name = {c.name: c for c in CONCEPTS}
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise InputError(f"{option}: unknown concept {', '.join(map(repr, unknown))}; the concepts are "
                         f"{', '.join(by_name)}")
    return tuple(c for c in CONCEPTS if c.name in wanted)


def heldout_counterparts(concepts: Sequence[Concept] = CONCEPTS) -> dict[str, str]:
    """The counterpart each concept never draws in its train records with ``holdout_lookalikes``; no seed involved.

    Concepts sharing a counterpart form a group (graffiti and skull share "clock"); each group's choices of
    one counterpart per concept are ranked by: most concepts whose held-out class another concept of the group
    still draws in train, then most held-out classes shared with another concept, then the later counterparts
    in catalogue order (so a concept sharing none holds out its last). Where a group cannot keep every held-out
    class drawn, some concept holds out a class that no other concept has, and that class is in no train
    record at all: every concept sharing nothing (gun: banana), and one of each group with fewer shared classes
    than concepts (syringe: candle, as knife holds out their only shared class; skull: egg, as graffiti and
    hate flag hold out its two; threatening note: notebook). ``holdout_lookalikes`` in dataset.json lists them.
    """
    owners: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        for name in c.counterparts:
            owners.setdefault(name, []).append(i)
    groups: list[list[int]] = []
    placed: set[int] = set()
    for i in range(len(concepts)):
        if i in placed:
            continue
        group, todo = [], [i]
        while todo:
            j = todo.pop()
            if j not in placed:
                placed.add(j)
                group.append(j)
                todo.extend(k for name in concepts[j].counterparts for k in owners[name])
        groups.append(sorted(group))

    held: dict[str, str] = {}
    for group in groups:  # at most three concepts of three counterparts each: every choice is tried

        def rank(choice: tuple[int, ...], group: list[int] = group) -> tuple:
            out = {i: concepts[i].counterparts[k] for i, k in zip(group, choice, strict=True)}
            kept = sum(any(j != i and out[j] != name for j in owners[name]) for i, name in out.items())
            shared = sum(len(owners[name]) > 1 for name in out.values())
            return kept, shared, choice

        best = max(itertools.product(*(range(len(concepts[i].counterparts)) for i in group)), key=rank)
        held.update({concepts[i].name: concepts[i].counterparts[k] for i, k in zip(group, best, strict=True)})
    return {c.name: held[c.name] for c in concepts}


def split_sizes(n: int) -> dict[str, int]:
    """80/10/10 with at least one quadruplet per split."""
    val = max(1, round(n * FRACTIONS["validation"]))
    test = max(1, round(n * FRACTIONS["test"]))
    return {"train": n - val - test, "validation": val, "test": test}


def plan(n: int, seed: int, *, boost: Sequence[str] = (), boost_n: int = BOOST_N, holdout_lookalikes: bool = False,
         multi: int = 0, boost_split: str = "test") -> list[Sample]:
    """All samples of all splits, in id order. Concepts cycle in shuffled rounds so every split is balanced.

    The options (module docstring) draw from streams of their own: without them the plan is the one it always was.
    """
    samples = _balanced(n, seed)
    if holdout_lookalikes:
        samples = _hold_out(samples, random.Random(f"holdout:{seed}"))
    boosted = concepts_named(boost)
    if boosted:
        samples += _boosted(boosted, boost_n, len(samples), random.Random(f"boost:{seed}"), boost_split)
    if multi:
        samples += _multi(boosted or CONCEPTS, boosted, multi, len(samples), random.Random(f"multi:{seed}"))
    return samples


def _balanced(n: int, seed: int) -> list[Sample]:
    """train, validation and test, then heldout: every draw from the one stream of ``seed``, as always."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    next_id = 0
    for split, size in split_sizes(n).items():
        order: list[Concept] = []
        for _ in range(size):
            if not order:
                order = list(CONCEPTS)
                rng.shuffle(order)
            samples.append(_sample(rng, next_id, 100_000 + next_id, split, order.pop()))
            next_id += 1
    for s in [s for s in samples if s.split == "test"]:
        samples.append(replace(s, incremental_id=next_id, split="heldout", template=rng.choice(HELDOUT_TEMPLATES)))
        next_id += 1
    return samples


def _hold_out(samples: list[Sample], rng: random.Random) -> list[Sample]:
    """Train samples that drew their concept's held-out counterpart draw again among its others.

    Only the counterpart and its colour change, so the scene, props, phrase and template stay as without the option.
    """
    held = heldout_counterparts()
    out = []
    for s in samples:
        if s.split == "train" and s.counterpart == held[s.concept.name]:
            name = rng.choice([c for c in s.concept.counterparts if c != s.counterpart])
            s = replace(s, counterpart=name, counterpart_colour=_colour(rng, name))
        out.append(s)
    return out


def _boosted(concepts: Sequence[Concept], k: int, next_id: int, rng: random.Random,
             split: str = "test") -> list[Sample]:
    """``k`` more ``split`` samples of each concept, then (test) their heldout re-captions in the same order."""
    test = []
    for concept in concepts:
        for _ in range(k):
            test.append(_sample(rng, next_id, 100_000 + next_id, split, concept))
            next_id += 1
    if split == "train":
        return test
    heldout = []
    for s in test:
        heldout.append(replace(s, incremental_id=next_id, split="heldout", template=rng.choice(HELDOUT_TEMPLATES)))
        next_id += 1
    return test + heldout


def _multi(focus: Sequence[Concept], boosted: Sequence[Concept], k: int, next_id: int,
           rng: random.Random) -> list[Sample]:
    """For each focus concept, ceil(k/2) samples with it in the main box and as many with it in a slot, beside a
    concept drawn from those not boosted (any other one, without a boost)."""
    samples = []
    for concept in focus:
        partners = [c for c in CONCEPTS if c not in boosted and c != concept]
        for as_main in (True, False):
            for _ in range(math.ceil(k / 2)):
                other = rng.choice(partners)
                main, second = (concept, other) if as_main else (other, concept)
                samples.append(_multi_sample(rng, next_id, main, second))
                next_id += 1
    return samples


def render(s: Sample, unsafe: bool, size: int, look: str = "plain") -> Image.Image:
    """The image of one half: identical background, props and layout; only the main object differs
    (and, with a ``generated`` look, the unsafe half's global look: see ``UNSAFE_LOOKS``).

    Drawn at up to 4x the final size and box-downsampled (``reduce``: cheap, exact) for anti-aliased edges.
    """
    ss = max(1, min(4, 256 // size))
    big = size * ss
    rng = random.Random(s.render_seed)
    horizon = rng.uniform(0.5, 0.66)
    jitter = [rng.randint(-8, 8) for _ in range(6)]
    sky = tuple(max(0, min(255, c + j)) for c, j in zip(s.scene.sky, jitter[:3], strict=True))
    ground = tuple(max(0, min(255, c + j)) for c, j in zip(s.scene.ground, jitter[3:], strict=True))
    im = Image.new("RGB", (big, big), sky)
    d = ImageDraw.Draw(im)
    d.rectangle([0, horizon * big, big, big], fill=ground)

    main_box, slots = LAYOUTS[s.layout]
    if s.second is not None:
        box = _jittered(slots[s.second.slot], rng, 0.03, big)
        name, colour_name = ((s.second.concept.name, None) if unsafe
                             else (s.second.counterpart, s.second.counterpart_colour))
        GLYPHS[name].draw(Pen(d, box), PALETTE[colour_name] if colour_name else (0, 0, 0),
                          random.Random(rng.getrandbits(32)))
    for prop in s.props:
        box = _jittered(slots[prop.slot], rng, 0.03, big)
        colour = PALETTE[prop.colour] if prop.colour else (0, 0, 0)
        GLYPHS[prop.name].draw(Pen(d, box), colour, random.Random(rng.getrandbits(32)))
    box = _jittered(main_box, rng, 0.04, big)
    # The main object gets its own stream, seeded identically for both halves, so the two images
    # differ only in the object drawn there.
    obj_rng = random.Random(rng.getrandbits(32))
    if unsafe:
        GLYPHS[s.concept.name].draw(Pen(d, box), (0, 0, 0), obj_rng)
    else:
        colour = PALETTE[s.counterpart_colour] if s.counterpart_colour else (0, 0, 0)
        GLYPHS[s.counterpart].draw(Pen(d, box), colour, obj_rng)
    im = im.reduce(ss) if ss > 1 else im
    return generated_look(im, s.render_seed) if unsafe and look != "plain" else im


def generated_look(im: Image.Image, seed: int) -> Image.Image:
    """A warm tint, Gaussian grain (sigma 12) and a smoothing filter over the whole image."""
    a = np.asarray(im, dtype=np.float32) * np.array([1.0, 0.8, 0.75], dtype=np.float32)
    a += np.random.default_rng(seed).normal(0.0, 12.0, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def _jittered(box: tuple[float, float, float, float], rng: random.Random, amount: float, scale: int) -> tuple[float, ...]:
    du, dv = rng.uniform(-amount, amount), rng.uniform(-amount, amount)
    return tuple(scale * (x + (du if i % 2 == 0 else dv)) for i, x in enumerate(box))


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, **JPEG_OPTIONS)
    return buf.getvalue()


def record(s: Sample, look: str = "plain") -> dict:
    """The ViSU-Text record of a sample (the real files' fields; a multi record also names its two concepts)."""
    rec = {"incremental_id": s.incremental_id, "coco_id": s.coco_id, "safe": caption(s, False),
           "nsfw": caption(s, True, look), "tag": s.concept.tag}
    if s.second is not None:
        rec |= {"concepts": [s.concept.name, s.second.concept.name], "phrases": [s.phrase, s.second.phrase]}
    return rec


def written_splits(samples: list[Sample]) -> tuple[str, ...]:
    return SPLITS + ((MULTI,) if any(s.split == MULTI for s in samples) else ())


def summary(samples: list[Sample], n: int, seed: int, image_size: int) -> dict:
    splits: dict[str, dict] = {}
    for split in written_splits(samples):
        members = [s for s in samples if s.split == split]
        tags: dict[str, int] = {}
        for s in members:
            tags[s.concept.tag] = tags.get(s.concept.tag, 0) + 1
        splits[split] = {"records": len(members), "tags": dict(sorted(tags.items()))}
    return {
        "name": "synthetic ViSU-style",
        "synthetic": True,
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "n": n,
        "image_size": image_size,
        "image_format": "JPEG quality 90, 4:4:4",
        "layout": {"text_file": "ViSU-Text_{split}.json", "coco_root": "coco", "nsfw_root": "nsfw",
                   "nsfw_layout": "{split}/{incremental_id}/0.jpg"},
        "heldout": "the test scenes re-captioned with templates never used in train, validation or test",
        "concepts": {c.name: {"tag": c.tag, "keyword": c.keyword, "phrases": list(c.phrases),
                              "safe_counterparts": list(c.counterparts)} for c in CONCEPTS},
        "splits": splits,
    }


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not empty and not a synthetic dataset of ours."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "dataset.json").read_text()).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise InputError(f"{out} is not empty and holds no synthetic dataset; choose an empty or new --out")


def options_summary(samples: list[Sample], n: int, boost: Sequence[Concept], boost_n: int, holdout_lookalikes: bool,
                    multi: int, boost_split: str = "test") -> dict:
    """What dataset.json adds for the options given (nothing without them)."""
    info: dict = {}
    if boost and boost_split == "train":
        first, count = n + split_sizes(n)["test"], len(boost) * boost_n
        info["boost"] = {"concepts": [c.name for c in boost], "n": boost_n, "split": "train",
                         "ids": {"train": [first, first + count - 1]},
                         "note": "extra train records (ids inclusive), appended after the balanced ones"}
    elif boost:
        first, count = n + split_sizes(n)["test"], len(boost) * boost_n  # after the balanced splits' ids
        info["boost"] = {"concepts": [c.name for c in boost], "n": boost_n,
                         "ids": {"test": [first, first + count - 1], "heldout": [first + count, first + 2 * count - 1]},
                         "note": "extra test records (ids inclusive), appended after the balanced ones; their heldout "
                                 "re-captions likewise, in the same order"}
    if holdout_lookalikes:
        held = heldout_counterparts()
        in_train = {s.counterpart for s in samples if s.split == "train"}
        info["holdout_lookalikes"] = {
            "split": "train",
            "drawn_in_train": sorted({h for h in held.values() if h in in_train}),
            "absent_from_train": sorted({h for h in held.values() if h not in in_train}),
            "note": "each concept's train records never draw its heldout_counterparts; a class in drawn_in_train "
                    "still appears in train as another concept's look-alike, one in absent_from_train in no train "
                    "record (no other concept has it, or, with few records, none drew it)",
        }
    if multi:
        focus = boost or CONCEPTS
        info["multi"] = {
            "n": multi, "concepts": [c.name for c in focus],
            "partners": [c.name for c in CONCEPTS if c not in boost],
            "per_concept": {"main": math.ceil(multi / 2), "slot": math.ceil(multi / 2)},
            "text_file": f"ViSU-Text_{MULTI}.json", "nsfw_layout": f"{MULTI}/{{incremental_id}}/0.jpg",
            "note": "test-like scenes showing two concepts: concepts[0] in the main box (tag), concepts[1] in a prop "
                    "slot, each named in the nsfw caption by phrases[i]; captions use the heldout templates",
        }
    return info


def generate(out: Path, n: int, seed: int, image_size: int = 64, unsafe_look: str = "plain", *,
             boost: Sequence[str] = (), boost_n: int = BOOST_N, holdout_lookalikes: bool = False,
             multi: int = 0, boost_split: str = "test") -> dict:
    """Write a synthetic ViSU-style dataset to ``out`` and return its summary (also in ``out/dataset.json``).

    ``n`` quadruplets over train/validation/test (80/10/10) plus a ``heldout`` re-captioning of test.
    The dataset is built in a sibling temp directory and renamed into place, so ``out`` never holds a
    half-written dataset; a previous synthetic dataset there is replaced. ``unsafe_look``: one of
    ``UNSAFE_LOOKS``. ``boost`` (concept names, with ``boost_n``), ``holdout_lookalikes`` and ``multi``
    (records per concept of the ``multi`` split): see the module docstring.
    """
    out = Path(out)
    if unsafe_look not in UNSAFE_LOOKS:
        raise InputError(f"unknown unsafe look {unsafe_look!r}; use one of {', '.join(UNSAFE_LOOKS)}")
    if n < MIN_N:
        raise InputError(f"--n must be at least {MIN_N} (one quadruplet per split), got {n}")
    if not MIN_SIZE <= image_size <= MAX_SIZE:
        raise InputError(f"--image-size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {image_size}")
    boosted = concepts_named(boost)
    if boosted and boost_n < 1:
        raise InputError(f"--boost-n must be at least 1, got {boost_n}")
    if boost_split not in BOOST_SPLITS:
        raise InputError(f"--boost-split is {' or '.join(BOOST_SPLITS)}, not {boost_split!r}")
    if multi < 0:
        raise InputError(f"--multi must be 0 (no multi split) or more, got {multi}")
    if multi and len(boosted) == len(CONCEPTS):
        raise InputError("--multi pairs each boosted concept with one not boosted; leave at least one concept out "
                         "of --boost")
    _check_out(out)
    samples = plan(n, seed, boost=boost, boost_n=boost_n, holdout_lookalikes=holdout_lookalikes, multi=multi,
                   boost_split=boost_split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    try:
        _write(tmp, samples, image_size, unsafe_look)
        info = summary(samples, n, seed, image_size) | {"unsafe_look": unsafe_look}
        info |= options_summary(samples, n, boosted, boost_n, holdout_lookalikes, multi, boost_split)
        if holdout_lookalikes:
            for name, held in heldout_counterparts().items():
                info["concepts"][name]["heldout_counterparts"] = [held]
        _write_json(tmp / "dataset.json", info)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _write(root: Path, samples: list[Sample], image_size: int, look: str) -> None:
    nsfw_bytes: dict[int, bytes] = {}  # coco_id -> unsafe JPEG, reused by heldout
    for s in samples:
        if s.coco_id not in nsfw_bytes:
            safe = root / "coco" / COCO_DIR[s.split] / f"{s.coco_id:012d}.jpg"
            safe.parent.mkdir(parents=True, exist_ok=True)
            safe.write_bytes(jpeg_bytes(render(s, False, image_size)))
            nsfw_bytes[s.coco_id] = jpeg_bytes(render(s, True, image_size, look))
        unsafe = root / "nsfw" / s.split / str(s.incremental_id) / "0.jpg"
        unsafe.parent.mkdir(parents=True, exist_ok=True)
        unsafe.write_bytes(nsfw_bytes[s.coco_id])
    for split in written_splits(samples):
        _write_json(root / f"ViSU-Text_{split}.json", [record(s, look) for s in samples if s.split == split])


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
