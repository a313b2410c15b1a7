"""Short SDLM training runs of `lenet5-1998` at the paper's global rate, one per candidate cause of
its divergence (docs/lenet5-1998.md, "The paper's learning rate").

Every run follows appendix C: the Hessian diagonal re-estimated on 500 training samples before
each pass (`diagonal_hessian`), mu = 0.02, updates after every pattern (or after every 16 with
the rate scaled by 16), eta constant over the first passes as in the paper (0.0005 for passes
1-2), on the first --train-samples training digits. The running loss is an exponential average
over about 100 patterns; a run stops at the deadline, when its loss is no longer finite, or when
after 2,000 patterns its running loss is above 1.5 times the untrained network's loss (diverged).
Test error is measured on the 10,000 test digits at the end. Runs go one at a time unless --jobs
says otherwise, one thread each.

    python docs/scripts/sdlm_eta_runs.py --data-dir ../shared/mnist --train-samples 10000 --passes 2 \
        --out docs/results/lecun1998-hessian/runs.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lenet5.data import load_mnist
from lenet5.data.transforms import to_model_input
from lenet5.models.lenet5_1998 import C3_TABLE, LeNet5_1998
from lenet5.train.sdlm import SDLM, diagonal_hessian


@dataclass
class Run:
    name: str
    init: str = "paper"  # paper: uniform +-2.4/F (appendix A as printed); sqrt: +-2.4/sqrt(F); sqrt1: +-1/sqrt(F)
    eta: float = 5e-4  # per pattern
    batch: int = 1
    hessian_scale: float = 1.0  # 500: the sum over the 500 samples instead of their mean
    reestimate: bool = False  # also re-estimate after patterns 1, 2, 4, 8, ... and every 2,000
    unit_variance_input: bool = False  # standardise the model's input over the training set
    zero_biases: bool = False
    seed: int = 0


RUNS = [
    Run("init 2.4/F, mean h (the paper as printed)"),
    Run("init 2.4/F, h summed over the 500 samples", hessian_scale=500),
    Run("init 2.4/F, mean h re-estimated as the network moves", reestimate=True),
    Run("init 2.4/F, input standardised to mean 0, variance 1", unit_variance_input=True),
    Run("init 2.4/F, biases 0", zero_biases=True),
    Run("init 2.4/F, eta 1e-5 (the recipe's rate)", eta=1e-5),
    Run("init 2.4/sqrt(F), mean h", init="sqrt"),
    Run("init 2.4/sqrt(F), mean h, 16 patterns per update", init="sqrt", batch=16),
    Run("init 2.4/sqrt(F), mean h, eta 1e-3", init="sqrt", eta=1e-3),
    Run("init 1/sqrt(F) (eblearn's), mean h", init="sqrt1"),
    Run("init 2.4/sqrt(F), mean h, seed 1", init="sqrt", seed=1),
    Run("init 2.4/F, mean h, 16 patterns per update", batch=16),
    Run("init 2.4/F, eta 1e-5, 16 patterns per update (the recipe's rate)", eta=1e-5, batch=16),
    Run("init 1/sqrt(F) (eblearn's), mean h, 16 patterns per update", init="sqrt1", batch=16),
]


def fan_in_init_(model: LeNet5_1998, value: float, power: float) -> None:
    """Every weight and bias uniform in +-value / F**power, F the fan-in of its unit (as the model's
    own initialisation, with value 2.4 and power 1)."""
    fans = {"C1": 25, "S2": 4, "S4": 4, "C5": 16 * 25, "F6": 120}
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = name.split(".")[0]
            if layer in fans:
                p.uniform_(-1, 1).mul_(value / fans[layer] ** power)
        pairs = [o for o, inputs in enumerate(C3_TABLE) for _ in inputs]
        fan = torch.tensor([25.0 * len(C3_TABLE[o]) for o in pairs])
        model.C3.weight.uniform_(-1, 1).mul_((value / fan ** power)[:, None, None])
        fan = torch.tensor([25.0 * len(inputs) for inputs in C3_TABLE])
        model.C3.bias.uniform_(-1, 1).mul_(value / fan ** power)


def build(run: Run, train_x: torch.Tensor) -> LeNet5_1998:
    torch.manual_seed(run.seed)
    model = LeNet5_1998()
    value, power = {"paper": (2.4, 1.0), "sqrt": (2.4, 0.5), "sqrt1": (1.0, 0.5)}[run.init]
    fan_in_init_(model, value, power)
    if run.zero_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    if run.unit_variance_input:
        paper = model.input_transform(train_x[:10_000])
        mean, std = paper.mean().item(), paper.std().item()
        model.input_transform = lambda x, t=LeNet5_1998.input_transform: (t(x) - mean) / std
    return model


@torch.no_grad()
def test_error(model: LeNet5_1998, x: torch.Tensor, y: torch.Tensor) -> float:
    wrong = sum(int((model(x[s:s + 1000]).argmin(1) != y[s:s + 1000]).sum()) for s in range(0, len(x), 1000))
    return wrong / len(x)


def train(run: Run, data_dir: str, passes: int, deadline: float, train_samples: int) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    mnist = load_mnist(data_dir, download=False)
    images, y = mnist.train.images[:train_samples], mnist.train.labels[:train_samples]
    x = to_model_input(images)
    test_x, test_y = to_model_input(mnist.test.images), mnist.test.labels
    model = build(run, x)
    optimizer = SDLM(model.parameters(), lr=run.eta * run.batch, mu=0.02)

    def estimate(generator_seed: int) -> None:
        sample = torch.randperm(len(x), generator=torch.Generator().manual_seed(generator_seed))[:500]
        hessian = diagonal_hessian(model, images[sample])
        optimizer.set_hessian({p: run.hessian_scale * h for p, h in hessian.items()})
        for state in optimizer.state.values():
            state.pop("step_size", None)

    with torch.no_grad():
        untrained = model.loss(model(x[:1000]), y[:1000]).item()
    record = {"run": asdict(run), "train_samples": len(x), "untrained_loss": untrained, "curve": [],
              "diverged_at": None, "stopped_diverged": False}
    running, seen, next_reestimate = None, 0, 1
    for epoch in range(passes):
        estimate(1_000 + epoch)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(run.seed * 1_000_003 + epoch))
        for start in range(0, len(x), run.batch):
            idx = order[start:start + run.batch]
            loss = model.loss(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
            value = loss.item()
            running = value if running is None else 0.99 * running + 0.01 * value
            if not math.isfinite(value):
                record["diverged_at"] = seen
                break
            if seen >= 2_000 and running > 1.5 * untrained:
                record["stopped_diverged"] = True
                break
            if run.reestimate and seen >= next_reestimate:
                estimate(2_000 + seen)
                next_reestimate = 2 * next_reestimate if next_reestimate < 2_000 else next_reestimate + 2_000
            if seen % 1_000 < run.batch:
                record["curve"].append({"patterns": seen, "running_loss": running})
            if time.perf_counter() - started > deadline:
                break
        if record["diverged_at"] or record["stopped_diverged"] or time.perf_counter() - started > deadline:
            break
    record.update(patterns=seen, running_loss=running, test_error=test_error(model, test_x, test_y),
                  seconds=time.perf_counter() - started)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=10_000)
    parser.add_argument("--deadline", type=float, default=1800, help="seconds per run")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="*", help="indices into RUNS (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [RUNS[i] for i in args.only] if args.only else RUNS
    work = [(run, args.data_dir, args.passes, args.deadline, args.train_samples) for run in runs]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        records = pool.starmap(train, work)
    args.out.write_text(json.dumps(records, indent=1))
    print("| run | eta per pattern | patterns | untrained loss | running loss at the end | test error % | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        end = ("not finite" if r["diverged_at"] else f"{r['running_loss']:.2f}"
               + (" (stopped: diverged)" if r["stopped_diverged"] else ""))
        print(f"| {r['run']['name']} | {r['run']['eta']:g} | {r['patterns']:,} | {r['untrained_loss']:.1f} | {end} "
              f"| {100 * r['test_error']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
