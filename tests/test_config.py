"""TrainConfig round-trips, validation, and the schedules' shapes."""

from __future__ import annotations

import json

import pytest

from lenet5.errors import ConfigError
from lenet5.train import TrainConfig
from lenet5.train.optim import lr_multiplier


def test_defaults_are_the_blog_posts_run():
    config = TrainConfig()
    assert (config.model, config.optimizer, config.lr, config.batch_size, config.epochs) == (
        "keras-lenet", "rmsprop", 1e-3, 32, 3)
    assert (config.rho, config.eps) == (0.9, 1e-7)  # Keras' RMSprop, not PyTorch's (0.99, 1e-8)


def test_round_trips_through_json(tmp_path):
    config = TrainConfig(model="lenet5", optimizer="sgd", nesterov=True, schedule="onecycle", seed=7)
    assert config.lr == 0.01  # the optimizer's default rate is resolved and recorded
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_json(path) == config


@pytest.mark.parametrize("options, message", [
    ({"epochs": 0}, "--epochs must be positive"),
    ({"batch_size": -4}, "--batch-size must be positive"),
    ({"lr": -0.1}, "--lr must be positive"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
    ({"schedule": "linear"}, "unknown schedule"),
    ({"train_samples": -1}, "--train-samples must not be negative"),
    ({"rho": 1.0}, "--rho must be in"),
    ({"nesterov": True, "optimizer": "adam"}, "--nesterov needs --optimizer sgd"),
    ({"device": "tpu"}, "--device must be"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"stop_at": 99.0}, "--stop-at is an accuracy between 0 and 1"),
    ({"threads": -2}, "--threads must not be negative"),
])
def test_impossible_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


@pytest.mark.parametrize("values, message", [
    ({"device": 5}, "--device must be a string, got 5"),
    ({"batch_size": 32.5}, "--batch-size must be an integer, got 32.5"),
    ({"epochs": True}, "--epochs must be an integer, got True"),
    ({"distort": "yes"}, "--distort must be true or false, got 'yes'"),
    ({"lr": "0.1"}, "--lr must be a number, got '0.1'"),
    ({"model": None}, "--model must be a string, got None"),
    ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
    ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
    ({"momentum": float("-inf")}, "--momentum must be a finite number"),
    ({"stop_at": float("nan")}, "--stop-at must be a finite number"),
    ({"seed": 2**40}, "--seed must be below 2\\*\\*32"),
    ({"epochs": 10**30}, "--epochs is out of range"),
])
def test_every_field_is_type_checked_and_floats_are_finite(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_whole_numbers_are_accepted_for_floats(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lr": 1, "momentum": 0, "optimizer": "sgd"}))
    config = TrainConfig.from_json(path)
    assert config.lr == 1.0 and isinstance(config.lr, float) and isinstance(config.momentum, float)


def test_unknown_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown training option.*: colour"):
        TrainConfig.from_dict({"colour": "red"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON config"):
        TrainConfig.from_json(bad)


def test_schedule_shapes():
    steps = 100
    onecycle = lr_multiplier(TrainConfig(schedule="onecycle", epochs=4, warmup=0.25), steps)
    assert onecycle(0) == pytest.approx(1 / 25)
    assert onecycle(100) == pytest.approx(1.0)  # peak at the end of the warm-up
    assert onecycle(399) < 1e-3
    values = [onecycle(s) for s in range(400)]
    assert max(values) == pytest.approx(1.0)
    step = lr_multiplier(TrainConfig(schedule="step", epochs=4, step_epochs=2, gamma=0.5), steps)
    assert [step(s) for s in (0, 199, 200, 399)] == [1.0, 1.0, 0.5, 0.5]
    cosine = lr_multiplier(TrainConfig(schedule="cosine", epochs=2), steps)
    assert cosine(0) == 1.0 and cosine(100) == pytest.approx(0.5) and cosine(200) == pytest.approx(0.0)


def test_every_recipe_is_a_valid_config():
    from lenet5.train.config import RECIPES

    assert RECIPES["keras"].options == {}  # the blog post's run is the defaults
    for name, recipe in RECIPES.items():
        for hardware in (None, *recipe.by_class):
            options = recipe.options_for(hardware) if hardware else recipe.options
            config = TrainConfig(**options)
            assert all(getattr(config, k) == v for k, v in options.items()), (name, hardware)
            # bf16 is chosen per machine (auto), never by a recipe: emulated, it is ~300x slower. A recipe may
            # name fp32 (the avx512-bf16 class's fast recipe, measured so), which runs at full speed everywhere.
            assert options.get("precision", "fp32") == "fp32", (name, hardware)


def test_thread_counts_are_bounded_by_the_cores_this_process_may_use(monkeypatch, capsys, mnist_dir, tmp_path):
    """--threads 100000 ended in a segmentation fault, 5000 in a hang: at most 4 per usable core. The
    bound is the machine's, so a run's config.json from a bigger machine still loads (and resumes
    with --threads)."""
    from lenet5 import hardware
    from lenet5.cli import main

    monkeypatch.setattr(hardware, "usable_cores", lambda: 3)
    assert hardware.thread_limit_problem(12) is None and hardware.thread_limit_problem(0) is None
    assert hardware.thread_limit_problem(13) == "--threads must be at most 12 (4 per core of the 3 this process may use), got 13"
    assert TrainConfig(threads=64).threads == 64
    data = ["--data-dir", str(mnist_dir), "--offline"]
    for command in (["train", "--threads", "100000", "--out-dir", str(tmp_path), *data],
                    ["reproduce", "lecun1998", "--threads", "100000", *data], ["serve", "--threads", "100000"]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (f"lenet5 {command[0]}: error: --threads must be at "
                                                                    f"most 12 (4 per core of the 3 this process may use), "
                                                                    f"got 100000")
