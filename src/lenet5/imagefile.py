"""Read a user's image file and decode it to grey, within fixed bounds of bytes, pixels and memory.

This is the one decode path: `lenet5 predict`, `lenet5 explain` and the HTTP service all use
it, with the same formats and the same limits. Its bounds:

- only regular files are read, and at most MAX_BYTES of them (a FIFO would hang the read and
  /dev/zero would never end);
- only the formats in FORMATS are decoded: Pillow can open many more, and some of them hand
  the bytes to other programs (EPS to Ghostscript) or to rarely-used decoders;
- at most MAX_PIXELS pixels are decoded (JPEGs are decoded at 1/2, 1/4 or 1/8 scale by the
  decoder itself when they are large, and counted after that);
- a large image is shrunk by an integer factor to at most WORK_SIDE pixels on its longer side
  while it is still 1 or 4 bytes a pixel, before any float copy. A 25 MP upload therefore
  takes about 100 MB at its peak, not the 0.9 GB that float RGBA copies of it took.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lenet5.errors import Lenet5Error

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
MAX_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 25_000_000  # decoded pixels: 100 MB at 4 bytes a pixel, Pillow's widest storage
WORK_SIDE = 1024  # the digit ends up 20x20: a 1024-pixel image keeps even a small digit's strokes
STRIP_ROWS = 256  # rows converted and shrunk at a time: a few MB, whatever the image
ORIENTATION = 0x0112  # the EXIF tag phones use instead of rotating the pixels
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
NOT_REGULAR = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class ImageError(Lenet5Error):
    """An input image that cannot be read or holds no digit."""


def read_file(path: str | Path, label: str, limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is an ImageError."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot read: {e.strerror or e}") from None
    with open(fd, "rb", closefd=True) as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError(f"{label}: is a directory")
        if not stat.S_ISREG(mode):
            kind = NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
            raise ImageError(f"{label}: {kind}, not an image file")
        size = os.fstat(fd).st_size
        if size > limit:
            raise ImageError(f"{label}: {size:,} bytes, more than the {limit:,} accepted")
        try:
            data = file.read(limit + 1)  # never more, whatever the file does meanwhile
        except OSError as e:
            raise ImageError(f"{label}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise ImageError(f"{label}: more than the {limit:,} bytes accepted")
    return data


def decode_grey(data: bytes, label: str) -> np.ndarray:
    """Decode an image into grey float32 in [0, 1], its longer side at most WORK_SIDE.

    The first frame of an animation is used; EXIF rotation is applied (phone photos);
    transparency is flattened onto a background that contrasts with the strokes (a canvas
    drawing is often ink on a transparent background); 16-bit, 32-bit and float images are
    scaled by their bit depth or range.
    """
    if not data:
        raise ImageError(f"{label}: empty file")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{label}: {len(data):,} bytes, more than the {MAX_BYTES:,} accepted")
    try:
        with warnings.catch_warnings():
            # Pillow warns about large images when opening; the size check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        with image:
            image.seek(0)
            factor = _shrink_factor(image.size)
            if factor > 1 and image.format in ("JPEG", "MPO"):
                # The decoder scales by 1/2, 1/4 or 1/8 as it decodes (and to grey: a YCbCr JPEG's Y).
                image.draft("L", (image.width // factor, image.height // factor))
            width, height = image.size
            if width == 0 or height == 0:
                raise ImageError(f"{label}: the image is {width}x{height}")
            if width * height > MAX_PIXELS:
                raise ImageError(f"{label}: {width}x{height} is {width * height / 1e6:.0f} MP, "
                                 f"more than the {MAX_PIXELS / 1e6:.0f} MP accepted")
            orientation = image.getexif().get(ORIENTATION)
            image.load()
            small, bits = _shrink(image)
        if orientation in TRANSPOSE:
            small = small.transpose(TRANSPOSE[orientation])
        return _grey(small, bits, label)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file this tool can read ({FORMAT_NAMES})") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: image too large (decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise ImageError(f"{label}: damaged or truncated image ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise assorted types on malformed files
        raise ImageError(f"{label}: damaged image ({type(e).__name__}: {e})") from None


def _shrink_factor(size: tuple[int, int]) -> int:
    return max(1, math.ceil(max(size) / WORK_SIDE))


def _shrink(image: Image.Image) -> tuple[Image.Image, int | None]:
    """`image` in a mode Pillow can average in, shrunk to at most WORK_SIDE by box averaging,
    and its bit depth when the mode no longer says it.

    Done in strips of rows: converting or reducing the whole image at once would make a second
    full-size copy (reduce premultiplies RGBA into a copy), doubling the memory a decode takes.
    """
    transparent, bits = "transparency" in image.info, None
    if image.mode == "1":
        mode = "L"  # 1 byte a pixel either way
    elif image.mode in ("P", "PA"):
        mode = "LA" if transparent or image.mode == "PA" else "L"
    elif image.mode.startswith("I;16"):
        mode, bits = "I", 16  # Pillow cannot average 16-bit storage
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
        mode = "RGBA" if "A" in image.mode or transparent else "RGB"
    else:
        mode = image.mode
    factor = _shrink_factor(image.size)
    width, height = image.size
    small = Image.new(mode, (math.ceil(width / factor), math.ceil(height / factor)))
    rows = factor * max(1, STRIP_ROWS // factor)  # a multiple of the factor: strips average like the whole
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        strip = strip.convert(mode) if strip.mode != mode else strip
        small.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return small, bits


def _grey(image: Image.Image, bits: int | None, label: str) -> np.ndarray:
    if image.mode in ("I", "F"):
        return _scaled(np.asarray(image, dtype=np.float64), bits, label)
    has_alpha = image.mode in ("LA", "RGBA")
    grey_alpha = np.asarray(image.convert("LA" if has_alpha else "L"), dtype=np.float32) / 255  # ITU-R 601 luma
    if not has_alpha:
        return grey_alpha
    grey, alpha = grey_alpha[..., 0], grey_alpha[..., 1]
    if alpha.min() < 0.99:
        opaque = alpha > 0.5
        strokes_dark = opaque.any() and grey[opaque].mean() < 0.5
        background = 1.0 if strokes_dark else 0.0
        grey = grey * alpha + background * (1 - alpha)
    return np.ascontiguousarray(grey)


def _scaled(values: np.ndarray, bits: int | None, label: str) -> np.ndarray:
    """Integer or float pixels -> [0, 1]: by the bit depth when known, else by the range they use."""
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageError(f"{label}: the image has NaN or infinite pixel values")
    if bits:
        top = 2.0 ** bits - 1
    elif low >= 0 and high <= 1:
        top = 1.0  # a float image in [0, 1]
    elif low >= 0 and high <= 255:
        top = 255.0
    elif low >= 0 and high <= 65535:
        top = 65535.0
    else:  # another range: stretch what is there
        return ((values - low) / ((high - low) or 1)).astype(np.float32)
    return (values / top).astype(np.float32)
