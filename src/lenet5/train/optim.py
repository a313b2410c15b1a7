"""Optimizers and learning-rate schedules named in TrainConfig.

Every schedule is a per-step multiplier of the peak rate (a LambdaLR), so its whole state is the
step count: resuming a run restores it exactly.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from lenet5 import native
from lenet5.train.config import TrainConfig
from lenet5.train.sdlm import SDLM

# The paper's global step for passes 1-2, 3-5, 6-8, 9-12 and after (appendix C / section III.C).
LECUN1998_RATES = ((2, 5e-4), (5, 2e-4), (8, 1e-4), (12, 5e-5), (None, 1e-5))


def build_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = config.lr, config.weight_decay
    params = list(params)
    # Speed: Adam, AdamW and SGD take the fused kernels (one pass over each tensor per step, on CPU
    # and GPU); RMSprop has none in PyTorch: lenet5's native pass on CPU, else foreach (one launch
    # per op for all tensors).
    if config.optimizer == "rmsprop":
        # Keras' RMSprop: rho=0.9, eps=1e-7 added outside the square root, as in PyTorch.
        return FusedRMSprop(params, lr=lr, alpha=config.rho, eps=config.eps, weight_decay=wd, foreach=True)
    if config.optimizer == "sgd":
        return _fused(torch.optim.SGD, params, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                      weight_decay=wd)
    if config.optimizer == "adam":
        return _fused(FusedAdam, params, lr=lr, eps=config.eps, weight_decay=wd)
    if config.optimizer == "adamw":
        return _fused(FusedAdamW, params, lr=lr, eps=config.eps, weight_decay=wd)
    if config.optimizer == "sdlm":
        return SDLM(params, lr=lr, mu=config.mu)
    raise AssertionError(config.optimizer)  # TrainConfig.validate() rejects anything else


def _unwrapped(method: Callable) -> Callable:
    """The function a torch.optim decorator wraps (functools.wraps keeps it), or `method` itself."""
    return getattr(method, "__wrapped__", method)


class _Eager:
    """torch.optim.Optimizer's methods without `torch._disable_dynamo`, for optimizers that only run
    eagerly (lenet5 compiles the forward pass at most, never the optimizer).

    torch wraps add_param_group (called by every constructor), zero_grad, state_dict and
    load_state_dict in a decorator whose first call imports torch._dynamo: 1.3-1.7 s of a
    process's start on 2 cores, for a training run that never uses it. Each method here is the
    one torch wraps, called directly; where a torch version keeps no `__wrapped__`, the wrapper
    itself runs, as before.
    """

    def add_param_group(self, param_group: dict) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return _unwrapped(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _unwrapped(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def _pytorch_step(self, closure=None):
        """The torch class's own step, without running the step hooks again: torch wraps each
        optimizer class's step in the hook runner once an instance exists, this class's and its
        torch base's alike."""
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.optim"))
        step = base.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__
        return step(self, closure)


class _FusedAdamStep(_Eager):
    """Adam's and AdamW's fused step, made here: the same ATen kernel (`torch._fused_adam_`,
    `torch._fused_adamw_`) on the same state as torch.optim.Adam(fused=True), so results and
    checkpoints are interchangeable with it, without the step's dynamo wrappers (see `_Eager`).
    Anything else (no fused kernel, amsgrad, maximize, capturable, a tensor lr, a closure, sparse
    or complex gradients, mixed devices or dtypes in a group, a GradScaler's step) takes torch's
    own step."""

    @torch.no_grad()
    def step(self, closure=None):
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return self._pytorch_step(closure)  # GradScaler unscales and skips inside the kernel: torch's path
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            kernel = getattr(torch, "_fused_adamw_" if self._decoupled(group) else "_fused_adam_", None)
            if (kernel is None or closure is not None or not group.get("fused") or group["amsgrad"]
                    or group["maximize"] or group["differentiable"] or group["capturable"]
                    or isinstance(group["lr"], torch.Tensor) or isinstance(group["betas"][0], torch.Tensor)
                    or len({(p.device, p.dtype) for p in params}) > 1
                    or any(p.grad.is_sparse or p.is_complex() for p in params)):
                return self._pytorch_step(closure)
            groups.append((group, params, kernel))
        for group, params, kernel in groups:
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:  # as Adam initialises it when fused
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            kernel(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                   [self.state[p]["exp_avg_sq"] for p in params], [], steps, amsgrad=False, lr=float(group["lr"]),
                   beta1=float(beta1), beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                   eps=float(group["eps"]), maximize=False, grad_scale=None, found_inf=None)
        return None

    def _decoupled(self, group: dict) -> bool:
        """AdamW's decay (torch >= 2.6 keeps it per group; earlier AdamW is its own class)."""
        return bool(group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW)))


class FusedAdam(_FusedAdamStep, torch.optim.Adam):
    """torch.optim.Adam(fused=True), stepped without torch._dynamo (`_FusedAdamStep`)."""


class FusedAdamW(_FusedAdamStep, torch.optim.AdamW):
    """torch.optim.AdamW(fused=True), stepped without torch._dynamo (`_FusedAdamStep`)."""


class FusedRMSprop(_Eager, torch.optim.RMSprop):
    """torch.optim.RMSprop whose step is one native pass over each tensor on CPU (lenet5.native),
    where PyTorch makes five: the same update, state and state_dict, to float rounding. Anything the
    pass does not cover (momentum, centring, maximize, a closure, GPU tensors, no compiler) takes
    RMSprop's own step.

    For bf16 training it can also keep each weight's bfloat16 copy (`keep_bf16_copies`), written by
    the same pass, so that autocast need not cast the weights to bfloat16 and their gradients back
    every step."""

    _copies: dict[torch.Tensor, torch.Tensor] | None = None
    _synced: dict[torch.Tensor, int]

    def keep_bf16_copies(self) -> dict[torch.Tensor, torch.Tensor] | None:
        """Keep a bfloat16 copy of every parameter from now on: {parameter: copy}, or None where the
        native pass cannot take this optimizer's steps (its options, the device, no compiler).

        The forward and backward passes are to run on the copies (lenet5.train.step puts them in
        the model's place), whose gradients, bfloat16, are what `step` then applies to the float32
        weights; the step rewrites each copy from its new weight, rounded as `.to(torch.bfloat16)`
        rounds, so the arithmetic is autocast's own. `sync_copies` refreshes a copy whose weight
        was changed by anything else (a checkpoint loaded, say)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if any(g["momentum"] or g["centered"] or g["maximize"] or g["differentiable"] or g["capturable"]
               for g in self.param_groups) or len(set(params)) != len(params):
            return None
        copies = {p: p.detach().to(torch.bfloat16).requires_grad_(p.requires_grad) for p in params}  # keeps channels_last
        if not native.rmsprop_applies(params, list(copies.values()), [torch.zeros_like(p) for p in params],
                                      list(copies.values())):
            return None
        self._copies, self._synced = copies, {p: p._version for p in params}
        return copies

    @torch.no_grad()
    def sync_copies(self) -> None:
        """Bring up to date the copy of every weight changed in place since the copy was written (the
        native pass writes weights without touching their version counters, other changes count)."""
        for p, copy in (self._copies or {}).items():
            if p._version != self._synced[p]:
                copy.copy_(p)
                self._synced[p] = p._version

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in (self._copies or {}).values():
            if copy.grad is not None:
                if set_to_none:
                    copy.grad = None
                else:
                    copy.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        if self._copies is not None:
            return self._step_on_copies(closure)
        if closure is not None or any(g["momentum"] or g["centered"] or g["maximize"] or g["differentiable"]
                                      or g["capturable"] for g in self.param_groups):
            return self._pytorch_step(closure)
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            averages = self._averages(params)
            if not native.rmsprop_applies(params, grads, averages):
                return self._pytorch_step()
            groups.append((group, params, grads, averages, None))
        self._apply(groups)
        return None

    def _step_on_copies(self, closure):
        if closure is not None:
            raise ValueError("FusedRMSprop: a closure cannot run on the bfloat16 copies")
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if self._copies[p].grad is not None]
            copies = [self._copies[p] for p in params]
            grads = [c.grad for c in copies]
            averages = self._averages(params)
            if not native.rmsprop_applies(params, grads, averages, copies):
                raise RuntimeError("FusedRMSprop: the native pass no longer applies to the bfloat16 copies "
                                   "(a gradient of another dtype or layout)")
            groups.append((group, params, grads, averages, copies))
        self._apply(groups)
        return None

    def _averages(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:
            if not self.state[p]:  # as RMSprop initialises it (no momentum, not centred)
                self.state[p]["step"] = torch.zeros((), dtype=_scalar_dtype())
                self.state[p]["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.state[p]["square_avg"] for p in params]

    def _apply(self, groups: list) -> None:
        for group, params, grads, averages, copies in groups:
            if not params:
                continue
            native.rmsprop_step(params, grads, averages, copies, lr=float(group["lr"]), alpha=group["alpha"],
                                eps=group["eps"], weight_decay=group["weight_decay"])
            torch._foreach_add_([self.state[p]["step"] for p in params], 1)  # one call, not one per tensor


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps a step count in (float32, or float64 under a float64 default)."""
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        return _get_scalar_dtype()
    except ImportError:
        return torch.float32


def _fused(kind: type[torch.optim.Optimizer], params: list[torch.nn.Parameter], **options) -> torch.optim.Optimizer:
    try:
        return kind(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # a device or PyTorch version without the fused kernel
        return kind(params, foreach=True, **options)


def lr_multiplier(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The factor applied to the peak learning rate at optimizer step `step` (0-based)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "constant":
        return lambda step: 1.0
    if config.schedule == "step":
        every = config.step_epochs * steps_per_epoch
        return lambda step: config.gamma ** (step // every)
    if config.schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if config.schedule == "lecun1998":
        peak = LECUN1998_RATES[0][1]

        def lecun1998(step: int) -> float:
            completed = step // steps_per_epoch  # passes finished before this step
            for last_pass, rate in LECUN1998_RATES:
                if last_pass is None or completed < last_pass:
                    return rate / peak
            raise AssertionError

        return lecun1998
    if config.schedule == "lecun1998-capped":
        # The paper's rates per pattern as they are (times the batch for the mean loss of a batch),
        # none above --lr: where the paper's early rates are too large to train (docs/lenet5-1998.md),
        # the cap replaces them, and the later passes run at the paper's own rates.
        def capped(step: int) -> float:
            completed = step // steps_per_epoch
            rate = next(r for last, r in LECUN1998_RATES if last is None or completed < last)
            return min(1.0, rate * config.batch_size / config.lr)

        return capped
    if config.schedule == "onecycle":
        # Smith & Topin's one-cycle policy: linear warm-up from lr/25, then cosine annealing
        # down to lr/1e4 (the constants of torch's OneCycleLR, without its momentum cycling,
        # which would turn RMSprop into momentum-RMSprop).
        warm = max(1, round(config.warmup * total))
        start, end = 1 / 25, 1 / 1e4

        def onecycle(step: int) -> float:
            if step < warm:
                return start + (1 - start) * step / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

        return onecycle
    raise AssertionError(config.schedule)


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(config, steps_per_epoch))
