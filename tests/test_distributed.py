"""torchrun + DDP on CPU (Gloo): two real processes must train the same network as one process.

Each test launches `python -m torch.distributed.run` (torchrun) on loopback, as a user would;
the runs are a few steps on a few hundred images, so the whole file takes ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lenet5.checkpoint import load_checkpoint
from lenet5.data import load_mnist
from lenet5.train import TrainConfig, fit

# 630 images in global batches of 63: every batch splits 32 + 31 between two ranks, so the test
# also checks that uneven shares are weighted right (a plain mean of rank means would not be).
OPTIONS = dict(model="lenet5", optimizer="sgd", lr=0.05, momentum=0.9, batch_size=63, train_samples=630,
               test_samples=400, device="cpu", seed=3, precision="fp32")  # fp32: bf16 rounds per share


def cli_options(**overrides) -> list[str]:
    args = []
    for key, value in {**OPTIONS, **overrides}.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def torchrun(mnist_dir: Path, cwd: Path, *argv: str, nproc: int = 2, script: Path | None = None,
             launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "LENET5_DATA": str(mnist_dir), "LENET5_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    program = [str(script)] if script else ["-m", "lenet5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *launcher, *program, "train", *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / "last.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    moved = max((a[k] - initial[k]).abs().max().item() for k in a)
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-2, "training should have moved the weights"
    assert differ < 1e-5 * max(1.0, moved), f"weights differ by {differ} (training moved them by {moved})"


@pytest.fixture(scope="module")
def single(mnist_dir, tmp_path_factory):
    """The reference: one process, the same global batch, two epochs."""
    mnist = load_mnist(mnist_dir, download=False)
    run_dir = tmp_path_factory.mktemp("single") / "run"
    torch.set_num_threads(1)
    try:
        result = fit(TrainConfig(**OPTIONS, epochs=2), mnist, run_dir)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(OPTIONS["seed"])
    from lenet5.models import create_model

    initial = {k: v.detach().clone() for k, v in create_model("lenet5").state_dict().items()}
    return result, weights(run_dir), initial


def test_two_gloo_processes_train_the_same_weights_as_one(single, mnist_dir, tmp_path):
    result, reference, initial = single
    done = torchrun(mnist_dir, tmp_path, *cli_options(epochs=2), "--out-dir", "runs", "--name", "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match" not in done.stderr, "every gradient has its weight's layout (DDP buckets)"
    run_dir = tmp_path / "runs" / "ddp"
    assert_same_weights(weights(run_dir), reference, initial)

    # Metrics are all-reduced over both ranks: they equal the single process's figures.
    history = json.loads((run_dir / "history.json").read_text())
    for mine, theirs in zip(history, result.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["train_acc"] == pytest.approx(theirs["train_acc"])
        assert mine["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-5)
        assert mine["test_acc"] == pytest.approx(theirs["test_acc"])

    # Rank 0 alone prints and writes, and the run records how it was made.
    assert done.stdout.count("test accuracy") == 1 and done.stdout.count("epoch  1  train loss") == 1
    assert "| batch 63 | 2 epochs | seed 3 | fp32 | 2 processes (gloo), global batch" in done.stdout
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["world_size"] == 2 and run_info["backend"] == "gloo"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    assert load_checkpoint(run_dir).meta["epoch"] == 2


def test_a_torchrun_run_resumes_where_it_stopped(single, mnist_dir, tmp_path):
    _, reference, initial = single
    # Same folder name for both processes without --name: rank 0's timestamped name is broadcast.
    first = torchrun(mnist_dir, tmp_path, *cli_options(epochs=1), "--out-dir", "runs")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    again = torchrun(mnist_dir, tmp_path, "--resume", str(run_dir), "--epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1" in again.stdout
    assert [r["epoch"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 2]
    assert_same_weights(weights(run_dir), reference, initial)


def test_a_global_batch_that_leaves_a_rank_empty_is_refused(mnist_dir, tmp_path):
    # 631 images in batches of 63: the last batch holds 1 image, nothing for the second rank.
    done = torchrun(mnist_dir, tmp_path, *cli_options(epochs=1, train_samples=631), "--out-dir", "runs")
    assert done.returncode != 0
    assert "lenet5 train: error: --batch-size 63 is the global batch" in done.stderr


# Rank 1 dies (as if killed) when its second epoch begins; rank 0 is then alone in a collective.
DYING_RANK = """
import os, sys
import lenet5.train.loop as loop
from lenet5.cli import main

if os.environ["RANK"] == "1":
    epoch_of = loop._train_and_evaluate
    def dying(step, splits, config, epoch, callbacks):
        if epoch == 1:  # counted from 0: the second epoch
            os._exit(7)
        return epoch_of(step, splits, config, epoch, callbacks)
    loop._train_and_evaluate = dying
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_dies_leaves_one_line_and_a_run_that_resumes(single, mnist_dir, tmp_path):
    _, reference, initial = single
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    # torchrun looks at its workers every 5 s here, so rank 0 usually reports the lost peer itself;
    # under load torchrun may stop it first (SIGTERM), which says so in one line too
    done = torchrun(mnist_dir, tmp_path, *cli_options(epochs=2), "--out-dir", "runs", "--name", "ddp",
                    script=script, launcher=("--monitor-interval", "5"))
    assert done.returncode != 0
    run_dir = tmp_path / "runs" / "ddp"
    said = [line for line in done.stderr.splitlines() if line.startswith("lenet5 train: ")]
    assert len(said) == 1, done.stderr[-3000:]
    assert said[0].startswith(("lenet5 train: error: rank 0 of 2: another process of this run stopped or cannot be "
                               "reached", "lenet5 train: rank 0 of 2: stopped by SIGTERM")), said
    assert said[0].endswith("--resume runs/ddp`)") or said[0].endswith("--resume runs/ddp`"), said
    assert "[rank0]: Traceback" not in done.stderr and "GLHF" not in done.stderr
    # The folder kept epoch 1 and finishes as if nothing had happened.
    assert load_checkpoint(run_dir).meta["epoch"] == 1
    again = torchrun(mnist_dir, tmp_path, "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(weights(run_dir), reference, initial)


# Each rank's machine measured its own bf16 (lenet5.hardware.bf16_probe): rank 0's found it slow, rank 1's
# found it fast on an AMX CPU, so alone they would pick different recipe options and precisions.
SPLIT_PROBES = """
import os, sys
from lenet5 import hardware
from lenet5.cli import main

fast = os.environ["RANK"] == "1"
hardware.cpu_class = lambda: "amx"
hardware.bf16_probe = lambda: hardware.Bf16Probe(20.0, 10.0) if fast else hardware.Bf16Probe(10.0, 20.0)

import lenet5.train.step as step
build = step.TrainStep.build.__func__
def telling(cls, *args, **kwargs):
    built = build(cls, *args, **kwargs)
    print(f"rank {os.environ['RANK']} trains in {built.precision.precision}", flush=True)
    return built
step.TrainStep.build = classmethod(telling)
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_whose_machines_measured_bf16_differently_train_with_rank_0s_choice(mnist_dir, tmp_path):
    script = tmp_path / "split_probes.py"
    script.write_text(SPLIT_PROBES)
    done = torchrun(mnist_dir, tmp_path, "--recipe", "fast", "--model", "slim-lenet-valid", "--device", "cpu",
                    "--train-samples", "256", "--test-samples", "128", "--batch-size", "64", "--out-dir", "runs",
                    "--name", "split", script=script)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "split"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 2 and config["lr"] == 0.02  # the fp32 class's recipe (rank 0's), not amx's
    assert json.loads((run_dir / "run.json").read_text())["precision"] == "fp32"
    assert "rank 0 trains in fp32" in done.stdout and "rank 1 trains in fp32" in done.stdout, done.stdout[-2000:]
    assert [r["epoch"] for r in json.loads((run_dir / "history.json").read_text())] == [1, 2]
