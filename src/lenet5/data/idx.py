"""Reader for the IDX format MNIST is published in, gzipped or raw.

An IDX file is a big-endian header -- two zero bytes, a type byte (0x08 = unsigned byte), the
number of dimensions -- then one 32-bit size per dimension, then the data. MNIST images have
magic 0x00000803 (N, 28, 28) and labels 0x00000801 (N). Everything here is validated so that
a bad file gives one line naming it and the problem instead of garbage tensors.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from lenet5.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
UBYTE = 0x08
KIND_OF_MAGIC = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
GZIP_SIGNATURE = b"\x1f\x8b"


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is a gzip stream (whatever its name says)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not data:
        raise DataError(f"{path.name}: empty file")
    if _looks_like_html(data):
        raise DataError(f"{path.name}: is an HTML page, not MNIST data (a failed download saved as data?)")
    if data[:2] == GZIP_SIGNATURE:
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise DataError(f"{path.name}: truncated gzip stream (the download was cut short?)") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise DataError(f"{path.name}: corrupt gzip data: {e}") from None
    elif path.suffix == ".gz" and data[:2] != b"\x00\x00":
        raise DataError(f"{path.name}: not a gzip file and not an IDX file")
    return data


def parse_idx(data: bytes, name: str, expected_magic: int) -> np.ndarray:
    """Decode IDX bytes into a uint8 array, checking the magic number and the exact length."""
    want = KIND_OF_MAGIC[expected_magic]
    if len(data) < 4:
        raise DataError(f"{name}: truncated: expected an IDX header, got {len(data)} bytes")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    if zero != 0 or dtype != UBYTE:
        raise DataError(f"{name}: not an IDX file of unsigned bytes (magic 0x{magic:08x})")
    if magic != expected_magic:
        got = KIND_OF_MAGIC.get(magic, f"{ndim}-d data")
        raise DataError(
            f"{name}: holds {got} (magic 0x{magic:08x}), expected {want} (magic 0x{expected_magic:08x})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated: expected a {header}-byte header, got {len(data)} bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) < expected:
        raise DataError(f"{name}: truncated: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise DataError(f"{name}: {len(data) - expected} unexpected bytes after the {expected} of the data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_images(path: str | Path) -> np.ndarray:
    """MNIST images as a uint8 array of shape (N, 28, 28)."""
    path = Path(path)
    images = parse_idx(read_bytes(path), path.name, IMAGES_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path.name}: images are {'x'.join(map(str, images.shape[1:]))}, expected 28x28")
    return images


def read_labels(path: str | Path) -> np.ndarray:
    """MNIST labels as a uint8 array of shape (N,), each in 0..9."""
    path = Path(path)
    labels = parse_idx(read_bytes(path), path.name, LABELS_MAGIC)
    if labels.ndim != 1:
        raise DataError(f"{path.name}: labels have {labels.ndim} dimensions, expected 1")
    if labels.size and labels.max() > 9:
        raise DataError(f"{path.name}: label {int(labels.max())} is not a digit 0-9")
    return labels
