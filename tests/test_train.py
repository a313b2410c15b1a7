"""Short real training runs on slices of MNIST: learning, the run folder, resume."""

from __future__ import annotations

import copy

import csv
import json

import pytest
import torch

from lenet5.checkpoint import load_checkpoint
from lenet5.errors import CheckpointError, ConfigError
from lenet5.evaluate import evaluate_checkpoint
from lenet5.train import Callback, TrainConfig, TrainingError, fit, resume, train_epoch
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
    with pytest.raises(ConfigError, match="--epochs 1 is fewer than the 2 the run has already trained"):
        resume(tmp_path / "run", mnist, epochs=1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta["epoch"] == 2
    with pytest.raises(CheckpointError, match="not a run folder"):
        resume(tmp_path, mnist)
    (tmp_path / "config.json").write_text("{}")  # once a full run at the defaults, without a word
    with pytest.raises(ConfigError, match="config.json: damaged: .* has no model, optimizer, lr, batch_size, epochs"):
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


@pytest.mark.parametrize("name", ["lenet5", "lenet5-modern"])  # the latter has batch norm's running statistics
def test_warm_up_changes_no_state(mnist, name):
    """warm_up runs the step's passes before the clock: weights, gradients, optimizer state, the
    schedule and the random stream stay as they were."""
    from lenet5.train import TrainStep

    config = TrainConfig(model=name, optimizer="adam", batch_size=128, precision="fp32")
    step = TrainStep.build(config, torch.device("cpu"), steps_per_epoch=2)
    train_epoch(step, mnist.train.head(256), 128, torch.arange(256))  # the optimizer now has state
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    optimizer = copy.deepcopy(step.optimizer.state_dict())
    schedule, rng = step.scheduler.state_dict(), torch.get_rng_state()
    step.warm_up(mnist.train.head(256), [128, 37])
    assert all(torch.equal(before[k], v) for k, v in step.model.state_dict().items())
    assert all(p.grad is None for p in step.model.parameters())
    after = step.optimizer.state_dict()
    assert after["param_groups"] == optimizer["param_groups"] and after["state"].keys() == optimizer["state"].keys()
    assert all(torch.equal(v, after["state"][k][name]) for k, state in optimizer["state"].items()
               for name, v in state.items())
    assert step.scheduler.state_dict() == schedule and torch.equal(torch.get_rng_state(), rng)


def test_validation_split_is_disjoint_fixed_and_refuses_everything(mnist):
    """--val-split N holds out N training images: never trained on, the same N for every seed."""
    from lenet5.data import Split
    from lenet5.train.loop import split_validation

    n = 1000
    ids = torch.arange(n)
    tagged = Split(images=ids.view(n, 1, 1).expand(n, 28, 28).to(torch.int64), labels=ids)  # image k holds k
    train, val = split_validation(tagged, 200)
    assert len(train) == 800 and len(val) == 200
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(n))
    assert torch.equal(train.images[:, 0, 0], train.labels)  # images and labels stay paired
    assert torch.equal(split_validation(tagged, 200)[1].labels, val.labels)  # fixed, not per seed
    assert not torch.equal(val.labels, torch.arange(800, 1000))  # drawn, not the tail
    assert split_validation(tagged, 0) == (tagged, None)
    with pytest.raises(ConfigError, match="--val-split 1000 leaves no training images of the 1000"):
        split_validation(tagged, 1000)


def test_validation_split_chooses_the_best_epoch_and_stops_the_run(mnist, tmp_path):
    config = TrainConfig(model="lenet5", optimizer="adam", batch_size=100, epochs=3, train_samples=2000,
                         test_samples=500, val_split=500, threads=1, precision="fp32")
    result = fit(config, mnist, tmp_path / "run")
    history, metrics = result.history, result.metrics
    assert all({"val_loss", "val_acc", "test_acc"} <= set(r) for r in history)
    best = max(history, key=lambda r: r["val_acc"])
    assert metrics["best_selected_by"] == "val_acc" and metrics["best_epoch"] == best["epoch"]
    assert metrics["best_val_acc"] == best["val_acc"] and metrics["best_test_acc"] == best["test_acc"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors").meta["epoch"] == best["epoch"]
    assert result.config == config  # FitResult carries the run's config
    # 1,500 images are trained on: an epoch is 15 steps of 100
    rows = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert rows[0]["val_acc"] and len(rows) == 3
    # --stop-at reads the validation accuracy: with a bar between epoch 1's validation and test
    # accuracy, exactly one of them passes it there, so the two readings stop at different epochs.
    first = history[0]
    assert first["val_acc"] != first["test_acc"]
    bar = (first["val_acc"] + first["test_acc"]) / 2
    by_val = next((r["epoch"] for r in history if r["val_acc"] >= bar), 3)
    stopped = fit(TrainConfig(**{**config.to_dict(), "stop_at": bar}), mnist, tmp_path / "stopped")
    assert len(stopped.history) == by_val
    assert [r["val_acc"] for r in stopped.history] == [r["val_acc"] for r in history[:by_val]]  # the same run


def test_weight_average_is_what_is_evaluated_saved_and_resumed(mnist, tmp_path):
    """--ema: the average is evaluated and checkpointed, the raw weights go on training, and an
    interrupted run resumes both to the bit (lenet5-modern, with label smoothing)."""
    from lenet5.run_folder import RunFolder

    config = TrainConfig(model="lenet5-modern", optimizer="adamw", lr=3e-3, batch_size=100, epochs=2,
                         label_smoothing=0.1, ema=0.9, train_samples=1_000, test_samples=300, threads=2,
                         precision="fp32")
    whole = fit(config, mnist, tmp_path / "whole")
    state = RunFolder(tmp_path / "whole").load_commit()
    saved = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.safetensors").model.state_dict()
    raw, average = state["model"], state["average"]["model"]
    assert state["average"]["updates"] == 20  # one per step
    for key, value in whole.model.state_dict().items():
        assert torch.equal(saved[key], value.cpu()) and torch.equal(average[key], value.cpu()), key
    assert not torch.equal(raw["head.2.weight"], average["head.2.weight"])
    last = tmp_path / "whole" / "checkpoints" / "last.safetensors"
    assert evaluate_checkpoint(last, mnist, test_samples=300)["test_accuracy"] == whole.history[-1]["test_acc"]
    with pytest.raises(KeyboardInterrupt):
        fit(config, mnist, tmp_path / "split", callbacks=[StopAfter(1)])
    resumed = resume(tmp_path / "split", mnist)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    strip = lambda history: [{k: v for k, v in r.items() if "seconds" not in k} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)


def test_label_smoothing_and_ema_are_checked():
    with pytest.raises(ConfigError, match="--label-smoothing needs a model with logit outputs"):
        TrainConfig(model="lenet5-1998", optimizer="sdlm", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"--ema is a decay in \[0, 1\)"):
        TrainConfig(ema=1.0)
    with pytest.raises(ConfigError, match=r"--label-smoothing must be in \[0, 1\)"):
        TrainConfig(label_smoothing=-0.1)


class Steps(Callback):
    """Records each epoch's announced step count."""

    def __init__(self):
        self.announced = []

    def on_epoch_begin(self, epoch, epochs, steps):
        self.announced.append(steps)


def test_epoch_repeats_sweep_the_training_set_several_times_per_epoch(mnist, tmp_path):
    """--epoch-repeats K: an epoch is K sweeps, each its own shuffle; per-epoch schedules count epochs."""
    from lenet5.train.loop import epoch_order, epoch_permutation

    assert torch.equal(epoch_order(7, 2, 50), epoch_permutation(7, 2, 50))  # one sweep: as before
    order = epoch_order(7, 2, 50, 3)
    sweeps = order.view(3, 50)
    assert all(torch.equal(s.sort().values, torch.arange(50)) for s in sweeps)  # each a permutation
    assert not torch.equal(sweeps[0], sweeps[1]) and not torch.equal(epoch_order(7, 3, 50, 3), order)
    with pytest.raises(ConfigError, match="epoch-repeats"):
        TrainConfig(epoch_repeats=0).validate()
    with pytest.raises(ConfigError, match="epoch-repeats"):
        TrainConfig(epoch_repeats=101).validate()
    from lenet5.run_folder import RunFolder

    steps = Steps()
    config = TrainConfig(model="lenet5", optimizer="adam", lr=2e-3, schedule="step", gamma=0.5, batch_size=100,
                         epochs=2, epoch_repeats=3, train_samples=500, test_samples=200, threads=1)
    result = fit(config, mnist, tmp_path / "run", callbacks=[steps])
    assert steps.announced == [15, 15]  # 3 x 500 images in batches of 100, per epoch
    assert [r["lr"] for r in result.history] == [2e-3, 1e-3]  # the step schedule decays once per epoch
    state = RunFolder(tmp_path / "run").load_commit()
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {30}  # 2 epochs x 15 steps
