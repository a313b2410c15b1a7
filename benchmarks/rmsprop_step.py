"""RMSprop's update of keras-lenet's 1.25M parameters: lenet5's native pass against PyTorch's foreach.

    python benchmarks/rmsprop_step.py > docs/results/rmsprop-step.txt

Interleaved in one process (this machine's speed drifts), 4 rounds of 100 steps each: the whole
training step of the blog post's run (batch 32, bf16 autocast where auto takes it) and the
optimizer's step alone; with the CPU class and the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from lenet5 import native
from lenet5.data.transforms import to_model_input
from lenet5.hardware import choose_precision, cpu_class, cpu_model
from lenet5.models import create_model
from lenet5.runtime import flush_denormals
from lenet5.train.optim import FusedRMSprop


def per_call_ms(fn, n: int = 100) -> float:
    for _ in range(10):
        fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e3


def main() -> None:
    flush_denormals()
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / per_call_ms(lambda: a @ b, 10) / 1e6
    precision = choose_precision("auto", torch.device("cpu")).precision
    print(f"{cpu_model()}, class {cpu_class()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s; step precision {precision}")
    model = create_model("keras-lenet").to(memory_format=torch.channels_last)
    x = to_model_input(torch.randint(0, 255, (32, 28, 28), dtype=torch.uint8))
    y = torch.randint(0, 10, (32,))
    optimizer = FusedRMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=1e-7, foreach=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        optimizer.step()

    for r in range(4):
        fused, fused_alone = per_call_ms(step), per_call_ms(optimizer.step)
        with native.disabled():
            plain, plain_alone = per_call_ms(step), per_call_ms(optimizer.step)
        print(f"round {r + 1}: training step {fused:.2f} ms native, {plain:.2f} ms foreach | "
              f"optimizer step alone {fused_alone:.2f} ms native, {plain_alone:.2f} ms foreach")


if __name__ == "__main__":
    main()
