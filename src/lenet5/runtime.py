"""The compute device, and what a run records about the machine and software that made it."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lenet5
from lenet5.errors import ConfigError
from lenet5.hardware import cpu_class, cpu_model, probe_used, usable_cores


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when there is a GPU; asking for one that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine or in this PyTorch build")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: Apple MPS is not available here")
    return device


_allocator_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the OS (glibc only).

    Speed trick: by default glibc serves each large block (a batch's activations are 0.1-10 MB)
    with a fresh mmap and returns it on free, so every training step page-faults its
    activations in again: ~2,000 page faults per step, measured, costing 20-25% of the step
    time of both models on 2 cores. Raising the mmap and trim thresholds makes the heap keep
    and reuse those pages. Process-wide and harmless elsewhere; returns whether it applied.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc (macOS, Windows, musl): nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    _allocator_tuned = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    return _allocator_tuned


def flush_denormals() -> bool:
    """Treat denormal floats (below 1.2e-38) as zero in CPU arithmetic, as TensorFlow does by default.

    Speed trick: RMSprop's running average of squared gradients decays into the denormal range
    for weights that rarely get a gradient, and the CPU computes on denormals through a slow
    microcode path: with it on, the Keras recipe's `sqrt` in the optimizer step takes half the
    time (measured, torch profiler). No result of these networks depends on numbers that small.
    """
    return torch.set_flush_denormal(True)


def git_revision() -> str | None:
    """The project's git revision when lenet5 runs from a checkout (with '+dirty' for local edits)."""
    source = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


_recipe: dict[str, Any] | None = None  # the recipe this process's run starts from (`note_recipe`)


def note_recipe(name: str | None, hardware: str | None = None, why: str = "", kept: dict[str, Any] | None = None) -> None:
    """Record the recipe a run starts from: its name, the hardware class it was chosen for, why, and the
    options of it that the user's own did not replace (run.json's "recipe"; None: no recipe)."""
    global _recipe
    _recipe = None if name is None else {"name": name, "hardware_class": hardware, "why": why, "options": kept or {}}


def recipe_noted() -> dict[str, Any] | None:
    return _recipe


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, machine, device and git revision, for the top of a run's log and its folder."""
    info: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "lenet5": lenet5.__version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_class": cpu_class(),
        "bf16_probe": probe_used(),  # where the flags promise bf16: whether it measured faster than fp32
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if _recipe:
        info["recipe"] = {k: _recipe[k] for k in ("name", "hardware_class", "why")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
