"""Training throughput: lenet5's trainer against plain PyTorch DataLoader loops, in one run.

Three ways to train the same architecture with the same optimizer (Adam, lr 1e-3) on the same
images, each timed over one pass after a warm-up, each in a fresh process (so no process-wide
setting of one leaks into another), rounds alternating so machine noise hits all of them:

- lenet5:   lenet5's own loop (`lenet5.train.train_epoch`, as `lenet5 train` runs it);
- tensors:  a TensorDataset of float images behind a shuffling DataLoader, default layout:
            the strongest plain loop (REFERENCE.md's "plain PyTorch loop");
- example:  the pipeline of the official PyTorch MNIST example, per-sample ToTensor and
            Normalize((0.1307,), (0.3081,)) in a Dataset (without the PIL round trip that
            torchvision's MNIST adds, so it is if anything faster than the real example).

    python benchmarks/train_throughput.py --data-dir ../shared/mnist --out docs/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lenet5.data import Split, load_mnist
from lenet5.models import create_model
from lenet5.runtime import cpu_model
from lenet5.train import TrainConfig, TrainStep, train_epoch

LOOPS = ("lenet5", "tensors", "example")
SETTINGS = (("lenet5", 32), ("lenet5", 64), ("lenet5", 128), ("keras-lenet", 32), ("keras-lenet", 128))


class ExampleStyleMNIST(Dataset):
    """Per-sample conversion as torchvision's ToTensor() + Normalize() do it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.numpy(), labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).float().div(255).unsqueeze(0)  # ToTensor
        return (x - 0.1307) / 0.3081, int(self.labels[i])  # Normalize


def time_lenet5(name: str, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                device: str = "cpu", precision: str = "fp32") -> float:
    from lenet5.runtime import flush_denormals, tune_allocator

    tune_allocator()  # as `lenet5 train` does
    flush_denormals()
    config = TrainConfig(model=name, optimizer="adam", batch_size=batch_size, precision=precision)
    step = TrainStep.build(config, torch.device(device), steps_per_epoch=1)  # as fit() builds it
    step.wrap(compile=False)
    data = Split(images, labels).to(device)
    train_epoch(step, data, batch_size, torch.arange(batch_size * 5, device=device))
    started = time.perf_counter()
    train_epoch(step, data, batch_size, torch.randperm(len(labels), device=device))  # ends with a .item()
    return len(labels) / (time.perf_counter() - started)


def time_dataloader(name: str, dataset: Dataset, batch_size: int, device: str = "cpu") -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    model = create_model(name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one_pass(limit: int | None = None) -> None:
        model.train()
        for i, (x, y) in enumerate(loader):
            if i == limit:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = model.loss(model(x), y)  # cross-entropy, or the 1998 network's own criterion
            loss.backward()
            optimizer.step()
        loss.item()

    one_pass(limit=5)
    started = time.perf_counter()
    one_pass()
    return len(dataset) / (time.perf_counter() - started)


def worker(loop: str, name: str, batch_size: int, data_dir: str | None, n: int, device: str = "cpu",
           precision: str = "fp32") -> float:
    torch.manual_seed(0)
    mnist = load_mnist(data_dir, download=False)
    images, labels = mnist.train.images[:n], mnist.train.labels[:n]
    if loop == "lenet5":
        return time_lenet5(name, images, labels, batch_size, device, precision)
    if loop == "tensors":
        return time_dataloader(name, TensorDataset(images.unsqueeze(1).float() / 255, labels), batch_size, device)
    return time_dataloader(name, ExampleStyleMNIST(images, labels), batch_size, device)


def measure(loop: str, name: str, batch_size: int, args: argparse.Namespace, precision: str = "fp32") -> float:
    """Images/s of one timed pass, in a fresh process."""
    command = [sys.executable, __file__, "--worker", loop, name, str(batch_size), "--images", str(args.images),
               "--device", args.device, "--precision", precision]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: lenet5's)")
    parser.add_argument("--images", type=int, default=12_800, help="training images per timed pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting (median)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("LOOP", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        loop, name, batch_size = args.worker
        print(worker(loop, name, int(batch_size), args.data_dir, args.images, args.device, args.precision))
        return

    rows = []
    print(f"{'model':<12} {'batch':>5} {'lenet5':>9} {'tensors':>9} {'example':>9}   images/s; lenet5 vs tensors, vs example")
    for name, batch_size in SETTINGS:
        runs: dict[str, list[float]] = {loop: [] for loop in LOOPS}
        for _ in range(args.rounds):
            for loop in LOOPS:
                runs[loop].append(measure(loop, name, batch_size, args))
        row = {"model": name, "batch_size": batch_size}
        row.update({f"{loop}_images_per_s": statistics.median(v) for loop, v in runs.items()})
        row["ratio_vs_tensors"] = row["lenet5_images_per_s"] / row["tensors_images_per_s"]
        row["ratio_vs_example"] = row["lenet5_images_per_s"] / row["example_images_per_s"]
        rows.append(row)
        print(f"{name:<12} {batch_size:>5} " + " ".join(f"{row[f'{loop}_images_per_s']:>9,.0f}" for loop in LOOPS)
              + f"   {row['ratio_vs_tensors']:.2f}x, {row['ratio_vs_example']:.2f}x", flush=True)
    result = {
        "benchmark": "train_throughput",
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "images_per_pass": args.images,
        "rounds": args.rounds,
        "optimizer": "adam lr 1e-3 (all loops)",
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
