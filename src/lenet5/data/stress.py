"""Stress sets: MNIST's test digits changed the ways real digits differ from MNIST's, reproducibly.

Made from the test digits only (never training digits), each keeping its digit's label. Four
are MNIST-format images changed directly, as a model input:

    thick         strokes one pixel wider on each side (3x3 grey dilation)
    thin          strokes half a pixel narrower on each side (3x3 grey erosion at twice the
                  resolution, then back), ink rescaled to full strength as a pen's would be
    rotated       turned by 20 degrees, clockwise or anticlockwise (random, seeded), about the centre
    lowres-8      averaged down to 8x8 pixels and enlarged back to 28x28 (bilinear)
    lowres-12     the same from 12x12

The others are drawn as a user's image file and go through `lenet5 predict`'s own path
(`lenet5.preprocess.prepare_file`: decode, find the background, invert if light, crop to the
ink, fit 20x20, centre by mass), since that is what a user's digit meets:

    small         the digit 10 px high, dark on white, somewhere on a 160x160 page (PNG)
    off-centre    the digit's field 56-100 px tall against an edge of a 240x180 page, dark on white (PNG)
    inverted      the 28x28 digit itself, dark on white (PNG)
    photographed  the digit's field 90-140 px tall on a 160x160 page of tinted paper under uneven
                  light (a gradient and a vignette, each darkening by up to 30%), photographed at an
                  angle (a random perspective: corners moved up to 12% of the page), slightly out of
                  focus, with sensor noise, saved as JPEG quality 30-60
    userlike      `lenet5.data.userlike`'s images of the first 2,000 test digits (seed 0): the
                  project's user-like set (canvases of 120-640 px, pens, paper, chalk, formats)

`load_stress_sets` generates them once and caches them (`stress_cache_dir()`); `lenet5 data
stress` does so from the command line and draws samples.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import platformdirs
import torch
from PIL import Image, ImageFilter

from lenet5.data.augment import dilate, downsample_upsample, erode
from lenet5.data.mnist import Split
from lenet5.errors import ConfigError
from lenet5.fileio import cached_arrays
from lenet5.preprocess import ImageError, prepare_file

VERSION = 2  # part of the cache's file name: bump it when a definition changes
# The non-digits measured by `evaluate --stress`. Seed 0's were looked at while the "unsure" rule was
# designed (lenet5.calibration), so the figures reported come from images nobody chose anything by.
NONDIGIT_SEED = 1
USERLIKE_DIGITS = 2000  # the user-like set is made of the first 2,000 test digits, as in docs/results/userlike


# ---------------------------------------------------------------- sets changed as tensors
def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)


def _bytes(images: torch.Tensor) -> np.ndarray:
    return images.squeeze(1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def thick(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _bytes(dilate(_float(images)))


def thin(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = torch.nn.functional.interpolate(_float(images), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.nn.functional.avg_pool2d(erode(x), 2)
    return _bytes(x / x.amax((1, 2, 3), keepdim=True).clamp(min=1e-6))


def rotated(images: np.ndarray, rng: np.random.Generator, degrees: float = 20.0) -> np.ndarray:
    sign = torch.from_numpy(rng.choice([-1.0, 1.0], len(images))).float()
    angle = sign * math.radians(degrees)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(len(images))
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    x = _float(images)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return _bytes(torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False))


def lowres(size: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def make(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _bytes(downsample_upsample(_float(images), size))

    return make


# ---------------------------------------------------------------- sets drawn as users' files
def _png(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    return buffer.getvalue()


def _scaled(digit: np.ndarray, side: int) -> np.ndarray:
    """The 28x28 digit's field at `side` x `side` pixels, ink in [0, 1]."""
    resample = Image.Resampling.BOX if side < 28 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(digit).resize((side, side), resample), dtype=np.float32) / 255


def _on_page(ink: np.ndarray, height: int, width: int, top: int, left: int) -> np.ndarray:
    page = np.zeros((height, width), dtype=np.float32)
    page[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    return page


def _dark_on_white(ink: np.ndarray) -> np.ndarray:
    return np.round((1 - np.clip(ink, 0, 1)) * 255).astype(np.uint8)


def small_file(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    rows = np.nonzero(digit.max(1) > 0)[0]
    ink_height = rows.max() - rows.min() + 1 if len(rows) else 20
    side = max(1, round(28 * 10 / ink_height))  # the field's size that makes the ink 10 px high
    ink = _scaled(digit, side)
    top, left = (int(rng.integers(0, 160 - side + 1)) for _ in range(2))
    return _png(_dark_on_white(_on_page(ink, 160, 160, top, left)))


def off_centre_file(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(56, 101))
    height, width = 180, 240
    # near one of the four edges: the field touches it, anywhere along it
    edge = int(rng.integers(0, 4))
    top = int(rng.integers(0, height - side + 1)) if edge >= 2 else (0 if edge == 0 else height - side)
    left = int(rng.integers(0, width - side + 1)) if edge < 2 else (0 if edge == 2 else width - side)
    return _png(_dark_on_white(_on_page(_scaled(digit, side), height, width, top, left)))


def inverted_file(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    return _png(255 - digit)


def _perspective_coefficients(source: np.ndarray, target: np.ndarray) -> list[float]:
    """PIL's 8 PERSPECTIVE coefficients mapping output points `target` to input points `source` (4x2 each)."""
    rows = []
    for (x, y), (u, v) in zip(target, source):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, dtype=np.float64), source.reshape(8)).tolist()


def photographed_file(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    size = 160
    side = int(rng.integers(90, 141))
    top, left = (int(rng.integers(5, size - side - 4)) for _ in range(2))
    ink = Image.fromarray((_on_page(_scaled(digit, side), size, size, top, left) * 255).astype(np.uint8))
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    moved = corners + rng.uniform(-0.12, 0.12, (4, 2)) * size
    ink = ink.transform((size, size), Image.Transform.PERSPECTIVE, _perspective_coefficients(corners, moved),
                        Image.Resampling.BICUBIC)
    ink = np.asarray(ink.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5)))), dtype=np.float32) / 255
    paper = rng.uniform(0.75, 1.0, 3) * rng.uniform(0.9, 1.0)
    pen = rng.uniform(0.0, 0.3, 3)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    gradient = 1 - rng.uniform(0.05, 0.3) * (0.5 + (xs * np.cos(direction) + ys * np.sin(direction)) / np.sqrt(2))
    vignette = 1 - rng.uniform(0.05, 0.3) * (xs ** 2 + ys ** 2) * 2
    light = (gradient * vignette)[..., None]
    rgb = (paper * (1 - ink[..., None]) + pen * ink[..., None]) * light
    rgb = np.clip(rgb + rng.normal(0, rng.uniform(0.01, 0.04), rgb.shape), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=int(rng.integers(30, 61)))
    return buffer.getvalue()


def through_predict(draw: Callable[[np.ndarray, np.random.Generator], bytes]) -> Callable:
    """A set whose digits are drawn as files by `draw` and prepared as `lenet5 predict` prepares files."""
    def make(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.stack([prepare_file(draw(digit, rng), "stress") for digit in images])

    return make


@dataclass(frozen=True)
class StressSet:
    make: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    through_preprocessing: bool


STRESS_SETS: dict[str, StressSet] = {
    "thick": StressSet(thick, False),
    "thin": StressSet(thin, False),
    "rotated": StressSet(rotated, False),
    "lowres-8": StressSet(lowres(8), False),
    "lowres-12": StressSet(lowres(12), False),
    "small": StressSet(through_predict(small_file), True),
    "off-centre": StressSet(through_predict(off_centre_file), True),
    "inverted": StressSet(through_predict(inverted_file), True),
    "photographed": StressSet(through_predict(photographed_file), True),
}


def make_userlike(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The user-like images of `images` (`lenet5.data.userlike`), prepared by `lenet5 predict`'s path."""
    from lenet5.data.userlike import make_user_images

    prepared = []
    for user in make_user_images(images, labels, seed=seed):
        try:
            prepared.append(prepare_file(user.data, "userlike"))
        except ImageError:  # counted as a blank input, which no model reads: it stays an error
            prepared.append(np.zeros((28, 28), np.uint8))
    return np.stack(prepared), labels


def make_stress_sets(images: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                     names: tuple[str, ...] | None = None, userlike: int = USERLIKE_DIGITS) -> dict[str, Split]:
    """Every stress set (or those in `names`) of uint8 digits (N, 28, 28) and their labels, with the
    user-like set of the first `userlike` digits (0: none). Each set has its own seeded generator,
    so a set is the same whichever others are made."""
    chosen = names if names is not None else (*STRESS_SETS, "userlike")
    out: dict[str, Split] = {}
    for index, name in enumerate((*STRESS_SETS, "userlike")):
        if name not in chosen:
            continue
        if name == "userlike":
            if userlike > 0:
                made, kept = make_userlike(images[:userlike], labels[:userlike], seed)
                out[name] = Split(torch.from_numpy(made), torch.from_numpy(kept.astype(np.int64)))
            continue
        made = STRESS_SETS[name].make(images, np.random.default_rng([seed, index]))
        out[name] = Split(torch.from_numpy(np.ascontiguousarray(made)), torch.from_numpy(labels.astype(np.int64)))
    return out


def stress_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("lenet5")) / "stress"


def _cache_file(test: Split, cache_dir: Path) -> Path:
    digest = hashlib.sha1(test.images.numpy().tobytes() + test.labels.numpy().tobytes()).hexdigest()[:12]
    return cache_dir / f"stress-v{VERSION}-{digest}.npz"


def load_stress_sets(test: Split, cache_dir: str | os.PathLike | None = None, *, refresh: bool = False,
                     on_make: Callable[[Path], None] | None = None) -> tuple[dict[str, Split], dict[str, torch.Tensor], Path]:
    """The stress sets of MNIST's test split and the non-digit sets (`lenet5.data.nondigits`), from the
    cache file, or made (a few minutes on 2 cores; `on_make(path)` is called first) and cached there."""
    folder = Path(cache_dir) if cache_dir else stress_cache_dir()
    if folder.exists() and not folder.is_dir():  # before minutes of making what could not be cached there
        raise ConfigError(f"{folder}: not a folder (the stress sets' cache folder)")
    path = _cache_file(test, folder)

    def make() -> dict[str, np.ndarray]:
        from lenet5.data.nondigits import make_nondigits

        sets = make_stress_sets(test.images.numpy(), test.labels.numpy())
        arrays = {f"{n}/{k}": getattr(s, k).numpy() for n, s in sets.items() for k in ("images", "labels")}
        arrays.update({f"nondigits/{k}": v for k, v in make_nondigits(seed=NONDIGIT_SEED).items()})
        return arrays

    def complete(arrays: dict[str, np.ndarray]) -> bool:
        return not refresh and all(k.replace("/images", "/labels") in arrays for k in arrays if k.endswith("/images"))

    arrays = cached_arrays(path, make, on_make, valid=complete)
    names = [k.removesuffix("/images") for k in arrays if k.endswith("/images")]
    sets = {n: Split(torch.from_numpy(arrays[f"{n}/images"]), torch.from_numpy(arrays[f"{n}/labels"])) for n in names}
    others = {k.removeprefix("nondigits/"): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("nondigits/")}
    return sets, others, path
