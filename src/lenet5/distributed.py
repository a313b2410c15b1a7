"""Data-parallel training across processes and machines with PyTorch's own engine (torchrun + DDP).

`torchrun --nproc_per_node=N -m lenet5 train ...` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in their environment; `init()` turns that into
a process group (NCCL on GPUs, Gloo on CPUs). Without those variables everything here is a
no-op for a single process, so the same code path serves both.

The split of the work, decided here and used by the training loop:
- `--batch-size` is the *global* batch: each step's B images are dealt out to the ranks
  (rank r takes positions r, r + W, r + 2W, ... of the batch), so a run's result does not
  depend on how many processes computed it, and DDP's gradient average equals the gradient of
  the whole batch's mean loss;
- every rank holds all of MNIST in memory (47 MB as uint8) and draws the same seeded epoch
  permutation, so no data is sent between processes, only gradients and metric sums;
- only rank 0 writes anything (config, history, curves, checkpoints) and prints progress.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lenet5.errors import ConfigError, Lenet5Error


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size` (0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str = "auto") -> World:
    """Join the process group torchrun described in the environment (once); single process otherwise.

    NCCL when this rank computes on a GPU, Gloo on CPU (`--device cpu`, or no GPU present).
    """
    if not launched_by_torchrun():
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this "
                                  "machine: start at most one process per GPU (--nproc_per_node)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def device_for(world: World, device: torch.device) -> torch.device:
    """Each process of a multi-GPU machine takes the GPU of its LOCAL_RANK."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def all_reduce_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sums of the given scalars over all ranks (one collective for all of them)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    packed = torch.stack([v.detach().to(torch.float64) for v in values])
    dist.all_reduce(packed)
    return list(packed.unbind())


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a run folder's name, say)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# What Gloo and NCCL say when the other end of a collective went away (a rank killed, a machine
# lost): DDP's gradient hooks raise them as plain RuntimeErrors, the collectives as DistErrors.
_PEER_LOST = re.compile(r"connection (?:reset|closed|refused)|broken pipe|socket timeout|remote process exited"
                        r"|peer (?:closed|disconnected)", re.IGNORECASE)


class PeerLost(Lenet5Error):
    """Another process of a torchrun run stopped or became unreachable mid-run."""


def peer_lost(error: BaseException, world: World, run_dir: object) -> PeerLost | None:
    """A one-line error for a collective that failed because a peer died; None for anything else.

    Without this, each surviving rank printed some 30 lines of PyTorch's traceback ending in
    "Connection reset by peer ... GLHF!", and nothing said that the run can be continued.
    """
    if not world.distributed or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not (isinstance(error, dist.DistNetworkError) or _PEER_LOST.search(text)):
        return None  # another failure of a collective (a bug, memory) keeps its traceback
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")  # gloo's "[file.cc:537] "
    reason = reason.split(". This is typically")[0][:200] or type(error).__name__
    return PeerLost(f"rank {world.rank} of {world.size}: another process of this run stopped or cannot be reached "
                    f"({reason}); {resume_hint(run_dir)}")


def resume_hint(run_dir: object) -> str:
    """How to go on after a run stopped: `--resume` where the run folder was begun, else the same command."""
    from lenet5.run_folder import RunFolder

    launcher = "torchrun ... -m lenet5" if launched_by_torchrun() else "lenet5"
    if run_dir and RunFolder(run_dir).is_run_folder():
        return f"continue with `{launcher} train --resume {run_dir}`"
    return "nothing was trained yet: run the same command again"
