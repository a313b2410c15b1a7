"""lenet5's Adam and AdamW: torch's fused kernel stepped without torch._dynamo, interchangeable with torch's."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from lenet5.train.optim import FusedAdam, FusedAdamW


def adam_pair(kind: str, **options):
    torch.manual_seed(0)
    shapes = [(20, 1, 5, 5), (50, 20, 5, 5), (500, 2450), (10,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ours[1] = ours[1].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    theirs = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in ours]
    mine, torchs = (FusedAdam, torch.optim.Adam) if kind == "adam" else (FusedAdamW, torch.optim.AdamW)
    settings = dict(lr=6e-3, eps=1e-7, fused=True, **options)
    return mine(ours, **settings), torchs(theirs, **settings), ours, theirs


def give_gradients(step: int, *param_lists) -> None:
    grads = [torch.randn_like(p) * 10 ** -step for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone(memory_format=torch.preserve_format)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_fused_adam_takes_torchs_steps_bit_for_bit(kind, weight_decay, monkeypatch):
    ours_opt, theirs_opt, ours, theirs = adam_pair(kind, weight_decay=weight_decay)
    calls = []
    name = "_fused_adam_" if kind == "adam" else "_fused_adamw_"
    kernel = getattr(torch, name)
    for step in range(4):
        give_gradients(step, ours, theirs)
        # count the kernel's calls from this optimizer's step only (torch's own calls it too)
        monkeypatch.setattr(torch, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
        ours_opt.step()
        monkeypatch.setattr(torch, name, kernel)
        theirs_opt.step()
        ours_opt.zero_grad()
        theirs_opt.zero_grad()
    assert calls == [1, 1, 1, 1]  # its own fused step, not torch's
    ours_opt, theirs_opt, ours, theirs = adam_pair(kind, weight_decay=weight_decay)
    for step in range(4):
        if step == 2:  # a scheduler's change of the rate between steps
            for opt in (ours_opt, theirs_opt):
                opt.param_groups[0]["lr"] *= 0.5
        give_gradients(step, ours, theirs)
        ours_opt.step()
        theirs_opt.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b) and a.stride() == b.stride()
        for a, b in zip(ours_opt.state.values(), theirs_opt.state.values()):
            assert a.keys() == b.keys() and a["step"].dtype == b["step"].dtype and a["step"] == step + 1
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert any(not torch.equal(p, q) for p, q in zip(ours, adam_pair(kind)[2]))  # the steps did move the weights


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_adam_state_loads_both_ways(kind):
    ours_opt, theirs_opt, ours, theirs = adam_pair(kind, weight_decay=1e-4)
    give_gradients(0, ours, theirs)
    ours_opt.step()
    theirs_opt.step()
    saved_ours, saved_theirs = copy.deepcopy(ours_opt.state_dict()), copy.deepcopy(theirs_opt.state_dict())
    assert saved_ours["param_groups"] == saved_theirs["param_groups"]
    ours_opt.load_state_dict(saved_theirs)
    theirs_opt.load_state_dict(saved_ours)
    give_gradients(1, ours, theirs)  # a resumed run goes on the same in either
    ours_opt.step()
    theirs_opt.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_groups_with_and_without_decoupled_decay_each_take_their_own_kernel():
    if "decoupled_weight_decay" not in torch.optim.Adam([torch.zeros(1)]).defaults:
        pytest.skip("this torch keeps AdamW's decay in its own class only")
    torch.manual_seed(0)
    ours = [torch.randn(8, requires_grad=True) for _ in range(2)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    groups = lambda ps: [{"params": [ps[0]], "decoupled_weight_decay": True}, {"params": [ps[1]]}]  # noqa: E731
    mine, torchs = (FusedAdam(groups(ours), lr=1e-2, weight_decay=0.5, fused=True),
                    torch.optim.Adam(groups(theirs), lr=1e-2, weight_decay=0.5, fused=True))
    give_gradients(0, ours, theirs)
    mine.step()
    torchs.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_grad_scalers_step_is_torchs():
    """GradScaler hands a fused Adam its scale and inf flag to apply in the kernel: torch's step does."""
    results = []
    for kind in (FusedAdam, torch.optim.Adam):
        torch.manual_seed(0)
        w = torch.randn(16, requires_grad=True)
        optimizer = kind([w], lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            optimizer.zero_grad()
            loss = (w ** 2).sum() * (float("inf") if step == 1 else 1.0)  # an overflow: that step is skipped
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        results.append((w.detach().clone(), optimizer.state[w]["exp_avg"].clone(), optimizer.state[w]["step"].item()))
    (w1, m1, s1), (w2, m2, s2) = results
    assert torch.isfinite(w1).all() and torch.equal(w1, w2) and torch.equal(m1, m2) and s1 == s2 == 2


def test_what_the_fused_step_does_not_cover_takes_torchs_step_and_the_hooks_run_once():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hooks = []
    handle = register_optimizer_step_pre_hook(lambda *_: hooks.append(1))
    try:
        for options in ({"amsgrad": True}, {"maximize": True}):
            ours_opt, theirs_opt, ours, theirs = adam_pair("adam", **options)
            hooks.clear()
            give_gradients(0, ours, theirs)
            ours_opt.step()
            assert len(hooks) == 1
            theirs_opt.step()
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b)
            assert ours_opt.state_dict()["state"].keys() == theirs_opt.state_dict()["state"].keys()
        closure_calls = []
        ours_opt, _, ours, _ = adam_pair("adam")

        def closure():
            closure_calls.append(1)
            ours_opt.zero_grad()
            loss = sum((p ** 2).sum() for p in ours)
            loss.backward()
            return loss

        assert ours_opt.step(closure) is not None and closure_calls == [1]
    finally:
        handle.remove()


def test_a_training_run_with_adam_adamw_or_rmsprop_never_imports_torch_dynamo(mnist_dir, tmp_path):
    """torch.optim's wrappers import torch._dynamo on first use (1.1-1.7 s of a run's start on 2 cores);
    lenet5's Adam, AdamW and RMSprop and the rest of a run, checkpoints and resume included, do
    without (SGD and SDLM are still torch.optim's, and pay it)."""
    code = f"""
import sys
from lenet5.data import load_mnist
from lenet5.train import TrainConfig, fit
mnist = load_mnist({str(mnist_dir)!r}, download=False)
for optimizer in ("adam", "adamw", "rmsprop"):
    config = TrainConfig(model="slim-lenet", optimizer=optimizer, batch_size=128, epochs=1, train_samples=512,
                         test_samples=256, schedule="onecycle", ema=0.99 if optimizer == "adamw" else 0.0)
    fit(config, mnist, {str(tmp_path)!r} + "/" + optimizer)
    fit(TrainConfig.from_dict({{**config.to_dict(), "epochs": 2}}), mnist, {str(tmp_path)!r} + "/" + optimizer,
        resume=True)
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def rmsprop_step_pair(model: str = "lenet5", batch: int = 16):
    """Two TrainSteps of one config in bf16 with RMSprop: the first as autocast runs it (casting every
    weight and gradient each step), the second on the optimizer's bfloat16 copies (`wrap`)."""
    from lenet5 import native
    from lenet5.train.config import TrainConfig
    from lenet5.train.step import TrainStep

    if not native.available():
        pytest.skip(native.why_unavailable())
    config = TrainConfig(model=model, optimizer="rmsprop", batch_size=batch, precision="bf16", weight_decay=1e-4)
    steps = [TrainStep.build(config, torch.device("cpu"), 100) for _ in range(2)]
    steps[1].wrap(compile=False)
    return steps


def take_steps(step, images: torch.Tensor, labels: torch.Tensor, count: int, start: int = 0) -> None:
    from lenet5.data.transforms import to_model_input

    batch = 16
    for i in range(start, start + count):
        x, y = to_model_input(images[i * batch:(i + 1) * batch]), labels[i * batch:(i + 1) * batch]
        objective, _ = step.objective(*step.outputs(x, len(y)), y)
        step.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        step.optimizer.step()


def test_bf16_training_on_the_optimizers_copies_is_autocasts_arithmetic_bit_for_bit(mnist):
    cast, copies = rmsprop_step_pair()
    assert cast.optimizer._copies is None and copies.optimizer._copies is not None
    images, labels = mnist.train.images[:640], mnist.train.labels[:640]
    take_steps(cast, images, labels, 8)
    take_steps(copies, images, labels, 8)
    for (name, a), b in zip(cast.model.named_parameters(), copies.model.parameters()):
        assert b.dtype == torch.float32 and isinstance(b, torch.nn.Parameter), name  # the model's own, back in place
        assert b.grad is None  # the gradients are the copies'
        assert torch.equal(a, b), name
        assert not torch.equal(a, copies.optimizer._copies[b].float()) or a.abs().max() == 0  # a rounded copy...
        assert torch.equal(copies.optimizer._copies[b], b.detach().bfloat16()), name  # ...of the new weight
    for a, b in zip(cast.optimizer.state.values(), copies.optimizer.state.values()):
        assert torch.equal(a["square_avg"], b["square_avg"]) and a["step"] == b["step"] == 8
    # weights changed from outside (a checkpoint loaded, say) reach the copies before the next pass
    other = {k: v * 0.5 for k, v in cast.model.state_dict().items()}
    for step in (cast, copies):
        step.model.load_state_dict(other)
    take_steps(cast, images, labels, 2, start=8)
    take_steps(copies, images, labels, 2, start=8)
    for a, b in zip(cast.model.parameters(), copies.model.parameters()):
        assert torch.equal(a, b)


def test_the_copies_are_kept_only_where_the_native_pass_takes_every_step():
    from lenet5.train.config import TrainConfig
    from lenet5.train.step import TrainStep

    step = TrainStep.build(TrainConfig(model="lenet5", optimizer="rmsprop", precision="fp32"),
                           torch.device("cpu"), 100)
    step.wrap(compile=False)
    assert step.forward is step.model and step.optimizer._copies is None  # fp32: nothing to cast
    step = TrainStep.build(TrainConfig(model="lenet5", optimizer="adam", precision="bf16"), torch.device("cpu"), 100)
    step.wrap(compile=False)
    assert step.forward is step.model  # Adam's step is ATen's fused kernel: autocast casts as before
    from lenet5.train.optim import FusedRMSprop

    for name in ("robust-lenet", "lenet5-modern", "lenet5-1998"):  # batch norm, or layers of their own arithmetic
        step = TrainStep.build(TrainConfig(model=name, optimizer="rmsprop", precision="bf16", batch_size=8),
                               torch.device("cpu"), 100)
        step.wrap(compile=False)
        assert step.forward is step.model and step.optimizer._copies is None, name
    params = [torch.zeros(3, requires_grad=True)]
    assert FusedRMSprop(params, lr=1e-3, momentum=0.9).keep_bf16_copies() is None  # torch's own step
    from lenet5 import native

    with native.disabled():
        assert FusedRMSprop(params, lr=1e-3).keep_bf16_copies() is None
