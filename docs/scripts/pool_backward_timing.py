"""Time lenet5's native ReLU + max pooling kernel alone, forward and backward, at keras-lenet's two
stages (batch 32), on 1 and 2 threads, with the kernels built for this CPU or another (--march).

    python docs/scripts/pool_backward_timing.py [--march haswell]
    # another revision's kernels, same interpreter:
    git worktree add /tmp/before REV && PYTHONPATH=/tmp/before/src python docs/scripts/pool_backward_timing.py

Prints the fp32 matmul peak of the same process for reference (the kernel is bound by memory, not by
arithmetic) and the best of 5 rounds of 200 calls per figure.
"""

from __future__ import annotations

import argparse
import time

import torch

from lenet5 import native
from lenet5.hardware import cpu_class, matmul_peak


def best_us(f, calls: int = 200, rounds: int = 5) -> float:
    for _ in range(20):
        f()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", default="native", help="build the kernels for this CPU (e.g. haswell: AVX2)")
    args = parser.parse_args()
    native.configure(args.march)
    assert native.available(), native.why_unavailable()
    kernels = native.kernels()
    print(f"torch {torch.__version__}, CPU class {cpu_class()}, kernels for -march={args.march} "
          f"({kernels.vector_width} floats per vector); fp32 matmul peak {matmul_peak() / 1e9:.0f} GFLOP/s")
    torch.manual_seed(0)
    before = torch.get_num_threads()
    for shape in [(32, 20, 28, 28), (32, 50, 14, 14)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        y, which = kernels.relu_max_pool_forward(x)
        grad = torch.randn(y.shape).contiguous(memory_format=torch.channels_last)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            forward = best_us(lambda: kernels.relu_max_pool_forward(x))
            backward = best_us(lambda: kernels.relu_max_pool_backward(grad, which))
            print(f"input {shape}, {threads} thread(s): forward {forward:.0f} us, backward {backward:.0f} us")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
