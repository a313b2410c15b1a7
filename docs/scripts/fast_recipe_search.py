"""The search behind `--recipe fast` on CPUs without native bf16: which cheap network reaches 99.0%
test accuracy soonest, and at what cost per step relative to keras-lenet on this CPU.

    python docs/scripts/fast_recipe_search.py accuracy --data-dir ../shared/mnist \
        relu-16-32-h64:1e-2:128:1:3 tanh-16-32-h64:6e-3:128:1:3 ... > docs/results/fast-recipes/accuracy.jsonl
    python docs/scripts/fast_recipe_search.py cost [--cpu-class avx2]   # ms per training step, batch 128

A candidate is `KIND-C1-C2[-hH][-valid]`: conv C1@5x5 (padded, or unpadded with `-valid`), pool,
conv C2@5x5 (unpadded), pool, [dense H,] dense 10; KIND `relu` (ReLU, max pooling, as keras-lenet) or `tanh` (tanh, average
pooling, as the classic lenet5). A spec is `CANDIDATE:LR:BATCH:EPOCHS:SEEDS` (Adam, one-cycle
with 20% warm-up, fp32; SEEDS is a count from seed 0 or a range such as `10-19`), optionally followed by `:KEY=VALUE+KEY=VALUE...`, more of lenet5's
training options (e.g. `label_smoothing=0.1+ema=0.99`). Registered models (`slim-lenet`,
`slim-lenet-valid`, `lenet5`, `keras-lenet`) work too. `--val-split N` holds out N training
digits and records the accuracy on them, to choose on them instead of the test set.
Accuracy does not depend on the machine's load; the cost ratios are measured interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lenet5.hardware import EMULATE

if __name__ == "__main__":  # the caps must be in place before torch loads
    if "--cpu-class" in sys.argv:
        cls = sys.argv[sys.argv.index("--cpu-class") + 1]
        if any(os.environ.get(k) != v for k, v in EMULATE[cls].items()):
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **EMULATE[cls]})

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lenet5.models import create_model, list_models, register_model  # noqa: E402
from lenet5.models.layers import Tanh  # noqa: E402
from lenet5.runtime import flush_denormals  # noqa: E402
from lenet5.models.registry import DigitClassifier  # noqa: E402


def candidate(name: str) -> None:
    """Register `name` (KIND-C1-C2[-hH][-valid]) as a model unless it is one already."""
    if name in list_models():
        return
    kind, c1, c2, *rest = name.split("-")
    padding = 0 if "valid" in rest else 2
    hidden = next((int(r[1:]) for r in rest if r.startswith("h")), 0)
    act, pool = (nn.ReLU, nn.MaxPool2d) if kind == "relu" else (Tanh, nn.AvgPool2d)

    class Candidate(DigitClassifier):
        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, int(c1), 5, padding=padding), act(), pool(2),
                                          nn.Conv2d(int(c1), int(c2), 5), act(), pool(2), nn.Flatten())
            flat = self.features(torch.zeros(1, 1, 28, 28)).shape[1]
            head = [nn.Linear(flat, hidden), act(), nn.Linear(hidden, num_classes)] if hidden else [nn.Linear(flat, num_classes)]
            self.classifier = nn.Sequential(*head)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    register_model(name)(Candidate)


def options(text: str) -> dict[str, float | str]:
    """`label_smoothing=0.1+ema=0.99` -> {"label_smoothing": 0.1, "ema": 0.99}."""
    out: dict[str, float | str] = {}
    for item in filter(None, text.split("+")):
        key, value = item.split("=", 1)
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def accuracy(specs: list[str], data_dir: Path | None, val_split: int = 0) -> None:
    from lenet5.data import load_mnist
    from lenet5.train import TrainConfig, fit

    mnist = load_mnist(data_dir, download=False)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            name, lr, batch, epochs, seeds, *extra = spec.split(":")
            candidate(name)
            first, _, last = seeds.partition("-")  # N seeds from 0, or the seeds FIRST-LAST
            for seed in range(int(first), int(last) + 1) if last else range(int(first)):
                settings = {"optimizer": "adam", "schedule": "onecycle", "warmup": 0.2, "precision": "fp32",
                            **({"val_split": val_split} if val_split else {}), **options(extra[0] if extra else "")}
                config = TrainConfig(model=name, lr=float(lr), batch_size=int(batch), epochs=int(epochs), seed=seed,
                                     **settings)
                result = fit(config, mnist, Path(tmp) / f"{name}-{seed}-{time.time_ns()}")
                record = {"spec": spec, "seed": seed, "test_acc": [r["test_acc"] for r in result.history],
                          "train_seconds": round(sum(r["train_seconds"] for r in result.history), 2)}
                if val_split:
                    record["val_acc"] = [r["val_acc"] for r in result.history]
                print(json.dumps(record), flush=True)


def cost(names: list[str], repeats: int = 15) -> None:
    torch.manual_seed(0)
    models = {n: (candidate(n), create_model(n).to(memory_format=torch.channels_last))[1] for n in names}
    optimizers = {n: torch.optim.Adam(m.parameters(), 1e-3) for n, m in models.items()}
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step(name: str) -> float:
        started = time.perf_counter()
        model, optimizer = models[name], optimizers[name]
        loss = model.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        step(n)
    for _ in range(repeats):  # interleaved, so load changes hit every candidate alike
        for n in names:
            times[n].append(step(n))
    base = statistics.median(times[names[0]])
    for n in names:
        print(json.dumps({"model": n, "ms_per_step": round(statistics.median(times[n]) * 1e3, 2),
                          "vs_first": round(statistics.median(times[n]) / base, 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("accuracy", "cost"))
    parser.add_argument("items", nargs="*", help="specs (accuracy) or model names, the first the baseline (cost)")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--cpu-class", choices=sorted(EMULATE), help="emulate a lesser CPU (cost)")
    parser.add_argument("--val-split", type=int, default=0, help="hold out this many training digits and record "
                        "the accuracy on them (accuracy)")
    args = parser.parse_intermixed_args()
    flush_denormals()  # as `lenet5 train` does: denormals would make some steps many times slower
    if args.what == "accuracy":
        accuracy(args.items, args.data_dir, args.val_split)
    else:
        cost(args.items or ["keras-lenet", "slim-lenet", "lenet5"])


if __name__ == "__main__":
    main()
