"""Reader for the IDX format MNIST is published in, gzipped or raw.

An IDX file is a big-endian header -- two zero bytes, a type byte (0x08 = unsigned byte), the
number of dimensions -- then one 32-bit size per dimension, then the data. MNIST images have
magic 0x00000803 (N, 28, 28) and labels 0x00000801 (N); QMNIST's extended labels are 32-bit
integers, magic 0x00000C02 (N, 8). Everything here is validated so that a bad file gives one line
naming it and the problem instead of garbage tensors.

Reading is bounded: the header comes first, a declared size over MAX_DATA_BYTES is refused
before any data is read, and a gzip stream is decompressed only up to the declared size (plus
one byte, to notice trailing data), so neither a hostile header nor a gzip bomb can make the
reader allocate more than the file honestly needs.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from lenet5.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
INT_LABELS_MAGIC = 0x00000C02  # QMNIST: (N, 8) big-endian int32, the class in column 0
UBYTE, INT32 = 0x08, 0x0C
DTYPES = {UBYTE: np.dtype(np.uint8), INT32: np.dtype(">i4")}
KIND_OF_MAGIC = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels", INT_LABELS_MAGIC: "extended labels"}
GZIP_SIGNATURE = b"\x1f\x8b"
MNIST_TRAIN_IMAGE_BYTES = 60_000 * 28 * 28
# The most data one file may declare: MNIST's largest (47 MB) with room to spare, and a bound on
# what a hostile header or a gzip bomb named like an MNIST file can make this reader allocate.
MAX_DATA_BYTES = 256 * 1024 * 1024


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def _declared_size(header: bytes, name: str, expected_magic: int) -> tuple[int, tuple[int, ...]]:
    """The header's (header bytes, shape), checked, from its first 4 + 4 * ndim bytes."""
    want = KIND_OF_MAGIC[expected_magic]
    if len(header) < 4:
        raise DataError(f"{name}: truncated: expected an IDX header, got {len(header)} bytes")
    zero, dtype, ndim = struct.unpack(">HBB", header[:4])
    magic = struct.unpack(">I", header[:4])[0]
    if zero != 0 or dtype not in DTYPES:
        raise DataError(f"{name}: not an IDX file of unsigned bytes or 32-bit integers (magic 0x{magic:08x})")
    if magic != expected_magic:
        got = KIND_OF_MAGIC.get(magic, f"{ndim}-d data")
        raise DataError(
            f"{name}: holds {got} (magic 0x{magic:08x}), expected {want} (magic 0x{expected_magic:08x})"
        )
    size = 4 + 4 * ndim
    if len(header) < size:
        raise DataError(f"{name}: truncated: expected a {size}-byte header, got {len(header)} bytes")
    shape = struct.unpack(f">{ndim}I", header[4:size])
    declared = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: no overflow, whatever the header claims
    if declared > MAX_DATA_BYTES:
        raise DataError(f"{name}: its header declares {' x '.join(map(str, shape))} = {declared:,} bytes of {want}, "
                        f"more than the {MAX_DATA_BYTES:,} this reader accepts (MNIST's largest file holds "
                        f"{MNIST_TRAIN_IMAGE_BYTES:,})")
    return size, shape


class _Source:
    """The bytes of an IDX file, gunzipped on the fly when it is a gzip stream (whatever its name
    says): `read(n)` never decompresses or allocates more than the n bytes asked for."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.raw = open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        head = self._guard(lambda: self.raw.read(512))
        self.raw.seek(0)
        if not head:
            self.close()
            raise DataError(f"{path.name}: empty file")
        if _looks_like_html(head):
            self.close()
            raise DataError(f"{path.name}: is an HTML page, not IDX data (a failed download saved as data?)")
        self.gzipped = head[:2] == GZIP_SIGNATURE
        if not self.gzipped and path.suffix == ".gz" and head[:2] != b"\x00\x00":
            self.close()
            raise DataError(f"{path.name}: not a gzip file and not an IDX file")
        self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gzipped else self.raw
        self.size = None if self.gzipped else os.fstat(self.raw.fileno()).st_size

    def _guard(self, read):
        try:
            return read()
        except EOFError:
            raise DataError(f"{self.path.name}: truncated gzip stream (the download was cut short?)") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{self.path.name}: corrupt gzip data: {e}") from None
        except OSError as e:
            raise DataError(f"{self.path.name}: cannot read: {e.strerror or e}") from None

    def read(self, n: int) -> bytes:
        return self._guard(lambda: self.stream.read(n))

    def close(self) -> None:
        self.raw.close()


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Decode an IDX file (gzipped or raw) into an array (uint8; int32 for extended labels), checking
    the magic number and the exact length. The header is read first: a size it declares beyond
    MAX_DATA_BYTES is refused before anything else is read or allocated, and no more than the
    declared size is ever decompressed."""
    path = Path(path)
    source = _Source(path)
    try:
        header = source.read(4)
        if len(header) == 4:
            header += source.read(4 * header[3])
        size, shape = _declared_size(header, path.name, expected_magic)
        dtype = DTYPES[header[2]]
        declared = math.prod(shape) * dtype.itemsize
        expected = size + declared
        if source.size is not None and source.size > expected:
            raise DataError(f"{path.name}: {source.size - expected} unexpected bytes after the {expected} of the data")
        data = source.read(declared + 1)  # one more: data past the declared size is an error
    finally:
        source.close()
    if len(data) < declared:
        raise DataError(f"{path.name}: truncated: expected {expected} bytes, got {size + len(data)}")
    if len(data) > declared:
        raise DataError(f"{path.name}: more data after the {expected} bytes its header declares")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_images(path: str | Path) -> np.ndarray:
    """MNIST images as a uint8 array of shape (N, 28, 28)."""
    path = Path(path)
    images = read_idx(path, IMAGES_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path.name}: images are {'x'.join(map(str, images.shape[1:]))}, expected 28x28")
    return images


def read_labels(path: str | Path, classes: int = 10, first: int = 0) -> np.ndarray:
    """Labels as an int64 array of shape (N,), each in first..first + classes - 1.

    Reads MNIST's byte labels (magic 0x00000801) and QMNIST's extended ones (0x00000C02, whose
    first column is the class)."""
    path = Path(path)
    source = _Source(path)
    try:
        magic = struct.unpack(">I", source.read(4).ljust(4, b"\0"))[0]
    finally:
        source.close()
    if magic == INT_LABELS_MAGIC:
        labels = read_idx(path, INT_LABELS_MAGIC)
        if labels.ndim != 2 or labels.shape[1] < 1:
            raise DataError(f"{path.name}: extended labels have shape {labels.shape}, expected (N, columns)")
        labels = labels[:, 0]
    else:
        labels = read_idx(path, LABELS_MAGIC)
        if labels.ndim != 1:
            raise DataError(f"{path.name}: labels have {labels.ndim} dimensions, expected 1")
    labels = labels.astype(np.int64)
    if labels.size and (labels.max() >= first + classes or labels.min() < first):
        bad = int(labels.max() if labels.max() >= first + classes else labels.min())
        what = "a digit 0-9" if (classes, first) == (10, 0) else f"a class {first}-{first + classes - 1}"
        raise DataError(f"{path.name}: label {bad} is not {what}")
    return labels


def content_sha256(path: str | Path, limit: int = MAX_DATA_BYTES + 64) -> str:
    """SHA-256 of a file's IDX bytes, gunzipped if it is a gzip stream: the same for every
    compression of the same data (a re-compressed copy, an uncompressed one). Reads at most
    `limit` bytes of content (DataError past it) and never holds more than a chunk."""
    import hashlib

    path = Path(path)
    source = _Source(path)
    digest, done = hashlib.sha256(), 0
    try:
        while chunk := source.read(1 << 20):
            done += len(chunk)
            if done > limit:
                raise DataError(f"{path.name}: more than {limit:,} bytes of content: not an IDX file of this data set")
            digest.update(chunk)
    finally:
        source.close()
    return digest.hexdigest()
