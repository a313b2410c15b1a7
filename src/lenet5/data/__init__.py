"""Data sets of 28x28 images in IDX files: MNIST and the others of lenet5.data.catalog, read,
downloaded, verified and loaded as tensors."""

from lenet5.data.catalog import DATASETS, DIGITS, DatasetSpec, dataset_names, dataset_spec, describe_dataset
from lenet5.data.dataset import Dataset, Split, load_dataset
from lenet5.data.idx import read_images, read_labels
from lenet5.data.mnist import (
    DEFAULT_MIRRORS,
    FILES,
    MNIST,
    fetch_mnist,
    load_mnist,
    resolve_data_dir,
    verify_file,
)

__all__ = [
    "DATASETS",
    "DEFAULT_MIRRORS",
    "DIGITS",
    "Dataset",
    "DatasetSpec",
    "FILES",
    "MNIST",
    "Split",
    "dataset_names",
    "dataset_spec",
    "describe_dataset",
    "fetch_mnist",
    "load_dataset",
    "load_mnist",
    "read_images",
    "read_labels",
    "resolve_data_dir",
    "verify_file",
]
