"""Training throughput: lenet5's trainer against the plain PyTorch DataLoader loop, same run.

The baseline is the loop of the official PyTorch MNIST example: a TensorDataset of float
images behind a shuffling DataLoader, a fresh model in PyTorch's default memory layout, one
optimizer step per batch. Both sides train the same architecture with the same optimizer
(Adam, lr 1e-3) on the same images; rounds alternate between them so that machine noise hits
both, and the medians are compared.

    python benchmarks/train_throughput.py --data-dir ../shared/mnist --out docs/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lenet5.data import load_mnist
from lenet5.models import create_model
from lenet5.runtime import cpu_model
from lenet5.train import TrainConfig, train_epoch
from lenet5.train.optim import build_optimizer, build_schedule


def lenet5_trainer(name: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Images/second of lenet5's own loop (uint8 data in memory, channels_last, permutation slices)."""
    from lenet5.data import Split

    config = TrainConfig(model=name, optimizer="adam", batch_size=batch_size)
    model = create_model(name).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_schedule(optimizer, config, 1)
    data = Split(images, labels)
    warm = torch.arange(batch_size * 5)
    train_epoch(model, optimizer, scheduler, data, batch_size, warm)
    started = time.perf_counter()
    train_epoch(model, optimizer, scheduler, data, batch_size, torch.randperm(len(labels)))
    return len(labels) / (time.perf_counter() - started)


def dataloader_loop(name: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Images/second of the plain loop of the PyTorch MNIST example."""
    dataset = TensorDataset(images.unsqueeze(1).float() / 255, labels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    model = create_model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one_pass(limit: int | None = None) -> None:
        model.train()
        for i, (x, y) in enumerate(loader):
            if limit is not None and i == limit:
                break
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

    one_pass(limit=5)
    started = time.perf_counter()
    one_pass()
    return len(labels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: lenet5's)")
    parser.add_argument("--images", type=int, default=12_800, help="training images per timed pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting (median)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    mnist = load_mnist(args.data_dir, download=False)
    images, labels = mnist.train.images[: args.images], mnist.train.labels[: args.images]
    settings = [("lenet5", 32), ("lenet5", 64), ("lenet5", 128), ("keras-lenet", 32), ("keras-lenet", 128)]
    rows = []
    print(f"{'model':<12} {'batch':>5} {'lenet5 img/s':>13} {'DataLoader img/s':>17} {'ratio':>6}")
    for name, batch_size in settings:
        ours, plain = [], []
        for _ in range(args.rounds):
            torch.manual_seed(0)
            ours.append(lenet5_trainer(name, images, labels, batch_size))
            torch.manual_seed(0)
            plain.append(dataloader_loop(name, images, labels, batch_size))
        row = {"model": name, "batch_size": batch_size, "lenet5_images_per_s": statistics.median(ours),
               "dataloader_images_per_s": statistics.median(plain)}
        row["ratio"] = row["lenet5_images_per_s"] / row["dataloader_images_per_s"]
        rows.append(row)
        print(f"{name:<12} {batch_size:>5} {row['lenet5_images_per_s']:>13,.0f} "
              f"{row['dataloader_images_per_s']:>17,.0f} {row['ratio']:>5.2f}x", flush=True)
    result = {
        "benchmark": "train_throughput",
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "images_per_pass": args.images,
        "rounds": args.rounds,
        "optimizer": "adam lr 1e-3 (both sides)",
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
