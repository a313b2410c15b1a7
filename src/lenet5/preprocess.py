"""Turn a user's image of a digit into a 28x28 MNIST-style digit.

MNIST's digits were prepared so: white digit on black, the digit's bounding box scaled to fit
20x20 keeping its aspect ratio (anti-aliased), then placed in a 28x28 field with its centre of
mass at the centre. A model trained on MNIST only sees digits like that, so a photo, a scan or
a canvas drawing must be brought to the same form first, or a 99% model fails on it.
`prepare_digit` does that for any size, colour or grey, dark-on-light or light-on-dark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lenet5.imagefile import ImageError, decode_grey, read_file

BOX, FIELD = 20, 28  # MNIST: digit fitted into 20x20, centred in 28x28

__all__ = ["ImageError", "load_grey", "prepare_digit", "prepare_file"]


def load_grey(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read and decode an image file (PNG, JPEG, BMP, GIF, WebP, TIFF) into grey floats in
    [0, 1], within the bounds `lenet5.imagefile` sets (large images come back shrunk)."""
    label = name or (Path(source).name if not isinstance(source, bytes) else "image")
    data = source if isinstance(source, bytes) else read_file(source, label)
    return decode_grey(data, label)


def prepare_digit(grey: np.ndarray, name: str = "image") -> np.ndarray:
    """A grey image (H, W) in [0, 1] -> MNIST-style uint8 (28, 28), light digit on black."""
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise ImageError(f"{name}: expected a 2-D image, got shape {grey.shape}")
    h, w = grey.shape
    # Background: the median of the image's border. A light border means dark ink: invert.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    ink = grey - background if background < 0.5 else background - grey
    # The ink's strength: its 99.9th percentile, which ignores a few pixels of noise, but no less
    # than its 8th-largest pixel, so that a small digit on a large page (under 0.1% of the pixels,
    # e.g. 10 px high on 160x160: the `small` stress set) is still found.
    contrast = float(max(np.percentile(ink, 99.9), np.partition(ink.ravel(), -8)[-8])) if ink.size > 1000 \
        else float(ink.max())
    if contrast < 0.15:
        raise ImageError(f"{name}: no ink found (a blank or almost uniform image)")
    ink = np.clip(ink / contrast, 0, 1)
    # Paper texture, sensor noise and JPEG ringing stay below about a third of the stroke's
    # contrast; cut them off so they do not enlarge the bounding box or shift the centre of mass.
    ink = np.clip((ink - 0.3) / 0.7, 0, 1)
    rows, cols = np.nonzero(ink > 0.2)
    if len(rows) == 0:
        raise ImageError(f"{name}: no ink found (a blank or almost uniform image)")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    digit = ink[top:bottom, left:right]
    scale = BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    # Anti-aliased resize: box filtering when shrinking (an average of the covered pixels).
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    fitted = np.asarray(Image.fromarray(digit.astype(np.float32), mode="F").resize(size, resample))
    peak = fitted.max()
    if peak <= 0:
        raise ImageError(f"{name}: no ink found (a blank or almost uniform image)")
    # Thin pen strokes on a large photo fade when shrunk; MNIST's strokes are saturated.
    fitted = np.clip(fitted / peak * 1.15, 0, 1)
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    ys, xs = np.mgrid[0:fitted.shape[0], 0:fitted.shape[1]]
    mass = fitted.sum()
    cy, cx = (ys * fitted).sum() / mass, (xs * fitted).sum() / mass
    # Centre of mass onto pixel (14, 14): where MNIST's digits have it (mean 13.99, 14.00 over
    # the test set, in row/column index coordinates), not the geometric centre 13.5.
    top = int(round(FIELD / 2 - cy))
    left = int(round(FIELD / 2 - cx))
    top = min(max(top, 0), FIELD - fitted.shape[0])
    left = min(max(left, 0), FIELD - fitted.shape[1])
    field[top:top + fitted.shape[0], left:left + fitted.shape[1]] = fitted
    return np.round(field * 255).astype(np.uint8)


def prepare_file(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read an image and prepare its digit: uint8 (28, 28)."""
    label = name or (Path(source).name if not isinstance(source, bytes) else "image")
    return prepare_digit(load_grey(source, label), label)

