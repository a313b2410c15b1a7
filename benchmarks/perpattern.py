"""Per-pattern SDLM training of lenet5-1998: the native pass against the plain PyTorch steps.

In one process, round by round, so that noise from other processes hits every path alike:
- plain: `train_epoch` at batch size 1 (a Python step per pattern; what `fit` ran before),
- native: `lenet5.train.perpattern.train_pass` (one C++ loop per pass),
- mini-batch 16: `train_epoch` at batch size 16 (the earlier `reproduce lecun1998` default),
each on the same model, optimizer and schedule as `fit` builds them. Prints patterns/s per round
by the wall clock and by the process's CPU time (which a busy machine does not inflate), the
best and the median of each, and the ratios.

    python benchmarks/perpattern.py --data-dir ../shared/mnist
    python benchmarks/perpattern.py --data-dir ../shared/mnist --threads 2 --rounds 7
    python benchmarks/perpattern.py --data-dir ../shared/mnist --march haswell   # as on an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from lenet5.data import load_mnist
from lenet5.models import create_model
from lenet5.native import sdlm_pass
from lenet5.reproduce import ETA_PER_SAMPLE
from lenet5.train import TrainConfig, perpattern, train_epoch
from lenet5.train.optim import build_optimizer, build_schedule
from lenet5.train.sdlm import diagonal_hessian
from lenet5.train.step import TrainStep


def build(train, batch_size: int):
    torch.manual_seed(0)
    model = create_model("lenet5-1998").to(memory_format=torch.channels_last)
    config = TrainConfig(model="lenet5-1998", optimizer="sdlm", lr=ETA_PER_SAMPLE * batch_size,
                         schedule="constant", batch_size=batch_size, epochs=20)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_schedule(optimizer, config, 60_000 // batch_size)  # constant: rounds may span passes
    optimizer.set_hessian(diagonal_hessian(model, train.images[:500]))
    return model, optimizer, scheduler


def timed(run, patterns: int) -> tuple[float, float]:
    """(patterns/s by the wall clock, patterns/s by this process's CPU time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return patterns / (time.perf_counter() - wall), patterns / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/mnist")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1: the plain path's fastest)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plain-patterns", type=int, default=600, help="patterns per round of the plain path")
    parser.add_argument("--native-patterns", type=int, default=20_000, help="patterns per round of the native pass")
    parser.add_argument("--march", default="native", help="build the native pass for this CPU (default: this one)")
    args = parser.parse_args()
    sdlm_pass.configure(args.march)
    torch.set_num_threads(args.threads)
    train = load_mnist(args.data_dir, download=False).train
    if not sdlm_pass.available():
        raise SystemExit(f"the native pass is unavailable: {sdlm_pass.why_unavailable()}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"native pass for -march={args.march}, load average {os.getloadavg()[0]:.2f}")

    paths = {}
    for name, batch in (("plain", 1), ("native", 1), ("mini-batch 16", 16)):
        model, optimizer, scheduler = build(train, batch)
        paths[name] = (model, optimizer, scheduler, batch)
    generator = torch.Generator().manual_seed(1)
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, (model, optimizer, scheduler, batch) in paths.items():
            n = args.native_patterns if name == "native" else args.plain_patterns * (8 if batch > 1 else 1)
            order = torch.randperm(len(train), generator=generator)[:n]
            step = TrainStep(model, optimizer, scheduler, model)
            if batch == 1:
                run = functools.partial(perpattern.train_pass, step, train, order, native=name == "native")
            else:
                run = functools.partial(train_epoch, step, train, batch, order)
            rates[name].append(timed(run, n))

    def summary(values: list[float]) -> str:
        return f"best {max(values):,.0f}, median {statistics.median(values):,.0f}"

    for name, measured in rates.items():
        wall, cpu = [w for w, _ in measured], [c for _, c in measured]
        print(f"{name:>13}: wall {summary(wall)} patterns/s; CPU time {summary(cpu)} patterns/s  "
              f"[rounds, wall: {', '.join(f'{w:,.0f}' for w in wall)}]")
    for key, label in ((0, "wall"), (1, "CPU time")):
        best = {name: max(r[key] for r in measured) for name, measured in rates.items()}
        median = {name: statistics.median(r[key] for r in measured) for name, measured in rates.items()}
        print(f"native / plain ({label}): best {best['native'] / best['plain']:.1f}x, "
              f"median {median['native'] / median['plain']:.1f}x; native / mini-batch 16: best "
              f"{best['native'] / best['mini-batch 16']:.1f}x, median {median['native'] / median['mini-batch 16']:.1f}x")
    native_median = statistics.median(w for w, _ in rates["native"])
    print(f"20 passes x 60,000 patterns at the native median: {20 * 60_000 / native_median / 60:.1f} min of training "
          f"(evaluation and Hessian estimates not included); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
