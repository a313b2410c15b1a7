"""Short real training runs on slices of MNIST: learning, the run folder, resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lenet5.checkpoint import load_checkpoint
from lenet5.errors import CheckpointError
from lenet5.evaluate import evaluate_checkpoint
from lenet5.models import create_model
from lenet5.train import Callback, TrainConfig, TrainingError, fit, resume
from lenet5.train.loop import HISTORY_FIELDS

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_blog_recipe_learns_from_10000_images(mnist, tmp_path):
    """One pass of the default recipe (Keras LeNet, RMSprop, batch 32) over 10,000 images."""
    config = TrainConfig(epochs=1, train_samples=10_000, test_samples=1_000)
    result = fit(config, mnist, tmp_path / "run")
    assert result.history[0]["test_acc"] > 0.90
    assert result.history[0]["train_loss"] < 0.6

    run = tmp_path / "run"
    assert TrainConfig.from_json(run / "config.json") == config
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [tuple(rows[0])] == [HISTORY_FIELDS] and len(rows) == 1
    assert json.loads((run / "history.json").read_text()) == result.history
    assert (run / "curves.png").read_bytes().startswith(PNG)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_acc"] == result.history[0]["test_acc"] and metrics["parameters"] == 1_256_080
    assert json.loads((run / "run.json").read_text())["torch"] == torch.__version__
    for name in ("last", "best"):
        sidecar = json.loads((run / "checkpoints" / f"{name}.json").read_text())
        assert sidecar["model"] == "keras-lenet" and sidecar["epoch"] == 1 and sidecar["config"]["seed"] == 0
    evaluated = evaluate_checkpoint(run, mnist, test_samples=1_000)
    assert evaluated["test_accuracy"] == pytest.approx(result.history[0]["test_acc"])
    assert not list(run.rglob("*.tmp"))


def test_bf16_autocast_learns_and_keeps_fp32_weights_and_stop_at_ends_early(mnist, tmp_path):
    """The fast recipe's settings on a slice: bf16 arithmetic, fp32 weights, stop at a target."""
    config = TrainConfig(model="keras-lenet", optimizer="adam", lr=3e-3, schedule="onecycle", batch_size=128,
                         epochs=4, precision="bf16", stop_at=0.85, train_samples=6_000, test_samples=1_000)
    result = fit(config, mnist, tmp_path / "run")
    assert len(result.history) < 4, "the target is reached in the first epochs, which ends the run"
    assert result.history[-1]["test_acc"] >= 0.85 > max([0.0] + [r["test_acc"] for r in result.history[:-1]])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert load_checkpoint(tmp_path / "run").meta["epoch"] == len(result.history)


class StopAfter(Callback):
    """Simulates Ctrl-C at the end of an epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resume_ends_exactly_where_an_uninterrupted_run_does(mnist, tmp_path):
    # A fixed thread count: bit-identity is promised for a given count (the governor may change it under load).
    config = TrainConfig(model="lenet5", optimizer="adam", batch_size=64, epochs=3, schedule="onecycle",
                         train_samples=2_000, test_samples=500, seed=3, threads=2)
    whole = fit(config, mnist, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(config, mnist, tmp_path / "split", callbacks=[StopAfter(2)])
    resumed = resume(tmp_path / "split", mnist)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    strip = lambda history: [{k: v for k, v in r.items() if "seconds" not in k} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert len(json.loads((tmp_path / "split" / "history.json").read_text())) == 3


def test_resume_extends_a_finished_run_and_rejects_a_non_run(mnist, tmp_path):
    config = TrainConfig(model="lenet5", optimizer="adam", batch_size=100, epochs=1, train_samples=1_000,
                         test_samples=200)
    fit(config, mnist, tmp_path / "run")
    longer = resume(tmp_path / "run", mnist, epochs=2)
    assert [r["epoch"] for r in longer.history] == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta["epoch"] == 2
    with pytest.raises(CheckpointError, match="not a run folder"):
        resume(tmp_path, mnist)


def test_a_diverging_run_stops_with_advice(mnist, tmp_path):
    config = TrainConfig(model="keras-lenet", optimizer="sgd", lr=1e6, epochs=1, train_samples=500, test_samples=100)
    with pytest.raises(TrainingError, match="try a smaller --lr"):
        fit(config, mnist, tmp_path / "run")


def test_fit_leaves_the_process_as_it_found_it(mnist, tmp_path):
    """No process-wide setting changes behind the caller's back: thread count, denormals (issue 11)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)  # as a fresh process has it (an in-process `lenet5 train` turns it on)
    try:
        fit(TrainConfig(model="lenet5", optimizer="adam", batch_size=100, epochs=1, train_samples=500,
                        test_samples=100, threads=2), mnist, tmp_path / "run")
        assert torch.get_num_threads() == 1
        assert (torch.tensor([1e-39]) * 0.5).item() != 0.0, "denormals are still computed, not flushed"
    finally:
        torch.set_num_threads(before)


def test_warm_up_changes_no_state(mnist):
    """warm_up runs the step's passes before the clock; weights and gradients stay as they were."""
    from lenet5.train.loop import warm_up

    torch.manual_seed(0)
    model = create_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    warm_up(model, model, mnist.train.head(256), [128, 37])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
