"""Per-pattern SDLM training of lenet5-1998 at speed: the paper's one update per pattern.

LeCun et al. (1998, section III.C, appendix C) update the weights after every training pattern,
with per-parameter steps eta / (mu + h_kk) held fixed for a pass. In PyTorch that is a Python
step per pattern, ~2 ms of per-op overhead for ~1 MFLOP of arithmetic (about 430 patterns/s on
2 cores). `train_pass` runs the whole pass in one native loop instead (lenet5/native/
sdlm_pass.cpp: forward, eq. 9, backward and update per pattern, no Python per pattern), with the
same math in fp32: it leaves the model, the optimizer, the schedule and the random stream as
that many `train_epoch` steps at batch size 1 would, to fp32 rounding (tests/test_perpattern.py).

Distortions: the pass's images are distorted chunk by chunk before the loop, by the same
`random_affine` from the same global generator; a chunk draws exactly the numbers its patterns
would have drawn one by one, so the distorted images are identical, not just alike.

Where the native pass cannot run (no compiler, LENET5_NATIVE=0, a learning rate that changes
within the pass, a model not shaped as lenet5-1998), `train_pass` runs `train_epoch` at batch
size 1: the plain path, the reference.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from lenet5.data import Split
from lenet5.data.distort import random_affine
from lenet5.data.transforms import to_model_input
from lenet5.errors import DataError
from lenet5.models.lenet5_1998 import LeNet5_1998
from lenet5.native import sdlm_pass
from lenet5.train.sdlm import SDLM
from lenet5.train.step import TrainStep, train_epoch

log = logging.getLogger(__name__)

CHUNK = 2000  # patterns per native call: progress reports and distortion memory in between
SHAPES = {"C1.weight": (6, 1, 5, 5), "C1.bias": (6,), "S2.weight": (6,), "S2.bias": (6,), "C3.weight": (None, 5, 5),
          "C3.bias": (16,), "S4.weight": (16,), "S4.bias": (16,), "C5.weight": (120, 16, 5, 5), "C5.bias": (120,),
          "F6.weight": (84, 120), "F6.bias": (84,)}  # the parameters in the order sdlm_pass.cpp takes them


def applies(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, device: torch.device,
            distributed: bool, precision: str) -> bool:
    """Whether a pass is per-pattern SDLM training of lenet5-1998 on one CPU process in fp32:
    then `train_pass` does it (natively where it can)."""
    return (isinstance(model, LeNet5_1998) and type(optimizer) is SDLM and batch_size == 1
            and device.type == "cpu" and not distributed and precision == "fp32")


def why_plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> str | None:
    """Why `train_pass` would take the plain PyTorch path for a pass of `steps` patterns, or None."""
    reason = sdlm_pass.why_unavailable()
    if reason:
        return reason
    names = [name for name, _ in model.named_parameters()]
    if names != list(SHAPES) or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return "the model's parameters are not lenet5-1998's, in fp32 on the CPU"
    for name, p in model.named_parameters():
        if any(want is not None and want != have for want, have in zip(SHAPES[name], p.shape)) \
                or len(SHAPES[name]) != p.dim():
            return f"{name} has shape {tuple(p.shape)}, not lenet5-1998's"
    if tuple(model.output.prototypes.shape) != (10, 84) or model.C3.in_maps != 6 or len(model.C3.table) != 16:
        return "the model's RBF output or C3 table is not lenet5-1998's"
    if len(optimizer.param_groups) != 1 or len(optimizer.param_groups[0]["params"]) != len(names):
        return "the optimizer does not hold exactly the model's parameters in one group"
    if not _lr_constant(optimizer, scheduler, steps):
        return "the learning rate changes within the pass"
    return None


def train_pass(step: TrainStep, train: Split, order: torch.Tensor, callbacks: Sequence = (), *,
               distort: bool | Callable[[torch.Tensor], torch.Tensor] = False, log_every: int = 50,
               native: bool | None = None) -> tuple[float, float]:
    """One pass of per-pattern SDLM over `train` in the given order with `step`'s model, optimizer
    and schedule; returns the running mean loss and accuracy, as `train_epoch` at batch size 1
    does, and leaves the same state behind.

    `native`: None picks the native pass when it can run (`why_plain`), False forces the plain
    path (`train_epoch` at batch size 1, with the paper's distortions if `distort`), True
    requires the native one. `distort`: True for the paper's distortions, or the batch transform
    to distort with (`lenet5.data.augment.distortion`)."""
    model, optimizer, scheduler = step.model, step.optimizer, step.scheduler
    if order.dim() != 1 or order.dtype != torch.int64 or len(order) == 0:
        raise DataError(f"the pass's order must be a non-empty 1-D int64 tensor, "
                        f"not {order.dtype} {tuple(order.shape)}")
    if train.images.dim() != 3 or train.images.shape[1:] != (28, 28) or train.images.dtype != torch.uint8:
        raise DataError(f"per-pattern training needs uint8 (N, 28, 28) images, not {train.images.dtype} "
                        f"{tuple(train.images.shape)}")
    if int(order.min()) < 0 or int(order.max()) >= len(train.images):
        raise DataError(f"the pass's order indexes outside the {len(train.images)} training images")
    reason = why_plain(model, optimizer, scheduler, len(order)) if native is not False else "asked for"
    if reason and native:
        raise RuntimeError(f"the native per-pattern pass cannot run: {reason}")
    if distort is True:
        distort = random_affine
    if reason:
        log.info("per-pattern pass on the PyTorch path (%s)", reason)
        plain = dataclasses.replace(step, augment=distort or None)
        return train_epoch(plain, train, 1, order, callbacks, log_every)
    log.debug("per-pattern pass on the native path")
    return _native_pass(model, optimizer, scheduler, train, order, callbacks, distort)


def _native_pass(model: LeNet5_1998, optimizer: SDLM, scheduler: LambdaLR, train: Split, order: torch.Tensor,
                 callbacks: Sequence, distort: Callable[[torch.Tensor], torch.Tensor] | bool) -> tuple[float, float]:
    model.train()
    params = list(model.parameters())
    work, steps, prototypes, pairs = kernel_arguments(model, optimizer)
    labels = train.labels.to(torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) > 9:
        raise DataError("the training labels must be digits 0-9")
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for start in range(0, len(order), CHUNK):
            idx = order[start:start + CHUNK]
            x = to_model_input(train.images[idx])  # (B, 1, 28, 28)
            if distort:
                x = distort(x)  # draws what B steps of train_epoch draw, in the same order
            losses, right = sdlm_pass.run(x[:, 0].contiguous(), labels[idx].contiguous(), work, steps, prototypes,
                                          pairs, float(model.j))
            loss_sum += losses.double().sum().item()
            correct += int(right.sum())
            seen += len(idx)
            for cb in callbacks:
                cb.on_batch_end(seen, loss_sum / seen, correct / seen)
    finally:
        with torch.no_grad():  # also after an interruption: the patterns trained on stay trained
            for p, w in zip(params, work):
                p.copy_(w)
        _advance(optimizer, scheduler, seen)
    return loss_sum / seen, correct / seen


def kernel_arguments(model: LeNet5_1998, optimizer: SDLM) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                    torch.Tensor, torch.Tensor]:
    """What `sdlm_pass.run` takes from the model and optimizer: contiguous copies of the parameters
    (updated in place by the pass), their step sizes, the RBF prototypes and C3's kernel pairs."""
    step_sizes = optimizer.step_sizes()
    params = list(model.parameters())
    work = [p.detach().clone(memory_format=torch.contiguous_format) for p in params]
    steps = [step_sizes[p].to(torch.float32).contiguous() for p in params]
    prototypes = model.output.prototypes.to(torch.float32).contiguous()
    slots = model.C3.slots
    pairs = torch.stack([slots // model.C3.in_maps, slots % model.C3.in_maps], 1).to(torch.int32).contiguous()
    return work, steps, prototypes, pairs


def _lr_constant(optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> bool:
    """Whether every step of the next `steps` runs at the current rate (true of the per-pass
    schedules: lecun1998, step, constant)."""
    if not isinstance(scheduler, LambdaLR):
        return False
    start = scheduler.last_epoch
    for group, rate, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        if any(base * rate(start + k) != group["lr"] for k in range(1, steps)):
            return False
    return True


def _advance(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, steps: int) -> None:
    """Leave `scheduler` as `steps` calls of scheduler.step() after optimizer.step() would."""
    if steps == 0:
        return
    optimizer._opt_called = True  # what LRScheduler's wrapper of optimizer.step() records
    scheduler.last_epoch += steps - 1
    scheduler._step_count += steps - 1
    scheduler.step()
