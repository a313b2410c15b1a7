"""The training loop: the whole data set as tensors on the compute device, one readable function.

Speed choices, named where they matter:
- images stay uint8 on the device and a batch is one gather by a permutation slice, converted
  to float there (no DataLoader, no per-sample Python, no host-to-device copy per step);
- loss and accuracy are summed on the device and read back only every `log_every` steps and
  at the end of the epoch (a `.item()` per step would sync a GPU every step);
- the epoch's shuffle comes from its own seeded generator, so epoch e sees the same order
  whether or not the run was interrupted before it;
- `--precision bf16` runs the forward and backward passes under bf16 autocast (the weights,
  the optimizer and the evaluation stay fp32), and `auto` does so only where bf16 is fast
  (lenet5.hardware); `--compile` hands the model to torch.compile.

Under torchrun the same loop runs data-parallel (see lenet5.distributed): each rank computes
its share of every global batch, DDP averages the gradients, metric sums are all-reduced and
only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lenet5 import distributed
from lenet5.data import Dataset, Split
from lenet5.data.catalog import canonical_name
from lenet5.data.distort import random_affine
from lenet5.data.transforms import compose, random_hflip, to_model_input
from lenet5.distributed import World
from lenet5.errors import CheckpointError, ConfigError, Lenet5Error, one_line
from lenet5.evaluate import EVAL_BATCH, evaluate
from lenet5.models import DigitClassifier, count_parameters, create_model, model_class
from lenet5.hardware import choose_precision, usable_cores
from lenet5.run_folder import RunFolder, best_record
from lenet5.runtime import environment, resolve_device
from lenet5.train.config import HOST_SETTINGS, TrainConfig
from lenet5.train.optim import build_optimizer, build_schedule
from lenet5.train.sdlm import SDLM, diagonal_hessian
from lenet5.train.state import capture_train_state, restore_rng
from lenet5.train.threads import ThreadGovernor

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_seconds", "seconds",
                  "threads")
EVAL_TRAIN_FIELDS = ("train_eval_loss", "train_eval_acc")  # with TrainConfig.eval_train


class TrainingError(Lenet5Error):
    """Training cannot go on (the loss diverged)."""


class Callback:
    """Hooks the loop calls to report progress; the library itself never prints."""

    def on_train_begin(self, run_dir: Path, config: TrainConfig, env: dict[str, Any], start_epoch: int) -> None: ...

    def on_epoch_begin(self, epoch: int, epochs: int, steps: int) -> None: ...

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None: ...

    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    model: DigitClassifier
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    run_dir: Path


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass (its backward follows), or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_epoch(model: DigitClassifier, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, train: Split, batch_size: int,
                order: torch.Tensor, callbacks: Sequence[Callback] = (), log_every: int = 50,
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                forward: Callable[[torch.Tensor], torch.Tensor] | None = None, world: World = World(),
                precision: str = "fp32", governor: ThreadGovernor | None = None) -> tuple[float, float]:
    """One pass over `train` in the given order; returns the running mean loss and accuracy
    (as Keras reports them: averaged over the epoch's batches while the weights change).

    `augment`, if given, transforms each (B, 1, 28, 28) float batch on its device. `forward` is
    what computes the outputs (the model itself, or its DDP or compiled wrapper). With a `world`
    of several ranks, each step's `batch_size` images are the global batch and this rank takes
    every `world.size`-th of them; the returned figures are over all ranks. A `governor` (CPU only)
    is told each step's time and may change the thread count between steps."""
    model.train()
    forward = model if forward is None else forward
    device = train.images.device
    autocast = _autocast(device, precision)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for step, start in enumerate(range(0, len(order), batch_size), 1):
        started = time.perf_counter()
        batch = order[start:start + batch_size]
        idx = batch[world.rank::world.size] if world.distributed else batch
        x, y = to_model_input(train.images[idx]), train.labels[idx]  # (B, 1, 28, 28), (B,)
        if augment is not None:
            x = augment(x)
        with autocast:
            outputs = forward(x)
        loss = model.loss(outputs.float(), y)
        # DDP averages gradients over ranks; weighting each rank's mean by its share of the batch
        # makes that average the gradient of the whole batch's mean loss, even for uneven shares.
        scaled = loss * (len(idx) * world.size / len(batch)) if world.distributed else loss
        optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (model.logits(outputs.detach()).argmax(1) == y).sum()
        seen += len(idx)
        if governor is not None and governor.step_done(time.perf_counter() - started):
            governor.probe(lambda: _shadow_step(model, forward, x, y, autocast))
        if callbacks and step % log_every == 0:
            loss_now, acc_now = loss_sum.item() / seen, correct.item() / seen  # this rank's share
            for cb in callbacks:
                cb.on_batch_end(step, loss_now, acc_now)
    loss_sum, correct_sum, seen_sum = distributed.all_reduce_sum(
        loss_sum, correct.double(), torch.tensor(float(seen), device=device))
    return loss_sum.item() / seen_sum.item(), correct_sum.item() / seen_sum.item()


def _shadow_step(model: DigitClassifier, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, autocast: contextlib.AbstractContextManager) -> None:
    """A training step's forward and backward with the gradients thrown away: changes no state."""
    with autocast:
        outputs = forward(x)
    model.loss(outputs.float(), y).backward()
    model.zero_grad(set_to_none=True)


def evaluate_split(model: DigitClassifier, split: Split, batch_size: int, world: World = World()) -> tuple[float, float]:
    """Mean loss and accuracy over `split`; with several ranks each evaluates its share."""
    if not world.distributed:
        return evaluate(model, split.images, split.labels, batch_size)
    images, labels = split.images[world.rank::world.size], split.labels[world.rank::world.size]
    loss, accuracy = evaluate(model, images, labels, batch_size)
    n = torch.tensor(float(len(labels)), dtype=torch.float64, device=labels.device)
    loss_sum, correct, total = distributed.all_reduce_sum(n * loss, n * accuracy, n)
    return loss_sum.item() / total.item(), round(correct.item()) / total.item()


def _compiled(forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Callable:
    """torch.compile; on a GPU with CUDA graphs, which replay a step's kernels in one launch (the
    steps of these small networks are bound by kernel launches, not arithmetic)."""
    if device.type != "cuda":
        return torch.compile(forward)
    graphed = torch.compile(forward, mode="reduce-overhead")

    def step(x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
        return graphed(x)

    return step


def warm_up(model: DigitClassifier, forward: Callable[[torch.Tensor], torch.Tensor], train: Split,
            sizes: Sequence[int], world: World = World(), precision: str = "fp32") -> None:
    """Run the training step's forward and backward once per batch shape, then drop the gradients.

    Before the clock starts, so that an epoch's time is training: the first steps on a device
    pay one-off costs (CUDA's lazy kernel loading and cuDNN/cuBLAS set-up, oneDNN primitive
    creation, torch.compile's compilation per shape). No weight, optimizer state or random
    stream changes, so the run's result is the same with or without it.
    """
    autocast = _autocast(train.images.device, precision)
    for size in sizes:
        idx = torch.arange(size, device=train.images.device)[world.rank::world.size]
        with autocast:
            outputs = forward(to_model_input(train.images[idx]))
        model.loss(outputs.float(), train.labels[idx]).backward()
    model.zero_grad(set_to_none=True)


def _summary(config: TrainConfig, model: DigitClassifier, history: list[dict[str, Any]]) -> dict[str, Any]:
    final = history[-1]
    best = best_record(history)
    return {
        "model": config.model,
        "parameters": count_parameters(model),
        "epochs": len(history),
        "test_acc": final["test_acc"],
        "test_error": 1 - final["test_acc"],
        "test_loss": final["test_loss"],
        "train_acc": final["train_acc"],
        "train_loss": final["train_loss"],
        "best_epoch": best["epoch"],
        "best_test_acc": best["test_acc"],
        "train_seconds": sum(r["train_seconds"] for r in history),
        "seconds": sum(r["seconds"] for r in history),
    }


def fit(config: TrainConfig, data: Dataset, run_dir: str | Path, *, callbacks: Sequence[Callback] = (),
        resume: bool = False) -> FitResult:
    """Train `config` on `data` (the data set `config.dataset` names), writing the run folder after every epoch.

    A new run refuses a folder that already holds one (ConfigError). With ``resume=True`` the run
    continues from ``run_dir``'s last committed epoch (weights, optimizer, schedule, RNG and
    history; from scratch if none was committed), first rewriting the folder's other files from
    it, and ends as an uninterrupted run would. Under torchrun every rank calls this with the same
    arguments; rank 0 alone writes and calls `callbacks`, and every rank returns the same result.

    It leaves the process as it found it (the thread count is restored). The process-wide speed
    settings `lenet5 train` makes first, `lenet5.runtime.tune_allocator()` and `flush_denormals()`,
    are the caller's to make (see their docstrings).
    """
    threads = torch.get_num_threads()
    try:
        return _fit(config, data, Path(run_dir), callbacks, resume)
    finally:
        torch.set_num_threads(threads)  # the governor's or --threads' count stays inside the run


def _fit(config: TrainConfig, data: Dataset, run_dir: Path, callbacks: Sequence[Callback], resume: bool) -> FitResult:
    config.validate()
    if canonical_name(data.name) != canonical_name(config.dataset):
        raise ConfigError(f"the run's --dataset is {config.dataset}, but the data given is {data.name}")
    folder = RunFolder(run_dir)
    world = distributed.init(config.device)
    device = distributed.device_for(world, resolve_device(config.device))
    if not world.is_main:
        callbacks = ()
    # A fixed --threads N is kept; otherwise the governor starts from the cores this process may use
    # (CPU, one process) and backs off while other processes compete for them.
    governor = None
    if config.threads or device.type != "cpu" or world.distributed:
        torch.set_num_threads(config.threads or usable_cores())
    else:
        governor = ThreadGovernor(usable_cores())
    precision = choose_precision(config.precision, device, model_class(config.model).bf16_pays)
    train = data.train.head(config.train_samples).to(device)
    test = data.test.head(config.test_samples).to(device)
    if config.batch_size > len(train):
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {len(train)} training images")
    if world.distributed and (config.batch_size < world.size or 0 < len(train) % config.batch_size < world.size):
        raise ConfigError(f"--batch-size {config.batch_size} is the global batch: every one of the {world.size} "
                          f"processes needs at least one image of every batch, including the last "
                          f"({len(train) % config.batch_size or config.batch_size} images)")

    torch.manual_seed(config.seed)
    # channels_last: oneDNN's convolutions run 1.3-1.7x faster on this layout on CPU (measured
    # for both models at batch 32-128); a 1-channel input is already in it, so no copy is made.
    model = create_model(config.model, num_classes=len(data.classes)).to(device, memory_format=torch.channels_last)
    model.dataset, model.classes = data.name, data.classes
    if world.distributed:
        # Distortions draw from the global generator: a different stream per rank.
        torch.manual_seed(config.seed * 1_000_003 + 7919 * world.rank)
    optimizer = build_optimizer(model.parameters(), config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = build_schedule(optimizer, config, steps_per_epoch)
    history: list[dict[str, Any]] = []
    title = f"{config.model}, {config.optimizer}, batch {config.batch_size}"
    if resume:
        state = folder.require().load_commit()
        if state is not None:
            try:
                model.load_state_dict(state["model"])  # copies into the channels_last weights
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                restore_rng(state, world.rank)
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"{folder.state}: does not fit this run's config.json "
                                      f"({one_line(e)})") from None
            history = list(state["history"])
        if world.is_main:
            folder.clean()
            if history:  # the files a crash may have left behind the commit record catch up with it
                folder.publish(model, config=config.to_dict(), history=history,
                               summary=_summary(config, model, history), title=title, check_best=True)
    else:
        folder.claim()
        # Every rank has checked that the folder is free before rank 0 starts writing into it.
        distributed.barrier()
        if world.is_main:
            folder.begin(config.to_dict())
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        forward = _compiled(forward, device)
    env = environment(device)
    env.update(precision=precision.precision, precision_reason=precision.reason, precision_slow=precision.slow)
    if world.distributed:
        env.update(world_size=world.size, backend=distributed.backend())
    if world.is_main:
        folder.write_run_info(env, len(history) if resume else None)
    for cb in callbacks:
        cb.on_train_begin(run_dir, config, env, len(history))

    eval_batch = config.eval_batch_size or (EVAL_BATCH if device.type == "cpu" else 10_000)
    stopped = bool(history and config.stop_at and history[-1]["test_acc"] >= config.stop_at)
    epochs = len(history) if stopped else config.epochs  # a run that reached --stop-at is finished
    if len(history) < epochs:
        last = len(train) % config.batch_size
        warm_up(model, forward, train, [config.batch_size] + ([last] if last else []), world, precision.precision)
        if governor is not None:
            idx = torch.arange(config.batch_size, device=device)
            governor.probe(lambda: _shadow_step(model, forward, to_model_input(train.images[idx]), train.labels[idx],
                                                _autocast(device, precision.precision)))
    augment = compose(random_affine if config.distort else None, random_hflip if config.flip else None)
    for epoch in range(len(history), epochs):
        for cb in callbacks:
            cb.on_epoch_begin(epoch + 1, config.epochs, steps_per_epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(optimizer, SDLM):
            # Appendix C: re-estimate the Hessian's diagonal on a few hundred samples before each pass
            # (the same samples on every rank, so every rank gets the same estimate).
            sample = epoch_permutation(config.seed + 1, epoch, len(train))[: config.hessian_samples].to(device)
            optimizer.set_hessian(diagonal_hessian(model, train.images[sample]))
        order = epoch_permutation(config.seed, epoch, len(train)).to(device)
        train_loss, train_acc = train_epoch(model, optimizer, scheduler, train, config.batch_size, order, callbacks,
                                            augment=augment, forward=forward, world=world,
                                            precision=precision.precision, governor=governor)
        train_seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            raise TrainingError(f"the training loss became {train_loss} in epoch {epoch + 1}; "
                                f"try a smaller --lr (now {config.lr:g})")
        test_loss, test_acc = evaluate_split(model, test, eval_batch, world)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                  "test_acc": test_acc, "lr": lr, "train_seconds": train_seconds,
                  "seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}
        if config.eval_train:
            record["train_eval_loss"], record["train_eval_acc"] = evaluate_split(model, train, eval_batch, world)
        history.append(record)
        rng = distributed.all_gather(torch.get_rng_state()) if world.distributed else None
        if world.is_main:
            # The commit record first (the epoch is kept from here on), then what derives from it.
            folder.commit(capture_train_state(epoch=epoch + 1, model=model, optimizer=optimizer,
                                              scheduler=scheduler, history=history, rank_rng=rng))
            folder.publish(model, config=config.to_dict(), history=history,
                           summary=_summary(config, model, history), title=title)
        for cb in callbacks:
            cb.on_epoch_end(record)
        if config.stop_at and test_acc >= config.stop_at:
            break

    if not history:
        raise ConfigError(f"{run_dir}: nothing to do, the run already has {config.epochs} epochs")
    distributed.barrier()  # the other ranks return once rank 0's files are complete
    return FitResult(model=model, history=history, metrics=_summary(config, model, history), run_dir=run_dir)


def resume(run_dir: str | Path, data: Dataset, *, epochs: int | None = None,
           callbacks: Sequence[Callback] = (), **host: Any) -> FitResult:
    """Continue an interrupted run from its folder (optionally for more epochs than planned).

    `host` may change the settings of the machine it continues on (HOST_SETTINGS: device,
    threads, eval_batch_size, compile) for this session; config.json keeps the run's own."""
    folder = RunFolder(run_dir).require()
    config = TrainConfig.from_json(folder.config)
    if epochs is not None:
        config.epochs = epochs
        config.validate()
        folder.write_config(config.to_dict())
    unknown = sorted(set(host) - set(HOST_SETTINGS))
    if unknown:
        raise ConfigError(f"--resume may change only {', '.join(HOST_SETTINGS)} and --epochs, not {', '.join(unknown)}")
    config = dataclasses.replace(config, **host)  # validates
    return fit(config, data, folder.path, callbacks=callbacks, resume=True)
