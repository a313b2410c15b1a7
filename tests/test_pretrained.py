"""The bundled model: what the documented recipe makes, small, and it reads users' digits with no
checkpoint given."""

from __future__ import annotations

import dataclasses

import numpy as np

from lenet5.checkpoint import load_checkpoint
from lenet5.cli import main
from lenet5.data.userlike import make_user_image
from lenet5.predict import predict_files
from lenet5.pretrained import RECIPE, SEED, bundled_checkpoint
from lenet5.train.config import HOST_SETTINGS, RECIPES, TrainConfig


def test_the_shipped_weights_are_the_recipes_run():
    path = bundled_checkpoint()
    assert path.stat().st_size < 1_000_000
    checkpoint = load_checkpoint(path)
    recorded = TrainConfig.from_dict(checkpoint.meta["config"])  # options added since take their defaults
    expected = TrainConfig(**RECIPES[RECIPE].options, seed=SEED)
    differ = {f.name for f in dataclasses.fields(TrainConfig)
              if getattr(recorded, f.name) != getattr(expected, f.name)} - set(HOST_SETTINGS)
    assert not differ, f"the bundled model's config differs from --recipe {RECIPE} in {sorted(differ)}"
    assert checkpoint.meta["epoch"] == recorded.epochs  # the last epoch: nothing chosen on the test set
    assert checkpoint.meta["calibration"]["fitted"]
    assert checkpoint.meta["metrics"]["test_acc"] >= 0.995


def test_the_bundled_model_reads_users_digits(mnist, tmp_path):
    model = load_checkpoint(bundled_checkpoint()).model
    rng = np.random.default_rng(11)
    paths, labels = [], []
    for k in range(40):  # MNIST test digits redrawn as users' images (pens, paper, sizes, formats)
        digit, label = mnist.test.images[k].numpy(), int(mnist.test.labels[k])
        image = make_user_image(digit, label, rng)
        path = tmp_path / f"{k}.{image.extension}"
        path.write_bytes(image.data)
        paths.append(path)
        labels.append(label)
    predictions = predict_files(model, paths)
    correct = sum(p.digit == label for p, label in zip(predictions, labels))
    assert correct >= 39, f"{correct} of 40"


def test_predict_explain_without_a_checkpoint_use_it_and_say_so(mnist, tmp_path, capsys):
    image = make_user_image(mnist.test.images[0].numpy(), 7, np.random.default_rng(0))
    path = tmp_path / f"seven.{image.extension}"
    path.write_bytes(image.data)
    assert main(["predict", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "using the bundled model (robust-lenet" in err and '"digit": 7' in out
    assert main(["predict", str(bundled_checkpoint()), str(path)]) == 0  # an explicit checkpoint wins, silently
    out, err = capsys.readouterr()
    assert "bundled" not in err and "seven" in out
    assert main(["explain", str(path), "--out", str(tmp_path / "maps.png")]) == 0
    assert "predicted 7" in capsys.readouterr().out and (tmp_path / "maps.png").stat().st_size > 5000
    assert main(["predict", str(bundled_checkpoint())]) == 2
    assert "is a checkpoint: give the images to predict after it" in capsys.readouterr().err


def test_the_bundled_model_says_unsure_for_noise_and_sure_for_clean_digits(mnist):
    import torch

    from lenet5.calibration import Calibration, judge, logits_of
    from lenet5.data.nondigits import make_nondigits

    checkpoint = load_checkpoint(bundled_checkpoint())
    calibration = Calibration.from_meta(checkpoint.meta)
    noise = torch.from_numpy(make_nondigits(per_kind=30, seed=1, kinds=("noise",))["noise"])
    assert judge(logits_of(checkpoint.model, noise), calibration).unsure.double().mean() >= 0.9
    digits = judge(logits_of(checkpoint.model, mnist.test.images[:500]), calibration)
    assert digits.unsure.double().mean() <= 0.02
