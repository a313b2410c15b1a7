"""MNIST: reading IDX files, downloading and verifying them, loading them as tensors."""

from lenet5.data.idx import read_images, read_labels
from lenet5.data.mnist import (
    DEFAULT_MIRRORS,
    FILES,
    MNIST,
    Split,
    fetch_mnist,
    load_mnist,
    resolve_data_dir,
    verify_file,
)

__all__ = [
    "DEFAULT_MIRRORS",
    "FILES",
    "MNIST",
    "Split",
    "fetch_mnist",
    "load_mnist",
    "read_images",
    "read_labels",
    "resolve_data_dir",
    "verify_file",
]
