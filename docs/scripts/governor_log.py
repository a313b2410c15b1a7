"""What the thread governor decides beside competition: a classic lenet5 epoch (the suite's contention
run: batch 128, Adam, 1,000 test digits) alone, beside a process that keeps one core busy, and two at
once, each printing its training time and every probe's decision (the count kept, or tried on real steps,
the per-step time of the count not kept, in ms, and the real-to-probe step ratio the governor allows
for).

    python docs/scripts/governor_log.py --data-dir ../shared/mnist [--rounds 3]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 LENET5_NATIVE_MARCH=haswell \\
        python docs/scripts/governor_log.py --data-dir ../shared/mnist      # as an AVX2 CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs `lenet5 train` with the governor's probe wrapped to print its decision on stderr.
LAUNCHER = """
import runpy, sys
from lenet5.train import threads
probe = threads.ThreadGovernor.probe
def logged(self, work):
    kept = probe(self, work)
    trial = f", trial of {kept} threads" if getattr(self, "trial", None) else ""
    print(f"probe {self.probes}: {kept} threads kept{trial}, other count {self.alternative * 1e3:.2f} ms a step, "
          f"real/probe {self.overhead:.2f}", file=sys.stderr)
    return kept
threads.ThreadGovernor.probe = logged
sys.argv = ["lenet5", *sys.argv[1:]]
runpy.run_module("lenet5", run_name="__main__")
"""


def trainings(names: list[str], options: list[str], out: Path) -> None:
    runs = [subprocess.Popen([sys.executable, "-c", LAUNCHER, "train", *options, "--out-dir", str(out), "--name", name],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in names]
    for name, run in zip(names, runs):
        log = run.communicate()[1]
        if run.returncode:
            raise SystemExit(log[-2000:])
        seconds = json.loads((out / name / "history.json").read_text())[0]["train_seconds"]
        probes = [line for line in log.splitlines() if line.startswith("probe ")]
        print(f"{name}: {seconds:.2f} s | " + " | ".join(probes), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    options = ["--model", "lenet5", "--optimizer", "adam", "--batch-size", "128", "--epochs", "1", "--test-samples",
               "1000", "--device", "cpu", "--quiet", "--offline", "--data-dir", args.data_dir]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for r in range(args.rounds):
            trainings([f"quiet-{r}"], options, out)
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                trainings([f"busy-{r}"], options, out)
            finally:
                busy.kill()
                busy.wait()
            trainings([f"pair-a-{r}", f"pair-b-{r}"], options, out)


if __name__ == "__main__":
    main()
