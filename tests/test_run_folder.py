"""Run folders: kill -9 at every write of an epoch, then resume: the same weights as an
uninterrupted run, and every file in the folder agreeing with every other.

Each crash runs training in a subprocess with the test hook LENET5_TEST_CRASH_AT=FILE:EPOCH
(lenet5.run_folder), which SIGKILLs it in the middle of writing FILE for EPOCH, leaving a
half-written temporary file behind as a real kill would.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lenet5
from lenet5.checkpoint import load_checkpoint, save_checkpoint
from lenet5.errors import CheckpointError, ConfigError
from lenet5.run_folder import TEST_CRASH_ENV, RunFolder, best_record
from lenet5.train import TrainConfig, fit, resume

OPTIONS = dict(model="lenet5", optimizer="adam", lr=3e-3, batch_size=100, epochs=3, train_samples=1000,
               test_samples=500, seed=3, threads=1, device="cpu")
# Every file an epoch writes, in the order it writes them.
EPOCH_FILES = ["last.state.pt", "last.safetensors", "last.json", "best.safetensors", "best.json",
               "history.json", "history.csv", "curves.png", "metrics.json"]
CRASH_POINTS = [f"{name}:2" for name in EPOCH_FILES] + ["last.state.pt:1", "last.safetensors:3", "best.json:3",
                                                         "metrics.json:3"]
# One fresh interpreter loads everything once, then forks a child per crash point that trains
# until the hook kills it (the parent computes nothing, so forking is safe). One start-up of
# torch instead of one per point keeps the whole file at a few seconds of training.
SCRIPT = """
import json, os, sys
import torch._dynamo  # imported by the fused optimizers: once here, not in every child
from lenet5.data import load_mnist
from lenet5.plots import plot_curves
from lenet5.train import TrainConfig, fit
plot_curves([{"epoch": 1, "train_loss": 1, "test_loss": 1, "train_acc": 0, "test_acc": 0}])  # fonts, once
options, mnist = json.loads(sys.argv[1]), load_mnist(sys.argv[2], download=False)
for point, run_dir in json.loads(sys.argv[3]):
    pid = os.fork()
    if pid == 0:
        os.environ["%s"] = point
        fit(TrainConfig(**options), mnist, run_dir)
        os._exit(0)
    print(point, os.waitpid(pid, 0)[1], flush=True)
""" % TEST_CRASH_ENV


@pytest.fixture(scope="module")
def crashed(mnist_dir, tmp_path_factory) -> dict[str, Path]:
    """A run folder killed at each crash point (and one more killed in epoch 1, to be started anew)."""
    root = tmp_path_factory.mktemp("crashed")
    runs = {point: root / point.replace(":", "-") / "run" for point in CRASH_POINTS}
    runs["new"] = root / "new" / "run"
    jobs = [(point.replace("new", "last.state.pt:1"), str(run)) for point, run in runs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(lenet5.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(OPTIONS), str(mnist_dir), json.dumps(jobs)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses = dict(line.split() for line in done.stdout.splitlines())
    assert all(os.WIFSIGNALED(int(s)) and os.WTERMSIG(int(s)) == signal.SIGKILL for s in statuses.values()), statuses
    return runs


@pytest.fixture(scope="module")
def reference(mnist, tmp_path_factory):
    """The uninterrupted run; its test accuracy rises every epoch, so every epoch writes `best`."""
    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    try:
        result = fit(TrainConfig(**OPTIONS), mnist, run_dir)
    finally:
        torch.set_num_threads(threads)
    accuracies = [r["test_acc"] for r in result.history]
    assert accuracies == sorted(set(accuracies)), "the crash points below assume a new best every epoch"
    return run_dir


def strip(history):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in history]


def assert_same_weights(a: Path, b: Path) -> None:
    mine, theirs = load_file(a), load_file(b)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def assert_consistent(run_dir: Path, reference: Path) -> None:
    """Every file agrees with the commit record, and the run with the uninterrupted one."""
    folder = RunFolder(run_dir)
    assert folder.stale_files() == []
    state = folder.load_commit()
    history = state["history"]
    assert state["epoch"] == len(history) == OPTIONS["epochs"]
    assert json.loads(folder.history_json.read_text()) == history
    rows = list(csv.DictReader(folder.history_csv.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and float(rows[-1]["test_acc"]) == history[-1]["test_acc"]
    metrics = json.loads(folder.metrics.read_text())
    best = best_record(history)
    assert (metrics["epochs"], metrics["test_acc"], metrics["best_epoch"], metrics["best_test_acc"]) == (
        3, history[-1]["test_acc"], best["epoch"], best["test_acc"])
    assert metrics["seconds"] == pytest.approx(sum(r["seconds"] for r in history))
    for name, record in (("last", history[-1]), ("best", best)):
        checkpoint = load_checkpoint(folder.checkpoints / f"{name}.safetensors")
        assert checkpoint.meta["epoch"] == record["epoch"]
        assert checkpoint.meta["metrics"]["test_acc"] == record["test_acc"]
        assert json.loads((folder.checkpoints / f"{name}.json").read_text()) == checkpoint.meta
    for key, value in load_file(folder.last_weights).items():
        assert torch.equal(value, state["model"][key]), key
    # ... and the run is the uninterrupted one, bit for bit.
    assert strip(history) == strip(json.loads((reference / "history.json").read_text()))
    assert_same_weights(folder.last_weights, reference / "checkpoints" / "last.safetensors")
    assert_same_weights(folder.best_weights, reference / "checkpoints" / "best.safetensors")


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_run_killed_at_any_write_resumes_to_the_uninterrupted_result(mnist, crashed, reference, point):
    run_dir = crashed[point]
    folder = RunFolder(run_dir)
    assert folder.stale_files(), "the kill left a half-written temporary file"
    name, epoch = point.split(":")
    committed = int(epoch) - (name == "last.state.pt")
    if committed:
        assert folder.load_commit()["epoch"] == committed
    else:  # killed during epoch 1: nothing to keep, so the name may be used again
        assert folder.load_commit() is None and not folder.holds_run()
        folder.claim()
    threads = torch.get_num_threads()
    try:
        result = resume(run_dir, mnist)
    finally:
        torch.set_num_threads(threads)
    assert result.metrics == json.loads(folder.metrics.read_text())
    assert_consistent(run_dir, reference)


def test_a_new_run_may_take_the_name_of_one_killed_in_its_first_epoch(mnist, crashed, reference):
    run_dir = crashed["new"]
    assert RunFolder(run_dir).is_run_folder() and RunFolder(run_dir).stale_files()
    threads = torch.get_num_threads()
    try:
        fit(TrainConfig(**OPTIONS), mnist, run_dir)
    finally:
        torch.set_num_threads(threads)
    assert_consistent(run_dir, reference)
    assert sorted(p.name for p in run_dir.glob("run*.json")) == ["run.json"]


def test_the_overwrite_guard_is_in_the_library(mnist, reference, tmp_path):
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        fit(TrainConfig(**OPTIONS), mnist, reference)
    with pytest.raises(CheckpointError, match="not a run folder"):
        resume(tmp_path, mnist)


def test_files_get_the_users_umask_mode(reference):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in reference.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_damaged_commit_records_are_named(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    folder = RunFolder(run_dir)
    # A commit record from before it held the weights: they come from last.safetensors of the same epoch.
    state = torch.load(folder.state, weights_only=True)
    weights = state.pop("model")
    torch.save(state, folder.state)
    for key, value in folder.load_commit()["model"].items():
        assert torch.equal(value, weights[key]), key
    folder.state.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"last.state.pt: unreadable training state"):
        folder.load_commit()
    folder.state.unlink()
    with pytest.raises(CheckpointError, match=r"last.state.pt: missing, so the run cannot be resumed"):
        folder.load_commit()
    assert folder.holds_run()
    with pytest.raises(ConfigError, match="already holds a run"):
        folder.claim()


def test_resume_keeps_an_older_best_and_names_one_changed_by_hand(mnist, reference, tmp_path):
    """When the best epoch is not the last, resume checks that best.safetensors is that epoch's."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    folder = RunFolder(run_dir)
    state = torch.load(folder.state, weights_only=True)
    state["history"][2]["test_acc"] = 0.0  # epoch 2 becomes the best; its weights are not in the record
    torch.save(state, folder.state)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(CheckpointError, match=r"best.safetensors: is from epoch 3, but the history's best is "
                                                  r"epoch 2 \(the folder was changed outside lenet5\)"):
            resume(run_dir, mnist)
        best = load_checkpoint(folder.best_weights)
        save_checkpoint(folder.checkpoints / "best", best.model, config=best.meta["config"], epoch=2,
                        metrics=best.meta["metrics"])
        result = resume(run_dir, mnist)
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["best_epoch"] == 2 == json.loads(folder.metrics.read_text())["best_epoch"]
    assert load_checkpoint(folder.best_weights).meta["epoch"] == 2


def test_a_run_that_reached_stop_at_stays_finished_on_resume(mnist, reference, tmp_path):
    """Killed after the epoch that reached --stop-at was committed, a run resumes to nothing more."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    history = json.loads((run_dir / "history.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "epochs": 5, "stop_at": history[-1]["test_acc"]}))
    threads = torch.get_num_threads()
    try:
        result = resume(run_dir, mnist)
    finally:
        torch.set_num_threads(threads)
    assert len(result.history) == 3 and result.metrics["epochs"] == 3


def test_one_training_at_a_time_in_a_folder(mnist, tmp_path):
    """Two trainings started on one folder once both ran, the config of one beside the history of the
    other, and the resume that followed crashed. The second is refused; the lock goes with its holder."""
    import subprocess
    import sys

    from lenet5.errors import ConfigError
    from lenet5.run_folder import RunFolder
    from lenet5.train import TrainConfig, fit, resume

    config = TrainConfig(model="lenet5", optimizer="adam", batch_size=100, epochs=1, train_samples=500,
                         test_samples=100)
    folder = RunFolder(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lenet5.run_folder import RunFolder\n"
        f"with RunFolder({str(folder.path)!r}).lock():\n"
        "    print('held', flush=True); sys.stdin.readline()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"run is in use by another training \(process {holder.pid}\)"):
            fit(config, mnist, folder.path)
        assert not folder.is_run_folder()  # nothing of this one was written
    finally:
        holder.communicate("\n", timeout=30)  # the holder ends, and its lock with it
    fit(config, mnist, folder.path)
    assert len(resume(folder.path, mnist, epochs=2).history) == 2


def test_sigterm_stops_a_training_in_one_line_and_it_resumes(mnist_dir, tmp_path):
    """SIGTERM (torchrun stopping the other processes of a failed run, a scheduler, `kill`) once ended
    a training silently; it now stops as Ctrl-C does, names the --resume command, and exits 143."""
    import time

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "lenet5", "train", "--model", "lenet5", "--optimizer", "adam", "--batch-size", "100",
               "--train-samples", "1000", "--test-samples", "200", "--threads", "1", "--device", "cpu",
               "--data-dir", str(mnist_dir), "--offline", "--out-dir", str(tmp_path), "--name", "run", "--quiet"]
    training = subprocess.Popen([*command, "--epochs", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "history.json").is_file() and time.monotonic() < deadline and training.poll() is None:
            time.sleep(0.05)
        assert (run_dir / "history.json").is_file(), "the first epoch should have been committed by now"
        training.send_signal(signal.SIGTERM)
        _, err = training.communicate(timeout=60)
    finally:
        training.kill()
    assert training.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"lenet5 train: stopped by SIGTERM (continue with `lenet5 train --resume {run_dir}`)"
    assert "Traceback" not in err
    committed = len(json.loads((run_dir / "history.json").read_text()))
    resumed = subprocess.run([sys.executable, "-m", "lenet5", "train", "--resume", str(run_dir), "--epochs",
                              str(committed + 1), "--data-dir", str(mnist_dir), "--offline", "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((run_dir / "history.json").read_text())) == committed + 1
