"""The blog post's training step (keras-lenet, RMSprop, batch 32, fp32: lenet5's own TrainStep) with
each of lenet5's native convolution paths and without it, in alternating rounds in one process.

    python docs/scripts/native_step_ab.py [--cpu-class avx2] [--rounds 8]

Variants: "all" (every native path that applies), "no winograd pooling" (Winograd's convolution,
then the separate ReLU + max pooling kernel), "no winograd" (oneDNN's second convolution), "no
one-channel" (oneDNN's first convolution, then the pooling kernel), "pytorch" (PyTorch's ops only).
Each round runs 20 warm-up steps and times 200 on random images (the cost does not depend on the
pixels); the medians over rounds are printed with every round's figure, and the fp32 matmul peak of
the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

from lenet5.hardware import EMULATE, restart_emulating

if __name__ == "__main__" and "--cpu-class" in sys.argv:
    restart_emulating(sys.argv[sys.argv.index("--cpu-class") + 1])

import torch  # noqa: E402

from lenet5 import native  # noqa: E402
from lenet5.hardware import cpu_class, matmul_peak  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from keras_layers import blog_step  # noqa: E402  (the same step as the layer benchmark's)


@contextlib.contextmanager
def without(*names: str):
    """Within the block, the named `*_applies` functions of lenet5.native answer False."""
    saved = {name: getattr(native, name) for name in names}
    for name in names:
        setattr(native, name, lambda *args: False)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(native, name, fn)


VARIANTS = {
    "all": lambda: contextlib.nullcontext(),
    "no winograd pooling": lambda: without("winograd_pool_applies"),
    "no winograd": lambda: without("winograd_pool_applies", "winograd_applies"),
    "no one-channel": lambda: without("single_conv_pool_applies"),
    "pytorch": native.disabled,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-class", choices=sorted(EMULATE), help="emulate a lesser CPU")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    _, train_step, _ = blog_step("fp32")

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, context in VARIANTS.items():
            with context():
                for _ in range(20):
                    train_step()
                started = time.perf_counter()
                for _ in range(200):
                    train_step()
                times[name].append((time.perf_counter() - started) / 200 * 1e3)
    print(f"`python docs/scripts/native_step_ab.py{' --cpu-class ' + args.cpu_class if args.cpu_class else ''}"
          f" --rounds {args.rounds}`\n")
    print(f"CPU class {cpu_class()}, torch {torch.__version__}, {torch.get_num_threads()} threads, native vector "
          f"width {native.kernels().vector_width if native.available() else '-'}; fp32 matmul peak "
          f"{matmul_peak() / 1e9:.0f} GFLOP/s\n")
    print("| keras-lenet step, batch 32, fp32 | median ms | against all | every round (ms) |")
    print("|---|---:|---:|---|")
    base = statistics.median(times["all"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
