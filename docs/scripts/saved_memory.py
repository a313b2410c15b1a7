"""Memory the autograd graph keeps for the backward pass: one forward pass at batch 256, the saved
tensors' distinct storages summed (a saved-tensors hook sees each one). For keras-lenet and classic
lenet5, in fp32 with and without a gradient wanted for the input, and under bf16 autocast.

    python docs/scripts/saved_memory.py
    PYTHONPATH=OTHER_CHECKOUT/src python docs/scripts/saved_memory.py   # another commit, to compare
"""

from __future__ import annotations

import contextlib

import torch

from lenet5.models import create_model


def saved_mib(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> float:
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    context = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), context:
        model(x)
    return sum(storages.values()) / 2**20


def main() -> None:
    torch.manual_seed(0)
    print("| model | input needs a gradient | bf16 autocast | saved MiB |\n|---|---|---|---:|")
    for name in ("keras-lenet", "lenet5"):
        model = create_model(name).to(memory_format=torch.channels_last)
        images = torch.randn(256, 1, 28, 28)
        for wants_grad, autocast in ((False, False), (True, False), (False, True)):
            mib = saved_mib(model, images.clone().requires_grad_(wants_grad), autocast)
            print(f"| {name} | {'yes' if wants_grad else 'no'} | {'yes' if autocast else 'no'} | {mib:.1f} |")


if __name__ == "__main__":
    main()
