"""A run's resumable training state: optimizer, schedule, RNG and history, beside its `last` weights.

Saved with torch.save (optimizer state is nested tensors and numbers) and loaded with
``weights_only=True``, so loading it can never execute code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from lenet5.errors import CheckpointError
from lenet5.fileio import atomic_write_bytes


def save_train_state(path: Path, *, epoch: int, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, history: list[dict],
                     rank_rng: list[torch.Tensor] | None = None) -> None:
    """`rank_rng`: under torchrun, every rank's CPU generator state, in rank order."""
    state: dict[str, Any] = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "rng_cpu": torch.get_rng_state(),
    }
    if rank_rng is not None:
        state["rng_cpu_ranks"] = rank_rng
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_train_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from (did the first epoch finish?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same thing to the user
        raise CheckpointError(f"{path}: unreadable training state ({e})") from None


def restore_rng(state: dict[str, Any], rank: int = 0) -> None:
    ranks = state.get("rng_cpu_ranks")
    # A run resumed with as many processes as it had gets each rank's own stream back.
    torch.set_rng_state(ranks[rank] if ranks and rank < len(ranks) else state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
