"""A training run's folder: its layout, whether it holds a run, and how an epoch is committed.

    RUN/config.json                  the TrainConfig (written before the first epoch)
    RUN/run.json, run-resumed-N.json versions, device, git revision of each start
    RUN/checkpoints/last.state.pt    the commit record: epoch, weights, optimizer, schedule, RNG, history
    RUN/checkpoints/last.safetensors (+ .json)  the last epoch's weights    } derived from the
    RUN/checkpoints/best.safetensors (+ .json)  the best epoch's weights    } commit record, and
    RUN/history.json, history.csv, curves.png, metrics.json                 } written after it

Crash safety rests on one atomic rename. Each epoch first replaces `last.state.pt`, which alone
holds everything needed to go on; that rename is the moment the epoch is committed. The derived
files follow, each replaced atomically. A process killed at any instant therefore leaves the
commit record of epoch N or N-1 and derived files of at most that epoch, and `resume` rewrites
every derived file from the commit record before training on, so they agree again. `best` is
only ever written for the committed epoch, so an older best is never lost. Half-written
temporary files (`.NAME.RANDOM.tmp`) are removed whenever a run starts or resumes.

One process trains in a folder at a time: `RUN/.lock` is held (an advisory flock, released by
the system however the process ends) while a run trains, and a second `train` or `--resume` of
the same folder is refused instead of mixing its files into the first one's.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import torch

from lenet5.checkpoint import METADATA_KEY, checkpoint_files, load_checkpoint, read_header
from lenet5.errors import CheckpointError, ConfigError, one_line
from lenet5.fileio import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, create_temp
from lenet5.models import DigitClassifier
from lenet5.plots import plot_curves

# Test hook, read by tests/test_run_folder.py only: "FILE:EPOCH" (e.g. "last.state.pt:2") kills
# this process with SIGKILL while it writes FILE for EPOCH, leaving a half-written temporary file.
TEST_CRASH_ENV = "LENET5_TEST_CRASH_AT"
LOCK_FILE = ".lock"
CHECKPOINT_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc")


def selection_key(history: list[dict[str, Any]]) -> str:
    """The record field that chooses the best epoch (and stops a run at --stop-at): validation
    accuracy where a validation split was held out, else, the Keras recipe's way, test accuracy."""
    return "val_acc" if history and "val_acc" in history[0] else "test_acc"


def best_record(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch the best checkpoint holds: the first with the highest selection accuracy."""
    key = selection_key(history)
    return max(history, key=lambda r: r[key])


class RunFolder:
    """The files of one run under `path`; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.checkpoints = self.path / "checkpoints"
        self.state = self.checkpoints / "last.state.pt"
        self.last_weights = self.checkpoints / "last.safetensors"
        self.best_weights = self.checkpoints / "best.safetensors"
        self.history_json = self.path / "history.json"
        self.history_csv = self.path / "history.csv"
        self.curves = self.path / "curves.png"
        self.metrics = self.path / "metrics.json"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process while it trains; ConfigError if another holds it."""
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): one process a folder is then the user's to keep
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 20).decode(errors="replace").strip() or "?"
                raise ConfigError(f"{self.path} is in use by another training (process {holder}); wait for it to "
                                  "end, or pick another --name") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------ what is there
    def is_run_folder(self) -> bool:
        """A run was started here (it has its config.json)."""
        return self.config.is_file()

    def require(self) -> "RunFolder":
        if not self.is_run_folder():
            raise CheckpointError(f"{self.path}: not a run folder (no config.json)")
        return self

    def holds_run(self) -> bool:
        """At least one epoch was committed here (or files of one are), so starting over would lose it."""
        return any(p.exists() for p in (self.state, self.last_weights, self.best_weights, self.metrics,
                                        self.history_json))

    def claim(self) -> None:
        """The overwrite guard: refuse to start a new run where one has trained. A folder that holds
        no committed epoch (say, a run killed during its first epoch) may be started again."""
        if self.holds_run():
            raise ConfigError(f"{self.path} already holds a run; continue it with --resume {self.path} "
                              "or pick --name")

    def stale_files(self) -> list[Path]:
        """Temporary files left by a process killed while writing."""
        return [p for folder in (self.path, self.checkpoints) if folder.is_dir()
                for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()]

    # ------------------------------------------------------------ starting and resuming
    def clean(self) -> None:
        for stale in self.stale_files():
            stale.unlink(missing_ok=True)

    def begin(self, config: dict[str, Any]) -> None:
        """Start a new run here: the folder, no stale files, its config.json."""
        self.claim()
        self.path.mkdir(parents=True, exist_ok=True)
        self.clean()
        for earlier in self.path.glob("run-resumed-*.json"):  # from an attempt that committed nothing
            earlier.unlink(missing_ok=True)
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config, config)

    def write_run_info(self, env: dict[str, Any], resumed_after: int | None = None) -> None:
        name = "run.json" if resumed_after is None else f"run-resumed-{resumed_after}.json"
        atomic_write_json(self.path / name, env)

    def load_commit(self) -> dict[str, Any] | None:
        """The last committed epoch's state (with its weights under "model"), or None when no epoch
        was committed: a run killed in its first epoch starts again from scratch."""
        if not self.state.is_file():
            if self.last_weights.is_file() or self.best_weights.is_file():
                raise CheckpointError(f"{self.state}: missing, so the run cannot be resumed (its checkpoints "
                                      "are still usable with evaluate, predict, serve and export)")
            return None
        try:
            state = torch.load(self.state, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors all mean the same thing to the user
            raise CheckpointError(f"{self.state}: unreadable training state ({one_line(e)})") from None
        history = state.get("history") if isinstance(state, dict) else None
        if not isinstance(history, list) or state.get("epoch") != len(history) or not history:
            raise CheckpointError(f"{self.state}: damaged training state (its epoch and history disagree)")
        if "model" not in state:  # written by lenet5 before the commit record held the weights
            last = load_checkpoint(self.last_weights)
            if last.meta.get("epoch") != state["epoch"]:
                raise CheckpointError(f"{self.checkpoints}: last.safetensors is from epoch {last.meta.get('epoch')} "
                                      f"but last.state.pt from epoch {state['epoch']}")
            state["model"] = last.model.state_dict()
        return state

    # ------------------------------------------------------------ writing an epoch
    def _write(self, path: Path, data: bytes, epoch: int) -> None:
        if os.environ.get(TEST_CRASH_ENV) == f"{path.name}:{epoch}":
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, _ = create_temp(path)  # kill -9 in mid-write: half the bytes in a temporary file
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_bytes(path, data)

    def commit(self, state: dict[str, Any]) -> None:
        """Commit an epoch: one atomic replace of the commit record (see the module docstring)."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._write(self.state, buffer.getvalue(), state["epoch"])

    def _write_checkpoint(self, weights: Path, model: DigitClassifier, config: dict[str, Any],
                          record: dict[str, Any], epoch: int) -> None:
        data, sidecar = checkpoint_files(model, config=config, epoch=record["epoch"],
                                         metrics={k: record[k] for k in CHECKPOINT_METRICS if k in record})
        self._write(weights, data, epoch)
        self._write(weights.with_suffix(".json"), sidecar, epoch)

    def publish(self, model: DigitClassifier, *, config: dict[str, Any], history: list[dict[str, Any]],
                summary: dict[str, Any], title: str, check_best: bool = False) -> None:
        """Write every derived file from the committed epoch: `model` holds its weights and `history`
        its records. With `check_best`, an older best checkpoint must be the history's best epoch."""
        epoch, best = history[-1]["epoch"], best_record(history)
        self._write_checkpoint(self.last_weights, model, config, history[-1], epoch)
        if best["epoch"] == epoch:
            self._write_checkpoint(self.best_weights, model, config, best, epoch)
        elif check_best:
            self._check_best(best["epoch"])
        self._write(self.history_json, (json.dumps(history, indent=2) + "\n").encode(), epoch)
        text = io.StringIO()
        # the union of the records' fields: a run resumed by a newer lenet5 may have gained some
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in history for k in r)),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        self._write(self.history_csv, text.getvalue().encode(), epoch)
        self._write(self.curves, plot_curves(history, title), epoch)
        self._write(self.metrics, (json.dumps(summary, indent=2) + "\n").encode(), epoch)

    def _check_best(self, epoch: int) -> None:
        found = None
        if self.best_weights.is_file():
            try:
                found = json.loads(read_header(self.best_weights)["__metadata__"][METADATA_KEY]).get("epoch")
            except (CheckpointError, KeyError, TypeError, ValueError, AttributeError):
                pass
        if found != epoch:
            raise CheckpointError(f"{self.best_weights}: is from epoch {found}, but the history's best is epoch "
                                  f"{epoch} (the folder was changed outside lenet5)")
