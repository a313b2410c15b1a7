"""Per-pattern SDLM training of lenet5-1998: the native pass against the plain PyTorch steps,
its fallback, the seeded distortions, and fit() with resume."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

import pytest
import torch

from lenet5 import native
from lenet5.data import Split
from lenet5.data.augment import distortion
from lenet5.errors import DataError
from lenet5.models import create_model
from lenet5.native import sdlm_pass
from lenet5.native.build import BuildError, compiler
from lenet5.train import Callback, TrainConfig, TrainStep, fit, loop, perpattern, resume
from lenet5.train.optim import build_optimizer, build_schedule
from lenet5.train.sdlm import diagonal_hessian

# The rate per pattern these agreement checks are made at (the reproduction's cap is 2e-5; five
# times that from the initialisation diverges, and chaotic runs do not agree to 1e-5).
ETA = 1e-5


@pytest.fixture(scope="module")
def kernel():
    """Skips only when there is no compiler at all; a compiler that fails is a failure."""
    try:
        compiler()
    except BuildError as e:
        pytest.skip(str(e))
    assert sdlm_pass.available(), sdlm_pass.why_unavailable()


@pytest.fixture
def one_thread():
    """The plain path at batch size 1 is fastest on one thread (and far slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(train: Split, lr: float = ETA, schedule: str = "lecun1998", **model_args):
    """A fresh lenet5-1998 as fit() builds it, its SDLM with a Hessian estimate, and the schedule."""
    torch.manual_seed(0)
    model = create_model("lenet5-1998", **model_args).to(memory_format=torch.channels_last)
    config = TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=lr, schedule=schedule, batch_size=1, epochs=20)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_schedule(optimizer, config, len(train))
    optimizer.set_hessian(diagonal_hessian(model, train.images[:200]))
    return model, optimizer, scheduler


def run_pass(train: Split, native_path: bool, distort: bool, lr: float = ETA, **model_args):
    model, optimizer, scheduler = setup(train, lr, **model_args)
    before = [p.detach().clone() for p in model.parameters()]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    loss, accuracy = perpattern.train_pass(TrainStep(model, optimizer, scheduler, model), train, order,
                                           distort=distort, native=native_path)
    return {"model": model, "before": before, "optimizer": optimizer, "scheduler": scheduler,
            "loss": loss, "accuracy": accuracy, "rng": torch.get_rng_state()}


@pytest.mark.parametrize("distort, model_args", [(False, {}), (True, {}), (distortion(0.5, share=0.9), {}),
                                                 (False, {"j": 3.0}), (False, {"j": 3.0, "codes": "random"})],
                         ids=["plain", "distorted", "half-strength-on-90%", "j=3", "j=3-random-codes"])
def test_native_pass_is_the_plain_per_pattern_steps(kernel, mnist, distort, model_args, one_thread):
    # 5x the recipe's rate, so that 200 patterns move every parameter well beyond rounding.
    train = mnist.train.head(200)
    fast, plain = (run_pass(train, native_path, distort, lr=5 * ETA, **model_args) for native_path in (True, False))
    assert fast["model"].j == model_args.get("j", 0.1)
    # Tolerance: each parameter tensor within 1e-5 of its largest value, and what the pass changed
    # within 1e-4 of the largest change (measured: 1.2e-6 and 7e-6; sums in another order and a tanh
    # a few ulp from PyTorch's, over 200 updates).
    for (name, a), b, start in zip(fast["model"].named_parameters(), plain["model"].parameters(), plain["before"]):
        change = (b - start).abs().max().item()
        assert change > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item(), msg=name)
        torch.testing.assert_close(a - start, b - start, rtol=0, atol=1e-4 * change, msg=name)
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert fast["accuracy"] == plain["accuracy"]
    # The schedule, the optimizer's state and the random stream are where 200 plain steps leave them.
    assert fast["scheduler"].state_dict() == plain["scheduler"].state_dict()
    assert fast["scheduler"].last_epoch == 200
    assert torch.equal(fast["rng"], plain["rng"])  # distortions drew exactly what 200 steps draw
    for p, q in zip(fast["model"].parameters(), plain["model"].parameters()):
        a, b = fast["optimizer"].state[p], plain["optimizer"].state[q]
        assert a["step_lr"] == b["step_lr"] and torch.equal(a["step_size"], b["step_size"])


def test_distortions_are_seeded(kernel, mnist):
    train = mnist.train.head(200)
    first, again = run_pass(train, True, True), run_pass(train, True, True)
    for a, b in zip(first["model"].parameters(), again["model"].parameters()):
        assert torch.equal(a, b)
    undistorted = run_pass(train, True, False)
    assert undistorted["loss"] != first["loss"]


def test_plain_path_where_the_native_one_cannot_run(mnist, caplog, one_thread):
    train = mnist.train.head(40)
    model, optimizer, scheduler = setup(train, schedule="cosine")
    assert perpattern.why_plain(model, optimizer, scheduler, len(train)) in (
        "the learning rate changes within the pass", sdlm_pass.why_unavailable())
    with native.disabled():
        model, optimizer, scheduler = setup(train)
        assert perpattern.why_plain(model, optimizer, scheduler, len(train)) == "disabled by lenet5.native.disabled()"
        with caplog.at_level(logging.INFO, logger="lenet5.train.perpattern"):
            step = TrainStep(model, optimizer, scheduler, model)
            loss, accuracy = perpattern.train_pass(step, train, torch.arange(len(train)))
        assert "PyTorch path" in caplog.text and 0 < loss < 200 and 0 <= accuracy <= 1
        assert scheduler.last_epoch == len(train)
        with pytest.raises(RuntimeError, match="cannot run: disabled"):
            perpattern.train_pass(TrainStep(model, optimizer, scheduler, model), train, torch.arange(4), native=True)


SCRIPT = """
import torch
from lenet5.data import load_mnist
from lenet5.models import create_model
from lenet5.native import sdlm_pass
from lenet5.train import TrainConfig, TrainStep, perpattern
from lenet5.train.optim import build_optimizer, build_schedule
torch.set_num_threads(1)
train = load_mnist({root!r}, download=False).train.head(20)
model = create_model("lenet5-1998")
config = TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=1e-5, schedule="lecun1998", batch_size=1)
optimizer = build_optimizer(model.parameters(), config)
scheduler = build_schedule(optimizer, config, len(train))
step = TrainStep(model, optimizer, scheduler, model)
loss, accuracy = perpattern.train_pass(step, train, torch.arange(20), distort=True)
print("available", sdlm_pass.available(), "loss", round(loss, 3), "steps", scheduler.last_epoch)
"""


@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/c++"}, {"LENET5_NATIVE": "0"}], ids=["no-compiler", "off"])
def test_trains_on_the_plain_path_without_the_kernel(mnist_dir, tmp_path, env):
    run_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}  # an empty cache: nothing built before
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(mnist_dir))], env=run_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "available False loss" in done.stdout and "steps 20" in done.stdout
    if "CXX" in env:
        assert "falling back to the PyTorch path" in done.stderr and "/nonexistent/c++" in done.stderr
    assert not any(tmp_path.rglob("*.so"))


def test_bad_input_is_refused_clearly(kernel, mnist):
    train = mnist.train.head(20)
    model, optimizer, scheduler = setup(train)
    with pytest.raises(DataError, match="uint8 \\(N, 28, 28\\) images"):
        perpattern.train_pass(TrainStep(model, optimizer, scheduler, model), Split(train.images.float(), train.labels),
                              torch.arange(20))
    with pytest.raises(DataError, match="outside the 20 training images"):
        perpattern.train_pass(TrainStep(model, optimizer, scheduler, model), train, torch.tensor([0, 20]))
    with pytest.raises(DataError, match="1-D int64"):
        perpattern.train_pass(TrainStep(model, optimizer, scheduler, model), train, torch.arange(20).float())
    with pytest.raises(DataError, match="digits 0-9"):
        perpattern.train_pass(TrainStep(model, optimizer, scheduler, model), Split(train.images, train.labels + 10),
                              torch.arange(20))
    assert scheduler.last_epoch == 0  # nothing ran


class StopAfter(Callback):
    """Simulates Ctrl-C at the end of an epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop_after", [1, 2])
def test_fit_takes_the_native_pass_and_resumes_exactly(kernel, mnist, tmp_path, caplog, stop_after):
    # 3 passes on the paper's schedule: the rate drops after pass 2, and h is re-estimated before every
    # pass, so step sizes change between passes whether the rate does (stopped after 2) or not (after 1).
    config = TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=ETA, schedule="lecun1998",
                         batch_size=1, epochs=3, distort=True, hessian_samples=100, train_samples=1_000,
                         test_samples=300, seed=2, threads=1)
    with caplog.at_level(logging.DEBUG, logger="lenet5.train.perpattern"):
        whole = fit(config, mnist, tmp_path / "whole")
    assert caplog.text.count("per-pattern pass on the native path") == 3
    with pytest.raises(KeyboardInterrupt):
        fit(config, mnist, tmp_path / "split", callbacks=[StopAfter(stop_after)])
    resumed = resume(tmp_path / "split", mnist)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    strip = lambda history: [{k: v for k, v in r.items() if "seconds" not in k} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert [r["lr"] for r in whole.history] == pytest.approx([ETA] * 2 + [0.4 * ETA])


def test_fit_gives_what_the_plain_path_gives(kernel, mnist, tmp_path, one_thread):
    config = TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=ETA, schedule="lecun1998",
                         batch_size=1, epochs=2, hessian_samples=100, train_samples=200, test_samples=300, threads=1)
    fast = fit(config, mnist, tmp_path / "native")
    with native.disabled():
        plain = fit(config, mnist, tmp_path / "plain")
    for a, b in zip(fast.history, plain.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    for (name, a), b in zip(fast.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("march", ["haswell", "x86-64"], ids=["avx2", "sse"])
def test_narrower_vector_builds_agree(kernel, mnist, march):
    """The kernel built for an AVX2-only or an SSE-only CPU trains as this CPU's build does."""
    train = mnist.train.head(200)
    images, labels = train.images.float().div(255), train.labels
    model, optimizer, _ = setup(train, lr=5 * ETA)
    results = []
    for lib in (None, sdlm_pass.load(march)):
        work, steps, prototypes, pairs = perpattern.kernel_arguments(model, optimizer)
        losses, _ = sdlm_pass.run(images, labels, work, steps, prototypes, pairs, model.j, lib=lib)
        results.append((work, losses))
    (here, here_losses), (there, there_losses) = results
    torch.testing.assert_close(there_losses, here_losses, rtol=1e-5, atol=0)
    for (name, p), a, b in zip(model.named_parameters(), here, there):
        change = (a - p.detach()).abs().max().item()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * change, msg=name)


def test_the_kernel_refuses_labels_outside_the_digits(kernel):
    model = create_model("lenet5-1998")
    params = [p.detach().clone(memory_format=torch.contiguous_format) for p in model.parameters()]
    steps = [torch.zeros_like(p) for p in params]
    slots = model.C3.slots
    pairs = torch.stack([slots // 6, slots % 6], 1).to(torch.int32).contiguous()
    with pytest.raises(ValueError, match="labels outside 0-9"):
        sdlm_pass.run(torch.zeros(2, 28, 28), torch.tensor([3, 10]), params, steps,
                      model.output.prototypes.contiguous(), pairs, 0.1)


@pytest.mark.parametrize("model, optimizer, batch_size", [("lenet5-1998", "sdlm", 1), ("lenet5", "adam", 32)],
                         ids=["per-pattern", "batches"])
def test_fit_distorts_with_the_configs_strength_and_share(kernel, mnist, tmp_path, monkeypatch, model, optimizer,
                                                          batch_size):
    made, seen = [], []

    def spy(strength, share):  # stands for lenet5.data.augment.distortion in the loop
        made.append((strength, share))
        return lambda images: seen.append(len(images)) or images

    monkeypatch.setattr(loop, "distortion", spy)
    config = TrainConfig(model=model, optimizer=optimizer, lr=1e-5 if optimizer == "sdlm" else 1e-3,
                         batch_size=batch_size, epochs=1, distort=True, distort_strength=0.5, distort_share=0.8,
                         hessian_samples=20, train_samples=64, test_samples=100, threads=1)
    fit(config, mnist, tmp_path / "run")
    assert made and set(made) == {(0.5, 0.8)}
    assert sum(seen) == 64  # every training image of the pass went through the configured transform


def test_other_augmentations_take_the_plain_path(kernel, mnist, tmp_path, caplog):
    """The native pass applies only the paper's distortions: --augment or --flip must not be dropped."""
    config = TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=ETA, schedule="lecun1998", batch_size=1, epochs=1,
                         augment="noise", flip=True, hessian_samples=20, train_samples=40, test_samples=100, threads=1)
    with caplog.at_level(logging.DEBUG, logger="lenet5.train.perpattern"):
        fit(config, mnist, tmp_path / "run")
    assert "per-pattern pass on the native path" not in caplog.text
    with caplog.at_level(logging.DEBUG, logger="lenet5.train.perpattern"):
        fit(dataclasses.replace(config, augment="none", flip=False), mnist, tmp_path / "plain")
    assert "per-pattern pass on the native path" in caplog.text


def test_the_documented_speed_benchmark_runs(kernel, mnist_dir):
    """docs/lenet5-1998.md quotes `python benchmarks/perpattern.py`; it once failed on a changed signature."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "perpattern.py"
    out = subprocess.run([sys.executable, str(script), "--data-dir", str(mnist_dir), "--rounds", "1",
                          "--plain-patterns", "20", "--native-patterns", "200"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "native / plain (wall)" in out.stdout and "mini-batch 16: wall" in out.stdout
