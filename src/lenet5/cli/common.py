"""What the commands share: the training and data options, data loading with a download bar, the
Keras-style training display, and the checkpoint a command falls back to."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lenet5.data.catalog import dataset_names
from lenet5.data.dataset import DATA_ENV, MIRRORS_ENV, load_dataset, resolve_data_dir
from lenet5.errors import ConfigError, Lenet5Error, one_line
from lenet5.models import count_parameters, create_model
from lenet5.run_folder import RunFolder
from lenet5.train import Callback, TrainConfig

OFFLINE_ENV = "LENET5_OFFLINE"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143  # 128 + SIGINT, 128 + SIGTERM


# ---------------------------------------------------------------- options
def _field_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field. Unset options stay out of the namespace (SUPPRESS),
    so a --config file or a resumed run's config.json is only overridden by what was typed."""
    group = parser.add_argument_group("training options (TrainConfig; defaults reproduce the blog post's run)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default is not None else "")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                               metavar=None if f.metadata.get("choices") else f.name.upper(), help=help_text)


def add_data_options(parser: argparse.ArgumentParser, dataset: str | None = None) -> None:
    """The options of where data comes from; with `dataset` ("checkpoint" or a default name), --dataset too
    (`train` has it from TrainConfig)."""
    group = parser.add_argument_group("data")
    if dataset == "checkpoint":
        group.add_argument("--dataset", metavar="NAME", help="evaluate on this data set: " + ", ".join(dataset_names())
                           + " (default: the one the checkpoint was trained on; its classes must be the checkpoint's)")
    elif dataset:
        group.add_argument("--dataset", metavar="NAME", default=dataset,
                           help=f"data set: {', '.join(dataset_names())} (default: {dataset})")
    group.add_argument("--data-dir", type=Path, default=None,
                       help=f"folder with the data set's files (default: for mnist ${DATA_ENV}, else "
                            f"{resolve_data_dir(None).parent}/NAME)")
    group.add_argument("--offline", action=argparse.BooleanOptionalAction,
                       default=os.environ.get(OFFLINE_ENV, "") not in ("", "0"),
                       help=f"never download; missing files are an error (default: ${OFFLINE_ENV}, else off)")
    group.add_argument("--mirror", action="append", metavar="URL",
                       help=f"download from this mirror (repeatable; default: for mnist ${MIRRORS_ENV}, else the "
                            "data set's built-in list)")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds before a stalled download (no byte, or under 1 KiB/s over that "
                       "time) is abandoned")
    group.add_argument("--retries", type=int, default=2, help="retries per mirror for transient failures")


DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto)"
CHECKPOINT_HELP = "a .safetensors checkpoint or a run folder (uses its best)"
BUNDLED_HELP = "a .safetensors checkpoint or a run folder (uses its best; default: the bundled model)"


MAX_TIMEOUT_S, MAX_RETRIES = 86_400, 100  # a day without a byte; a hundred tries a mirror


def load_data(args: argparse.Namespace, dataset: str = "mnist"):
    # NaN passed "<= 0" and reached the socket as a traceback; inf overflowed its clock
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        raise ConfigError(f"--timeout must be positive seconds, at most {MAX_TIMEOUT_S}, got {args.timeout}")
    if not 0 <= args.retries <= MAX_RETRIES:
        raise ConfigError(f"--retries must be from 0 to {MAX_RETRIES}, got {args.retries}")
    progress = DownloadProgress()
    try:
        return load_dataset(dataset, args.data_dir, download=not args.offline, mirrors=args.mirror,
                            timeout=args.timeout, retries=args.retries, progress=progress)
    finally:
        progress.close()



def check_run_name(name: str | None) -> None:
    """A --name is one folder inside --out-dir ('../x', '/tmp/x', 'a/b' and '.' wrote elsewhere)."""
    if name is not None and (name in (".", "..") or "/" in name or os.sep in name or (os.altsep or "/") in name):
        raise ConfigError(f"--name {name[:80]!r}: a run's folder name, without '/' (the folder goes in --out-dir)")


# ---------------------------------------------------------------- checkpoints and their calibration
def print_calibration(calibration, path: Path) -> None:
    print(f"{path}: {calibration.rule()}")
    print(f"fitted on {calibration.heldout}: {calibration.heldout_rejected:.2%} of them marked unsure, "
          f"error {calibration.heldout_error:.2%} on the rest")


def is_checkpoint(path: Path) -> bool:
    """Whether a command's first item names a checkpoint rather than an image or a folder of them."""
    # as load_checkpoint reads them: a file, a run folder, or its checkpoints/ folder (best.safetensors)
    return path.suffix == ".safetensors" or RunFolder(path).is_run_folder() or (path / "best.safetensors").is_file()


def checkpoint_or_bundled(checkpoint: Path | None) -> Path:
    """The checkpoint given, else the model shipped with the package (and a line saying so)."""
    if checkpoint is not None:
        return checkpoint
    from lenet5.pretrained import RECIPE, bundled_checkpoint

    path = bundled_checkpoint()
    print(f"using the bundled model ({path.stem}, the {RECIPE} recipe's; give a checkpoint to use your own)",
          file=sys.stderr)
    return path


# ---------------------------------------------------------------- progress shown to the user
class DownloadProgress:
    """A byte progress bar per downloaded file (hidden when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.name = ""

    def __call__(self, name: str, done: int, total: int) -> None:
        if name != self.name or self.bar is None:
            self.close()
            self.name = name
            self.bar = tqdm(total=total, desc=f"downloading {name}", unit="B", unit_scale=True, disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleProgress(Callback):
    """Keras-style output: a header, a progress bar per epoch, one line of figures per epoch."""

    def __init__(self, classes: int = 10) -> None:
        self.bar: tqdm | None = None
        self.classes = classes

    def on_train_begin(self, run_dir, config, env, start_epoch) -> None:
        rev = f", git {env['git_revision']}" if env.get("git_revision") else ""
        where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
        print(f"lenet5 {env['lenet5']}{rev} | torch {env['torch']} | {env['device']} ({where})")
        model = create_model(config.model, num_classes=self.classes, **config.model_args())
        extra = f" | {env['precision']}"
        if env.get("world_size"):
            extra += f" | {env['world_size']} processes ({env['backend']}), global batch"
        print(f"model {config.model} ({count_parameters(model):,} parameters) | {config.optimizer} lr {config.lr:g} "
              f"| {config.schedule} schedule | batch {config.batch_size} | {config.epochs} epochs | seed {config.seed}"
              + extra)
        print(f"data {config.dataset} ({self.classes} classes)")
        print(f"precision {env['precision']}: {env['precision_reason']}")
        if env["precision_slow"]:
            print("warning: --precision bf16 will be slow on this machine; --precision auto picks fp32 here",
                  file=sys.stderr, flush=True)
        print(f"run folder: {run_dir}" + (f" (resuming after epoch {start_epoch})" if start_epoch else ""),
              flush=True)

    def on_epoch_begin(self, epoch, epochs, steps) -> None:
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, disable=None)

    def on_batch_end(self, step, loss, accuracy) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {accuracy:.2%}", refresh=False)

    def on_epoch_end(self, record) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"epoch {record['epoch']:>2}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}"
              + (f"  |  val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}" if "val_acc" in record else "")
              + f"  |  test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}"
              f"  |  lr {record['lr']:.2e}  {record['seconds']:.1f} s", flush=True)



def error_line(error: BaseException) -> str:
    """An error as one line for stderr: an OSError as "FILE: reason", anything else by lenet5.errors.one_line."""
    if isinstance(error, OSError) and not isinstance(error, Lenet5Error) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return one_line(error, limit=1000)
