"""A classic lenet5 training step (batch 128, Adam) at 2 and 1 threads, quiet and beside a process that
keeps one core busy: the floor the thread governor can reach when a core is taken.

    python benchmarks/thread_counts.py [--cpu-class avx2]

Median of 60 steps per setting, in one process, on random images (the step's cost does not depend
on the pixels); the fp32 matmul peak of the same run is printed with it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from lenet5.hardware import EMULATE, restart_emulating

if __name__ == "__main__" and "--cpu-class" in sys.argv:  # the caps must be in place before torch loads
    restart_emulating(sys.argv[sys.argv.index("--cpu-class") + 1])

import torch  # noqa: E402

from lenet5.data.transforms import to_model_input  # noqa: E402
from lenet5.hardware import cpu_class, matmul_peak  # noqa: E402
from lenet5.runtime import flush_denormals  # noqa: E402
from lenet5.train.config import TrainConfig  # noqa: E402
from lenet5.train.step import TrainStep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-class", choices=sorted(EMULATE), help="emulate a lesser CPU")
    parser.parse_args()
    flush_denormals()
    batch = 128
    step = TrainStep.build(TrainConfig(model="lenet5", optimizer="adam", batch_size=batch), torch.device("cpu"), 469)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (60_000,), generator=generator)

    def one() -> float:
        started = time.perf_counter()
        idx = torch.randint(0, 60_000, (batch,), generator=generator)
        objective, _ = step.objective(*step.outputs(to_model_input(images[idx]), batch), labels[idx])
        step.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        step.optimizer.step()
        return time.perf_counter() - started

    def median_ms(threads: int) -> float:
        torch.set_num_threads(threads)
        for _ in range(10):
            one()
        return statistics.median(one() for _ in range(60)) * 1e3

    print(f"class {cpu_class()}, torch {torch.__version__}, fp32 matmul peak {matmul_peak() / 1e9:.0f} GFLOP/s")
    quiet = {n: median_ms(n) for n in (2, 1)}
    busy_process = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 120\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)
        busy = {n: median_ms(n) for n in (2, 1)}
    finally:
        busy_process.kill()
        busy_process.wait()
    for n in (2, 1):
        print(f"{n} thread(s): quiet {quiet[n]:.2f} ms a step, one core busy {busy[n]:.2f} ms")
    print(f"one thread beside a busy core / two threads quiet: {busy[1] / quiet[2]:.2f}x (the governor's floor)")


if __name__ == "__main__":
    main()
