"""Images that look like users' digits, made from MNIST test digits, to test preprocessing honestly.

Each MNIST digit is drawn the way people hand digits to a recogniser: on a large canvas,
off-centre, at any size, dark ink on white or coloured paper or chalk on a dark board, with
thicker or thinner strokes, blur, sensor noise, uneven light, saved as PNG, JPEG (with its
artefacts), BMP, WebP, GIF or TIFF. None of it is in MNIST's format, so a model that is only
right on MNIST-formatted input fails here unless the input is prepared the way MNIST was.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

FORMATS = ("PNG", "JPEG", "JPEG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")


@dataclass
class UserImage:
    data: bytes  # the encoded file
    extension: str
    label: int
    description: str


def make_user_image(digit: np.ndarray, label: int, rng: np.random.Generator) -> UserImage:
    """One MNIST digit (uint8 28x28, light on black) redrawn as a user's photo or drawing."""
    width, height = int(rng.integers(120, 640)), int(rng.integers(120, 640))
    side = int(min(width, height) * rng.uniform(0.45, 0.85))  # the digit's 28x28 field, scaled
    ink = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    stroke = rng.choice(["normal", "thick", "thin"], p=[0.5, 0.3, 0.2])
    k = max(3, (side // 28) | 1)  # an odd filter size of about one MNIST pixel
    if stroke == "thick":
        ink = ink.filter(ImageFilter.MaxFilter(k + 2 if k + 2 <= 9 else 9))
    elif stroke == "thin":
        ink = ink.filter(ImageFilter.MinFilter(min(k, 5)))
    canvas = np.zeros((height, width), dtype=np.float32)
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    canvas[top:top + side, left:left + side] = np.asarray(ink, dtype=np.float32) / 255
    blur = float(rng.choice([0, 0, 1, 2]))
    style = rng.choice(["pen on white", "pen on coloured paper", "chalk on board"], p=[0.5, 0.3, 0.2])
    if style == "chalk on board":
        paper, pen = rng.uniform(0.05, 0.3, 3), rng.uniform(0.8, 1.0, 3)
    elif style == "pen on coloured paper":
        paper, pen = rng.uniform(0.65, 1.0, 3), rng.uniform(0.0, 0.35, 3)
    else:
        paper, pen = np.full(3, rng.uniform(0.85, 1.0)), rng.uniform(0.0, 0.25, 3)
    light = np.linspace(1 - rng.uniform(0, 0.2), 1, width, dtype=np.float32)[None, :, None]  # uneven light
    rgb = (paper * (1 - canvas[..., None]) + pen * canvas[..., None]) * light
    noise = rng.uniform(0, 0.06)
    rgb = np.clip(rgb + rng.normal(0, noise, rgb.shape), 0, 1)
    image = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    fmt = str(rng.choice(FORMATS))
    buffer = io.BytesIO()
    if fmt == "JPEG":
        quality = int(rng.integers(35, 90))
        image.save(buffer, fmt, quality=quality)
        fmt_note = f"JPEG q{quality}"
    elif fmt == "GIF":
        image.convert("L").save(buffer, fmt)
        fmt_note = fmt
    else:
        image.save(buffer, fmt)
        fmt_note = fmt
    description = f"{width}x{height} {style}, {stroke} strokes, blur {blur:g}, noise {noise:.2f}, {fmt_note}"
    extension = {"JPEG": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())
    return UserImage(buffer.getvalue(), extension, int(label), description)


def make_user_images(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[UserImage]:
    rng = np.random.default_rng(seed)
    return [make_user_image(img, int(lbl), rng) for img, lbl in zip(images, labels)]
