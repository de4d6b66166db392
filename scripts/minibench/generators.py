"""The twelve image-classification tasks of the mini benchmark, drawn from seeded generators.

Each task mirrors one of the real CLIP tasks: handwritten digits (MNIST, real images from
scikit-learn), house numbers on clutter (SVHN), letters (EMNIST), traffic signs (GTSRB),
textures (DTD), land-cover tiles (EuroSAT), plus colours, shapes, counts, orientations,
clock faces and symbols for the variety of the larger task sets. Images are 32 × 32 RGB,
drawn at four times that size and downsampled, so edges are smooth like photographs.

``draw(rng, label, domain)`` is deterministic given the generator state. ``domain`` is
``"task"`` for the benchmark's own images and ``"web"`` for the pretraining corpus: the web
domain draws the same concepts with a shifted style (other backgrounds, sizes, palettes),
the way CLIP's pretraining images differ from a benchmark's, which is one reason zero-shot
accuracy trails a fine-tuned model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 32
SCALE = 4
BIG = SIZE * SCALE

Draw = Callable[[np.random.Generator, int, str], Image.Image]


@dataclass(frozen=True)
class TaskSpec:
    """A mini task: names as the registry and the prompts use them, and its generator."""

    name: str
    mirrors: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    draw: Draw
    # The side at which the benchmark's own images were captured before being upscaled to
    # SIZE, as the real low-resolution datasets (MNIST 28 px, SVHN and GTSRB ~32 px, EuroSAT
    # 64 px) are upscaled to CLIP's 224 px; SIZE means captured at full resolution.
    native: int = SIZE


# ---------------------------------------------------------------- helpers


def _color(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _contrasting(rng: np.random.Generator, background: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour whose brightness differs clearly from ``background``."""
    luminance = sum(background) / 3
    for _ in range(20):
        color = _color(rng)
        if abs(sum(color) / 3 - luminance) > 70:
            return color
    return (255, 255, 255) if luminance < 128 else (0, 0, 0)


def _background(rng: np.random.Generator, domain: str) -> Image.Image:
    """Solid, gradient or noisy backgrounds; the web domain prefers bright, plain ones."""
    kind = rng.choice(["solid", "gradient", "noise"], p=[0.6, 0.3, 0.1] if domain == "web" else [0.3, 0.35, 0.35])
    base = _color(rng, 150, 256) if domain == "web" else _color(rng)
    if kind == "solid":
        return Image.new("RGB", (BIG, BIG), base)
    if kind == "gradient":
        other = np.array(_color(rng), dtype=np.float32)
        t = np.linspace(0, 1, BIG, dtype=np.float32)[:, None, None]
        array = (1 - t) * np.array(base, dtype=np.float32) + t * other
        array = np.broadcast_to(array, (BIG, BIG, 3))
        if rng.random() < 0.5:
            array = array.transpose(1, 0, 2)
        return Image.fromarray(array.astype(np.uint8))
    noise = rng.normal(0, 40, size=(BIG // 8, BIG // 8, 3)) + np.array(base)
    small = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    return small.resize((BIG, BIG), Image.BICUBIC)


def acquire(image: Image.Image, native: int) -> Image.Image:
    """The image as a low-resolution benchmark ships it: captured at ``native`` px, upscaled to SIZE.

    Capture averages over the sensor's pixels (box filter); the upscaling is CLIP's bicubic
    preprocessing resize. Only benchmark images go through it, never the web corpus, so every
    low-resolution task shares the same shift away from pretraining, as the real ones do.
    """
    if native >= SIZE:
        return image
    return image.resize((native, native), Image.BOX).resize((SIZE, SIZE), Image.BICUBIC)


def _finish(image: Image.Image, rng: np.random.Generator, noise: float = 6.0) -> Image.Image:
    small = image.resize((SIZE, SIZE), Image.LANCZOS)
    array = np.asarray(small, dtype=np.float32) + rng.normal(0, noise, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _glyph(text: str, size: int, color, rotation: float, shear: float = 0.0, stroke: int = 0) -> Image.Image:
    """An RGBA image of ``text`` centred on a transparent BIG × BIG canvas, rotated and sheared."""
    layer = Image.new("RGBA", (BIG, BIG), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = _font(size)
    box = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = (BIG - (box[2] - box[0])) / 2 - box[0]
    y = (BIG - (box[3] - box[1])) / 2 - box[1]
    draw.text((x, y), text, font=font, fill=(*color, 255), stroke_width=stroke, stroke_fill=(*color, 255))
    if shear:
        layer = layer.transform(layer.size, Image.AFFINE, (1, shear, -shear * BIG / 2, 0, 1, 0), Image.BICUBIC)
    return layer.rotate(rotation, resample=Image.BICUBIC)


def _paste(base: Image.Image, layer: Image.Image, dx: float = 0, dy: float = 0) -> Image.Image:
    canvas = base.convert("RGBA")
    shifted = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    shifted.paste(layer, (int(dx), int(dy)), layer)
    return Image.alpha_composite(canvas, shifted).convert("RGB")


def _polygon(center, radius, sides, rotation):
    cx, cy = center
    return [
        (
            cx + radius * math.cos(rotation + 2 * math.pi * i / sides),
            cy + radius * math.sin(rotation + 2 * math.pi * i / sides),
        )
        for i in range(sides)
    ]


# ---------------------------------------------------------------- tasks


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def digit_indices(label: int) -> np.ndarray:
    """Indices of scikit-learn's handwritten digits with this label (the real images)."""
    return np.flatnonzero(_sklearn_digits()[1] == label)


def digit_split(test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (test, train) index pools over scikit-learn's 1797 digits, from a seeded shuffle."""
    order = np.random.default_rng(seed).permutation(len(_sklearn_digits()[1]))
    return np.sort(order[:test_size]), np.sort(order[test_size:])


def draw_handwritten_digit(
    rng: np.random.Generator, label: int, domain: str, pool: np.ndarray | None = None
) -> Image.Image:
    """A real 8 × 8 handwritten digit (scikit-learn), upscaled, placed and lit like MNIST.

    ``pool`` restricts the choice to some indices (a split), so test digits stay unseen.
    """
    images, targets = _sklearn_digits()
    choices = digit_indices(label) if pool is None else pool[targets[pool] == label]
    pixels = images[choices[rng.integers(len(choices))]]
    glyph = Image.fromarray((pixels * 255).astype(np.uint8)).resize((BIG // 2, BIG // 2), Image.BICUBIC)
    glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC)
    scale = rng.uniform(0.7, 1.1) if domain == "task" else rng.uniform(1.0, 1.4)
    side = int(BIG * 0.75 * scale)
    glyph = glyph.resize((side, side), Image.BICUBIC)
    if domain == "task":
        background, ink = (0, 0, 0), (255, 255, 255)
    else:
        background = _color(rng, 170, 256)
        ink = _contrasting(rng, background)
    canvas = Image.new("RGB", (BIG, BIG), background)
    mask = glyph.filter(ImageFilter.GaussianBlur(1))
    offset = ((BIG - side) // 2 + int(rng.integers(-8, 9)), (BIG - side) // 2 + int(rng.integers(-8, 9)))
    canvas.paste(Image.new("RGB", (side, side), ink), offset, mask)
    return _finish(canvas, rng, noise=4.0)


def draw_house_number(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """A centred digit on a cluttered plate, with neighbouring digits cut off at the sides."""
    background = _background(rng, domain)
    ink = _contrasting(rng, tuple(int(c) for c in np.asarray(background).mean(axis=(0, 1))))
    size = int(rng.integers(60, 90)) if domain == "task" else int(rng.integers(80, 110))
    rotation = float(rng.uniform(-12, 12))
    image = _paste(background, _glyph(str(label), size, ink, rotation, stroke=int(rng.integers(0, 3))))
    if domain == "task":
        for side in (-1, 1):
            if rng.random() < 0.8:
                other = str(int(rng.integers(0, 10)))
                image = _paste(image, _glyph(other, size, ink, rotation), dx=side * size * 0.75)
    return _finish(image, rng)


LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def draw_letter(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """A letter written with varying size, slant and weight, like EMNIST's handwriting."""
    letter = LETTERS[label]
    if domain == "task":
        background, ink = (0, 0, 0), (255, 255, 255)
        text = letter
    else:
        background = _color(rng, 150, 256)
        ink = _contrasting(rng, background)
        text = letter
    size = int(rng.integers(70, 105))
    layer = _glyph(text, size, ink, float(rng.uniform(-15, 15)), float(rng.uniform(-0.2, 0.2)), int(rng.integers(0, 5)))
    image = _paste(Image.new("RGB", (BIG, BIG), background), layer, rng.integers(-8, 9), rng.integers(-8, 9))
    return _finish(image, rng, noise=5.0)


SIGNS = (
    "stop",
    "yield",
    "no entry",
    "speed limit",
    "keep right",
    "pedestrian crossing",
    "general caution",
    "no parking",
    "roundabout",
    "priority road",
)


def draw_traffic_sign(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """Simplified road signs: shape, colours and a symbol, photographed at varying size and tilt."""
    image = _background(rng, domain)
    draw = ImageDraw.Draw(image)
    c = (BIG / 2 + rng.uniform(-10, 10), BIG / 2 + rng.uniform(-10, 10))
    r = rng.uniform(35, 55) if domain == "task" else rng.uniform(50, 62)
    red, white, blue, yellow, black = (200, 20, 30), (245, 245, 245), (20, 60, 200), (250, 200, 0), (15, 15, 15)
    tilt = math.radians(rng.uniform(-8, 8))
    name = SIGNS[label]
    if name == "stop":
        draw.polygon(_polygon(c, r, 8, math.pi / 8 + tilt), fill=red)
        draw.polygon(_polygon(c, r * 0.8, 8, math.pi / 8 + tilt), outline=white, width=3)
        draw.rectangle((c[0] - r * 0.55, c[1] - r * 0.12, c[0] + r * 0.55, c[1] + r * 0.12), fill=white)
    elif name == "yield":
        draw.polygon(_polygon(c, r, 3, math.pi / 2 + tilt), fill=red)
        draw.polygon(_polygon(c, r * 0.55, 3, math.pi / 2 + tilt), fill=white)
    elif name == "no entry":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=red)
        draw.rectangle((c[0] - r * 0.7, c[1] - r * 0.18, c[0] + r * 0.7, c[1] + r * 0.18), fill=white)
    elif name == "speed limit":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=red)
        draw.ellipse((c[0] - r * 0.78, c[1] - r * 0.78, c[0] + r * 0.78, c[1] + r * 0.78), fill=white)
        number = str(int(rng.choice([20, 30, 50, 60, 70, 80])))
        image = _paste(image, _glyph(number, int(r * 0.8), black, math.degrees(-tilt)), c[0] - BIG / 2, c[1] - BIG / 2)
        draw = ImageDraw.Draw(image)
    elif name == "keep right":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=blue)
        draw.line((c[0] - r * 0.4, c[1] - r * 0.4, c[0] + r * 0.35, c[1] + r * 0.35), fill=white, width=int(r * 0.22))
        draw.polygon(
            [
                (c[0] + r * 0.55, c[1] + r * 0.55),
                (c[0] + r * 0.55, c[1] - r * 0.05),
                (c[0] - r * 0.05, c[1] + r * 0.55),
            ],
            fill=white,
        )
    elif name == "pedestrian crossing":
        draw.rectangle((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=blue)
        draw.polygon(_polygon(c, r * 0.75, 3, -math.pi / 2 + tilt), fill=white)
        draw.ellipse((c[0] - r * 0.12, c[1] - r * 0.2, c[0] + r * 0.12, c[1] + r * 0.04), fill=black)
    elif name == "general caution":
        draw.polygon(_polygon(c, r, 3, -math.pi / 2 + tilt), fill=red)
        draw.polygon(_polygon(c, r * 0.62, 3, -math.pi / 2 + tilt), fill=white)
        draw.rectangle((c[0] - r * 0.06, c[1] - r * 0.15, c[0] + r * 0.06, c[1] + r * 0.2), fill=black)
    elif name == "no parking":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=red)
        draw.ellipse((c[0] - r * 0.75, c[1] - r * 0.75, c[0] + r * 0.75, c[1] + r * 0.75), fill=blue)
        draw.line((c[0] - r * 0.55, c[1] - r * 0.55, c[0] + r * 0.55, c[1] + r * 0.55), fill=red, width=int(r * 0.2))
    elif name == "roundabout":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=blue)
        draw.ellipse(
            (c[0] - r * 0.6, c[1] - r * 0.6, c[0] + r * 0.6, c[1] + r * 0.6), outline=white, width=int(r * 0.18)
        )
    else:  # priority road
        draw.polygon(_polygon(c, r, 4, tilt), fill=white)
        draw.polygon(_polygon(c, r * 0.7, 4, tilt), fill=yellow)
    return _finish(image, rng)


TEXTURES = (
    "banded",
    "lined",
    "chequered",
    "dotted",
    "gridded",
    "zigzagged",
    "wavy",
    "marbled",
    "crosshatched",
    "porous",
)


def draw_texture(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """Describable textures: periodic patterns at random scale, angle and colours, or noise fields."""
    name = TEXTURES[label]
    a = np.array(_color(rng), dtype=np.float32)
    b = np.array(_contrasting(rng, tuple(int(x) for x in a)), dtype=np.float32)
    if domain == "web":
        b = np.array((255, 255, 255) if a.mean() < 128 else (0, 0, 0), dtype=np.float32)
    y, x = np.mgrid[0:BIG, 0:BIG].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(28, 44) if domain == "task" else rng.uniform(36, 52)
    if name == "banded":
        mask = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif name == "lined":
        mask = (np.abs(np.sin(math.pi * u / (period * 0.6))) < 0.3).astype(np.float32)
    elif name == "chequered":
        mask = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif name == "dotted":
        mask = ((np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period)) > 0.6).astype(np.float32)
    elif name == "gridded":
        mask = ((np.abs(np.sin(math.pi * u / period)) < 0.2) | (np.abs(np.sin(math.pi * v / period)) < 0.2)).astype(
            np.float32
        )
    elif name == "zigzagged":
        tri = np.abs((v / period) % 2 - 1) * period * 0.8
        mask = (np.sin(2 * math.pi * (u + tri) / period) > 0).astype(np.float32)
    elif name == "wavy":
        mask = (np.sin(2 * math.pi * (u + 6 * np.sin(2 * math.pi * v / (period * 2))) / period) > 0).astype(np.float32)
    elif name == "marbled":
        noise = np.asarray(
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).resize((BIG, BIG), Image.BICUBIC), np.float32
        )
        mask = (np.sin(u / period * 3 + noise / 20) + 1) / 2
    elif name == "crosshatched":
        w = u + v
        z = u - v
        mask = ((np.abs(np.sin(math.pi * w / period)) < 0.2) | (np.abs(np.sin(math.pi * z / period)) < 0.2)).astype(
            np.float32
        )
    else:  # porous
        holes = rng.random((BIG // 10, BIG // 10)) < 0.35
        mask = (
            np.asarray(Image.fromarray((holes * 255).astype(np.uint8)).resize((BIG, BIG), Image.NEAREST), np.float32)
            / 255
        )
        mask = (
            np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)), np.float32)
            / 255
        )
        mask = (mask > 0.4).astype(np.float32)
    image = a * (1 - mask[..., None]) + b * mask[..., None]
    return _finish(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), rng, noise=8.0)


LAND_COVER = (
    "annual crop land",
    "forest",
    "herbaceous vegetation land",
    "highway or road",
    "industrial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings",
    "river",
    "sea or lake",
)


def draw_land_cover(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """Satellite-like tiles: vegetation, water and built-up areas as colour fields and layouts."""
    name = LAND_COVER[label]
    jitter = rng.normal(0, 12, size=3)

    def field(color, scale=16, strength=25.0):
        noise = rng.normal(0, strength, size=(BIG // scale, BIG // scale, 3))
        small = np.clip(np.array(color) + jitter + noise, 0, 255).astype(np.uint8)
        return Image.fromarray(small).resize((BIG, BIG), Image.BICUBIC)

    green, dark, light, brown, gray, water = (
        (90, 130, 60),
        (30, 70, 35),
        (150, 170, 90),
        (150, 120, 80),
        (120, 120, 120),
        (40, 80, 140),
    )
    if domain == "web":  # brighter, greener imagery
        green, dark, light, water = (110, 170, 70), (40, 110, 50), (180, 200, 110), (60, 120, 200)
    if name == "forest":
        return _finish(field(dark, 4, 30), rng)
    if name == "pasture land":
        return _finish(field(light, 32, 10), rng)
    if name == "herbaceous vegetation land":
        return _finish(field(green, 8, 35), rng)
    if name == "sea or lake":
        return _finish(field(water, 32, 8), rng)
    image = field(green, 16, 20)
    draw = ImageDraw.Draw(image)
    if name == "annual crop land":
        width = int(rng.integers(14, 26))
        colors = [brown, light, (190, 170, 90), green]
        for i in range(-BIG, 2 * BIG, width):
            draw.polygon(
                [(i, 0), (i + width, 0), (i + width + BIG * 0.3, BIG), (i + BIG * 0.3, BIG)],
                fill=colors[int(rng.integers(4))],
            )
    elif name == "permanent crop land":
        step = int(rng.integers(10, 16))
        for yy in range(0, BIG, step):
            for xx in range(int(rng.integers(0, step)), BIG, step):
                draw.ellipse((xx - 3, yy - 3, xx + 3, yy + 3), fill=dark)
    elif name == "highway or road":
        x0, x1 = rng.uniform(0, BIG), rng.uniform(0, BIG)
        draw.line((x0, -5, x1, BIG + 5), fill=gray, width=int(rng.integers(10, 18)))
        draw.line((x0, -5, x1, BIG + 5), fill=(230, 230, 230), width=2)
    elif name == "river":
        points = [(rng.uniform(0, BIG), -5)]
        for yy in range(16, BIG + 16, 16):
            points.append((points[-1][0] + rng.uniform(-18, 18), yy))
        draw.line(points, fill=water, width=int(rng.integers(12, 22)), joint="curve")
    elif name == "residential buildings":
        for _ in range(int(rng.integers(18, 30))):
            xx, yy = rng.uniform(0, BIG), rng.uniform(0, BIG)
            s = rng.uniform(5, 10)
            draw.rectangle((xx, yy, xx + s, yy + s), fill=(int(rng.integers(150, 220)), 90, 70))
    else:  # industrial buildings
        for _ in range(int(rng.integers(3, 6))):
            xx, yy = rng.uniform(-10, BIG), rng.uniform(-10, BIG)
            draw.rectangle(
                (xx, yy, xx + rng.uniform(25, 50), yy + rng.uniform(20, 40)), fill=(int(rng.integers(170, 230)),) * 3
            )
    return _finish(image, rng)


COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 30),
    "green": (40, 170, 50),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 210),
    "purple": (130, 40, 180),
    "pink": (250, 140, 190),
    "brown": (120, 70, 30),
    "gray": (128, 128, 128),
}


def draw_color(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """A blob of a named colour (with some hue jitter) on a neutral or dim background."""
    color = np.array(list(COLORS.values())[label], dtype=np.float32) + rng.normal(0, 12, size=3)
    if domain == "task":
        background = Image.new("RGB", (BIG, BIG), _color(rng, 0, 90) if rng.random() < 0.5 else _color(rng, 200, 256))
    else:
        background = Image.new("RGB", (BIG, BIG), (255, 255, 255))
    draw = ImageDraw.Draw(background)
    r = rng.uniform(25, 55)
    c = (BIG / 2 + rng.uniform(-15, 15), BIG / 2 + rng.uniform(-15, 15))
    fill = tuple(int(v) for v in np.clip(color, 0, 255))
    if rng.random() < 0.5:
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill)
    else:
        draw.polygon(_polygon(c, r, int(rng.integers(3, 7)), rng.uniform(0, math.pi)), fill=fill)
    return _finish(background, rng)


SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "crescent")


def _shape(draw: ImageDraw.ImageDraw, name: str, c, r: float, rotation: float, fill, background) -> None:
    if name == "circle":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill)
    elif name == "square":
        draw.polygon(_polygon(c, r * 1.2, 4, math.pi / 4 + rotation), fill=fill)
    elif name == "triangle":
        draw.polygon(_polygon(c, r * 1.2, 3, rotation), fill=fill)
    elif name == "hexagon":
        draw.polygon(_polygon(c, r * 1.1, 6, rotation), fill=fill)
    elif name == "diamond":
        points = _polygon(c, r * 1.2, 4, rotation)
        points = [(c[0] + (x - c[0]) * 0.6, y) if i % 2 == 0 else (x, y) for i, (x, y) in enumerate(points)]
        draw.polygon(points, fill=fill)
    elif name == "star":
        outer = _polygon(c, r * 1.25, 5, rotation - math.pi / 2)
        inner = _polygon(c, r * 0.5, 5, rotation - math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=fill)
    elif name == "cross":
        w = r * 0.35
        draw.rectangle((c[0] - r, c[1] - w, c[0] + r, c[1] + w), fill=fill)
        draw.rectangle((c[0] - w, c[1] - r, c[0] + w, c[1] + r), fill=fill)
    elif name == "ring":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill)
        draw.ellipse((c[0] - r * 0.55, c[1] - r * 0.55, c[0] + r * 0.55, c[1] + r * 0.55), fill=background)
    elif name == "crescent":
        draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=fill)
        shift = r * 0.5
        draw.ellipse(
            (c[0] - r + shift, c[1] - r - shift * 0.3, c[0] + r + shift, c[1] + r - shift * 0.3), fill=background
        )
    else:  # arrow
        cos, sin = math.cos(rotation), math.sin(rotation)

        def rot(px, py):
            return (c[0] + px * cos - py * sin, c[1] + px * sin + py * cos)

        shaft = [(-r, -r * 0.2), (r * 0.2, -r * 0.2), (r * 0.2, r * 0.2), (-r, r * 0.2)]
        head = [(r * 0.2, -r * 0.6), (r, 0), (r * 0.2, r * 0.6)]
        draw.polygon([rot(*p) for p in shaft], fill=fill)
        draw.polygon([rot(*p) for p in head], fill=fill)


def draw_shape(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """A geometric shape of random colour, size and rotation."""
    background_color = _color(rng) if domain == "task" else (255, 255, 255)
    image = Image.new("RGB", (BIG, BIG), background_color)
    fill = _contrasting(rng, background_color)
    c = (BIG / 2 + rng.uniform(-12, 12), BIG / 2 + rng.uniform(-12, 12))
    _shape(
        ImageDraw.Draw(image),
        SHAPES[label],
        c,
        rng.uniform(25, 45),
        rng.uniform(0, 2 * math.pi),
        fill,
        background_color,
    )
    return _finish(image, rng)


COUNTS = ("one", "two", "three", "four", "five")


def draw_count(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """``label + 1`` objects scattered without overlap (CLEVR-count-like).

    The benchmark's own images are rendered like CLEVR's: a grey floor lit from above (a soft
    vertical gradient) with objects of varied colours, so that objects, not the clutter of
    the background, are what varies; the web domain keeps the shared varied backgrounds.
    """
    if domain == "task":
        top, bottom = float(rng.uniform(150, 190)), float(rng.uniform(90, 130))
        rows = np.linspace(top, bottom, BIG, dtype=np.float32)[:, None, None]
        image = Image.fromarray(np.broadcast_to(rows, (BIG, BIG, 3)).astype(np.uint8))
    else:
        image = _background(rng, domain)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float]] = []
    r, spacing = (16, 2.4) if domain == "task" else (16, 2.2)
    attempts = 0
    while len(placed) < label + 1:
        attempts += 1
        if attempts > 500:  # the objects placed so far leave no room for the rest: start over
            placed, attempts = [], 0
        p = (rng.uniform(r + 2, BIG - r - 2), rng.uniform(r + 2, BIG - r - 2))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > (spacing * r) ** 2 for q in placed):
            placed.append(p)
    background = tuple(int(c) for c in np.asarray(image).mean(axis=(0, 1)))
    for p in placed:
        fill = _contrasting(rng, background)
        if rng.random() < 0.5:
            draw.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=fill)
        else:
            draw.rectangle((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=fill)
    return _finish(image, rng)


ORIENTATIONS = (
    "horizontal",
    "slightly rising",
    "diagonal rising",
    "steeply rising",
    "vertical",
    "steeply falling",
    "diagonal falling",
    "slightly falling",
)


def draw_orientation(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """A bar at one of eight orientations (22.5° apart), with a few degrees of jitter."""
    image = _background(rng, domain)
    background = tuple(int(c) for c in np.asarray(image).mean(axis=(0, 1)))
    angle = math.radians(label * 22.5 + rng.uniform(-5, 5))
    length = rng.uniform(40, 60)
    c = (BIG / 2 + rng.uniform(-10, 10), BIG / 2 + rng.uniform(-10, 10))
    dx, dy = length * math.cos(angle), -length * math.sin(angle)
    width = int(rng.integers(8, 14)) if domain == "task" else 16
    ImageDraw.Draw(image).line(
        (c[0] - dx, c[1] - dy, c[0] + dx, c[1] + dy), fill=_contrasting(rng, background), width=width
    )
    return _finish(image, rng)


HOURS = tuple(f"{h} o'clock" for h in range(1, 13))


def draw_clock(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """An analog clock face whose short hand points to hour ``label + 1``."""
    face = _color(rng, 180, 256) if domain == "task" else (255, 255, 255)
    image = Image.new("RGB", (BIG, BIG), _color(rng, 0, 120))
    draw = ImageDraw.Draw(image)
    c, r = (BIG / 2, BIG / 2), rng.uniform(48, 60)
    draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=face, outline=(20, 20, 20), width=3)
    for tick in range(12):
        a = 2 * math.pi * tick / 12
        draw.line(
            (
                c[0] + r * 0.8 * math.sin(a),
                c[1] - r * 0.8 * math.cos(a),
                c[0] + r * 0.95 * math.sin(a),
                c[1] - r * 0.95 * math.cos(a),
            ),
            fill=(20, 20, 20),
            width=3,
        )
    hour = (label + 1) % 12
    minute = rng.uniform(0, 60) if domain == "task" else 0.0
    a = 2 * math.pi * (hour + minute / 60) / 12
    draw.line((c[0], c[1], c[0] + r * 0.5 * math.sin(a), c[1] - r * 0.5 * math.cos(a)), fill=(10, 10, 10), width=8)
    if domain == "task":
        b = 2 * math.pi * minute / 60
        draw.line(
            (c[0], c[1], c[0] + r * 0.85 * math.sin(b), c[1] - r * 0.85 * math.cos(b)), fill=(60, 60, 60), width=3
        )
    return _finish(image.rotate(float(rng.uniform(-10, 10)), resample=Image.BICUBIC), rng)


SYMBOLS = {
    "plus": "+",
    "minus": "-",
    "asterisk": "*",
    "slash": "/",
    "equals": "=",
    "percent": "%",
    "hash": "#",
    "at": "@",
    "ampersand": "&",
    "dollar": "$",
}


def draw_symbol(rng: np.random.Generator, label: int, domain: str) -> Image.Image:
    """A rendered symbol, like text rendered on an image (rendered-SST2-like)."""
    glyph = list(SYMBOLS.values())[label]
    background = _color(rng) if domain == "task" else (255, 255, 255)
    ink = _contrasting(rng, background) if domain == "task" else (0, 0, 0)
    layer = _glyph(glyph, int(rng.integers(60, 100)), ink, float(rng.uniform(-25, 25)), stroke=int(rng.integers(0, 4)))
    image = _paste(Image.new("RGB", (BIG, BIG), background), layer, rng.integers(-8, 9), rng.integers(-8, 9))
    return _finish(image, rng)


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        "mini-digits",
        "mnist",
        tuple(str(i) for i in range(10)),
        ('a photo of the number: "{}".', "a handwritten digit {}."),
        draw_handwritten_digit,
        native=16,
    ),
    TaskSpec(
        "mini-house-numbers",
        "svhn",
        tuple(str(i) for i in range(10)),
        ('a photo of the number: "{}".', "a street number {} on a wall."),
        draw_house_number,
        native=16,
    ),
    TaskSpec(
        "mini-letters",
        "emnist_letters",
        LETTERS,
        ('a photo of the letter: "{}".', 'the letter "{}" written by hand.'),
        draw_letter,
        native=16,
    ),
    TaskSpec(
        "mini-traffic-signs",
        "gtsrb",
        SIGNS,
        (
            'a zoomed in photo of a "{}" traffic sign.',
            'a centered photo of a "{}" traffic sign.',
            'a close up photo of a "{}" traffic sign.',
        ),
        draw_traffic_sign,
        native=16,
    ),
    TaskSpec(
        "mini-textures",
        "dtd",
        TEXTURES,
        ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing."),
        draw_texture,
    ),
    TaskSpec(
        "mini-land-cover",
        "eurosat",
        LAND_COVER,
        (
            "a centered satellite photo of {}.",
            "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.",
        ),
        draw_land_cover,
        native=16,
    ),
    TaskSpec("mini-shapes", "(shapes)", SHAPES, ("a drawing of a {}.", "a photo of a {} shape."), draw_shape),
    TaskSpec(
        "mini-colors", "(colours)", tuple(COLORS), ("a photo of a {} object.", "something colored {}."), draw_color
    ),
    TaskSpec(
        "mini-counts",
        "clevr_count",
        COUNTS,
        ("a photo of {} objects.", "there are {} things in the picture."),
        draw_count,
    ),
    TaskSpec(
        "mini-orientations", "(orientations)", ORIENTATIONS, ("a photo of a {} bar.", "a {} line."), draw_orientation
    ),
    TaskSpec("mini-clocks", "(clocks)", HOURS, ("a photo of a clock showing {}.", "the time is {}."), draw_clock),
    TaskSpec(
        "mini-symbols",
        "rendered-sst2",
        tuple(SYMBOLS),
        ('a photo of the "{}" symbol.', "a rendering of a {} sign."),
        draw_symbol,
    ),
)
