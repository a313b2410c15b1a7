"""Native conv + tanh + pool kernels against the PyTorch path, in one process, interleaved.

Prints the machine's fp32 matrix-product peak (a 2048^3 torch.mm, best of 5, measured at the
start and at the end), lenet5 training images/s with Adam through lenet5's own loop
(`train_epoch`, as `lenet5 train` runs it) with the native kernels and with PyTorch's ops, as a
share of that peak, and the forward + backward time of each fused layer. A and B alternate
round by round so that noise from other processes hits both; medians over the rounds.

FLOPs are counted from the layer sizes: forward multiply-adds per image C1 117,600, C3 240,000,
C5 48,000, F6 10,080, output 840; 2 FLOPs each; training = the forward pass, the weights' gradients
and the inputs' gradients of every layer but C1 (whose input gradient no training computes), as
torch's FLOP counter counts it in benchmarks/suite.py. (Until 2026-11-30 this script counted 3 x the
forward pass, C1's input gradient included: its shares of peak were 1.10x the suite's.)

    python benchmarks/native_kernels.py --data-dir ../shared/mnist
    # an AVX2-only CPU, emulated: kernels built for Haswell, PyTorch limited to AVX2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/native_kernels.py --march haswell
    # one thread: the kernels' own efficiency, without waiting on a core another process holds
    python benchmarks/native_kernels.py --data-dir ../shared/mnist --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lenet5 import native
from lenet5.data import Split, load_mnist
from lenet5.models import create_model
from lenet5.models.layers import conv_tanh_pool, tanh
from lenet5.runtime import flush_denormals, tune_allocator
from lenet5.train import TrainConfig, TrainStep, train_epoch

C1_MACS = 117_600
FORWARD_MACS = C1_MACS + 240_000 + 48_000 + 10_080 + 840
TRAIN_FLOPS = 3 * 2 * FORWARD_MACS - 2 * C1_MACS  # per image: 2,263,920, the suite's count


def matmul_peak(n: int = 2048, tries: int = 5) -> float:
    """fp32 GFLOP/s of the best of `tries` n^3 products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(tries))
    return 2 * n ** 3 / best / 1e9


def _timed(f) -> float:
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def training(images: torch.Tensor, labels: torch.Tensor, batch: int, rounds: int, steps: int) -> dict[str, list]:
    """Images/s per round of `steps` Adam steps, native and PyTorch alternating, same initial weights."""
    runs = {}
    for path in ("native", "pytorch"):
        torch.manual_seed(0)
        config = TrainConfig(model="lenet5", optimizer="adam", batch_size=batch, precision="fp32")
        runs[path] = TrainStep.build(config, torch.device("cpu"), steps_per_epoch=1)  # as fit() builds it
    data = Split(images, labels)
    n = batch * steps
    rates: dict[str, list] = {"native": [], "pytorch": []}
    for r in range(rounds + 1):  # round 0 warms up (and compiles nothing: that happened before)
        for path, step in runs.items():
            order = torch.randperm(len(labels))[:n]
            scope = native.disabled() if path == "pytorch" else _nothing()
            with scope:
                seconds = _timed(lambda: train_epoch(step, data, batch, order))
            if r:
                rates[path].append(n / seconds)
    return rates


class _nothing:
    def __enter__(self): return None
    def __exit__(self, *exc): return None


def layer_times(batch: int, rounds: int, reps: int = 10) -> list[str]:
    """Median ms of forward + backward of C1 + S2 and C3 + S4 at `batch`, native and PyTorch."""
    model = create_model("lenet5").to(memory_format=torch.channels_last)
    c1, c3 = model.features[0], model.features[3]
    cases = [("C1+S2", c1, torch.rand(batch, 1, 28, 28), 117_600),
             ("C3+S4", c3, torch.rand(batch, 6, 14, 14, requires_grad=True), 240_000)]
    lines = []
    for name, conv, x, macs in cases:
        def step(fused: bool) -> None:
            y = conv_tanh_pool(x, conv) if fused else F.avg_pool2d(tanh(conv(x)), 2)
            y.backward(torch.ones_like(y))
        times: dict[str, list] = {"native": [], "pytorch": []}
        for r in range(rounds + 1):
            for path in times:
                with (native.disabled() if path == "pytorch" else _nothing()):
                    t = _timed(lambda: [step(path == "native") for _ in range(reps)]) / reps
                if r:
                    times[path].append(t)
        med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
        passes = 3 if x.requires_grad else 2  # forward, weight gradient, and the input's where asked for
        gflops = {p: passes * 2 * macs * batch / (ms / 1e3) / 1e9 for p, ms in med.items()}
        lines.append(f"{name} batch {batch} forward+backward: native {med['native']:.3f} ms ({gflops['native']:.0f} "
                     f"GFLOP/s), PyTorch {med['pytorch']:.3f} ms ({gflops['pytorch']:.0f} GFLOP/s), "
                     f"{med['pytorch'] / med['native']:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST files (default: random images)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="Adam steps per timed round")
    parser.add_argument("--march", default="native", help="build the kernels for this CPU (e.g. haswell)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the peak is then measured on as many threads, too
    tune_allocator()  # as `lenet5 train` does
    flush_denormals()
    native.configure(args.march)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.why_unavailable()}")
    if args.data_dir:
        train = load_mnist(args.data_dir, download=False).train
        images, labels = train.images, train.labels
    else:
        images, labels = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (60_000,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels built with -march={args.march} "
          f"({native.kernels().vector_width} floats per vector), ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}, "
          f"load average {os.getloadavg()[0]:.2f}")
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 torch.mm, best of 5): {peak:.1f} GFLOP/s")
    for batch in args.batch_sizes:
        rates = training(images, labels, batch, args.rounds, args.steps)
        med = {p: statistics.median(v) for p, v in rates.items()}
        share = {p: r * TRAIN_FLOPS / 1e9 / peak for p, r in med.items()}
        print(f"lenet5 training, Adam, batch {batch}: native {med['native']:,.0f} img/s ({share['native']:.0%} of "
              f"peak), PyTorch {med['pytorch']:,.0f} img/s ({share['pytorch']:.0%}), native/PyTorch "
              f"{med['native'] / med['pytorch']:.2f}x  [rounds: native {', '.join(f'{r:,.0f}' for r in rates['native'])}"
              f"; PyTorch {', '.join(f'{r:,.0f}' for r in rates['pytorch'])}]")
    for batch in args.batch_sizes:
        for line in layer_times(batch, args.rounds):
            print(line)
    print(f"fp32 matmul peak at the end: {matmul_peak():.1f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
