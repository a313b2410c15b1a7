"""Outlier exposure (`--outliers`): the training pool, the loss, and a run that trains on non-digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lenet5.data import nondigits
from lenet5.data.nondigits import DIGIT_LIKE, LETTERS, POOL_KINDS, make_nondigits, outlier_pool
from lenet5.errors import ConfigError
from lenet5.train import TrainConfig, fit, resume
from lenet5.train.outliers import Outliers, load_outliers, uniform_loss

DIGITS = tuple(str(d) for d in range(10))


def test_the_uniform_loss_is_lowest_for_an_answer_that_favours_no_class():
    flat = torch.zeros(4, 10)
    assert uniform_loss(flat).item() == pytest.approx(math.log(10))
    peaked = torch.tensor([[8.0] + [0.0] * 9])
    assert uniform_loss(peaked).item() > uniform_loss(flat).item() + 0.5
    logits = torch.zeros(3, 10, requires_grad=True)
    uniform_loss(logits).backward()
    assert torch.allclose(logits.grad, torch.zeros(3, 10), atol=1e-7)  # the minimum


def test_draws_come_from_the_pool_in_the_share_asked_and_follow_the_seed():
    pool = torch.arange(50, dtype=torch.uint8)[:, None, None].expand(50, 28, 28).contiguous()
    outliers = Outliers(pool, share=0.25, weight=0.5)
    assert [outliers.count(n) for n in (128, 100, 3, 1)] == [32, 25, 1, 1]
    torch.manual_seed(3)
    a = outliers.draw(128)
    torch.manual_seed(3)
    b = outliers.draw(128)
    assert a.shape == (32, 28, 28) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert set(a[:, 0, 0].tolist()) <= set(range(50))


def test_the_pool_leaves_out_letters_written_like_digits_and_is_cached(tmp_path, monkeypatch):
    drawn: list[str] = []
    real_letter = nondigits.letter
    monkeypatch.setattr(nondigits, "letter", lambda rng, char: drawn.append(char) or real_letter(rng, char))
    made: list = []
    pool = outlier_pool(per_kind=40, seed=5, cache_dir=tmp_path, on_make=made.append)
    assert drawn and not set(drawn) & set(DIGIT_LIKE) and set(drawn) < set(LETTERS)
    assert "scribbles" not in POOL_KINDS  # the kind kept to measure what the lesson carries over to
    assert pool.dtype == np.uint8 and pool.shape[1:] == (28, 28) and 100 <= len(pool) <= 40 * len(POOL_KINDS)
    assert len(made) == 1 and made[0].is_file()
    assert np.array_equal(outlier_pool(per_kind=40, seed=5, cache_dir=tmp_path, on_make=made.append), pool)
    assert len(made) == 1  # the second call read the cache
    made[0].write_bytes(b"damaged")
    assert np.array_equal(outlier_pool(per_kind=40, seed=5, cache_dir=tmp_path, on_make=made.append), pool)
    assert len(made) == 2  # made again, the same
    # the pool's seed is none of the measured ones: its letters differ from the reported set's
    assert not np.array_equal(pool[:10], make_nondigits(per_kind=10, seed=1)["letters"][:10])


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"--outliers is a share of the batch in \[0, 1\]"):
        TrainConfig(outliers=1.5)
    with pytest.raises(ConfigError, match="--outliers needs a model with logit outputs"):
        TrainConfig(model="lenet5-1998", optimizer="sdlm", outliers=0.25)
    with pytest.raises(ConfigError, match="--outlier-weight must not be negative"):
        TrainConfig(outliers=0.25, outlier_weight=-1)
    with pytest.raises(ConfigError, match="needs a data set of the digits 0-9"):
        load_outliers(0.25, 0.5, ("T-shirt/top", "Trouser"), torch.device("cpu"))
    assert load_outliers(0.0, 0.5, ("a",), torch.device("cpu")) is None


@pytest.fixture
def small_pool(tmp_path, monkeypatch):
    """A pool of 45 images, so that the tests do not make the full one."""
    pool = nondigits.make_outlier_pool(per_kind=15, seed=5)
    monkeypatch.setattr(nondigits, "outlier_pool", lambda **kw: pool)
    return pool


def test_a_run_with_outliers_answers_them_less_confidently_and_resumes_bit_for_bit(mnist, small_pool, tmp_path):
    options = dict(model="slim-lenet", optimizer="adam", lr=3e-3, batch_size=100, epochs=2, train_samples=2000,
                   test_samples=300, augment="robust", threads=1)
    plain = fit(TrainConfig(**options), mnist, tmp_path / "plain")
    exposed = fit(TrainConfig(**options, outliers=0.25), mnist, tmp_path / "exposed")
    from lenet5.data.transforms import to_model_input

    others = to_model_input(torch.from_numpy(small_pool))

    def confidence(model):
        model.eval()
        with torch.no_grad():
            return model.probabilities(others).max(1).values.mean().item()

    assert confidence(exposed.model) < confidence(plain.model) - 0.08
    # measured: 0.51 -> 0.39 mean confidence on the pool, 81.3% -> 82.3% on 300 test digits
    assert exposed.history[-1]["test_acc"] > plain.history[-1]["test_acc"] - 0.03  # and it still reads digits
    fit(TrainConfig(**{**options, "epochs": 1}, outliers=0.25), mnist, tmp_path / "stopped")
    resumed = resume(tmp_path / "stopped", mnist, epochs=2)
    for a, b in zip(exposed.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)



def test_the_digits_and_their_outliers_share_one_forward_pass(mnist, small_pool):
    """The outliers' outputs are the rows after the digits' of one call in training mode."""
    from lenet5.data.transforms import to_model_input
    from lenet5.train.step import TrainStep

    config = TrainConfig(model="robust-lenet", optimizer="adam", outliers=0.25, precision="fp32")
    step = TrainStep.build(config, torch.device("cpu"), 10)
    x = torch.cat([to_model_input(mnist.train.images[:64]), to_model_input(torch.from_numpy(small_pool[:16]))])
    step.model.train()
    outputs, others = step.outputs(x, 64)
    whole = step.model(x)
    torch.testing.assert_close(outputs, whole[:64])
    torch.testing.assert_close(others, whole[64:])
    assert step.outputs(x[:64], 64)[1] is None
