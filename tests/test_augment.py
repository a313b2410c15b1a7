"""Training-time augmentation: batched, seeded, in range, and resumable inside a run."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from lenet5.data import augment
from lenet5.data.augment import OPS, augmentation, dilate, downsample_upsample, erode, robust
from lenet5.data.transforms import to_model_input
from lenet5.errors import ConfigError
from lenet5.train import TrainConfig, fit, resume

ALL = {**OPS, "robust": robust}


@pytest.fixture(scope="module")
def digits(mnist):
    return to_model_input(mnist.train.images[:64])


@pytest.mark.parametrize("name", list(ALL))
def test_ops_keep_shape_and_range_and_are_seeded(name, digits):
    op = ALL[name]
    first = op(digits, torch.Generator().manual_seed(3))
    again = op(digits, torch.Generator().manual_seed(3))
    other = op(digits, torch.Generator().manual_seed(4))
    assert first.shape == digits.shape and first.dtype == digits.dtype
    assert torch.isfinite(first).all() and first.min() >= -1e-6 and first.max() <= 1 + 1e-5
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, digits)
    # each image gets its own parameters: two copies of one digit come out different
    pair = op(digits[:1].expand(2, -1, -1, -1).contiguous(), torch.Generator().manual_seed(5))
    assert not torch.equal(pair[0], pair[1])


@pytest.mark.parametrize("name", list(ALL))
def test_ops_take_the_global_generator_when_given_none(name, digits):
    torch.manual_seed(11)
    first = ALL[name](digits)
    torch.manual_seed(11)
    assert torch.equal(first, ALL[name](digits))


def test_no_python_loop_over_the_images():
    """The ops' source has no loop over the batch: loops (if any) run over a fixed list of ops or sizes."""
    tree = ast.parse(inspect.getsource(augment))
    loops = [node for node in ast.walk(tree) if isinstance(node, (ast.For, ast.comprehension))]
    iterated = sorted(ast.unparse(loop.iter) for loop in loops)
    assert iterated == ["(h, w)", "(stroke_width, low_resolution, blur, contrast, noise)", "name.split('+')",
                        "name.split('+')", "ops", "sizes", "sizes"]


def test_a_batch_costs_far_less_than_its_images_one_by_one(digits):
    import time

    batch = digits[:1].expand(512, -1, -1, -1).contiguous()
    one = batch[:1]

    def seconds(x, repeat):
        robust(x, torch.Generator().manual_seed(0))  # warm
        started = time.perf_counter()
        for _ in range(repeat):
            robust(x, torch.Generator().manual_seed(0))
        return (time.perf_counter() - started) / repeat

    assert seconds(batch, 3) < 0.25 * 512 * seconds(one, 10)


def test_rotate_turns_each_image_within_its_range_and_does_nothing_else():
    """A horizontal bar through the centre comes out as a bar through the centre at an angle of at most
    10 degrees, each image at its own angle, with its ink's amount kept (no shift, scale or shear)."""
    bar = torch.zeros(256, 1, 28, 28)
    bar[:, :, 13:15, 4:24] = 1.0
    turned = augment.rotate(bar, torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ink = turned[:, 0]
    mass = ink.sum((1, 2))
    cy, cx = (ink * ys).sum((1, 2)) / mass, (ink * xs).sum((1, 2)) / mass
    assert torch.allclose(cy, torch.full_like(cy, 13.5), atol=0.05) and torch.allclose(cx, torch.full_like(cx, 13.5), atol=0.05)
    assert torch.allclose(mass, bar[:, 0].sum((1, 2)), rtol=0.03)
    # the bar's direction from its second moments: the angle of its main axis
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    cov_xy, cov_xx, cov_yy = ((ink * dx * dy).sum((1, 2)), (ink * dx * dx).sum((1, 2)), (ink * dy * dy).sum((1, 2)))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * cov_xy, cov_xx - cov_yy))
    assert angle.abs().max() <= 10.2 and angle.abs().max() > 8 and angle.std() > 4  # spread over the range


def test_dilation_and_erosion_change_stroke_width(digits):
    ink = (digits > 0.5).sum()
    assert (dilate(digits) > 0.5).sum() > 1.5 * ink
    assert (erode(digits) > 0.5).sum() < 0.7 * ink
    assert torch.all(erode(digits) <= digits + 1e-6) and torch.all(dilate(digits) >= digits - 1e-6)


def test_low_resolution_keeps_only_coarse_detail(digits):
    """Down to 8x8 and back: the result is exactly a bilinear enlargement of an 8x8 average."""
    x = downsample_upsample(digits, 8)
    small = torch.nn.functional.adaptive_avg_pool2d(digits, 8)
    expected = torch.nn.functional.interpolate(small, size=28, mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    assert x.sum() == pytest.approx(digits.sum().item(), rel=0.02)  # ink is averaged, not lost


def test_names_and_composition():
    assert augmentation("none") is None
    assert augmentation("robust") is robust
    assert augmentation("warp+noise") is not None and augmentation("none", distort=True) is not None
    with pytest.raises(ConfigError, match="unknown augmentation 'warp\\+fog'"):
        augmentation("warp+fog")
    with pytest.raises(ConfigError, match="unknown augmentation"):
        TrainConfig(augment="fog")


def test_a_resumed_run_draws_the_same_augmentations(mnist, tmp_path):
    """Stopped after epoch 1 and resumed, an augmented run ends with the same weights, bit for bit."""
    options = dict(model="slim-lenet", optimizer="adam", batch_size=100, epochs=2, train_samples=1000,
                   test_samples=200, augment="robust", threads=1)
    straight = fit(TrainConfig(**options), mnist, tmp_path / "straight")
    fit(TrainConfig(**{**options, "epochs": 1}), mnist, tmp_path / "stopped")
    resumed = resume(tmp_path / "stopped", mnist, epochs=2)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert straight.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]
