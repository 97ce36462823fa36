"""Drawn objects of the synthetic ViSU-style dataset: unsafe glyphs, their safe counterparts, and props.

Every glyph is a small function ``draw(pen, colour, rng)`` that paints one object inside the pen's box
(coordinates ``(u, v)`` in [0, 1] relative to that box), so the same object can sit anywhere at any size.
Unsafe glyphs keep a fixed, distinctive look (a dark gun, red blood, a white skull, ...) because the look
*is* the concept; benign objects take the colour named in their caption when they are ``colourable``.
Shapes are deliberately bold and few: at 64 px an object is about 30 px wide and must still be told apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import ImageDraw

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]

OUTLINE: RGB = (25, 25, 25)
SKIN: RGB = (232, 185, 150)
WHITE: RGB = (245, 245, 245)
BLOOD: RGB = (165, 0, 12)
WOOD: RGB = (160, 110, 60)

#: Colours that benign objects and props may take; the name goes into the caption.
PALETTE: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (50, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}


class Pen:
    """Draws inside one box; ``(u, v)`` are fractions of the box's width and height."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: Box):
        self.d = draw
        self.x0, self.y0, self.x1, self.y1 = box
        self.w, self.h = self.x1 - self.x0, self.y1 - self.y0
        # Outline about 1 px at the final resolution keeps shapes readable on any background.
        self.ow = max(1, round(min(self.w, self.h) * 0.035))

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def px(self, f: float) -> int:
        """A length given as a fraction of the box width, in pixels (at least 1)."""
        return max(1, round(f * self.w))

    def _xy(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (a, b), (c, d) = self.pt(u0, v0), self.pt(u1, v1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]

    def rect(self, u0, v0, u1, v1, fill: RGB | None, *, outline: bool = True, radius: float = 0.0) -> None:
        xy = self._xy(u0, v0, u1, v1)
        kw = dict(fill=fill, outline=OUTLINE if outline else None, width=self.ow)
        if radius:
            self.d.rounded_rectangle(xy, radius=self.px(radius), **kw)
        else:
            self.d.rectangle(xy, **kw)

    def ellipse(self, u0, v0, u1, v1, fill: RGB | None, *, outline: bool = True) -> None:
        self.d.ellipse(self._xy(u0, v0, u1, v1), fill=fill, outline=OUTLINE if outline else None, width=self.ow)

    def circle(self, u: float, v: float, r: float, fill: RGB | None, *, outline: bool = True) -> None:
        """A true circle of radius ``r`` (fraction of the box width) centred at ``(u, v)``."""
        x, y = self.pt(u, v)
        rr = r * self.w
        self.d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill, outline=OUTLINE if outline else None, width=self.ow)

    def poly(self, pts: Sequence[tuple[float, float]], fill: RGB | None, *, outline: bool = True) -> None:
        self.d.polygon([self.pt(u, v) for u, v in pts], fill=fill, outline=OUTLINE if outline else None, width=self.ow)

    def line(self, pts: Sequence[tuple[float, float]], fill: RGB, width: float = 0.05) -> None:
        self.d.line([self.pt(u, v) for u, v in pts], fill=fill, width=self.px(width), joint="curve")

    def arc(self, u0, v0, u1, v1, start: float, end: float, fill: RGB, width: float = 0.05) -> None:
        self.d.arc(self._xy(u0, v0, u1, v1), start, end, fill=fill, width=self.px(width))

    def pie(self, u0, v0, u1, v1, start: float, end: float, fill: RGB, *, outline: bool = True) -> None:
        self.d.pieslice(self._xy(u0, v0, u1, v1), start, end, fill=fill, outline=OUTLINE if outline else None, width=self.ow)


Draw = Callable[[Pen, RGB, random.Random], None]


@dataclass(frozen=True)
class Glyph:
    """A drawable object: ``colourable`` ones take (and name) a palette colour."""

    name: str
    draw: Draw
    colourable: bool


GLYPHS: dict[str, Glyph] = {}


def glyph(name: str, colourable: bool = False) -> Callable[[Draw], Draw]:
    def register(fn: Draw) -> Draw:
        GLYPHS[name] = Glyph(name, fn, colourable)
        return fn

    return register


def shade(c: RGB, f: float) -> RGB:
    """Darker (f < 1) or lighter (f > 1) version of a colour, for details on coloured objects."""
    if f <= 1:
        return tuple(int(x * f) for x in c)  # type: ignore[return-value]
    return tuple(int(x + (255 - x) * (f - 1)) for x in c)  # type: ignore[return-value]


def blob(p: Pen, cu: float, cv: float, r: float, fill: RGB, rng: random.Random, *, spikes: int = 14, jag: float = 0.35) -> None:
    """An irregular splat of mean radius ``r`` around ``(cu, cv)``."""
    pts = []
    for i in range(spikes):
        a = 2 * math.pi * i / spikes
        rr = r * (1 - jag / 2 + jag * rng.random())
        pts.append((cu + rr * math.cos(a), cv + rr * math.sin(a)))
    p.poly(pts, fill, outline=False)


def star_points(cu: float, cv: float, r_out: float, r_in: float, n: int, rng: random.Random | None = None) -> list:
    pts = []
    for i in range(2 * n):
        a = math.pi * i / n - math.pi / 2
        r = r_out if i % 2 == 0 else r_in
        if rng is not None:
            r *= 0.85 + 0.3 * rng.random()
        pts.append((cu + r * math.cos(a), cv + r * math.sin(a)))
    return pts


# ---------------------------------------------------------------- unsafe glyphs (fixed looks)

@glyph("gun")
def gun(p: Pen, c: RGB, rng: random.Random) -> None:
    metal = (50, 50, 56)
    p.arc(0.34, 0.36, 0.62, 0.66, 0, 180, metal, 0.05)  # trigger guard
    p.poly([(0.12, 0.38), (0.44, 0.38), (0.38, 0.92), (0.05, 0.92)], metal)  # grip
    p.rect(0.06, 0.2, 0.96, 0.42, metal)  # slide and barrel
    p.rect(0.86, 0.13, 0.92, 0.2, metal)  # front sight
    p.circle(0.94, 0.31, 0.04, (0, 0, 0), outline=False)  # muzzle


@glyph("knife")
def knife(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.03, 0.42, 0.38, 0.6, (30, 30, 30), radius=0.04)
    for u in (0.12, 0.28):
        p.circle(u, 0.51, 0.025, (200, 200, 200), outline=False)
    p.rect(0.37, 0.33, 0.43, 0.69, (110, 110, 115))
    p.poly([(0.43, 0.36), (0.8, 0.36), (0.98, 0.52), (0.43, 0.64)], (205, 210, 222))


@glyph("blood")
def blood(p: Pen, c: RGB, rng: random.Random) -> None:
    blob(p, 0.5, 0.6, 0.3, BLOOD, rng, spikes=16, jag=0.5)
    blob(p, 0.48, 0.62, 0.15, (120, 0, 8), rng)
    for _ in range(7):
        a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.36, 0.46)
        p.circle(0.5 + d * math.cos(a), 0.6 + 0.8 * d * math.sin(a), rng.uniform(0.03, 0.065), BLOOD, outline=False)


@glyph("vomit")
def vomit(p: Pen, c: RGB, rng: random.Random) -> None:
    blob(p, 0.5, 0.65, 0.34, (175, 180, 45), rng, spikes=18, jag=0.45)
    for _ in range(9):
        p.circle(rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.8), rng.uniform(0.03, 0.06),
                 rng.choice([(130, 100, 35), (215, 210, 110), (150, 160, 30)]), outline=False)


@glyph("syringe")
def syringe(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.75, 0.5), (0.99, 0.5)], (80, 80, 85), 0.03)  # needle
    p.rect(0.7, 0.44, 0.77, 0.56, (150, 150, 155))
    p.rect(0.02, 0.3, 0.08, 0.7, (120, 120, 125))  # thumb rest
    p.rect(0.08, 0.46, 0.24, 0.54, (120, 120, 125))  # plunger rod
    p.rect(0.22, 0.36, 0.71, 0.64, (232, 238, 244))  # barrel
    p.rect(0.4, 0.39, 0.69, 0.61, (175, 15, 30), outline=False)  # dose
    for u in (0.32, 0.42, 0.52, 0.62):
        p.line([(u, 0.36), (u, 0.44)], OUTLINE, 0.02)


@glyph("pills")
def pills(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.58, 0.32, 0.92, 0.9, (225, 125, 20), radius=0.04)  # bottle
    p.rect(0.62, 0.5, 0.88, 0.72, WHITE, outline=False)  # label
    p.rect(0.55, 0.2, 0.95, 0.33, WHITE)  # cap
    spots = [(0.1, 0.6), (0.3, 0.55), (0.18, 0.75), (0.4, 0.72), (0.08, 0.9), (0.3, 0.9), (0.48, 0.88)]
    for i, (u, v) in enumerate(spots):
        if i % 2:
            p.circle(u, v, 0.055, WHITE)
        else:  # two-tone capsule
            p.rect(u - 0.08, v - 0.04, u + 0.08, v + 0.04, (215, 30, 30), radius=0.04)
            p.rect(u - 0.08, v - 0.04, u, v + 0.04, WHITE, radius=0.04)


@glyph("explosion")
def explosion(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly(star_points(0.5, 0.5, 0.5, 0.27, 12, rng), (230, 65, 20))
    p.poly(star_points(0.5, 0.5, 0.32, 0.16, 9, rng), (255, 210, 40), outline=False)
    p.circle(0.5, 0.5, 0.08, (255, 250, 200), outline=False)


@glyph("graffiti")
def graffiti(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.0, 0.08, 1.0, 0.92, (165, 158, 150))
    for v in (0.3, 0.52, 0.74):
        p.line([(0.0, v), (1.0, v)], (120, 115, 110), 0.02)
    for colour in ((235, 30, 200), (90, 235, 40), (30, 210, 235)):
        pts = [(0.05 + 0.9 * k / 6, rng.uniform(0.2, 0.8)) for k in range(7)]
        p.line(pts, colour, 0.08)


def figure(p: Pen, skin: RGB, torso: RGB, arms: RGB, legs: RGB, *, dress: RGB | None = None) -> None:
    """A standing person; the clothing colours are what tells naked from dressed."""
    p.line([(0.42, 0.6), (0.37, 0.97)], legs, 0.11)
    p.line([(0.58, 0.6), (0.63, 0.97)], legs, 0.11)
    p.line([(0.36, 0.32), (0.16, 0.6)], arms, 0.1)
    p.line([(0.64, 0.32), (0.84, 0.6)], arms, 0.1)
    p.rect(0.33, 0.27, 0.67, 0.64, torso, radius=0.08)
    if dress is not None:
        p.poly([(0.34, 0.45), (0.66, 0.45), (0.8, 0.82), (0.2, 0.82)], dress)
    p.circle(0.5, 0.15, 0.12, skin)


@glyph("naked person")
def naked_person(p: Pen, c: RGB, rng: random.Random) -> None:
    figure(p, SKIN, SKIN, SKIN, SKIN)
    p.circle(0.5, 0.5, 0.015, (170, 110, 90), outline=False)


@glyph("lingerie")
def lingerie(p: Pen, c: RGB, rng: random.Random) -> None:
    red, lace = (200, 15, 60), (40, 0, 15)
    p.line([(0.3, 0.0), (0.33, 0.18)], red, 0.03)
    p.line([(0.7, 0.0), (0.67, 0.18)], red, 0.03)
    p.poly([(0.13, 0.46), (0.33, 0.14), (0.5, 0.46)], red)
    p.poly([(0.5, 0.46), (0.67, 0.14), (0.87, 0.46)], red)
    p.line([(0.1, 0.47), (0.9, 0.47)], lace, 0.05)
    p.poly([(0.22, 0.58), (0.78, 0.58), (0.56, 0.92), (0.44, 0.92)], red)
    p.line([(0.22, 0.6), (0.78, 0.6)], lace, 0.04)


@glyph("noose")
def noose(p: Pen, c: RGB, rng: random.Random) -> None:
    rope = (150, 105, 55)
    p.line([(0.5, 0.0), (0.5, 0.36)], rope, 0.08)
    p.arc(0.28, 0.44, 0.72, 0.96, 0, 360, rope, 0.08)
    p.rect(0.42, 0.28, 0.58, 0.5, rope)
    for v in (0.34, 0.4, 0.46):
        p.line([(0.42, v), (0.58, v)], (100, 65, 30), 0.02)


@glyph("hate flag")
def hate_flag(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.1, 0.02), (0.1, 0.98)], (90, 60, 30), 0.05)
    p.rect(0.12, 0.08, 0.94, 0.62, (20, 20, 20))
    p.circle(0.53, 0.35, 0.19, WHITE, outline=False)
    p.poly([(0.56, 0.18), (0.42, 0.37), (0.52, 0.37), (0.46, 0.53), (0.64, 0.31), (0.54, 0.31)], (210, 0, 0), outline=False)


@glyph("skull")
def skull(p: Pen, c: RGB, rng: random.Random) -> None:
    bone = (238, 232, 212)
    p.rect(0.32, 0.55, 0.68, 0.88, bone, radius=0.06)
    p.ellipse(0.16, 0.06, 0.84, 0.7, bone)
    p.ellipse(0.27, 0.32, 0.46, 0.52, (15, 15, 15), outline=False)
    p.ellipse(0.54, 0.32, 0.73, 0.52, (15, 15, 15), outline=False)
    p.poly([(0.5, 0.52), (0.45, 0.63), (0.55, 0.63)], (15, 15, 15), outline=False)
    for u in (0.4, 0.47, 0.54, 0.61):
        p.line([(u, 0.72), (u, 0.88)], OUTLINE, 0.02)


def face(p: Pen, skin: RGB = SKIN) -> None:
    p.ellipse(0.14, 0.08, 0.86, 0.86, skin)


@glyph("bruised face")
def bruised_face(p: Pen, c: RGB, rng: random.Random) -> None:
    face(p)
    p.ellipse(0.18, 0.2, 0.52, 0.56, (105, 35, 135), outline=False)  # black eye
    p.ellipse(0.52, 0.46, 0.82, 0.72, (120, 60, 150), outline=False)
    p.ellipse(0.3, 0.66, 0.5, 0.8, (140, 70, 160), outline=False)
    p.circle(0.36, 0.38, 0.04, (15, 15, 15), outline=False)
    p.circle(0.64, 0.38, 0.04, (15, 15, 15), outline=False)
    p.line([(0.58, 0.16), (0.76, 0.32)], BLOOD, 0.05)  # cut
    p.arc(0.32, 0.62, 0.68, 0.86, 200, 340, (90, 20, 20), 0.05)  # frown
    p.line([(0.36, 0.46), (0.34, 0.62)], (80, 150, 235), 0.04)  # tear


@glyph("caged dog")
def caged_dog(p: Pen, c: RGB, rng: random.Random) -> None:
    dog(p, c, rng)
    bars = (65, 65, 72)
    p.rect(0.02, 0.04, 0.98, 0.96, None)
    for u in (0.04, 0.2, 0.36, 0.52, 0.68, 0.84, 0.96):
        p.line([(u, 0.04), (u, 0.96)], bars, 0.045)
    p.line([(0.02, 0.06), (0.98, 0.06)], bars, 0.06)
    p.line([(0.02, 0.94), (0.98, 0.94)], bars, 0.06)


@glyph("stolen cash")
def stolen_cash(p: Pen, c: RGB, rng: random.Random) -> None:
    cash, dark = (80, 165, 80), (40, 110, 45)
    for (u, v, du) in ((0.3, 0.12, -0.06), (0.5, 0.06, 0.0), (0.68, 0.12, 0.06)):
        p.poly([(u - 0.12, v + 0.3), (u - 0.1 + du, v), (u + 0.1 + du, v), (u + 0.12, v + 0.3)], cash)
        p.circle(u + du / 2, v + 0.12, 0.04, dark, outline=False)
    p.ellipse(0.12, 0.36, 0.88, 0.97, (28, 28, 28))
    p.rect(0.3, 0.3, 0.7, 0.42, (28, 28, 28))
    p.line([(0.3, 0.4), (0.7, 0.4)], (200, 170, 60), 0.04)  # drawstring


@glyph("cocaine")
def cocaine(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.04, 0.4, 0.96, 0.92, (15, 15, 20))  # mirror
    for v in (0.55, 0.68, 0.81):
        p.line([(0.15, v), (0.7, v)], (250, 250, 250), 0.05)
    p.line([(0.74, 0.58), (0.92, 0.86)], (80, 165, 80), 0.07)  # rolled banknote
    p.rect(0.56, 0.06, 0.86, 0.34, (250, 250, 250))  # bag of powder
    p.poly([(0.62, 0.06), (0.8, 0.06), (0.71, 0.0)], (220, 220, 220))


@glyph("spiked bat")
def spiked_bat(p: Pen, c: RGB, rng: random.Random) -> None:
    bat(p, (120, 80, 45))
    for t in (0.45, 0.56, 0.67, 0.78, 0.89):  # nails driven through the head, both sides
        u, v = 0.12 + 0.76 * t, 0.88 - 0.76 * t
        p.line([(u - 0.15, v - 0.15), (u + 0.15, v + 0.15)], (95, 95, 102), 0.05)
    for u, v, r in ((0.7, 0.3, 0.06), (0.58, 0.44, 0.045), (0.82, 0.2, 0.05)):
        p.circle(u, v, r, BLOOD, outline=False)


@glyph("threatening note")
def threatening_note(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly([(0.14, 0.1), (0.86, 0.05), (0.9, 0.92), (0.12, 0.95)], (245, 240, 222))
    for v in (0.2, 0.34, 0.48, 0.62):
        pts = [(0.22 + 0.08 * k, v + (0.05 if k % 2 else -0.04)) for k in range(6)]
        p.line(pts, (205, 0, 0), 0.05)
    p.rect(0.46, 0.7, 0.54, 0.8, (205, 0, 0), outline=False)  # "!"
    p.circle(0.5, 0.87, 0.035, (205, 0, 0), outline=False)


@glyph("broken glass")
def broken_glass(p: Pen, c: RGB, rng: random.Random) -> None:
    glass = (185, 225, 242)
    shards = [[(0.1, 0.9), (0.3, 0.3), (0.42, 0.88)], [(0.4, 0.92), (0.55, 0.15), (0.68, 0.9)],
              [(0.66, 0.95), (0.92, 0.45), (0.9, 0.95)], [(0.05, 0.55), (0.2, 0.42), (0.18, 0.62)]]
    for s in shards:
        p.poly([(u + rng.uniform(-0.03, 0.03), v) for u, v in s], glass)
    for u, v in ((0.3, 0.95), (0.62, 0.5), (0.8, 0.75)):
        p.circle(u, v, 0.04, BLOOD, outline=False)


def hand(p: Pen, col: RGB, fingers: Sequence[tuple[float, float]]) -> None:
    """A palm with upright fingers at ``(u, top)`` and a thumb on the left."""
    for u, top in fingers:
        p.rect(u - 0.065, top, u + 0.065, 0.6, col, radius=0.06)
    p.line([(0.3, 0.75), (0.12, 0.5)], col, 0.12)
    p.rect(0.24, 0.45, 0.76, 0.95, col, radius=0.12)


@glyph("middle finger")
def middle_finger(p: Pen, c: RGB, rng: random.Random) -> None:
    hand(p, SKIN, [(0.5, 0.03)])
    for u in (0.33, 0.64, 0.76):  # curled fingers
        p.circle(u - 0.02 if u < 0.5 else u - 0.04, 0.5, 0.075, SKIN)


def cone(p: Pen, col: RGB) -> None:
    p.poly([(0.5, 0.02), (0.8, 0.9), (0.2, 0.9)], col)


@glyph("dunce cap")
def dunce_cap(p: Pen, c: RGB, rng: random.Random) -> None:
    cone(p, WHITE)
    p.rect(0.12, 0.86, 0.88, 0.96, WHITE)
    p.line([(0.44, 0.45), (0.44, 0.75)], OUTLINE, 0.045)  # the letter D
    p.arc(0.32, 0.45, 0.58, 0.75, 270, 90, OUTLINE, 0.045)


# ---------------------------------------------------------------- benign counterparts

@glyph("umbrella", True)
def umbrella(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.45), (0.5, 0.86)], (40, 40, 40), 0.045)
    p.arc(0.5, 0.78, 0.66, 0.94, 0, 180, (40, 40, 40), 0.045)
    p.pie(0.04, 0.12, 0.96, 0.82, 180, 360, c)
    for u in (0.27, 0.5, 0.73):
        p.line([(0.5, 0.13), (u, 0.47)], shade(c, 0.6), 0.02)


@glyph("camera", True)
def camera(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.3, 0.2, 0.52, 0.32, (40, 40, 40))
    p.rect(0.06, 0.3, 0.94, 0.82, c, radius=0.06)
    p.circle(0.5, 0.56, 0.19, (30, 30, 30))
    p.circle(0.5, 0.56, 0.1, (90, 110, 140), outline=False)
    p.rect(0.74, 0.36, 0.86, 0.44, WHITE)


@glyph("banana")
def banana(p: Pen, c: RGB, rng: random.Random) -> None:
    p.arc(0.06, -0.35, 0.94, 0.8, 25, 155, (245, 215, 40), 0.16)
    p.arc(0.06, -0.35, 0.94, 0.8, 25, 155, (200, 160, 20), 0.03)


@glyph("spoon")
def spoon(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.05, 0.52), (0.6, 0.5)], (190, 190, 198), 0.07)
    p.ellipse(0.56, 0.36, 0.96, 0.64, (205, 205, 212))


@glyph("pencil")
def pencil(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.03, 0.42, 0.12, 0.58, (240, 150, 170))
    p.rect(0.12, 0.42, 0.74, 0.58, (245, 200, 40))
    p.poly([(0.74, 0.42), (0.95, 0.5), (0.74, 0.58)], (235, 200, 150))
    p.poly([(0.88, 0.475), (0.95, 0.5), (0.88, 0.525)], (30, 30, 30), outline=False)


@glyph("paintbrush", True)
def paintbrush(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.03, 0.44, 0.55, 0.56, (170, 110, 55), radius=0.05)
    p.rect(0.55, 0.42, 0.68, 0.58, (180, 180, 185))
    p.poly([(0.68, 0.41), (0.9, 0.44), (0.98, 0.5), (0.9, 0.56), (0.68, 0.59)], c)


@glyph("puddle of water")
def puddle(p: Pen, c: RGB, rng: random.Random) -> None:
    blob(p, 0.5, 0.65, 0.32, (80, 140, 225), rng, spikes=10, jag=0.2)
    p.ellipse(0.32, 0.55, 0.52, 0.62, (175, 210, 250), outline=False)


@glyph("pile of leaves")
def leaves(p: Pen, c: RGB, rng: random.Random) -> None:
    for _ in range(11):
        u, v = rng.uniform(0.15, 0.85), rng.uniform(0.45, 0.88)
        col = rng.choice([(225, 120, 30), (200, 160, 40), (150, 80, 30), (120, 150, 40)])
        p.ellipse(u - 0.11, v - 0.06, u + 0.11, v + 0.06, col)


@glyph("rug", True)
def rug(p: Pen, c: RGB, rng: random.Random) -> None:
    for u in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        p.line([(u, 0.4), (u, 0.95)], (235, 225, 200), 0.02)
    p.rect(0.06, 0.45, 0.94, 0.9, c)
    p.rect(0.16, 0.52, 0.84, 0.83, None)
    p.line([(0.16, 0.675), (0.84, 0.675)], shade(c, 1.5), 0.05)


@glyph("bowl of soup", True)
def soup(p: Pen, c: RGB, rng: random.Random) -> None:
    for u in (0.38, 0.5, 0.62):
        p.line([(u, 0.12), (u + 0.04, 0.22), (u, 0.32)], (150, 150, 150), 0.025)
    p.pie(0.1, 0.2, 0.9, 0.9, 0, 180, c)
    p.ellipse(0.1, 0.47, 0.9, 0.63, (215, 130, 45))


@glyph("pen", True)
def pen(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.05, 0.43, 0.78, 0.57, c, radius=0.05)
    p.line([(0.12, 0.4), (0.4, 0.4)], (150, 150, 155), 0.03)  # clip
    p.poly([(0.78, 0.44), (0.95, 0.5), (0.78, 0.56)], (190, 190, 195))


@glyph("candle", True)
def candle(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.3), (0.5, 0.38)], (30, 30, 30), 0.025)
    p.poly([(0.5, 0.05), (0.58, 0.22), (0.5, 0.32), (0.42, 0.22)], (250, 170, 30))
    p.rect(0.38, 0.37, 0.62, 0.93, c)


@glyph("coins")
def coins(p: Pen, c: RGB, rng: random.Random) -> None:
    gold = (232, 190, 50)
    for u, v in ((0.25, 0.75), (0.5, 0.8), (0.75, 0.72), (0.38, 0.55), (0.62, 0.52)):
        p.circle(u, v, 0.12, gold)
        p.circle(u, v, 0.07, (200, 155, 30), outline=False)


@glyph("marbles")
def marbles(p: Pen, c: RGB, rng: random.Random) -> None:
    cols = [(60, 110, 230), (230, 60, 60), (60, 190, 90), (240, 200, 40), (160, 80, 200), (40, 180, 200)]
    for i, (u, v) in enumerate(((0.2, 0.75), (0.42, 0.82), (0.66, 0.76), (0.84, 0.6), (0.3, 0.52), (0.56, 0.56))):
        p.circle(u, v, 0.1, cols[i])
        p.circle(u - 0.03, v - 0.03, 0.03, WHITE, outline=False)


@glyph("buttons", True)
def buttons(p: Pen, c: RGB, rng: random.Random) -> None:
    for u, v in ((0.25, 0.7), (0.5, 0.5), (0.75, 0.72), (0.5, 0.82)):
        p.circle(u, v, 0.13, c)
        for du, dv in ((-0.03, -0.03), (0.03, -0.03), (-0.03, 0.03), (0.03, 0.03)):
            p.circle(u + du, v + dv, 0.015, shade(c, 0.4), outline=False)


@glyph("sun")
def sun(p: Pen, c: RGB, rng: random.Random) -> None:
    for k in range(12):
        a = 2 * math.pi * k / 12
        p.line([(0.5 + 0.3 * math.cos(a), 0.5 + 0.3 * math.sin(a)), (0.5 + 0.47 * math.cos(a), 0.5 + 0.47 * math.sin(a))],
               (245, 200, 30), 0.05)
    p.circle(0.5, 0.5, 0.26, (250, 220, 50))


@glyph("sunflower")
def sunflower(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.5), (0.5, 0.98)], (60, 140, 50), 0.06)
    for k in range(10):
        a = 2 * math.pi * k / 10
        u, v = 0.5 + 0.22 * math.cos(a), 0.4 + 0.22 * math.sin(a)
        p.circle(u, v, 0.1, (250, 205, 30))
    p.circle(0.5, 0.4, 0.14, (110, 70, 30))


@glyph("orange")
def orange(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.2), (0.52, 0.08)], (100, 70, 30), 0.04)
    p.ellipse(0.52, 0.06, 0.75, 0.18, (60, 150, 50))
    p.circle(0.5, 0.56, 0.36, (245, 145, 30))


@glyph("painting", True)
def painting(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.04, 0.1, 0.96, 0.9, c)
    p.rect(0.14, 0.2, 0.86, 0.8, (170, 215, 245))
    p.pie(0.05, 0.5, 0.8, 1.1, 180, 360, (70, 160, 70), outline=False)
    p.circle(0.7, 0.38, 0.07, (250, 210, 50), outline=False)


@glyph("poster", True)
def poster(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.12, 0.06, 0.88, 0.94, c)
    p.circle(0.5, 0.38, 0.18, WHITE)
    for v in (0.68, 0.78):
        p.line([(0.25, v), (0.75, v)], WHITE, 0.05)


@glyph("clock", True)
def clock(p: Pen, c: RGB, rng: random.Random) -> None:
    p.circle(0.5, 0.5, 0.44, c)
    p.circle(0.5, 0.5, 0.34, WHITE)
    p.line([(0.5, 0.5), (0.5, 0.26)], (20, 20, 20), 0.04)
    p.line([(0.5, 0.5), (0.67, 0.58)], (20, 20, 20), 0.04)


@glyph("man in a coat", True)
def person_coat(p: Pen, c: RGB, rng: random.Random) -> None:
    figure(p, SKIN, c, c, (50, 60, 110))
    for v in (0.38, 0.48, 0.58):
        p.circle(0.5, v, 0.018, shade(c, 0.4), outline=False)


@glyph("woman in a dress", True)
def person_dress(p: Pen, c: RGB, rng: random.Random) -> None:
    figure(p, SKIN, c, SKIN, SKIN, dress=c)


@glyph("snowman")
def snowman(p: Pen, c: RGB, rng: random.Random) -> None:
    p.circle(0.5, 0.74, 0.24, WHITE)
    p.circle(0.5, 0.42, 0.17, WHITE)
    p.circle(0.5, 0.17, 0.12, WHITE)
    p.poly([(0.5, 0.16), (0.68, 0.19), (0.5, 0.21)], (245, 130, 30), outline=False)


@glyph("t-shirt", True)
def tshirt(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly([(0.3, 0.12), (0.42, 0.12), (0.5, 0.2), (0.58, 0.12), (0.7, 0.12), (0.95, 0.32), (0.84, 0.45),
            (0.74, 0.38), (0.74, 0.92), (0.26, 0.92), (0.26, 0.38), (0.16, 0.45), (0.05, 0.32)], c)


@glyph("scarf", True)
def scarf(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly([(0.1, 0.2), (0.9, 0.2), (0.9, 0.36), (0.1, 0.36)], c)
    p.poly([(0.62, 0.3), (0.78, 0.3), (0.8, 0.85), (0.64, 0.85)], c)
    for v in (0.5, 0.68):
        p.line([(0.63, v), (0.79, v)], shade(c, 0.6), 0.04)
    for u in (0.66, 0.7, 0.74, 0.78):
        p.line([(u, 0.86), (u, 0.96)], c, 0.02)


@glyph("apron", True)
def apron(p: Pen, c: RGB, rng: random.Random) -> None:
    p.arc(0.34, 0.0, 0.66, 0.36, 180, 360, c, 0.04)
    p.poly([(0.34, 0.18), (0.66, 0.18), (0.66, 0.4), (0.82, 0.45), (0.78, 0.95), (0.22, 0.95), (0.18, 0.45), (0.34, 0.4)], c)
    p.rect(0.38, 0.6, 0.62, 0.76, shade(c, 0.7))


@glyph("hanging lamp", True)
def lamp(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.0), (0.5, 0.4)], (30, 30, 30), 0.03)
    p.circle(0.5, 0.72, 0.09, (255, 240, 140))
    p.poly([(0.38, 0.38), (0.62, 0.38), (0.84, 0.7), (0.16, 0.7)], c)


@glyph("swing", True)
def swing(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.22, 0.0), (0.22, 0.76)], (110, 110, 110), 0.035)
    p.line([(0.78, 0.0), (0.78, 0.76)], (110, 110, 110), 0.035)
    p.rect(0.14, 0.74, 0.86, 0.84, c)


@glyph("hanging plant")
def hanging_plant(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.0), (0.5, 0.4)], (60, 60, 60), 0.03)
    for u in (0.3, 0.42, 0.58, 0.7):
        p.ellipse(u - 0.07, 0.45, u + 0.07, 0.95, (60, 150, 55))
    p.poly([(0.28, 0.38), (0.72, 0.38), (0.64, 0.62), (0.36, 0.62)], (195, 95, 50))


@glyph("flag", True)
def flag(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.1, 0.02), (0.1, 0.98)], (90, 60, 30), 0.05)
    p.rect(0.12, 0.08, 0.94, 0.62, c)
    p.rect(0.12, 0.26, 0.94, 0.44, WHITE)


@glyph("kite", True)
def kite(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.7), (0.4, 0.8), (0.55, 0.88), (0.45, 0.98)], (60, 60, 60), 0.02)
    p.poly([(0.5, 0.05), (0.82, 0.35), (0.5, 0.72), (0.18, 0.35)], c)
    p.line([(0.5, 0.05), (0.5, 0.72)], shade(c, 0.5), 0.02)
    p.line([(0.18, 0.35), (0.82, 0.35)], shade(c, 0.5), 0.02)


@glyph("balloon", True)
def balloon(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.72), (0.45, 0.85), (0.52, 0.98)], (60, 60, 60), 0.02)
    p.ellipse(0.24, 0.06, 0.76, 0.72, c)
    p.ellipse(0.34, 0.16, 0.42, 0.28, shade(c, 1.6), outline=False)


@glyph("egg")
def egg(p: Pen, c: RGB, rng: random.Random) -> None:
    p.ellipse(0.28, 0.1, 0.72, 0.9, (250, 245, 230))


@glyph("smiling face")
def smiling_face(p: Pen, c: RGB, rng: random.Random) -> None:
    face(p)
    p.circle(0.36, 0.38, 0.045, (15, 15, 15), outline=False)
    p.circle(0.64, 0.38, 0.045, (15, 15, 15), outline=False)
    p.arc(0.3, 0.42, 0.7, 0.72, 20, 160, (120, 30, 30), 0.05)


@glyph("face with sunglasses")
def sunglasses_face(p: Pen, c: RGB, rng: random.Random) -> None:
    face(p)
    p.rect(0.22, 0.32, 0.46, 0.46, (15, 15, 15), radius=0.04)
    p.rect(0.54, 0.32, 0.78, 0.46, (15, 15, 15), radius=0.04)
    p.line([(0.46, 0.36), (0.54, 0.36)], (15, 15, 15), 0.03)
    p.arc(0.32, 0.46, 0.68, 0.72, 20, 160, (120, 30, 30), 0.05)


@glyph("clown face")
def clown_face(p: Pen, c: RGB, rng: random.Random) -> None:
    for u in (0.14, 0.86):
        p.circle(u, 0.35, 0.15, (240, 120, 30))
    face(p, WHITE)
    p.circle(0.36, 0.36, 0.045, (15, 15, 15), outline=False)
    p.circle(0.64, 0.36, 0.045, (15, 15, 15), outline=False)
    p.circle(0.5, 0.52, 0.08, (230, 20, 20))
    p.arc(0.26, 0.44, 0.74, 0.78, 20, 160, (230, 20, 20), 0.07)


@glyph("dog")
def dog(p: Pen, c: RGB, rng: random.Random) -> None:
    brown, dark = (160, 105, 60), (90, 55, 30)
    for u in (0.28, 0.4, 0.6, 0.72):
        p.rect(u - 0.04, 0.7, u + 0.04, 0.9, brown)
    p.line([(0.2, 0.6), (0.08, 0.42)], brown, 0.05)  # tail
    p.ellipse(0.16, 0.48, 0.8, 0.8, brown)
    p.circle(0.76, 0.42, 0.15, brown)
    p.ellipse(0.6, 0.28, 0.7, 0.52, dark)  # ear
    p.circle(0.8, 0.38, 0.03, (10, 10, 10), outline=False)
    p.circle(0.9, 0.46, 0.03, (10, 10, 10), outline=False)


@glyph("cat", True)
def cat(p: Pen, c: RGB, rng: random.Random) -> None:
    p.arc(0.02, 0.3, 0.4, 0.9, 90, 250, c, 0.05)
    p.ellipse(0.18, 0.5, 0.78, 0.9, c)
    p.poly([(0.56, 0.24), (0.62, 0.08), (0.7, 0.22)], c)
    p.poly([(0.76, 0.22), (0.86, 0.08), (0.9, 0.26)], c)
    p.circle(0.74, 0.38, 0.17, c)
    p.circle(0.68, 0.36, 0.025, (10, 10, 10), outline=False)
    p.circle(0.8, 0.36, 0.025, (10, 10, 10), outline=False)


@glyph("teddy bear")
def teddy_bear(p: Pen, c: RGB, rng: random.Random) -> None:
    fur, light = (175, 120, 70), (225, 190, 145)
    p.ellipse(0.25, 0.45, 0.75, 0.95, fur)
    p.ellipse(0.36, 0.58, 0.64, 0.86, light, outline=False)
    p.circle(0.3, 0.12, 0.09, fur)
    p.circle(0.7, 0.12, 0.09, fur)
    p.circle(0.5, 0.3, 0.2, fur)
    p.ellipse(0.42, 0.32, 0.58, 0.44, light, outline=False)
    p.circle(0.42, 0.24, 0.025, (10, 10, 10), outline=False)
    p.circle(0.58, 0.24, 0.025, (10, 10, 10), outline=False)


@glyph("shopping bag", True)
def shopping_bag(p: Pen, c: RGB, rng: random.Random) -> None:
    p.arc(0.32, 0.12, 0.68, 0.5, 180, 360, (40, 40, 40), 0.04)
    p.rect(0.16, 0.32, 0.84, 0.95, c)


@glyph("backpack", True)
def backpack(p: Pen, c: RGB, rng: random.Random) -> None:
    p.arc(0.36, 0.04, 0.64, 0.3, 180, 360, shade(c, 0.6), 0.05)
    p.rect(0.2, 0.16, 0.8, 0.95, c, radius=0.12)
    p.rect(0.3, 0.58, 0.7, 0.86, shade(c, 0.75), radius=0.05)


@glyph("basket")
def basket(p: Pen, c: RGB, rng: random.Random) -> None:
    straw = (200, 150, 80)
    p.arc(0.18, 0.1, 0.82, 0.9, 180, 360, (150, 100, 50), 0.05)
    p.poly([(0.1, 0.48), (0.9, 0.48), (0.78, 0.95), (0.22, 0.95)], straw)
    for v in (0.6, 0.72, 0.84):
        p.line([(0.15, v), (0.85, v)], (150, 100, 50), 0.025)


@glyph("plate of cookies")
def cookies(p: Pen, c: RGB, rng: random.Random) -> None:
    p.ellipse(0.02, 0.45, 0.98, 0.95, WHITE)
    for u, v in ((0.3, 0.66), (0.55, 0.6), (0.72, 0.74), (0.45, 0.8)):
        p.ellipse(u - 0.12, v - 0.08, u + 0.12, v + 0.08, (190, 130, 65))
        p.circle(u, v, 0.02, (70, 40, 20), outline=False)


@glyph("sandwich")
def sandwich(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.08, 0.62, 0.92, 0.82, (230, 190, 120), radius=0.05)
    p.line([(0.08, 0.6), (0.92, 0.6)], (230, 50, 40), 0.06)
    p.line([(0.06, 0.54), (0.94, 0.54)], (80, 180, 60), 0.06)
    p.rect(0.08, 0.3, 0.92, 0.5, (230, 190, 120), radius=0.08)


@glyph("book", True)
def book(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.18, 0.12, 0.86, 0.92, WHITE)
    p.rect(0.14, 0.08, 0.8, 0.9, c)
    p.line([(0.22, 0.08), (0.22, 0.9)], shade(c, 0.6), 0.04)


@glyph("baseball bat", True)
def baseball_bat(p: Pen, c: RGB, rng: random.Random) -> None:
    bat(p, c)
    p.line([(0.13, 0.87), (0.27, 0.73)], (30, 30, 30), 0.07)  # grip tape


def bat(p: Pen, col: RGB) -> None:
    p.poly([(0.08, 0.86), (0.14, 0.92), (0.94, 0.24), (0.76, 0.06)], col)


@glyph("rolling pin")
def rolling_pin(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.02, 0.45, 0.2, 0.55, WOOD, radius=0.04)
    p.rect(0.8, 0.45, 0.98, 0.55, WOOD, radius=0.04)
    p.rect(0.18, 0.36, 0.82, 0.64, (220, 180, 125), radius=0.08)


@glyph("flashlight", True)
def flashlight(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly([(0.72, 0.42), (0.98, 0.2), (0.98, 0.8), (0.72, 0.58)], (255, 240, 150), outline=False)
    p.rect(0.06, 0.42, 0.58, 0.58, c, radius=0.03)
    p.poly([(0.56, 0.4), (0.72, 0.34), (0.72, 0.66), (0.56, 0.6)], shade(c, 0.7))


@glyph("letter")
def letter(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.14, 0.06, 0.86, 0.94, (250, 250, 250))
    for v in (0.2, 0.32, 0.44, 0.56, 0.68, 0.8):
        p.line([(0.24, v), (0.76, v)], (70, 90, 170), 0.025)


@glyph("notebook", True)
def notebook(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.16, 0.06, 0.86, 0.94, c)
    p.rect(0.36, 0.3, 0.76, 0.46, WHITE)
    for v in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9):
        p.circle(0.16, v, 0.04, None)


@glyph("glass of water")
def glass_of_water(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.3, 0.06, 0.7, 0.94, (225, 238, 246))
    p.rect(0.32, 0.4, 0.68, 0.92, (90, 150, 230), outline=False)


@glyph("vase", True)
def vase(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.35), (0.5, 0.15)], (60, 140, 50), 0.04)
    p.circle(0.5, 0.12, 0.09, (240, 80, 120))
    p.poly([(0.38, 0.32), (0.62, 0.32), (0.58, 0.42), (0.76, 0.66), (0.64, 0.95), (0.36, 0.95), (0.24, 0.66), (0.42, 0.42)], c)


@glyph("bottle", True)
def bottle(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.42, 0.04, 0.58, 0.14, (60, 60, 60))
    p.rect(0.42, 0.12, 0.58, 0.36, c)
    p.rect(0.28, 0.32, 0.72, 0.95, c, radius=0.08)
    p.rect(0.32, 0.52, 0.68, 0.72, WHITE, outline=False)


@glyph("waving hand")
def waving_hand(p: Pen, c: RGB, rng: random.Random) -> None:
    hand(p, SKIN, [(0.32, 0.14), (0.45, 0.04), (0.58, 0.06), (0.7, 0.18)])


@glyph("mitten", True)
def mitten(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.3, 0.7), (0.12, 0.42)], c, 0.14)
    p.rect(0.24, 0.1, 0.78, 0.9, c, radius=0.25)
    p.rect(0.22, 0.82, 0.8, 0.96, WHITE)


@glyph("glove", True)
def glove(p: Pen, c: RGB, rng: random.Random) -> None:
    hand(p, c, [(0.32, 0.14), (0.45, 0.04), (0.58, 0.06), (0.7, 0.18)])


@glyph("party hat", True)
def party_hat(p: Pen, c: RGB, rng: random.Random) -> None:
    cone(p, c)
    p.line([(0.36, 0.5), (0.6, 0.3)], WHITE, 0.05)
    p.line([(0.28, 0.74), (0.7, 0.6)], WHITE, 0.05)
    p.circle(0.5, 0.06, 0.08, (250, 220, 60))


@glyph("traffic cone")
def traffic_cone(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.1, 0.86, 0.9, 0.96, (40, 40, 40))
    cone(p, (245, 120, 20))
    for v in (0.4, 0.64):
        p.line([(0.5 - 0.3 * v, v), (0.5 + 0.3 * v, v)], WHITE, 0.07)


@glyph("ice cream cone", True)
def ice_cream(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly([(0.28, 0.45), (0.72, 0.45), (0.5, 0.98)], (220, 170, 100))
    p.circle(0.5, 0.36, 0.22, c)


# ---------------------------------------------------------------- props (small context objects)

@glyph("ball", True)
def ball(p: Pen, c: RGB, rng: random.Random) -> None:
    p.circle(0.5, 0.55, 0.38, c)
    p.arc(0.2, 0.25, 0.8, 0.85, 200, 340, shade(c, 0.5), 0.04)


@glyph("tree")
def tree(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.42, 0.55, 0.58, 0.98, (120, 80, 40))
    p.circle(0.5, 0.38, 0.34, (45, 140, 55))


@glyph("star", True)
def star(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly(star_points(0.5, 0.52, 0.46, 0.2, 5), c)


@glyph("car", True)
def car(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.24, 0.3, 0.74, 0.55, shade(c, 1.3))
    p.rect(0.04, 0.5, 0.96, 0.78, c, radius=0.06)
    p.circle(0.26, 0.8, 0.11, (25, 25, 25))
    p.circle(0.74, 0.8, 0.11, (25, 25, 25))


@glyph("cloud")
def cloud(p: Pen, c: RGB, rng: random.Random) -> None:
    for u, v, r in ((0.3, 0.58, 0.2), (0.5, 0.45, 0.25), (0.72, 0.58, 0.2)):
        p.circle(u, v, r, WHITE)
    p.rect(0.2, 0.55, 0.82, 0.78, WHITE, outline=False)


@glyph("chair", True)
def chair(p: Pen, c: RGB, rng: random.Random) -> None:
    for u in (0.25, 0.72):
        p.line([(u, 0.55), (u, 0.98)], shade(c, 0.6), 0.07)
    p.rect(0.18, 0.05, 0.34, 0.6, c)
    p.rect(0.18, 0.5, 0.82, 0.62, c)


@glyph("flower", True)
def flower(p: Pen, c: RGB, rng: random.Random) -> None:
    p.line([(0.5, 0.45), (0.5, 0.98)], (60, 140, 50), 0.07)
    for k in range(6):
        a = 2 * math.pi * k / 6
        p.circle(0.5 + 0.18 * math.cos(a), 0.35 + 0.18 * math.sin(a), 0.13, c)
    p.circle(0.5, 0.35, 0.1, (250, 210, 50))


@glyph("bird", True)
def bird(p: Pen, c: RGB, rng: random.Random) -> None:
    p.poly([(0.78, 0.42), (0.98, 0.5), (0.78, 0.56)], (245, 150, 30))
    p.ellipse(0.1, 0.35, 0.82, 0.8, c)
    p.ellipse(0.25, 0.45, 0.55, 0.65, shade(c, 0.6))
    p.circle(0.68, 0.48, 0.035, (10, 10, 10), outline=False)


@glyph("house", True)
def house(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.14, 0.45, 0.86, 0.96, c)
    p.poly([(0.05, 0.48), (0.5, 0.08), (0.95, 0.48)], (170, 60, 45))
    p.rect(0.42, 0.66, 0.58, 0.96, (90, 60, 30))


@glyph("box", True)
def box_(p: Pen, c: RGB, rng: random.Random) -> None:
    p.rect(0.1, 0.25, 0.9, 0.92, c)
    p.line([(0.5, 0.25), (0.5, 0.92)], shade(c, 0.6), 0.06)


@glyph("cup", True)
def cup(p: Pen, c: RGB, rng: random.Random) -> None:
    p.arc(0.56, 0.38, 0.92, 0.74, 270, 90, c, 0.07)
    p.rect(0.14, 0.3, 0.7, 0.9, c, radius=0.06)
