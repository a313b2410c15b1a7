"""MNIST: where it lives, how it is fetched and verified, and how it is loaded fast.

The four published gzip files are kept in a data directory (``--data-dir``, else the
``LENET5_DATA`` environment variable, else the per-user cache directory). They are verified
against their SHA-256 before first use, then decoded once into ``.npy`` arrays so that later
loads take a few milliseconds instead of a gunzip of 10 MB.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import platformdirs
import torch

from lenet5.data.download import Progress, download_file
from lenet5.data.idx import read_images, read_labels
from lenet5.errors import DataError
from lenet5.fileio import atomic_write_bytes

DATA_ENV = "LENET5_DATA"
MIRRORS_ENV = "LENET5_MIRRORS"

# Tried in order. The original site has refused scripted downloads for years, so it comes last.
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


@dataclass(frozen=True)
class MnistFile:
    name: str
    split: str  # "train" or "test"
    kind: str  # "images" or "labels"
    size: int
    sha256: str


FILES = (
    MnistFile("train-images-idx3-ubyte.gz", "train", "images", 9912422,
              "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    MnistFile("train-labels-idx1-ubyte.gz", "train", "labels", 28881,
              "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    MnistFile("t10k-images-idx3-ubyte.gz", "test", "images", 1648877,
              "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    MnistFile("t10k-labels-idx1-ubyte.gz", "test", "labels", 4542,
              "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)
SPLIT_SIZES = {"train": 60_000, "test": 10_000}


@dataclass
class Split:
    """One half of MNIST: uint8 images (N, 28, 28) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        """The first `n` samples (all of them when n <= 0): a deterministic slice, no shuffle."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=10).tolist()


@dataclass
class MNIST:
    train: Split
    test: Split
    root: Path


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the MNIST files: the argument, else $LENET5_DATA, else the user cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path(platformdirs.user_cache_dir("lenet5")) / "mnist"


def resolve_mirrors(mirrors: Sequence[str] | None = None) -> list[str]:
    if mirrors:
        return list(mirrors)
    if os.environ.get(MIRRORS_ENV):
        return [m.strip() for m in os.environ[MIRRORS_ENV].split(",") if m.strip()]
    return list(DEFAULT_MIRRORS)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _local_copy(root: Path, file: MnistFile) -> Path | None:
    """The file in `root`, gzipped or already gunzipped by the user, if it is there."""
    for candidate in (root / file.name, root / file.name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def verify_file(path: Path, file: MnistFile) -> None:
    """Check a gzip file against the published size and checksum (raw files are checked when parsed)."""
    if path.suffix != ".gz":
        return
    size = path.stat().st_size
    if size != file.size:
        raise DataError(f"{path}: {size} bytes, expected {file.size}: truncated or not the published file; "
                        "delete it and run `lenet5 data` to download it again")
    if sha256_of(path) != file.sha256:
        raise DataError(f"{path}: checksum mismatch (sha256 differs from the published file); "
                        "delete it and run `lenet5 data` to download it again")


def fetch_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                mirrors: Sequence[str] | None = None, timeout: float = 30.0, retries: int = 2,
                progress: Progress | None = None) -> dict[str, Path]:
    """Make sure the four files are in the data directory, downloading missing ones.

    With ``download=False`` (offline) the network is never touched and a missing file is an error.
    """
    root = resolve_data_dir(data_dir)
    paths: dict[str, Path] = {}
    for file in FILES:
        path = _local_copy(root, file)
        if path is None:
            if not download:
                raise DataError(f"{file.name} not found in {root} and downloads are off (offline); "
                                f"put the MNIST files there, or point --data-dir / ${DATA_ENV} at them")
            path = download_file(file.name, file.size, file.sha256, root, resolve_mirrors(mirrors),
                                 timeout=timeout, retries=retries, progress=progress)
        paths[file.name] = path
    return paths


def decoded_cache_dir() -> Path:
    """Where decoded arrays are kept: the per-user cache, never beside the (maybe shared) source."""
    return Path(platformdirs.user_cache_dir("lenet5")) / "decoded"


def _load_array(path: Path, file: MnistFile) -> np.ndarray:
    """Decoded contents of an MNIST file, from the .npy cache when the source has not changed."""
    stat = path.stat()
    source_key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    version_key = f"{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ino}"
    cache_dir = decoded_cache_dir()
    cached = cache_dir / f"{source_key}-{version_key}-{file.name}.npy"
    if cached.is_file():
        try:
            return np.load(cached, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt from the source below
    verify_file(path, file)
    array = read_images(path) if file.kind == "images" else read_labels(path)
    if len(array) != SPLIT_SIZES[file.split]:
        raise DataError(f"{path.name}: {len(array)} {file.kind}, expected {SPLIT_SIZES[file.split]}")
    try:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(cached, buffer.getvalue())
        for stale in cache_dir.glob(f"{source_key}-*-{file.name}.npy"):
            if stale != cached:
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # no writable cache: every load decodes, which is slower but correct
    return array


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
               mirrors: Sequence[str] | None = None, timeout: float = 30.0, retries: int = 2,
               progress: Progress | None = None) -> MNIST:
    """Load MNIST as tensors (uint8 images, int64 labels), fetching and verifying it first if needed."""
    paths = fetch_mnist(data_dir, download=download, mirrors=mirrors, timeout=timeout,
                        retries=retries, progress=progress)
    arrays = {file.name: _load_array(paths[file.name], file) for file in FILES}
    splits = {}
    for split in ("train", "test"):
        images, labels = (arrays[f.name] for f in FILES if f.split == split)
        splits[split] = Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    return MNIST(train=splits["train"], test=splits["test"], root=resolve_data_dir(data_dir))
