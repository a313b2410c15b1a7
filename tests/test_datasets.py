"""Data sets other than MNIST (issue 14): Fashion-MNIST for real (Debian's copy, through a loopback
mirror, trained, evaluated, reported, predicted), and the others from small IDX files written here."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lenet5.checkpoint import load_checkpoint
from lenet5.cli import main
from lenet5.data import catalog, load_dataset, read_labels
from lenet5.data.catalog import FASHION_MNIST, MNIST
from lenet5.data.dataset import verify_file
from lenet5.errors import ConfigError, DataError, DownloadError
from lenet5.evaluate import evaluate_checkpoint
from lenet5.models import create_model, list_models
from mirror import Mirror

# Debian's dataset-fashion-mnist (.ci/run installs it); LENET5_TEST_FASHION overrides.
FASHION_DIR = Path(os.environ.get("LENET5_TEST_FASHION", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    missing = [f.name for f in FASHION_MNIST.files if not (FASHION_DIR / f.name).is_file()]
    if missing:
        pytest.fail(f"the Fashion-MNIST files are needed in {FASHION_DIR} (apt-get install dataset-fashion-mnist, "
                    f"or $LENET5_TEST_FASHION); missing: {missing}")
    return FASHION_DIR


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    content = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


def small_set(folder: Path, classes: int = 3, n: int = (60, 30), prefix: str = "", test: str = "t10k",
              suffix: str = ".gz", first_label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four IDX files of noise images whose class k has a bright column of its own (so a net can learn them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for split, count in zip(("train", test), n):
        labels = np.arange(count) % classes
        images = rng.integers(0, 40, (count, 28, 28), dtype=np.uint8)
        images[np.arange(count), :, 2 + labels * 24 // classes] = 255
        write_idx(folder / f"{prefix}{split}-images-idx3-ubyte{suffix}", images, 0x803)
        write_idx(folder / f"{prefix}{split}-labels-idx1-ubyte{suffix}", (labels + first_label).astype(np.uint8), 0x801)
        out.append((images, labels))
    return out[0]


# ---------------------------------------------------------------- Fashion-MNIST, real files
def test_debian_recompressed_files_pass_by_their_content(fashion_dir):
    for file in FASHION_MNIST.files:
        path = fashion_dir / file.name
        assert path.stat().st_size != file.size  # Debian's gzip, not the published bytes
        assert verify_file(path, file) == "content sha256 ok"


def test_fashion_downloads_from_a_mirror_verified_then_trains_evaluates_and_predicts(fashion_dir, mnist_dir, tmp_path,
                                                                                     capsys):
    dest = tmp_path / "fashion"
    with Mirror(fashion_dir) as mirror:
        data = load_dataset("fashion-mnist", dest, mirrors=[mirror.url("missing"), mirror.url("good")])
        assert sum(v for k, v in mirror.hits.items() if k.startswith("/good/")) == 4
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.name for f in FASHION_MNIST.files)
    assert data.classes[9] == "Ankle boot" and data.title == "Fashion-MNIST"
    assert data.train.class_counts() == [6000] * 10 and data.test.class_counts() == [1000] * 10

    # The whole path through the command line, on the downloaded folder, offline.
    common = ["--data-dir", dest, "--offline"]
    code, out, err = run(capsys, "train", "--dataset", "fashion-mnist", "--model", "slim-lenet", "--optimizer", "adam",
                         "--batch-size", 100, "--train-samples", 3000, "--test-samples", 1000, "--epochs", 1,
                         "--out-dir", tmp_path, "--name", "run", *common)
    assert code == 0, err
    assert "data fashion-mnist (10 classes)" in out
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.dataset == "fashion-mnist" and checkpoint.classes == FASHION_MNIST.classes
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "fashion-mnist"

    code, out, err = run(capsys, "evaluate", tmp_path / "run", "--report", tmp_path / "report", *common)
    assert code == 0, err
    assert "trained on fashion-mnist; test set of fashion-mnist" in out
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 65  # one short epoch on 3,000 images
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Ankle boot |" in report and "| T-shirt/top |" in report and "Fashion-MNIST test set" in report
    assert (tmp_path / "report" / "confusion.csv").read_text().splitlines()[0].endswith("Bag,Ankle boot")

    # Its classes are not MNIST's: evaluating it on MNIST is one line naming both lists.
    code, out, err = run(capsys, "evaluate", tmp_path / "run", "--dataset", "mnist", "--data-dir", mnist_dir,
                         "--offline")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "trained on fashion-mnist (10 classes: T-shirt/top" in err and "the class lists differ" in err

    code, out, err = run(capsys, "explain", tmp_path / "run", "--test-index", 0, "--out", tmp_path / "maps.png", *common)
    assert code == 0, err
    assert "Fashion-MNIST test image 0 (label Ankle boot): predicted " in out
    assert out.split("predicted ")[1].split(" (")[0] in FASHION_MNIST.classes

    # predict names the classes: a test image saved as a user's picture (dark on light).
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(255 - data.test.images[index].numpy()).resize((112, 112)).save(images / f"{index}.png")
    code, out, err = run(capsys, "predict", tmp_path / "run", images, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert all(r["label"] in FASHION_MNIST.classes and r["label"] == FASHION_MNIST.classes[r["digit"]] for r in rows)
    assert all(t["label"] in FASHION_MNIST.classes for r in rows for t in r["top3"])
    code, out, err = run(capsys, "predict", tmp_path / "run", images)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["file", "class", "confidence"]
    assert any(name in out for name in FASHION_MNIST.classes)

    # The service and its page get the names and what to draw from the checkpoint.
    from lenet5.serve.predictor import Predictor

    predictor = Predictor(tmp_path / "run")
    info = predictor.info()
    assert info["classes"] == list(FASHION_MNIST.classes) and info["noun"] == "an item of clothing"
    assert info["dataset_title"] == "Fashion-MNIST"
    answer = predictor.answer(data.test.images[0].numpy(), maps=False)
    assert answer["label"] == FASHION_MNIST.classes[answer["digit"]] and len(answer["probabilities"]) == 10


def test_a_wrong_fashion_download_is_refused(fashion_dir, tmp_path):
    with Mirror(fashion_dir) as mirror, pytest.raises(DownloadError) as err:
        load_dataset("fashion-mnist", tmp_path, mirrors=[mirror.url("wrong"), mirror.url("html")], retries=0)
    # Debian's file with a byte changed: neither the published size nor the published content.
    assert "expected 26421880 bytes, got 26421856; nor is its content the published one" in str(err.value)
    assert "served an HTML page" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_mnist_files_given_as_fashion_mnist_are_named(mnist_dir, capsys):
    code, _, err = run(capsys, "data", "--dataset", "fashion-mnist", "--data-dir", mnist_dir, "--offline")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "checksum mismatch" in err and "(it is MNIST's" in err


def test_bad_input_is_one_line(fashion_dir, tmp_path, capsys):
    html = tmp_path / "html"
    html.mkdir()
    for f in FASHION_MNIST.files:
        shutil.copy(fashion_dir / f.name, html / f.name)
    (html / "t10k-labels-idx1-ubyte.gz").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    cases = [
        (["data", "--dataset", "fashion-mnist", "--data-dir", html, "--offline"], 1, "(is an HTML page"),
        (["data", "--dataset", "nope"], 2, "unknown data set 'nope'; choose one of: mnist, fashion-mnist"),
        (["train", "--dataset", "nope"], 2, "unknown data set 'nope'"),
        (["data", "--dataset", f"idx:{tmp_path / 'absent'}"], 1, "is not a folder"),
        (["data", "--dataset", f"idx:{html}"], 1, "files could be the"),
        (["data", "--dataset", "kmnist", "--data-dir", tmp_path / "empty", "--offline"], 1,
         "not found in"),
    ]
    (html / "t10k-images-idx3-ubyte").write_bytes(b"")  # a second candidate for idx: (not for fashion-mnist)
    for argv, status, text in cases:
        code, _, err = run(capsys, *argv)
        assert code == status and text in err and len(err.strip().splitlines()) == 1, (argv, err)


# ---------------------------------------------------------------- idx:FOLDER
def test_an_idx_folder_trains_and_names_its_classes(tmp_path, capsys):
    folder = tmp_path / "shapes"
    small_set(folder, classes=3, suffix="")
    (folder / "classes.txt").write_text("left\nmiddle\nright\n")
    code, out, err = run(capsys, "train", "--dataset", f"idx:{folder}", "--model", "lenet5", "--optimizer", "adam",
                         "--lr", "0.01", "--batch-size", 20, "--epochs", 3, "--out-dir", tmp_path, "--name", "run")
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.classes == ("left", "middle", "right") and checkpoint.model.init_args == {"num_classes": 3}
    data = load_dataset(f"idx:{folder}")
    assert evaluate_checkpoint(tmp_path / "run", data)["test_accuracy"] == 1.0
    with pytest.raises(ConfigError, match="--data-dir is not used with idx:"):
        load_dataset(f"idx:{folder}", tmp_path)
    (folder / "classes.txt").write_text("left\nright\n")
    with pytest.raises(DataError, match="label 2 is not a class 0-1"):
        load_dataset(f"idx:{folder}")


def test_an_idx_folder_of_one_class_or_repeated_names_is_refused(tmp_path):
    """One class trained to "100%" and then its own checkpoints were refused as damaged."""
    folder = tmp_path / "one"
    small_set(folder, classes=1)
    with pytest.raises(DataError, match="every label is 0; a classifier needs at least 2 classes"):
        load_dataset(f"idx:{folder}")
    (folder / "classes.txt").write_text("only\n")
    with pytest.raises(DataError, match="expected 2 to 256 class names .*, found 1"):
        load_dataset(f"idx:{folder}")
    (folder / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match="class name.s. given twice: a$"):
        load_dataset(f"idx:{folder}")


def test_an_idx_folder_without_names_uses_the_label_numbers_and_fits_an_mnist_model(served_run, tmp_path, mnist):
    folder = tmp_path / "digits"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", mnist.train.images[:50].numpy(), 0x803)
    write_idx(folder / "train-labels-idx1-ubyte", mnist.train.labels[:50].numpy().astype(np.uint8), 0x801)
    write_idx(folder / "my-test-images.gz", mnist.test.images[:200].numpy(), 0x803)
    write_idx(folder / "my-test-labels.gz", mnist.test.labels[:200].numpy().astype(np.uint8), 0x801)
    data = load_dataset(f"idx:{folder}")
    assert data.classes == tuple("0123456789") and not data.named
    assert evaluate_checkpoint(served_run, data)["test_accuracy"] > 0.9
    (folder / "my-test-labels.gz").unlink()
    with pytest.raises(DataError, match="no test labels file in .* 't10k-labels' or 'test-labels'"):
        load_dataset(f"idx:{folder}")


# ---------------------------------------------------------------- EMNIST and QMNIST, from small files
def test_emnist_comes_from_its_verified_zip_upright_with_letters_from_a(tmp_path, monkeypatch):
    upright = np.zeros((28, 28), np.uint8)
    upright[2, :] = 255  # a bar across the top row
    source = tmp_path / "published"
    inner = tmp_path / "inner"
    small_set(inner, classes=26, n=(52, 26), prefix="emnist-letters-", test="test", first_label=1)
    for split, n in (("train", 52), ("test", 26)):  # stored as EMNIST stores them: transposed
        images = np.repeat(upright.T[None], n, 0)
        write_idx(inner / f"emnist-letters-{split}-images-idx3-ubyte.gz", images, 0x803)
    source.mkdir()
    with zipfile.ZipFile(source / "gzip.zip", "w") as zf:
        for f in sorted(inner.iterdir()):
            zf.write(f, f"gzip/{f.name}")
    md5 = hashlib.md5((source / "gzip.zip").read_bytes()).hexdigest()
    archive = dataclasses.replace(catalog.EMNIST_ARCHIVE, md5=md5)
    spec = dataclasses.replace(catalog.EMNIST_LETTERS, archive=archive, split_sizes=(52, 26))
    monkeypatch.setitem(catalog.DATASETS, "emnist-letters", spec)

    dest = tmp_path / "emnist"
    with pytest.raises(DataError, match="not found in .* downloads are off"):
        load_dataset("emnist-letters", dest, download=False)
    with Mirror(source) as mirror:
        with pytest.raises(DownloadError, match="checksum mismatch: expected md5"):
            load_dataset("emnist-letters", dest, mirrors=[mirror.url("wrong")], retries=0)
        data = load_dataset("emnist-letters", dest, mirrors=[mirror.url("good")])
        assert mirror.hits["/good/gzip.zip"] == 1  # one download for the four files
    assert (data.train.images[0].numpy() == upright).all()  # turned upright
    assert data.classes[0] == "a" and data.classes[25] == "z"
    assert data.train.labels.min() == 0 and data.train.labels.max() == 25  # published as 1..26
    assert data.train.class_counts(26) == [2] * 26


def test_qmnist_extended_labels_give_their_first_column(tmp_path, monkeypatch):
    folder = tmp_path / "qmnist"
    small_set(folder, classes=10, n=(20, 30), prefix="qmnist-", test="test")
    for split, n in (("train", 20), ("test", 30)):
        labels = read_labels(folder / f"qmnist-{split}-labels-idx1-ubyte.gz")
        extended = np.stack([labels, *(np.full(n, 7 + k) for k in range(7))], 1).astype(np.int32)  # (N, 8)
        (folder / f"qmnist-{split}-labels-idx1-ubyte.gz").unlink()
        write_idx(folder / f"qmnist-{split}-labels-idx2-int.gz", extended, 0xC02)
    assert read_labels(folder / "qmnist-test-labels-idx2-int.gz").tolist() == (np.arange(30) % 10).tolist()
    md5s = {f.name: hashlib.md5((folder / f.name).read_bytes()).hexdigest() for f in catalog.QMNIST.files}
    spec = dataclasses.replace(catalog.QMNIST, split_sizes=(20, 30),
                               files=tuple(dataclasses.replace(f, md5=md5s[f.name]) for f in catalog.QMNIST.files))
    monkeypatch.setitem(catalog.DATASETS, "qmnist", spec)
    data = load_dataset("qmnist", folder, download=False)
    assert len(data.test) == 30 and data.test.labels[:12].tolist() == [*range(10), 0, 1]
    (folder / "qmnist-test-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(20)))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("qmnist", folder, download=False)


# ---------------------------------------------------------------- models and checkpoints
@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_its_class_count_from_the_data(name):
    model = create_model(name, num_classes=26).eval()
    with torch.no_grad():
        assert model.logits(model(torch.rand(2, 1, 28, 28))).shape == (2, 26)


def test_lenet5_1998_keeps_the_digit_bitmaps_for_ten_classes_and_draws_fixed_codes_otherwise():
    ten, other = create_model("lenet5-1998"), create_model("lenet5-1998", num_classes=47)
    from lenet5.models.lenet5_1998 import rbf_prototypes

    assert torch.equal(ten.output.prototypes, rbf_prototypes())
    codes = other.output.prototypes
    assert codes.shape == (47, 84) and set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(codes, create_model("lenet5-1998", num_classes=47).output.prototypes)
    assert len({tuple(row.tolist()) for row in codes}) == 47


def test_a_checkpoint_without_a_data_set_is_mnist(served_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = served_run / "checkpoints" / "best.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lenet5"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("dataset", "classes"):
        meta.pop(key)
    meta["model_args"] = {}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"lenet5": json.dumps(meta)})
    checkpoint = load_checkpoint(old)
    assert checkpoint.dataset == "mnist" and checkpoint.classes == MNIST.classes
    meta["classes"] = ["a", "b"]
    save_file(tensors, str(old), metadata={"lenet5": json.dumps(meta)})
    with pytest.raises(Exception, match="2 class names for a model with 10 outputs"):
        load_checkpoint(old)
