"""Images that are not digits, drawn as users' files, to measure whether a model says it is unsure.

Each image is drawn dark on white on a page, saved as PNG and prepared by `lenet5 predict`'s own
path (`lenet5.preprocess.prepare_file`), exactly as a user's upload would be:

    letters    the 52 letters A-Z, a-z in Pillow's own font (the same on every machine), 28-150 px,
               regular to bold, turned up to 15 degrees; several are drawn like digits (O, l, S, Z, b, g, q)
    shapes     outlines and filled forms that are not digits: rectangles, triangles, stars, crosses,
               hashes, arrows, hearts, zigzags, spirals (no circles or ellipses, which are zeros)
    scribbles  one to three random smooth strokes
    noise      uniform noise, blurred noise (blobs) and scattered dots

An image the preparation refuses (no ink found) is kept out of the set: it never reaches the model.

`outlier_pool` makes the non-digits a run trains on with `--outliers` (outlier exposure): letters,
shapes and noise (`POOL_KINDS`) from a generator seed no measurement uses, without the letters that
are written like digits (`DIGIT_LIKE`), made once and cached like the stress sets. Scribbles stay
out of it: a smooth stroke is often a fair 1, 2 or 7, and they measure how the lesson carries to a
kind of non-digit never trained on. Seeds in use: 0 was looked at while the
"unsure" rule was designed, 1 is what `evaluate --stress` reports, 2 is the validation set that
chose the recipe (docs/scripts/robust_search.py), `POOL_SEED` is the training pool.
"""

from __future__ import annotations

import io
import math
import os
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lenet5.preprocess import ImageError, prepare_file

KINDS = ("letters", "shapes", "scribbles", "noise")
LETTERS = string.ascii_uppercase + string.ascii_lowercase
SHAPES = ("rectangle", "filled rectangle", "triangle", "filled triangle", "star", "cross", "hash", "arrow",
          "heart", "zigzag", "spiral")
PAGE = 160
# Letters a hand writes like a digit (O and 0, l and 1, S and 5, Z and 2, b and 6, g and 9, B and 8...):
# never trained on as non-digits, since pushing them away from every digit would push the digits too.
DIGIT_LIKE = "OoQDIlijJSsZzbgqBGT"
POOL_KINDS = ("letters", "shapes", "noise")
POOL_SEED = 10
POOL_VERSION = 2  # part of the cache file's name: bump it when a definition changes


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def letter(rng: np.random.Generator, char: str) -> Image.Image:
    size = int(rng.integers(28, 151))
    font = ImageFont.load_default(size=size)
    page = Image.new("L", (PAGE * 2, PAGE * 2), 255)
    ImageDraw.Draw(page).text((PAGE, PAGE), char, fill=0, font=font, anchor="mm",
                              stroke_width=int(rng.integers(0, max(1, size // 12) + 1)), stroke_fill=0)
    return page.rotate(float(rng.uniform(-15, 15)), Image.Resampling.BICUBIC, fillcolor=255)


def _star(cx: float, cy: float, r: float, points: int) -> list[tuple[float, float]]:
    return [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / points),
             cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / points)) for k in range(2 * points)]


def shape(rng: np.random.Generator, name: str) -> Image.Image:
    page = Image.new("L", (PAGE, PAGE), 255)
    draw = ImageDraw.Draw(page)
    w = int(rng.integers(3, 10))
    cx, cy = rng.uniform(60, 100, 2)
    r = rng.uniform(25, 55)
    if name in ("rectangle", "filled rectangle"):
        box = [cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0)]
        draw.rectangle(box, outline=0, width=w, fill=0 if name.startswith("filled") else None)
    elif name in ("triangle", "filled triangle"):
        corners = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in rng.uniform(0, 2 * math.pi) + np.arange(3) * 2.09]
        if name.startswith("filled"):
            draw.polygon(corners, fill=0)
        else:
            draw.line(corners + corners[:1], fill=0, width=w, joint="curve")
    elif name == "star":
        draw.polygon(_star(cx, cy, r, int(rng.integers(5, 8))), fill=0 if rng.random() < 0.5 else None,
                     outline=0, width=w)
    elif name == "cross":
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=0, width=w)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=0, width=w)
    elif name == "hash":
        for d in (-r / 3, r / 3):
            draw.line([(cx + d, cy - r), (cx + d, cy + r)], fill=0, width=w)
            draw.line([(cx - r, cy + d), (cx + r, cy + d)], fill=0, width=w)
    elif name == "arrow":
        draw.line([(cx - r, cy), (cx + r, cy)], fill=0, width=w)
        draw.line([(cx + r * 0.5, cy - r * 0.5), (cx + r, cy), (cx + r * 0.5, cy + r * 0.5)], fill=0, width=w)
    elif name == "heart":
        t = np.linspace(0, 2 * math.pi, 80)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        draw.polygon(list(zip(cx + x * r / 17, cy - y * r / 17)), fill=0 if rng.random() < 0.5 else None,
                     outline=0, width=w)
    elif name == "zigzag":
        xs = np.linspace(cx - r, cx + r, int(rng.integers(4, 8)))
        draw.line([(x, cy + (r / 2 if k % 2 else -r / 2)) for k, x in enumerate(xs)], fill=0, width=w)
    elif name == "spiral":
        t = np.linspace(0, rng.uniform(3, 5) * math.pi, 120)
        draw.line(list(zip(cx + r * t / t[-1] * np.cos(t), cy + r * t / t[-1] * np.sin(t))), fill=0, width=w)
    return page.rotate(float(rng.uniform(-30, 30)), Image.Resampling.BICUBIC, fillcolor=255)


def scribble(rng: np.random.Generator) -> Image.Image:
    page = Image.new("L", (PAGE, PAGE), 255)
    draw = ImageDraw.Draw(page)
    for _ in range(int(rng.integers(1, 4))):
        points = rng.uniform(20, PAGE - 20, (int(rng.integers(4, 9)), 2))
        # a smooth curve near random points: the polyline through them, sampled densely and averaged
        # over a sliding window
        along = np.linspace(0, len(points) - 1, 300)
        path = np.stack([np.interp(along, np.arange(len(points)), points[:, i]) for i in range(2)], 1)
        window = np.ones(31) / 31
        curve = np.stack([np.convolve(np.pad(path[:, i], 15, mode="edge"), window, "valid") for i in range(2)], 1)
        draw.line([tuple(p) for p in curve], fill=0, width=int(rng.integers(3, 10)), joint="curve")
    return page.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))


def noise(rng: np.random.Generator) -> Image.Image:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        pixels = rng.uniform(0, 255, (PAGE, PAGE))
    elif kind == 1:
        blobs = Image.fromarray(rng.uniform(0, 255, (PAGE, PAGE)).astype(np.uint8))
        blobs = np.asarray(blobs.filter(ImageFilter.GaussianBlur(float(rng.uniform(3, 8)))), dtype=np.float32)
        pixels = np.clip((blobs - blobs.mean()) * 6 + 200, 0, 255)
    else:
        pixels = np.full((PAGE, PAGE), 255.0)
        dots = rng.integers(0, PAGE, (int(rng.integers(20, 200)), 2))
        pixels[dots[:, 0], dots[:, 1]] = 0
        pixels = np.asarray(Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.MinFilter(3)), np.float32)
    return Image.fromarray(pixels.astype(np.uint8))


def make_nondigits(per_kind: int = 520, seed: int = 0, letters: str = LETTERS,
                   kinds: tuple[str, ...] = KINDS) -> dict[str, np.ndarray]:
    """The prepared 28x28 uint8 images of each of `kinds` (up to `per_kind`; those the preparation
    refuses are left out); the letters drawn in turn from `letters`. A kind's images do not depend
    on which other kinds are made."""
    out = {}
    for index, kind in enumerate(KINDS):
        if kind not in kinds:
            continue
        rng = np.random.default_rng([seed, index])
        prepared = []
        for k in range(per_kind):
            if kind == "letters":
                image = letter(rng, letters[k % len(letters)])
            elif kind == "shapes":
                image = shape(rng, SHAPES[k % len(SHAPES)])
            else:
                image = scribble(rng) if kind == "scribbles" else noise(rng)
            try:
                prepared.append(prepare_file(_png(image), kind))
            except ImageError:
                continue
        out[kind] = np.stack(prepared) if prepared else np.zeros((0, 28, 28), np.uint8)
    return out


def make_outlier_pool(per_kind: int, seed: int = POOL_SEED) -> np.ndarray:
    """(N, 28, 28) uint8 non-digits to train on: the `POOL_KINDS`, letters without `DIGIT_LIKE`."""
    kinds = make_nondigits(per_kind, seed, letters="".join(c for c in LETTERS if c not in DIGIT_LIKE),
                           kinds=POOL_KINDS)
    return np.concatenate([kinds[k] for k in POOL_KINDS])


def outlier_pool(per_kind: int = 2000, seed: int = POOL_SEED, cache_dir: str | os.PathLike | None = None,
                 on_make: Callable[[Path], None] | None = None) -> np.ndarray:
    """`make_outlier_pool`, from its cache file, or made (about a minute on one core for 2,000 of each
    kind; `on_make(path)` is called first) and cached there."""
    import platformdirs

    from lenet5.fileio import cached_arrays

    folder = Path(cache_dir) if cache_dir else Path(platformdirs.user_cache_dir("lenet5")) / "outliers"
    return cached_arrays(folder / f"outliers-v{POOL_VERSION}-{per_kind}-{seed}.npz",
                         lambda: {"images": make_outlier_pool(per_kind, seed)}, on_make,
                         valid=lambda a: "images" in a and a["images"].dtype == np.uint8
                         and a["images"].shape[1:] == (28, 28))["images"]
