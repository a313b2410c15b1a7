"""MNIST by its old names: the data set every command uses unless `--dataset` says otherwise.

Everything here is `lenet5.data.dataset` for the catalogue's "mnist" entry (kept so that code
written against the MNIST-only versions goes on working).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from lenet5.data.catalog import MNIST as MNIST_SPEC, DataFile
from lenet5.data.dataset import (
    DATA_ENV,
    MIRRORS_ENV,
    Dataset,
    Split,
    fetch_files,
    load_dataset,
    sha256_of,
    verify_file,
)
from lenet5.data.download import Progress

MNIST = Dataset  # a loaded data set; for MNIST its name is "mnist" and its classes the digits
MnistFile = DataFile
FILES = MNIST_SPEC.files
DEFAULT_MIRRORS = MNIST_SPEC.mirrors
SPLIT_SIZES = {"train": MNIST_SPEC.split_sizes[0], "test": MNIST_SPEC.split_sizes[1]}

__all__ = ["DATA_ENV", "DEFAULT_MIRRORS", "FILES", "MIRRORS_ENV", "MNIST", "MnistFile", "Split", "fetch_mnist",
           "load_mnist", "resolve_data_dir", "sha256_of", "verify_file"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the MNIST files: the argument, else $LENET5_DATA, else the user cache."""
    from lenet5.data.dataset import resolve_data_dir as resolve

    return resolve(data_dir, "mnist")


def fetch_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                mirrors: Sequence[str] | None = None, timeout: float = 30.0, retries: int = 2,
                progress: Progress | None = None) -> dict[str, Path]:
    """Make sure the four MNIST files are in the data directory, downloading missing ones."""
    return fetch_files(MNIST_SPEC, data_dir, download=download, mirrors=mirrors, timeout=timeout, retries=retries,
                       progress=progress)


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
               mirrors: Sequence[str] | None = None, timeout: float = 30.0, retries: int = 2,
               progress: Progress | None = None) -> Dataset:
    """Load MNIST as tensors (uint8 images, int64 labels), fetching and verifying it first if needed."""
    return load_dataset("mnist", data_dir, download=download, mirrors=mirrors, timeout=timeout, retries=retries,
                        progress=progress)
