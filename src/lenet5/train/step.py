"""The training step: what one step needs (`TrainStep`) and one pass over the data (`train_epoch`).

Speed choices, named where they matter:
- images stay uint8 on the device and a batch is one gather by a permutation slice, converted
  to float there (no DataLoader, no per-sample Python, no host-to-device copy per step);
- loss and accuracy are summed on the device and read back only every `log_every` steps and
  at the end of the epoch (a `.item()` per step would sync a GPU every step);
- bf16 runs the forward and backward passes under autocast (the weights, the optimizer and the
  evaluation stay fp32), chosen only where bf16 is fast (lenet5.hardware); with RMSprop on a CPU
  the passes run on bfloat16 copies of the weights that the optimizer's native pass keeps, instead
  of casting every weight and its gradient each step (`bf16_copies`);
- channels_last weights: oneDNN's convolutions run 1.3-1.7x faster on this layout on CPU
  (measured for both models at batch 32-128); a 1-channel input is already in it, so no copy.

`TrainStep.build` is the one place a model, its optimizer and schedule are made for training:
`fit` and the benchmarks both use it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lenet5 import distributed
from lenet5.data import Dataset, Split
from lenet5.data.transforms import to_model_input
from lenet5.distributed import World
from lenet5.errors import ConfigError
from lenet5.hardware import PrecisionChoice, choose_precision
from lenet5.models import DigitClassifier, create_model, model_class
from lenet5.train.config import TrainConfig
from lenet5.train.optim import FusedRMSprop, build_optimizer, build_schedule
from lenet5.train.average import WeightAverage
from lenet5.train.outliers import Outliers, uniform_loss
from lenet5.train.threads import ThreadGovernor

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrainStep:
    """Everything a training step needs, made once per run.

    `forward` computes the outputs: the model itself, or its DDP or compiled wrapper (`wrap`).
    `augment`, if set, transforms each (B, 1, 28, 28) float batch on its device. A `governor`
    (CPU, one process) is told each step's time and may change the thread count between steps.
    """

    model: DigitClassifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    forward: Forward
    precision: PrecisionChoice = PrecisionChoice("fp32", "asked for")
    world: World = World()
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    governor: ThreadGovernor | None = None
    label_smoothing: float = 0.0
    average: WeightAverage | None = None  # --ema: what is evaluated and saved
    outliers: Outliers | None = None  # --outliers: non-digits added to every batch

    @property
    def eval_model(self) -> DigitClassifier:
        """The weights a run evaluates and saves: the average where one is kept, else the model's."""
        return self.average.model if self.average is not None else self.model

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.label_smoothing:
            return self.model.loss(outputs, labels, label_smoothing=self.label_smoothing)
        return self.model.loss(outputs, labels)

    @classmethod
    def build(cls, config: TrainConfig, device: torch.device, steps_per_epoch: int, *,
              world: World = World(), governor: ThreadGovernor | None = None,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
              data: Dataset | None = None, outliers: Outliers | None = None) -> "TrainStep":
        """The model (initialised from `config.seed`, with one output per class of `data`, MNIST's
        ten digits by default), optimizer, schedule and precision of `config`."""
        torch.manual_seed(config.seed)
        classes = data.classes if data is not None else tuple(str(d) for d in range(10))
        try:
            model = create_model(config.model, num_classes=len(classes), **config.model_args())
        except ValueError as e:  # e.g. --rbf-codes bitmaps for a data set that is not ten classes
            raise ConfigError(f"--model {config.model} on {len(classes)} classes: {e}") from None
        model = model.to(device, memory_format=torch.channels_last)
        model.dataset, model.classes = (data.name, data.classes) if data is not None else ("mnist", classes)
        optimizer = build_optimizer(model.parameters(), config)
        scheduler = build_schedule(optimizer, config, steps_per_epoch)
        precision = choose_precision(config.precision, device, model_class(config.model).bf16_pays)
        if world.distributed:  # each machine measured its own bf16 (lenet5.hardware.bf16_probe): rank 0's choice for all
            precision = distributed.broadcast(precision)
        average = WeightAverage(model, config.ema) if config.ema else None
        return cls(model, optimizer, scheduler, model, precision, world, augment, governor, config.label_smoothing,
                   average, outliers)

    def wrap(self, compile: bool) -> None:
        """Wrap the forward pass for data parallelism (under torchrun) and/or torch.compile; or, for
        bf16 on a CPU with RMSprop, run it on the optimizer's bfloat16 copies of the weights."""
        device = next(self.model.parameters()).device
        if not self.world.distributed and not compile and device.type == "cpu" \
                and self.precision.precision == "bf16" and isinstance(self.optimizer, FusedRMSprop) \
                and _autocast_casts_every_weight(self.model):
            copies = self.optimizer.keep_bf16_copies()
            if copies is not None:
                self.forward = bf16_copies(self.model, copies, self.optimizer.sync_copies)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.model,
                                                   device_ids=[device.index] if device.type == "cuda" else None)
        if compile:
            self.forward = _compiled(self.forward, device)

    def outputs(self, x: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward pass of a batch whose first `digits` rows are digits and the rest outliers, in
        one call (batch norm's statistics are the whole batch's): the digits' outputs, and the
        outliers' (None when there are none)."""
        with self.autocast():
            outputs = self.forward(x)
        return (outputs, None) if len(x) == digits else (outputs[:digits], outputs[digits:])

    def objective(self, outputs: torch.Tensor, others: torch.Tensor | None, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the step minimises, the digits' loss, which the epoch reports)."""
        loss = self.loss(outputs.float(), labels)
        if others is None:
            return loss, loss
        return loss + self.outliers.weight * uniform_loss(self.model.logits(others.float())), loss

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the forward pass (its backward follows), or nothing for fp32."""
        if self.precision.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=torch.bfloat16)

    def shadow(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """A step's forward and backward with the gradients thrown away: changes no state (batch
        norm's running statistics, which a forward pass in training mode updates, are put back)."""
        buffers = [b.clone() for b in self.model.buffers()]
        self.objective(*self.outputs(x, len(y)), y)[0].backward()  # x may hold outliers after the digits y
        self.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)  # the gradients of weights it keeps copies of
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers):
                buffer.copy_(saved)

    def warm_up(self, train: Split, sizes: Sequence[int]) -> None:
        """Run the step's forward and backward once per batch shape, then drop the gradients.

        Before the clock starts, so that an epoch's time is training: the first steps on a device
        pay one-off costs (CUDA's lazy kernel loading and cuDNN/cuBLAS set-up, oneDNN primitive
        creation, torch.compile's compilation per shape). No weight, optimizer state or random
        stream changes, so the run's result is the same with or without it. The governor, if
        any, then measures its first thread counts on the same shadow step.
        """
        device = train.images.device

        def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.arange(size, device=device)[self.world.rank::self.world.size]
            images = train.images[idx]
            if self.outliers is not None:  # the first ones: no random draw, which would move the generator
                images = torch.cat([images, self.outliers.pool[:self.outliers.count(len(idx))]])
            return to_model_input(images), train.labels[idx]

        for size in sizes:
            self.shadow(*batch(size))
        if self.governor is not None:
            x, y = batch(sizes[0])
            self.governor.probe(lambda: self.shadow(x, y))


def train_epoch(step: TrainStep, train: Split, batch_size: int, order: torch.Tensor,
                callbacks: Sequence = (), log_every: int = 50) -> tuple[float, float]:
    """One pass over `train` in the given order; returns the running mean loss and accuracy
    (as Keras reports them: averaged over the epoch's batches while the weights change).

    With a `world` of several ranks, each step's `batch_size` images are the global batch and this
    rank takes every `world.size`-th of them; the returned figures are over all ranks."""
    model, world, governor = step.model, step.world, step.governor
    model.train()
    device = train.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for n, start in enumerate(range(0, len(order), batch_size), 1):
        batch = order[start:start + batch_size]
        idx = batch[world.rank::world.size] if world.distributed else batch
        # index_select, not train.images[idx]: the same rows, 13x faster on a CPU (98 us against 7.3 at
        # batch 256; docs/scripts/batch_gather.py)
        x, y = to_model_input(train.images.index_select(0, idx)), train.labels.index_select(0, idx)
        if step.outliers is not None:  # augmented with the digits, in the same call
            x = torch.cat([x, to_model_input(step.outliers.draw(len(idx)))])
        if step.augment is not None:
            x = step.augment(x)
        started = time.perf_counter()  # the governor times what its probes time, and the optimizer's step
        outputs, others = step.outputs(x, len(idx))
        objective, loss = step.objective(outputs, others, y)
        # DDP averages gradients over ranks; weighting each rank's mean by its share of the batch
        # makes that average the gradient of the whole batch's mean loss, even for uneven shares.
        scaled = objective * (len(idx) * world.size / len(batch)) if world.distributed else objective
        step.optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        step.optimizer.step()
        seconds = time.perf_counter() - started
        step.scheduler.step()
        if step.average is not None:
            step.average.update(model)
        loss_sum += loss.detach() * len(idx)
        correct += (model.logits(outputs.detach()).argmax(1) == y).sum()
        seen += len(idx)
        if governor is not None and governor.step_done(seconds):
            governor.probe(lambda: step.shadow(x, y))
        if callbacks and n % log_every == 0:
            loss_now, acc_now = loss_sum.item() / seen, correct.item() / seen  # this rank's share
            for cb in callbacks:
                cb.on_batch_end(n, loss_now, acc_now)
    loss_sum, correct_sum, seen_sum = distributed.all_reduce_sum(
        loss_sum, correct.double(), torch.tensor(float(seen), device=device))
    return loss_sum.item() / seen_sum.item(), correct_sum.item() / seen_sum.item()


def _autocast_casts_every_weight(model: torch.nn.Module) -> bool:
    """Whether each of the model's parameters belongs to a convolution or linear layer, whose ops
    autocast runs in bf16 (casting the weight): only then do bfloat16 copies give autocast's own
    arithmetic. Batch norm, or a custom layer's float32 arithmetic, would get bf16 weights instead."""
    return all(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules()
               if next(m.parameters(recurse=False), None) is not None)


def bf16_copies(model: torch.nn.Module, copies: dict[torch.Tensor, torch.Tensor],
                sync: Callable[[], None]) -> Forward:
    """The model's forward pass run on `copies` (bfloat16 tensors standing in for its parameters, so
    that autocast casts no weight and the gradients land on the copies); `sync` is called first,
    to refresh copies whose weights changed. The model's own parameters are back in place as soon
    as the pass returns: evaluation, checkpoints and weight averages see the float32 weights."""
    slots = [(module, name, param, copies[param]) for module in model.modules()
             for name, param in module._parameters.items() if param is not None and param in copies]

    def forward(x: torch.Tensor) -> torch.Tensor:
        sync()
        try:
            for module, name, _, copy in slots:
                module._parameters[name] = copy
            return model(x)
        finally:
            for module, name, param, _ in slots:
                module._parameters[name] = param

    return forward


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)


def _compiled(forward: Forward, device: torch.device) -> Forward:
    """torch.compile; on a GPU with CUDA graphs, which replay a step's kernels in one launch (the
    steps of these small networks are bound by kernel launches, not arithmetic)."""
    if device.type != "cuda":
        return torch.compile(forward)
    graphed = torch.compile(forward, mode="reduce-overhead")

    def step(x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
        return graphed(x)

    return step
