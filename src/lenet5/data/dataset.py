"""A data set by name: where its files live, how they are fetched and verified, and how they load fast.

The four files of a set are kept in a data directory (``--data-dir``; for MNIST also the
``LENET5_DATA`` environment variable; else the per-user cache, one folder per set). Missing ones
are downloaded from the set's mirrors (EMNIST's are taken from its published zip), each verified
against the catalogue's checksums (lenet5.data.catalog) before first use, then decoded once into
``.npy`` arrays, so later loads take milliseconds instead of a gunzip.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import platformdirs
import torch

from lenet5.data import archive
from lenet5.data.catalog import DATASETS, DIGITS, IDX_PREFIX, MNIST as MNIST_SPEC, DataFile, DatasetSpec, dataset_spec
from lenet5.data.download import Progress, download_file
from lenet5.data.idx import MAX_DATA_BYTES, content_sha256, read_images, read_labels
from lenet5.errors import ConfigError, DataError
from lenet5.fileio import atomic_write_bytes

DATA_ENV = "LENET5_DATA"  # MNIST's folder
MIRRORS_ENV = "LENET5_MIRRORS"  # MNIST's mirrors


@dataclass
class Split:
    """One half of a data set: uint8 images (N, 28, 28) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        """The first `n` samples (all of them when n <= 0): a deterministic slice, no shuffle."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])

    def take(self, n: int, option: str) -> "Split":
        """`head(n)` for an option's value: asking for more samples than there are is a ConfigError
        (it silently used all of them)."""
        if n > len(self):
            raise ConfigError(f"{option} {n:,} is more than the {len(self):,} images there are")
        return self.head(n)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def class_counts(self, classes: int = 10) -> list[int]:
        return torch.bincount(self.labels, minlength=classes).tolist()


@dataclass
class Dataset:
    """A loaded data set: its training and test splits, and what its labels mean."""

    train: Split
    test: Split
    root: Path | None
    name: str = "mnist"
    classes: tuple[str, ...] = DIGITS
    named: bool = True  # False: an idx: folder without classes.txt, whose names are the label numbers
    spec: DatasetSpec | None = field(default=None, repr=False)

    @property
    def title(self) -> str:
        return self.spec.title if self.spec else self.name

    def validation_split(self, images: int) -> "Dataset":
        """The last `images` training images held out as the test split, to choose settings on
        (the test set stays unseen); the training split is the rest."""
        if not 0 < images < len(self.train):
            raise ConfigError(f"a validation split needs 1 to {len(self.train) - 1} images, got {images}")
        n = len(self.train) - images
        held_out = Split(self.train.images[n:], self.train.labels[n:])
        return replace(self, train=Split(self.train.images[:n], self.train.labels[:n]), test=held_out)


def resolve_data_dir(data_dir: str | os.PathLike | None = None, dataset: str = "mnist") -> Path:
    """The folder holding a set's files: the argument; for MNIST, else $LENET5_DATA; else the user cache."""
    if data_dir:
        return Path(data_dir).expanduser()
    if dataset == "mnist" and os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    spec = DATASETS.get(dataset, MNIST_SPEC)
    return Path(platformdirs.user_cache_dir("lenet5")) / spec.folder


def resolve_mirrors(spec: DatasetSpec, mirrors: Sequence[str] | None = None) -> list[str]:
    if mirrors:
        return list(mirrors)
    if spec.name == "mnist" and os.environ.get(MIRRORS_ENV):
        return [m.strip() for m in os.environ[MIRRORS_ENV].split(",") if m.strip()]
    return list(spec.archive.mirrors if spec.archive else spec.mirrors)


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, in one read."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def sha256_of(path: Path) -> str:
    return file_digests(path)[0]


def _owner(sha256: str, content: str | None) -> str:
    """Whose published file these digests are, if any set's: ", it is MNIST's t10k-labels-idx1-ubyte.gz"."""
    for spec in DATASETS.values():
        for f in spec.files:
            if sha256 == f.sha256 or (content and content == f.content_sha256):
                return f" (it is {spec.title}'s {f.name})"
    return ""


def _content(path: Path) -> tuple[str | None, str]:
    """(SHA-256 of the IDX content, "") or (None, why it could not be read)."""
    try:
        return content_sha256(path), ""
    except DataError as e:
        return None, str(e).removeprefix(f"{path.name}: ")


def verify_file(path: Path, file: DataFile) -> str:
    """Check a data file against the catalogue: the published file (size and digest), or the same
    content in another compression. Returns how it was verified; DataError if it fails."""
    size = path.stat().st_size
    compressed = path.suffix in (".gz", ".xz")
    if compressed and (file.sha256 or file.md5) and (file.size is None or size == file.size):
        sha256, md5 = file_digests(path)
        if (file.sha256 is None or sha256 == file.sha256) and (file.md5 is None or md5 == file.md5):
            return f"{'sha256' if file.sha256 else 'md5'} ok"
    content, problem = None, ""
    if file.content_sha256:
        content, problem = _content(path)
        if content == file.content_sha256:
            return "content sha256 ok" + (" (not the published compression)" if compressed and file.sha256 else "")
    elif not (file.sha256 or file.md5):
        return "no published checksum: checked by its structure"
    elif not compressed:
        return "uncompressed copy (no published checksum): checked by its structure"
    again = "delete it and run `lenet5 data` to download it again"
    why = f" ({problem})" if problem else ""
    if compressed and file.size is not None and size != file.size and content is None:
        raise DataError(f"{path}: {size} bytes, expected {file.size}: truncated or not the published file{why}; {again}")
    owner = _owner(sha256_of(path), content)
    raise DataError(f"{path}: checksum mismatch (differs from the published file{owner}){why}; "
                    f"is it the right folder for this data set? Else {again}")


def _local_copy(root: Path, file: DataFile) -> Path | None:
    """The file in `root`, compressed or already uncompressed by the user, if it is there."""
    for candidate in (root / file.name, root / file.name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def fetch_files(spec: DatasetSpec, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                mirrors: Sequence[str] | None = None, timeout: float = 30.0, retries: int = 2,
                progress: Progress | None = None) -> dict[str, Path]:
    """Make sure a set's four files are in its data directory, downloading missing ones.

    With ``download=False`` (offline) the network is never touched and a missing file is an error.
    """
    if spec.name.startswith(IDX_PREFIX):
        root = Path(spec.folder)
        return {f.name: root / f.name for f in spec.files}
    root = resolve_data_dir(data_dir, spec.name)
    paths: dict[str, Path] = {}
    for file in spec.files:
        path = _local_copy(root, file)
        if path is None:
            if not download:
                hint = f"--data-dir / ${DATA_ENV}" if spec.name == "mnist" else "--data-dir"
                raise DataError(f"{file.name} not found in {root} and downloads are off (offline); "
                                f"put the {spec.title} files there, or point {hint} at them")
            if spec.archive:
                path = archive.extract(spec.archive, file.name, root, resolve_mirrors(spec, mirrors),
                                       timeout=timeout, retries=retries, progress=progress)
            else:
                accept = (lambda tmp, f=file: _content(tmp)[0] == f.content_sha256) if file.content_sha256 else None
                path = download_file(file.name, file.size, file.sha256, root, resolve_mirrors(spec, mirrors),
                                     md5=file.md5, accept=accept, max_bytes=MAX_DATA_BYTES, timeout=timeout,
                                     retries=retries, progress=progress)
        paths[file.name] = path
    return paths


def decoded_cache_dir() -> Path:
    """Where decoded arrays are kept: the per-user cache, never beside the (maybe shared) source."""
    return Path(platformdirs.user_cache_dir("lenet5")) / "decoded"


def _decode(path: Path, file: DataFile, spec: DatasetSpec) -> np.ndarray:
    verify_file(path, file)
    if file.kind == "images":
        array = read_images(path)
        if spec.transposed:  # stored column by column: turned upright once, before caching
            array = np.ascontiguousarray(array.transpose(0, 2, 1))
    else:
        classes = len(spec.classes) if spec.classes else 256
        array = read_labels(path, classes, spec.first_label) - spec.first_label
    expected = spec.split_sizes and spec.split_sizes[0 if file.split == "train" else 1]
    if expected and len(array) != expected:
        raise DataError(f"{path.name}: {len(array)} {file.kind}, expected {expected} in {spec.title}'s {file.split} split")
    return array


def _load_array(path: Path, file: DataFile, spec: DatasetSpec) -> np.ndarray:
    """Decoded contents of a data file, from the .npy cache when the source has not changed."""
    stat = path.stat()
    source_key = hashlib.sha1(f"{path.resolve()}|{spec.name}".encode()).hexdigest()[:12]
    version_key = f"{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ino}"
    cache_dir = decoded_cache_dir()
    cached = cache_dir / f"{source_key}-{version_key}-{file.name}.npy"
    if cached.is_file():
        try:
            return np.load(cached, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt from the source below
    array = _decode(path, file, spec)
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


def load_dataset(name: str = "mnist", data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 mirrors: Sequence[str] | None = None, timeout: float = 30.0, retries: int = 2,
                 progress: Progress | None = None) -> Dataset:
    """Load a data set by name (lenet5.data.catalog, or idx:FOLDER) as tensors: uint8 images,
    int64 labels 0..classes-1, fetching and verifying its files first if needed."""
    spec = dataset_spec(name)
    if spec.name.startswith(IDX_PREFIX) and data_dir:
        raise ConfigError(f"--data-dir is not used with {name}: the folder is part of the name")
    paths = fetch_files(spec, data_dir, download=download, mirrors=mirrors, timeout=timeout, retries=retries,
                        progress=progress)
    arrays = {file.name: _load_array(paths[file.name], file, spec) for file in spec.files}
    splits = {}
    for split in ("train", "test"):
        images, labels = (arrays[f.name] for f in spec.files if f.split == split)
        if len(images) != len(labels):
            raise DataError(f"{spec.title}: {len(images)} {split} images but {len(labels)} labels")
        if spec.classes and len(labels) and labels.max() >= len(spec.classes):  # checked here too: after a cache hit
            name = next(f.name for f in spec.files if f.split == split and f.kind == "labels")
            raise DataError(f"{name}: label {int(labels.max())} is not a class 0-{len(spec.classes) - 1}")
        splits[split] = Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    classes = spec.classes
    if not classes:  # an idx: folder without classes.txt: the label numbers
        top = max(int(s.labels.max()) if len(s) else 0 for s in splits.values())
        classes = tuple(str(k) for k in range(top + 1))
        if len(classes) < 2:
            raise DataError(f"{spec.title}: every label is 0; a classifier needs at least 2 classes")
    root = Path(spec.folder) if spec.name.startswith(IDX_PREFIX) else resolve_data_dir(data_dir, name)
    return Dataset(train=splits["train"], test=splits["test"], root=root, name=name, classes=classes,
                   named=spec.named, spec=spec)


def check_files(data: Dataset) -> list[tuple[Path, str]]:
    """Each file of a loaded data set, verified again in full: (path, how it was verified)."""
    spec = data.spec or dataset_spec(data.name)
    root = Path(spec.folder) if spec.name.startswith(IDX_PREFIX) else data.root
    rows = []
    for file in spec.files:
        path = _local_copy(root, file) if root else None
        if path is not None:
            rows.append((path, verify_file(path, file)))
    return rows
