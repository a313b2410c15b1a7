"""A run's resumable training state: weights, optimizer, schedule, RNG and history at an epoch's end.

`capture_train_state` gathers it; `RunFolder.commit` writes it as the run's commit record
(`checkpoints/last.state.pt`, with torch.save) and `RunFolder.load_commit` reads it back with
``weights_only=True``, so loading it can never execute code.
"""

from __future__ import annotations

from typing import Any

import torch

from lenet5.models import DigitClassifier


def capture_train_state(*, epoch: int, model: DigitClassifier, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, history: list[dict],
                        rank_rng: list[torch.Tensor] | None = None,
                        average: dict[str, Any] | None = None) -> dict[str, Any]:
    """`rank_rng`: under torchrun, every rank's CPU generator state, in rank order; `average`:
    the weight average's state, where the run keeps one (--ema)."""
    state: dict[str, Any] = {
        "epoch": epoch,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": list(history),
        "rng_cpu": torch.get_rng_state(),
    }
    if rank_rng is not None:
        state["rng_cpu_ranks"] = rank_rng
    if average is not None:
        state["average"] = average
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], rank: int = 0) -> None:
    ranks = state.get("rng_cpu_ranks")
    # A run resumed with as many processes as it had gets each rank's own stream back.
    torch.set_rng_state(ranks[rank] if ranks and rank < len(ranks) else state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
