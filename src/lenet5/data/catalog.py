"""The data sets lenet5 knows by name: where each is published, its checksums, classes and quirks.

Every set here is four IDX files of 28x28 grey images (a training and a test split, images and
labels), like MNIST. Checksums, per file:

- `sha256`/`md5` of the *published* file (MD5 where only that is published: Fashion-MNIST's
  README, torchvision's lists for KMNIST, QMNIST and EMNIST's zip);
- `content_sha256`, of the file's IDX bytes uncompressed, computed here from a copy we had: any
  compression of the same data passes (Debian re-compressed Fashion-MNIST, so its `.gz` bytes
  differ from the published ones while the content does not; a gunzipped copy passes too).

A file passes if it is the published one (size and digest) or has the recorded content.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from lenet5.errors import ConfigError, DataError

DIGITS = tuple(string.digits)
IDX_PREFIX = "idx:"


@dataclass(frozen=True)
class DataFile:
    name: str  # as published
    split: str  # "train" or "test"
    kind: str  # "images" or "labels"
    size: int | None = None  # bytes of the published file, where known
    sha256: str | None = None  # of the published file
    md5: str | None = None  # of the published file, where only MD5 is published
    content_sha256: str | None = None  # of its IDX bytes, uncompressed


@dataclass(frozen=True)
class Archive:
    """One published archive holding the data files (EMNIST's gzip.zip)."""

    name: str
    md5: str
    max_bytes: int  # a bound on the download: the size is not published
    folder: str  # the data files' folder inside the archive
    mirrors: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # what --dataset takes
    title: str  # how people write it
    classes: tuple[str, ...]  # class names by label (after `first_label` is subtracted)
    files: tuple[DataFile, ...]
    mirrors: tuple[str, ...]
    split_sizes: tuple[int, int] | None  # (train, test) images; None: whatever the files hold
    folder: str  # its folder under the user cache
    noun: str  # what one image shows, with its article, for the page: "Draw a digit"
    source: str  # who made it, and its licence
    transposed: bool = False  # images stored with rows and columns swapped (EMNIST)
    first_label: int = 0  # the published label of class 0 (EMNIST letters: 1)
    archive: Archive | None = None
    named: bool = True  # False for an idx: folder without classes.txt (names are the label numbers)


def _files(prefix: str = "", test: str = "t10k", labels: str = "labels-idx1-ubyte", suffix: str = ".gz",
           **facts: tuple) -> tuple[DataFile, ...]:
    """The four files, named as MNIST's are (with a prefix and other tails where a set differs);
    `facts` maps "train_images" etc. to (size, sha256, md5, content_sha256)."""
    files = []
    for split, word in (("train", "train"), ("test", test)):
        for kind, tail in (("images", "images-idx3-ubyte"), ("labels", labels)):
            size, sha256, md5, content = facts.get(f"{split}_{kind}", (None, None, None, None))
            files.append(DataFile(f"{prefix}{word}-{tail}{suffix}", split, kind, size, sha256, md5, content))
    return tuple(files)


MNIST = DatasetSpec(
    name="mnist", title="MNIST", classes=DIGITS, split_sizes=(60_000, 10_000), folder="mnist", noun="a digit",
    source="Yann LeCun, Corinna Cortes, Christopher J.C. Burges; CC BY-SA 3.0",
    # Tried in order. The original site has refused scripted downloads for years, so it comes last.
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
             "http://yann.lecun.com/exdb/mnist/"),
    files=_files(
        train_images=(9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", None,
                      "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        train_labels=(28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", None,
                      "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        test_images=(1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", None,
                     "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        test_labels=(4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", None,
                     "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ))

# Sizes and MD5s as published (the project's README; the sizes as Keras' downloader reports them);
# content SHA-256s computed here from Debian's dataset-fashion-mnist.
FASHION_MNIST = DatasetSpec(
    name="fashion-mnist", title="Fashion-MNIST", split_sizes=(60_000, 10_000), folder="fashion-mnist",
    noun="an item of clothing", source="Han Xiao, Kashif Rasul, Roland Vollgraf (Zalando Research), 2017; MIT",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"),
    files=_files(
        train_images=(26421880, None, "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        train_labels=(29515, None, "25c81989df183df01b3e8a0aad5dffbe",
                      "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        test_images=(4422102, None, "bef4ecab320f06d8554ea6380940ec79",
                     "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        test_labels=(5148, None, "bb300cfdad3c16e7a12a480ee83cd310",
                     "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ))

# Kuzushiji-MNIST: one class per hiragana, named by its romanisation (お き す つ な は ま や れ を).
# MD5s as torchvision lists them; no copy was at hand here, so no size or content digest.
KMNIST = DatasetSpec(
    name="kmnist", title="Kuzushiji-MNIST", split_sizes=(60_000, 10_000), folder="kmnist",
    noun="a cursive hiragana character", source="Tarin Clanuwat et al. (CODH), 2018; CC BY-SA 4.0",
    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
    files=_files(
        train_images=(None, None, "bdb82020997e1d708af4cf47b453dcf7", None),
        train_labels=(None, None, "e144d726b3acfaa3e44228e80efcd344", None),
        test_images=(None, None, "5c965bf0a639b31b8f53240b1b52f4d7", None),
        test_labels=(None, None, "7320c461ea6c1c855c0b718fb2a4b134", None),
    ))

# QMNIST: MNIST's training set and the full 60,000-image test set reconstructed from NIST (its
# first 10,000 are MNIST's test set). Labels are "extended" (N, 8) int32 rows whose first column is
# the class; the other columns (NIST writer, series, ...) are not used. The .xz files of all
# 402,953 NIST digits ("xnist") are not supported. MD5s as torchvision lists them.
QMNIST = DatasetSpec(
    name="qmnist", title="QMNIST", classes=DIGITS, split_sizes=(60_000, 60_000), folder="qmnist", noun="a digit",
    source="Chhavi Yadav, Leon Bottou, 'Cold Case: The Lost MNIST Digits', 2019; BSD",
    mirrors=("https://raw.githubusercontent.com/facebookresearch/qmnist/master/",),
    files=_files(
        prefix="qmnist-", test="test", labels="labels-idx2-int",
        train_images=(None, None, "ed72d4157d28c017586c42bc6afe6370", None),
        train_labels=(None, None, "0058f8dd561b90ffdd0f734c6a30e5e4", None),
        test_images=(None, None, "1394631089c404de565df7b7aeaf9412", None),
        test_labels=(None, None, "5b5b05890a5e13444e108efe57b788aa", None),
    ))

# EMNIST is published as one zip of all its splits (about 536 MB; its MD5 as torchvision lists
# it). The files inside carry no published checksums: the zip's MD5 is verified before anything
# is taken from it, and the files themselves are checked by their structure (IDX headers, image
# counts, label range). Images are stored transposed (column by column) and are turned upright
# on loading.
EMNIST_ARCHIVE = Archive(
    name="gzip.zip", md5="58c8d27c78d21e728a6bc7b3cc06412e", max_bytes=600_000_000, folder="gzip/",
    mirrors=("https://biometrics.nist.gov/cs_links/EMNIST/", "https://www.itl.nist.gov/iaui/vip/cs_links/EMNIST/"))
_EMNIST_SOURCE = "Gregory Cohen, Saeed Afshar, Jonathan Tapson, Andre van Schaik, 'EMNIST', 2017 (NIST SD 19)"


def _emnist(split: str, classes: tuple[str, ...], sizes: tuple[int, int], noun: str, first_label: int = 0) -> DatasetSpec:
    return DatasetSpec(
        name=f"emnist-{split}", title=f"EMNIST {split.capitalize()}", classes=classes, split_sizes=sizes,
        folder="emnist", noun=noun, source=_EMNIST_SOURCE, mirrors=(), transposed=True, first_label=first_label,
        archive=EMNIST_ARCHIVE, files=_files(prefix=f"emnist-{split}-", test="test"))


EMNIST_DIGITS = _emnist("digits", DIGITS, (240_000, 40_000), "a digit")
# Letters: upper and lower case merged into 26 classes, published as labels 1..26; here 0..25, named a..z.
EMNIST_LETTERS = _emnist("letters", tuple(string.ascii_lowercase), (124_800, 20_800), "a letter", first_label=1)
# Balanced: 47 classes, the lower-case letters that look like their capitals merged into them.
EMNIST_BALANCED = _emnist("balanced", DIGITS + tuple(string.ascii_uppercase) + tuple("abdefghnqrt"),
                          (112_800, 18_800), "a digit or a letter")

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (MNIST, FASHION_MNIST, KMNIST, EMNIST_DIGITS, EMNIST_LETTERS,
                                                        EMNIST_BALANCED, QMNIST)}
CLASSES_FILE = "classes.txt"  # optional, in an idx: folder: one class name per line
_IDX_PATTERNS = {("train", "images"): ("train-images",), ("train", "labels"): ("train-labels",),
                 ("test", "images"): ("t10k-images", "test-images"), ("test", "labels"): ("t10k-labels", "test-labels")}


def dataset_names() -> list[str]:
    return [*DATASETS, "idx:FOLDER"]


def check_dataset_name(name: str) -> None:
    """ConfigError unless `name` is a known data set or idx:FOLDER (the folder is checked on loading)."""
    if name in DATASETS or (name.startswith(IDX_PREFIX) and name[len(IDX_PREFIX):].strip()):
        return
    raise ConfigError(f"unknown data set {name[:80]!r}; choose one of: {', '.join(dataset_names())}")


def canonical_name(name: str) -> str:
    """The name with an idx: folder made absolute, so that two spellings of one folder compare equal."""
    if name.startswith(IDX_PREFIX):
        return IDX_PREFIX + str(Path(name[len(IDX_PREFIX):]).expanduser().resolve())
    return name


def describe_dataset(name: str) -> DatasetSpec | None:
    """The catalogue's entry for a name (None for idx: folders and unknown names)."""
    return DATASETS.get(name)


def idx_spec(name: str) -> DatasetSpec:
    """The spec of an idx:FOLDER data set: the four files found in FOLDER by their names (any
    prefix, gzipped or not), class names from FOLDER/classes.txt if there is one."""
    folder = Path(name[len(IDX_PREFIX):]).expanduser()
    if not folder.is_dir():
        raise DataError(f"{name}: {folder} is not a folder (idx:FOLDER needs a folder with the four IDX files)")
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    files = []
    for (split, kind), patterns in _IDX_PATTERNS.items():
        found = [p for p in entries if any(pattern in p.name.lower() for pattern in patterns)]
        what = f"{'training' if split == 'train' else 'test'} {kind}"
        if not found:
            raise DataError(f"{name}: no {what} file in {folder} (a name containing "
                            + " or ".join(repr(p) for p in patterns) + ", e.g. " + patterns[0]
                            + f"-idx{3 if kind == 'images' else 1}-ubyte.gz)")
        if len(found) > 1:
            raise DataError(f"{name}: {len(found)} files could be the {what}: {', '.join(p.name for p in found[:4])}; "
                            "keep one")
        files.append(DataFile(found[0].name, split, kind))
    classes: tuple[str, ...] = ()
    named = (folder / CLASSES_FILE).is_file()
    if named:
        try:
            text = (folder / CLASSES_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{folder / CLASSES_FILE}: cannot read: {e}") from None
        classes = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not 2 <= len(classes) <= 256 or any(len(c) > 100 for c in classes):
            raise DataError(f"{folder / CLASSES_FILE}: expected 2 to 256 class names of at most 100 characters, "
                            f"one per line, found {len(classes)}")  # one class: nothing to tell apart
        twice = sorted({c for c in classes if classes.count(c) > 1})
        if twice:
            raise DataError(f"{folder / CLASSES_FILE}: class name(s) given twice: {', '.join(twice)[:200]}")
    return DatasetSpec(name=name, title=name, classes=classes, files=tuple(files), mirrors=(), split_sizes=None,
                       folder=str(folder), noun="an image", source=f"the IDX files in {folder}", named=named)


def dataset_spec(name: str) -> DatasetSpec:
    check_dataset_name(name)
    return DATASETS[name] if name in DATASETS else idx_spec(name)
