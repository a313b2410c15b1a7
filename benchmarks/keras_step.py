"""The blog post's training step (keras-lenet, RMSprop, batch 32) with and without each of its CPU
speed-ups, in interleaved rounds in one process, against the matrix-product peak of that process.

    python benchmarks/keras_step.py [--cpu-class avx2] [--precision fp32|bf16] [--rounds 15]

Variants, each a TrainStep as `fit` builds it, with the same initial weights:
- `before`: autocast casts every weight to bfloat16 and every weight gradient back, each step (bf16
  only), and PyTorch's max pooling and ReLU, forward and backward;
- `+ bf16 copies`: the forward and backward passes run on the bfloat16 copies that the native
  RMSprop pass keeps (bf16 only; the same arithmetic, bit for bit);
- `+ native pooling`: ReLU and max pooling as one native kernel (lenet5.native.relu_max_pool), the
  way `lenet5 train` runs now.

Each round runs every variant for `--steps` steps in turn on random images (the step's cost does not
depend on the pixels); the table gives the median and the best round per variant, and each
variant's time against the first. The machine's speed drifts while it runs; interleaving exposes
every variant to the same drift.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from lenet5.hardware import EMULATE, restart_emulating

if __name__ == "__main__" and "--cpu-class" in sys.argv:  # the caps must be in place before torch loads
    restart_emulating(sys.argv[sys.argv.index("--cpu-class") + 1])

import torch  # noqa: E402

from lenet5 import native  # noqa: E402
from lenet5.data.transforms import to_model_input  # noqa: E402
from lenet5.hardware import cpu_class, matmul_peak  # noqa: E402
from lenet5.runtime import flush_denormals, tune_allocator  # noqa: E402
from lenet5.train.config import TrainConfig  # noqa: E402
from lenet5.train.step import TrainStep  # noqa: E402

BATCH = 32  # the blog post's
FLOP_PER_IMAGE = 38.35e6  # keras-lenet, forward and backward (torch.utils.flop_counter; benchmarks.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-class", choices=sorted(EMULATE), help="emulate a lesser CPU")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50, help="steps per variant per round")
    args = parser.parse_args()
    flush_denormals()
    tune_allocator()  # as `lenet5 train` does
    if not native.available():
        sys.exit(f"the native kernels are unavailable: {native.why_unavailable()}")
    config = TrainConfig(precision=args.precision)

    def build(copies: bool) -> TrainStep:
        step = TrainStep.build(config, torch.device("cpu"), 1875)  # seeded: the same initial weights
        if copies:
            step.wrap(compile=False)
        return step

    variants = {"before": (build(False), False)}  # (step, native pooling)
    if args.precision == "bf16":
        variants["+ bf16 copies"] = (build(True), False)
    variants["+ native pooling"] = (build(True), True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (60_000,), generator=generator)
    pooling = native.relu_max_pool_applies

    def steps(step: TrainStep, count: int) -> None:
        for _ in range(count):
            idx = torch.randint(0, 60_000, (BATCH,), generator=generator)
            objective, _ = step.objective(*step.outputs(to_model_input(images[idx]), BATCH), labels[idx])
            step.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            step.optimizer.step()

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (step, native_pooling) in variants.items():
                native.relu_max_pool_applies = pooling if native_pooling else (lambda x: False)
                started = time.perf_counter()
                steps(step, args.steps)
                if r:
                    times[name].append((time.perf_counter() - started) / args.steps * 1e3)
    finally:
        native.relu_max_pool_applies = pooling
    peak_after = matmul_peak(dtype)
    print(f"CPU class {cpu_class()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.precision} matmul peak (2048^3) {peak / 1e9:.0f} GFLOP/s before the rounds, "
          f"{peak_after / 1e9:.0f} after\n")
    print(f"| keras-lenet, batch {BATCH}, {args.precision}, {args.rounds} rounds of {args.steps} steps "
          f"| median ms a step | best round | median against `before` | share of the {args.precision} peak |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["before"])
    for name, ms in times.items():
        mid = statistics.median(ms)
        share = FLOP_PER_IMAGE * BATCH / (mid / 1e3) / max(peak, peak_after)
        print(f"| {name} | {mid:.2f} | {min(ms):.2f} | {mid / base:.2f}x | {share:.0%} |")


if __name__ == "__main__":
    main()
