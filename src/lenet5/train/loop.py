"""The training run: `fit` as a short sequence of named steps, from a config to a run folder.

    start the process's side (devices, threads)  ->  the data (train, validation, test splits)
    ->  the step (model, optimizer, schedule: lenet5.train.step)  ->  a new or restored run folder
    ->  wrap for DDP / torch.compile  ->  per epoch: train, evaluate, save (commit, then publish)

The epoch's shuffle comes from its own seeded generator, so epoch e sees the same order whether
or not the run was interrupted before it. Under torchrun the same steps run data-parallel (see
lenet5.distributed): each rank computes its share of every global batch, DDP averages the
gradients, metric sums are all-reduced and only rank 0 writes.

Model selection: with ``--val-split N`` the best epoch and ``--stop-at`` are decided on N held-out
training images and the test set is only measured, for the curves; without it, as in the Keras
recipe this project reproduces, the test set plays the validation set (and the summary says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lenet5 import distributed
from lenet5.data import Dataset, Split
from lenet5.data.augment import augmentation, distortion
from lenet5.data.catalog import canonical_name
from lenet5.data.transforms import compose, random_hflip
from lenet5.distributed import World
from lenet5.errors import CheckpointError, ConfigError, Lenet5Error, one_line
from lenet5.evaluate import EVAL_BATCH, evaluate
from lenet5.hardware import check_threads, usable_cores
from lenet5.models import DigitClassifier, count_parameters
from lenet5.run_folder import RunFolder, best_record, selection_key
from lenet5.runtime import environment, recipe_noted, resolve_device
from lenet5.train import perpattern
from lenet5.train.config import HOST_SETTINGS, TrainConfig
from lenet5.train.outliers import load_outliers
from lenet5.train.sdlm import SDLM, diagonal_hessian
from lenet5.train.state import capture_train_state, restore_rng
from lenet5.train.step import TrainStep, steps_per_epoch, train_epoch
from lenet5.train.threads import ThreadGovernor

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_seconds", "seconds",
                  "threads")
VAL_FIELDS = ("val_loss", "val_acc")  # with TrainConfig.val_split
RESUME_THREADS = "; a resumed run may set its own with --threads"
EVAL_TRAIN_FIELDS = ("train_eval_loss", "train_eval_acc")  # with TrainConfig.eval_train
# The held-out images are the same for every seed, so runs of different seeds and recipes are
# chosen on the same images.
VAL_SPLIT_SEED = 1998


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
    config: TrainConfig  # as the run used it (a resumed run's, with this session's host settings)


@dataclass
class Splits:
    train: Split
    val: Split | None  # held out of the training images by --val-split
    test: Split


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def epoch_order(seed: int, epoch: int, n: int, repeats: int = 1) -> torch.Tensor:
    """The order of an epoch's `repeats` sweeps over `n` images, each its own shuffle (with one
    sweep, `epoch_permutation`'s)."""
    return torch.cat([epoch_permutation(seed, epoch * repeats + r, n) for r in range(repeats)])


def epoch_size(config: TrainConfig, n: int) -> int:
    """The images an epoch trains on: `config.epoch_repeats` sweeps over `n`."""
    return n * config.epoch_repeats


def split_validation(train: Split, n: int) -> tuple[Split, Split | None]:
    """Hold out `n` of the training images, drawn by a fixed seeded permutation: (train, validation)."""
    if n <= 0:
        return train, None
    if n >= len(train):
        raise ConfigError(f"--val-split {n} leaves no training images of the {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    held, kept = order[:n].sort().values, order[n:].sort().values
    return Split(train.images[kept], train.labels[kept]), Split(train.images[held], train.labels[held])


def evaluate_split(model: DigitClassifier, split: Split, batch_size: int,
                   world: World = World()) -> tuple[float, float]:
    """Mean loss and accuracy over `split`; with several ranks each evaluates its share."""
    if not world.distributed:
        return evaluate(model, split.images, split.labels, batch_size)
    images, labels = split.images[world.rank::world.size], split.labels[world.rank::world.size]
    loss, accuracy = evaluate(model, images, labels, batch_size)
    n = torch.tensor(float(len(labels)), dtype=torch.float64, device=labels.device)
    loss_sum, correct, total = distributed.all_reduce_sum(n * loss, n * accuracy, n)
    return loss_sum.item() / total.item(), round(correct.item()) / total.item()


def _summary(config: TrainConfig, model: DigitClassifier, history: list[dict[str, Any]]) -> dict[str, Any]:
    final, best, key = history[-1], best_record(history), selection_key(history)
    summary = {
        "model": config.model,
        "parameters": count_parameters(model),
        "epochs": len(history),
        "test_acc": final["test_acc"],
        "test_error": 1 - final["test_acc"],
        "test_loss": final["test_loss"],
        "train_acc": final["train_acc"],
        "train_loss": final["train_loss"],
        "best_epoch": best["epoch"],
        "best_selected_by": key,  # test_acc: chosen on the test set, so not a test figure
        "best_test_acc": best["test_acc"],
        "train_seconds": sum(r["train_seconds"] for r in history),
        "seconds": sum(r["seconds"] for r in history),
    }
    if key == "val_acc":
        summary.update(val_acc=final["val_acc"], best_val_acc=best["val_acc"])
    return summary


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
    config.validate()  # these before the folder is touched
    # here, not in validate: a config.json may come from a bigger machine
    check_threads(config.threads, RESUME_THREADS if resume else "")
    if canonical_name(data.name) != canonical_name(config.dataset):
        raise ConfigError(f"the run's --dataset is {config.dataset}, but the data given is {data.name}")
    threads = torch.get_num_threads()
    # rank 0 alone writes the folder, so it alone holds it (two trainings once mixed their files in one)
    held = RunFolder(run_dir).lock() if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    try:
        with held:
            return _fit(config, data, Path(run_dir), callbacks, resume)
    finally:
        torch.set_num_threads(threads)  # the governor's or --threads' count stays inside the run


def _fit(config: TrainConfig, data: Dataset, run_dir: Path, callbacks: Sequence[Callback], resume: bool) -> FitResult:
    world, device, governor = _start(config)
    callbacks = callbacks if world.is_main else ()
    splits = _splits(config, data, device, world)
    distort = distortion(config.distort_strength, config.distort_share) if config.distort else None
    augment = compose(augmentation(config.augment, distort=distort), random_hflip if config.flip else None)
    outliers = load_outliers(config.outliers, config.outlier_weight, data.classes, device, announce=(
        lambda path: print(f"making the non-digits to train on, once (about a minute): {path}", file=sys.stderr,
                           flush=True)) if world.is_main else None)
    step = TrainStep.build(config, device, steps_per_epoch(epoch_size(config, len(splits.train)), config.batch_size),
                           world=world, governor=governor, augment=augment, data=data, outliers=outliers)
    if world.distributed:  # distortions draw from the global generator: a different stream per rank
        torch.manual_seed(config.seed * 1_000_003 + 7919 * world.rank)
    folder = RunFolder(run_dir)
    history = _restore(folder, step, config) if resume else _begin(folder, config, world)
    step.wrap(config.compile)
    env = _announce(folder, step, config, history if resume else None, callbacks)
    for cb in callbacks:
        cb.on_train_begin(run_dir, config, env, len(history))

    epochs = config.epochs
    if history and config.stop_at and history[-1][selection_key(history)] >= config.stop_at:
        epochs = len(history)  # a run that reached --stop-at is finished
    if len(history) < epochs:
        last = epoch_size(config, len(splits.train)) % config.batch_size
        step.warm_up(splits.train, [config.batch_size] + ([last] if last else []))  # outliers added to each
    for epoch in range(len(history), epochs):
        record = _train_and_evaluate(step, splits, config, epoch, callbacks)
        history.append(record)
        _save_epoch(folder, step, config, history)
        for cb in callbacks:
            cb.on_epoch_end(record)
        if config.stop_at and record[selection_key(history)] >= config.stop_at:
            break

    if not history:
        raise ConfigError(f"{run_dir}: nothing to do, the run already has {config.epochs} epochs")
    distributed.barrier()  # the other ranks return once rank 0's files are complete
    return FitResult(model=step.eval_model, history=history, metrics=_summary(config, step.model, history),
                     run_dir=run_dir, config=config)


def _start(config: TrainConfig) -> tuple[World, torch.device, ThreadGovernor | None]:
    """The process's side of a run: its rank, its device, its threads.

    A fixed --threads N is kept; otherwise the governor starts from the cores this process may use
    (CPU, one process) and backs off while other processes compete for them."""
    world = distributed.init(config.device)
    device = distributed.device_for(world, resolve_device(config.device))
    if config.threads or device.type != "cpu" or world.distributed:
        torch.set_num_threads(config.threads or usable_cores())
        return world, device, None
    return world, device, ThreadGovernor(usable_cores())


def _splits(config: TrainConfig, data: Dataset, device: torch.device, world: World) -> Splits:
    train, val = split_validation(data.train.take(config.train_samples, "--train-samples"), config.val_split)
    splits = Splits(train.to(device), val.to(device) if val else None,
                    data.test.take(config.test_samples, "--test-samples").to(device))
    n, batch = len(splits.train), config.batch_size
    if batch > n:
        raise ConfigError(f"--batch-size {batch} is larger than the {n} training images")
    last = epoch_size(config, n) % batch  # an epoch's last batch
    if world.distributed and (batch < world.size or 0 < last < world.size):
        raise ConfigError(f"--batch-size {batch} is the global batch: every one of the {world.size} "
                          f"processes needs at least one image of every batch, including the last "
                          f"({last or batch} images)")
    return splits


def _title(config: TrainConfig) -> str:
    return f"{config.model}, {config.optimizer}, batch {config.batch_size}"


def _begin(folder: RunFolder, config: TrainConfig, world: World) -> list[dict[str, Any]]:
    """Claim a new run's folder: refused if it holds a run."""
    folder.claim()
    distributed.barrier()  # every rank has checked that the folder is free before rank 0 writes into it
    if world.is_main:
        folder.begin(config.to_dict())
    return []


def _restore(folder: RunFolder, step: TrainStep, config: TrainConfig) -> list[dict[str, Any]]:
    """Load the last committed epoch into `step` and bring the folder's other files up to it."""
    state = folder.require().load_commit()
    if state is None:
        history: list[dict[str, Any]] = []
    else:
        try:
            saved = {k for group in state["optimizer"]["param_groups"] for k in group if k != "params"}
            wanted = {k for group in step.optimizer.param_groups for k in group if k != "params"}
            if saved != wanted:  # load_state_dict takes another optimizer's state; its step() then fails
                raise ValueError(f"its optimizer state is not {config.optimizer}'s, the optimizer config.json names")
            step.model.load_state_dict(state["model"])  # copies into the channels_last weights
            step.optimizer.load_state_dict(state["optimizer"])
            step.scheduler.load_state_dict(state["scheduler"])
            if step.average is not None:
                step.average.load_state_dict(state["average"])
            restore_rng(state, step.world.rank)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{folder.state}: does not fit this run's config.json ({one_line(e)})") from None
        history = list(state["history"])
    if step.world.is_main:
        folder.clean()
        if history:  # the files a crash may have left behind the commit record catch up with it
            folder.publish(step.eval_model, config=config.to_dict(), history=history,
                           summary=_summary(config, step.model, history), title=_title(config), check_best=True)
    return history


def _announce(folder: RunFolder, step: TrainStep, config: TrainConfig, history: list[dict[str, Any]] | None,
              callbacks: Sequence[Callback]) -> dict[str, Any]:
    """The run's environment (library versions, device, precision and why), written to run.json."""
    env = environment(next(step.model.parameters()).device)
    reason, recipe = step.precision.reason, recipe_noted()
    if reason == "asked for" and recipe and recipe["options"].get("precision") == config.precision:
        reason = f"the {recipe['name']} recipe's for {recipe['hardware_class']}"  # the recipe asked, not the user
    env.update(precision=step.precision.precision, precision_reason=reason, precision_slow=step.precision.slow)
    if step.world.distributed:
        env.update(world_size=step.world.size, backend=distributed.backend())
    if step.world.is_main:
        folder.write_run_info(env, len(history) if history is not None else None)
    return env


def _train_and_evaluate(step: TrainStep, splits: Splits, config: TrainConfig, epoch: int,
                        callbacks: Sequence[Callback]) -> dict[str, Any]:
    """One epoch: train on a seeded shuffle, then measure; returns the epoch's history record."""
    train, device = splits.train, splits.train.images.device
    for cb in callbacks:
        cb.on_epoch_begin(epoch + 1, config.epochs, steps_per_epoch(epoch_size(config, len(train)), config.batch_size))
    started = time.perf_counter()
    lr = step.optimizer.param_groups[0]["lr"]
    if isinstance(step.optimizer, SDLM):
        # Appendix C: re-estimate the Hessian's diagonal on a few hundred samples before each pass
        # (the same samples on every rank, so every rank gets the same estimate).
        sample = epoch_permutation(config.seed + 1, epoch, len(train))[: config.hessian_samples].to(device)
        step.optimizer.set_hessian(diagonal_hessian(step.model, train.images[sample]))
    order = epoch_order(config.seed, epoch, len(train), config.epoch_repeats).to(device)
    if perpattern.applies(step.model, step.optimizer, config.batch_size, device, step.world.distributed,
                          step.precision.precision) and config.augment == "none" and not config.flip \
            and step.outliers is None:  # the pass knows the paper's distortions, not the other transforms
        # The paper's one update per pattern, in one native loop per pass (lenet5.train.perpattern);
        # the step's transform is then --distort's alone, if any.
        train_loss, train_acc = perpattern.train_pass(step, train, order, callbacks, distort=step.augment or False)
    else:
        train_loss, train_acc = train_epoch(step, train, config.batch_size, order, callbacks)
    train_seconds = time.perf_counter() - started
    if not math.isfinite(train_loss):
        raise TrainingError(f"the training loss became {train_loss} in epoch {epoch + 1}; "
                            f"try a smaller --lr (now {config.lr:g})")
    eval_batch = config.eval_batch_size or (EVAL_BATCH if device.type == "cpu" else 10_000)
    model = step.eval_model
    test_loss, test_acc = evaluate_split(model, splits.test, eval_batch, step.world)
    extra: dict[str, float] = {}
    if splits.val is not None:
        extra["val_loss"], extra["val_acc"] = evaluate_split(model, splits.val, eval_batch, step.world)
    if config.eval_train:
        extra["train_eval_loss"], extra["train_eval_acc"] = evaluate_split(model, train, eval_batch, step.world)
    return {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
            "test_acc": test_acc, "lr": lr, "train_seconds": train_seconds, "seconds": time.perf_counter() - started,
            "threads": torch.get_num_threads(), **extra}


def _save_epoch(folder: RunFolder, step: TrainStep, config: TrainConfig, history: list[dict[str, Any]]) -> None:
    """The commit record first (the epoch is kept from here on), then every file derived from it."""
    rng = distributed.all_gather(torch.get_rng_state()) if step.world.distributed else None
    if step.world.is_main:
        folder.commit(capture_train_state(epoch=len(history), model=step.model, optimizer=step.optimizer,
                                          scheduler=step.scheduler, history=history, rank_rng=rng,
                                          average=step.average.state_dict() if step.average else None))
        folder.publish(step.eval_model, config=config.to_dict(), history=history,
                       summary=_summary(config, step.model, history), title=_title(config))


def resume(run_dir: str | Path, data: Dataset, *, epochs: int | None = None,
           callbacks: Sequence[Callback] = (), **host: Any) -> FitResult:
    """Continue an interrupted run from its folder (optionally for more epochs than planned).

    `host` may change the settings of the machine it continues on (HOST_SETTINGS: device,
    threads, eval_batch_size, compile) for this session; config.json keeps the run's own."""
    folder = RunFolder(run_dir).require()
    config = TrainConfig.from_json(folder.config, required=("model", "optimizer", "lr", "batch_size", "epochs"))
    unknown = sorted(set(host) - set(HOST_SETTINGS))
    if unknown:
        raise ConfigError(f"--resume may change only {', '.join(HOST_SETTINGS)} and --epochs, not {', '.join(unknown)}")
    if epochs is not None:  # written once everything else is known to be usable: a refused resume changes nothing
        planned = dataclasses.replace(config, epochs=epochs)  # validates
        session = dataclasses.replace(planned, **host)
        resolve_device(session.device)  # "CUDA is not available" before, not after, the run's config changes
        check_threads(session.threads, RESUME_THREADS)
        committed = len((folder.load_commit() or {}).get("history", []))
        if epochs < committed:  # it once "succeeded", leaving config.json at fewer epochs than the history
            raise ConfigError(f"--epochs {epochs} is fewer than the {committed} the run has already trained")
        folder.write_config(planned.to_dict())
        config = planned
    config = dataclasses.replace(config, **host)  # validates
    return fit(config, data, folder.path, callbacks=callbacks, resume=True)
