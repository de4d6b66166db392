"""Visual concepts of the pretraining corpus that no benchmark task asks about.

Real CLIP's 400 million pairs cover far more than its benchmarks: each benchmark's classes are
a small slice of what the image tower learnt to tell apart, so a fine-tune for one task can
change features that the other tasks barely use (the weight disentanglement Ortiz-Jiménez et
al. 2023 find in real CLIP and trace to pretraining). The mini's base is pretrained only on the
benchmark's own twelve concept families, so every feature it has serves every task. This
module adds *other* concepts to the corpus: seeded compositions of coloured primitives, each
with a made-up name, drawn from the same strokes, shapes and backgrounds as the tasks (so they
share low-level structure, as web images share it with a benchmark) but never a task's class.

``concepts(count, seed)`` defines the concepts; ``draw_corpus`` draws captioned images of them.
Everything is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from scripts.minibench.generators import BIG, _background, _finish, _glyph, _paste, _polygon

SYLLABLES = (
    "ka", "lo", "mi", "zu", "ter", "bal", "ron", "vex", "dai", "pol",
    "sen", "gri", "mo", "tal", "quo", "fen", "lar", "bri", "sto", "nim",
    "cor", "dul", "ash", "wen", "pim", "rok", "sav", "tef", "ulm", "yor",
)  # fmt: skip
PART_KINDS = ("ellipse", "polygon", "bars", "glyph", "ring", "dots")
CAPTIONS = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image showing a {}.")
GLYPHS = "#%&*+?@$0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Part:
    """One primitive of a concept, placed relative to the concept's centre (units of BIG)."""

    kind: str
    dx: float
    dy: float
    size: float
    angle: float
    sides: int
    color: int  # index into the concept's palette
    glyph: str


@dataclass(frozen=True)
class Concept:
    name: str
    palette: tuple[tuple[int, int, int], ...]
    parts: tuple[Part, ...]


def _name(rng: np.random.Generator) -> str:
    return "".join(SYLLABLES[int(i)] for i in rng.integers(len(SYLLABLES), size=int(rng.integers(2, 4))))


def concepts(count: int, seed: int) -> tuple[Concept, ...]:
    """``count`` distinct concepts: a made-up name, a palette of two or three colours, two to four parts."""
    rng = np.random.default_rng(seed * 7919 + 17)
    names: set[str] = set()
    out = []
    while len(out) < count:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        palette = tuple(tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in range(int(rng.integers(2, 4))))
        parts = tuple(
            Part(
                kind=PART_KINDS[int(rng.integers(len(PART_KINDS)))],
                dx=float(rng.uniform(-0.22, 0.22)),
                dy=float(rng.uniform(-0.22, 0.22)),
                size=float(rng.uniform(0.12, 0.32)),
                angle=float(rng.uniform(0, math.pi)),
                sides=int(rng.integers(3, 8)),
                color=int(rng.integers(len(palette))),
                glyph=GLYPHS[int(rng.integers(len(GLYPHS)))],
            )
            for _ in range(int(rng.integers(2, 5)))
        )
        out.append(Concept(name, palette, parts))
    return tuple(out)


def _jittered(color: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, 20), 0, 255)) for c in color)


def draw_concept(rng: np.random.Generator, concept: Concept) -> Image.Image:
    """One photograph of ``concept``: its parts as laid out, moved, scaled, turned and re-lit a little."""
    image = _background(rng, "web")
    scale = rng.uniform(0.8, 1.2)
    turn = rng.uniform(-0.35, 0.35)
    cx = BIG / 2 + rng.uniform(-10, 10)
    cy = BIG / 2 + rng.uniform(-10, 10)
    palette = [_jittered(c, rng) for c in concept.palette]
    for part in concept.parts:
        x = cx + scale * BIG * (part.dx * math.cos(turn) - part.dy * math.sin(turn))
        y = cy + scale * BIG * (part.dx * math.sin(turn) + part.dy * math.cos(turn))
        r = scale * BIG * part.size
        color = palette[part.color]
        angle = part.angle + turn
        if part.kind == "glyph":
            glyph = _glyph(part.glyph, max(8, int(2 * r)), color, math.degrees(-angle))
            image = _paste(image, glyph, x - BIG / 2, y - BIG / 2)
            continue
        draw = ImageDraw.Draw(image)
        if part.kind == "ellipse":
            draw.polygon([(x + r * math.cos(a) * math.cos(angle) - 0.6 * r * math.sin(a) * math.sin(angle),
                           y + r * math.cos(a) * math.sin(angle) + 0.6 * r * math.sin(a) * math.cos(angle))
                          for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)], fill=color)  # fmt: skip
        elif part.kind == "polygon":
            draw.polygon(_polygon((x, y), r, part.sides, angle), fill=color)
        elif part.kind == "ring":
            draw.ellipse((x - r, y - r, x + r, y + r), outline=color, width=max(2, int(r / 4)))
        elif part.kind == "bars":
            for k in range(-1, 2):
                ox, oy = k * 0.6 * r * math.cos(angle + math.pi / 2), k * 0.6 * r * math.sin(angle + math.pi / 2)
                dx, dy = r * math.cos(angle), r * math.sin(angle)
                draw.line((x + ox - dx, y + oy - dy, x + ox + dx, y + oy + dy), fill=color, width=max(2, int(r / 5)))
        else:  # dots on a small grid
            for i in range(-1, 2):
                for j in range(-1, 2):
                    px = x + 0.6 * r * (i * math.cos(angle) - j * math.sin(angle))
                    py = y + 0.6 * r * (i * math.sin(angle) + j * math.cos(angle))
                    d = max(2.0, r / 6)
                    draw.ellipse((px - d, py - d, px + d, py + d), fill=color)
    return _finish(image, rng)


def draw_corpus(
    count: int, per_concept: int, seed: int, noise: float, chunk: tuple[int, int] = (0, 1)
) -> tuple[list[Image.Image], list[str]]:
    """Captioned images of the concepts ``chunk[0]``, ``chunk[0] + chunk[1]``, … (a worker's share).

    A caption names a wrong concept with probability ``noise``, as the benchmark concepts'
    captions do. Each concept has its own seeded generator, so the images do not depend on
    how the concepts are split between workers.
    """
    import io

    from scripts.minibench.build import jpeg

    defined = concepts(count, seed)
    images, captions = [], []
    first, step = chunk
    for index in range(first, count, step):
        rng = np.random.default_rng([seed, 104729, index])
        for _ in range(per_concept):
            image = draw_concept(rng, defined[index])
            images.append(Image.open(io.BytesIO(jpeg(image))).convert("RGB"))
            named = int(rng.integers(count)) if rng.random() < noise else index
            captions.append(CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(defined[named].name))
    return images, captions
