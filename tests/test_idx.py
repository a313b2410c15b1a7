"""The IDX reader on the real files and on damaged copies of them."""

from __future__ import annotations

import gzip
import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest

from lenet5.data import read_images, read_labels
from lenet5.errors import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_reads_the_published_test_files(mnist_dir):
    images = read_images(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_labels(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert np.bincount(labels, minlength=10).tolist() == TEST_COUNTS
    assert images.max() == 255 and images.min() == 0
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits


def test_loaded_mnist_has_the_published_class_counts(mnist):
    assert mnist.train.images.shape == (60_000, 28, 28)
    assert mnist.train.class_counts() == TRAIN_COUNTS
    assert mnist.test.class_counts() == TEST_COUNTS


def test_reads_uncompressed_files(mnist_dir, tmp_path):
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.bincount(read_labels(raw), minlength=10).tolist() == TEST_COUNTS


def test_truncated_raw_file_names_the_expected_size(mnist_dir, tmp_path):
    data = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(data[:5000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: expected 7840016 bytes, got 5000"):
        read_images(bad)


def test_truncated_gzip_is_reported(mnist_dir, tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes((mnist_dir / bad.name).read_bytes()[:400_000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: truncated gzip stream"):
        read_images(bad)


def test_corrupt_gzip_is_reported(mnist_dir, tmp_path):
    data = bytearray((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    data[2000:2100] = bytes(100)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt gzip data"):
        read_labels(bad)


def test_html_saved_as_data_is_recognised(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>")
    with pytest.raises(DataError, match="is an HTML page"):
        read_images(bad)


def test_labels_file_given_as_images_is_named(mnist_dir):
    with pytest.raises(DataError, match=r"holds labels \(magic 0x00000801\), expected images"):
        read_images(mnist_dir / "t10k-labels-idx1-ubyte.gz")


def test_trailing_bytes_and_bad_labels_are_rejected(mnist_dir, tmp_path):
    data = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    extra = tmp_path / "extra-labels"
    extra.write_bytes(data + b"\x00\x01")
    with pytest.raises(DataError, match="2 unexpected bytes"):
        read_labels(extra)
    eleven = tmp_path / "eleven-labels"
    eleven.write_bytes(data[:8] + bytes([11]) + data[9:])
    with pytest.raises(DataError, match="label 11 is not a digit"):
        read_labels(eleven)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.gz").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_images(tmp_path / "empty.gz")
    with pytest.raises(DataError, match="file not found"):
        read_images(tmp_path / "nope.gz")


def test_gz_name_on_other_content_is_rejected(tmp_path):
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"PK\x03\x04 a zip archive, not gzip")
    with pytest.raises(DataError, match="not a gzip file"):
        read_labels(bad)


def copy_mnist(src, dst):
    dst.mkdir()
    for f in src.glob("*.gz"):
        shutil.copy(f, dst / f.name)
    return dst


def idx_header(magic: int, *shape: int) -> bytes:
    return struct.pack(f">I{len(shape)}I", magic, *shape)


@pytest.mark.parametrize("shape", [(2**31, 2**31, 28), (2**31, 28, 28), (2**32 - 1,) * 3])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_header_declaring_absurd_sizes_is_refused_before_any_allocation(tmp_path, shape, compressed):
    content = idx_header(0x00000803, *shape) + bytes(100)
    bad = tmp_path / ("train-images-idx3-ubyte" + (".gz" if compressed else ""))
    bad.write_bytes(gzip.compress(content) if compressed else content)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"its header declares .* bytes of images, more than the 268,435,456"):
            read_images(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_gzip_bomb_named_like_mnist_is_not_inflated(tmp_path):
    """A valid header for 10,000 images, then 1 GiB of zeros (64 gzip members of 16 MiB each):
    the reader stops one byte past the declared 7,840,016 bytes."""
    zeros = gzip.compress(bytes(16 << 20), compresslevel=9)
    bomb = tmp_path / "t10k-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(idx_header(0x00000803, 10_000, 28, 28)) + zeros * 64)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"more data after the 7840016 bytes its header declares"):
            read_images(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak:,} bytes allocated"  # a few times the declared size, not 1 GiB
    assert time.perf_counter() - started < 5


def test_a_raw_file_with_a_huge_tail_is_refused_without_reading_it(tmp_path):
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    with bad.open("wb") as f:
        f.write(idx_header(0x00000801, 10))
        f.write(bytes(10))
        f.truncate(18 + (1 << 30))  # a sparse GiB of trailing data
    with pytest.raises(DataError, match=r"1073741824 unexpected bytes after the 18 of the data"):
        read_labels(bad)
