"""Stress sets and non-digits: reproducible, made from the test digits, labels kept, cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenet5.data import Split
from lenet5.data.nondigits import KINDS, make_nondigits
from lenet5.data.stress import STRESS_SETS, load_stress_sets, make_stress_sets
from lenet5.errors import ConfigError

N = 30


@pytest.fixture(scope="module")
def source(mnist):
    return mnist.test.images[:N].numpy(), mnist.test.labels[:N].numpy()


@pytest.fixture(scope="module")
def sets(source):
    return make_stress_sets(*source, userlike=N)


def test_every_set_keeps_its_digits_labels_and_order(sets, source):
    images, labels = source
    assert list(sets) == [*STRESS_SETS, "userlike"]
    for name, split in sets.items():
        assert split.images.shape == (N, 28, 28) and split.images.dtype == torch.uint8, name
        assert torch.equal(split.labels, torch.from_numpy(labels)), name
        assert not torch.equal(split.images, torch.from_numpy(images)), name


def test_each_stress_digit_is_most_like_a_source_of_its_label(sets, source):
    """Label-preserving, checked by statistics: the source digit a stress digit correlates best with
    has its label (so it is that digit, changed, in the same place of the set)."""
    from lenet5.data.augment import blur

    def standardised(images: np.ndarray) -> np.ndarray:
        # blurred first (std 2 pixels), so that a turned or thickened stroke still overlaps its source
        x = blur(torch.from_numpy(images).float()[:, None], sigma=(2.0, 2.0)).reshape(len(images), -1).double()
        return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-9)).numpy()

    clean = standardised(source[0])
    for name, split in sets.items():
        similarity = standardised(split.images.numpy()) @ clean.T
        same_label = (source[1][similarity.argmax(1)] == source[1]).mean()
        assert same_label >= 0.8, (name, same_label)


def test_sets_are_reproducible_and_each_has_its_own_stream(sets, source):
    again = make_stress_sets(*source, names=("rotated", "photographed"), userlike=0)
    assert list(again) == ["rotated", "photographed"]  # only those asked for
    for name in again:
        assert torch.equal(again[name].images, sets[name].images), name
    other = make_stress_sets(*source, names=("photographed",), seed=1, userlike=0)
    assert not torch.equal(other["photographed"].images, sets["photographed"].images)


def test_what_the_sets_do(sets, source):
    ink = (source[0] > 127).sum()
    assert (sets["thick"].images > 127).sum() > 1.5 * ink
    assert (sets["thin"].images > 127).sum() < 0.8 * ink
    # low resolution: no detail finer than the small grid survives
    detail = lambda x: np.abs(np.diff(x.astype(float), axis=2)).mean()  # noqa: E731
    assert detail(sets["lowres-8"].images.numpy()) < detail(sets["lowres-12"].images.numpy()) < detail(source[0])
    # through predict's preparation: ink fitted into MNIST's 20x20 box
    for name in ("small", "off-centre", "inverted", "photographed", "userlike"):
        for digit in sets[name].images.numpy():
            rows, cols = np.nonzero(digit > 0)
            side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            assert 19 <= side <= 20, name


def test_nondigits_are_made_through_preparation():
    made = make_nondigits(per_kind=8)
    assert list(made) == list(KINDS)
    for kind, images in made.items():
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28) and len(images) >= 4, kind
    assert np.array_equal(make_nondigits(per_kind=8)["letters"], made["letters"])
    alone = make_nondigits(per_kind=8, kinds=("noise",))  # a kind does not depend on the others made
    assert list(alone) == ["noise"] and np.array_equal(alone["noise"], made["noise"])


def test_the_cache_is_made_once_and_read_back(mnist, tmp_path, monkeypatch):
    import lenet5.data.nondigits as nondigits

    monkeypatch.setattr(nondigits, "make_nondigits", lambda seed: make_nondigits(per_kind=4, seed=seed))
    test = Split(mnist.test.images[:12], mnist.test.labels[:12])
    made = []
    first, others, path = load_stress_sets(test, tmp_path, on_make=made.append)
    assert made == [path] and path.parent == tmp_path and set(others) == set(KINDS)
    second, others_again, same = load_stress_sets(test, tmp_path, on_make=made.append)
    assert made == [path] and same == path  # read from the cache, not made again
    for name in first:
        assert torch.equal(first[name].images, second[name].images) and torch.equal(first[name].labels, second[name].labels)
    assert all(torch.equal(others[k], others_again[k]) for k in others)
    path.write_bytes(b"damaged")
    load_stress_sets(test, tmp_path, on_make=made.append)
    assert len(made) == 2  # a damaged cache is made again
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile: not a folder .the stress sets' cache folder.$"):
        load_stress_sets(test, tmp_path / "afile", on_make=made.append)
    assert len(made) == 2  # refused before making anything


def test_evaluate_stress_prints_every_set_beside_the_clean_test_set(mnist, mnist_dir, sets, tmp_path, capsys):
    """The CLI's table, over a small stand-in for the cached sets (making all of them takes minutes)."""
    import io
    import json

    from lenet5.checkpoint import save_checkpoint
    from lenet5.cli import main
    from lenet5.data.stress import _cache_file
    from lenet5.models import create_model

    arrays = {f"{n}/{k}": getattr(s, k).numpy() for n, s in sets.items() for k in ("images", "labels")}
    arrays.update({f"nondigits/{k}": v for k, v in make_nondigits(per_kind=4).items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    _cache_file(mnist.test, tmp_path).write_bytes(buffer.getvalue())
    checkpoint = save_checkpoint(tmp_path / "model", create_model("slim-lenet"))
    common = ["evaluate", str(checkpoint), "--stress", "--stress-dir", str(tmp_path), "--data-dir", str(mnist_dir),
              "--offline"]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "unsure: default rule (no calibration stored)" in out
    assert "set             images  accuracy   unsure  accuracy when sure" in out
    assert "clean           10,000" in out and "photographed        30" in out and "userlike            30" in out
    assert "non-digits: letters" in out
    assert main(common + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["set"] for r in result["digits"]] == ["clean", *sets]
    assert [r["set"] for r in result["nondigits"]] == list(KINDS)
    assert main(common + ["--test-samples", "10"]) == 2
    assert "--stress uses the whole test set" in capsys.readouterr().err
