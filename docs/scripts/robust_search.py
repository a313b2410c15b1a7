"""The search that chose `--recipe robust`: candidates judged on a validation split, never the test set.

Every candidate trains on MNIST's first 55,000 training digits; the last 5,000 are its validation
digits, and the stress sets of `lenet5.data.stress` are made from them (not from the test digits)
with the same definitions. Each result line gives the candidate's options, its validation
accuracy, its accuracy on every validation stress set and its training time on the machine it
ran on. The test set is not loaded at all.

    python docs/scripts/robust_search.py stress --data-dir ../shared/mnist --out VAL_STRESS.npz
    python docs/scripts/robust_search.py train --data-dir ../shared/mnist --stress VAL_STRESS.npz \
        --candidates NAME[,NAME...] --out results.jsonl [--jobs N] [--runs DIR]
    python docs/scripts/robust_search.py evaluate CHECKPOINT --data-dir ../shared/mnist --stress VAL_STRESS.npz

`evaluate` measures a checkpoint trained on the first 55,000 digits (such as `--recipe robust`'s)
on the validation digits and their stress sets, and, with the calibration stored in it, the share of
validation non-digits (`lenet5.data.nondigits` of seed 2, a seed nothing else uses) it marks unsure.

Candidates are named in CANDIDATES below. A run of `lenet5 train --recipe robust` trains on the same
55,000 digits, so `evaluate` measures it on the same validation sets.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lenet5.data import MNIST, Split, load_mnist
from lenet5.data.stress import make_stress_sets
from lenet5.models.registry import DigitClassifier
from lenet5.predict import class_probabilities
from lenet5.train import TrainConfig, fit

TRAIN, VAL = 55_000, 5_000
VAL_NONDIGIT_SEED = 2  # 0: looked at while designing the unsure rule, 1: the reported set, 10: the training pool


_ADAM = {"optimizer": "adam", "schedule": "onecycle", "warmup": 0.2, "batch_size": 128}
# What was run (docs/results/stress/README.md, "How the recipe was chosen"). The probe ran with the augmentation's
# first ranges (rotation 15 degrees, low-resolution share 0.2); run again, it uses today's.
CANDIDATES: dict[str, dict] = {
    "probe": {"model": "robust-lenet", "lr": 5e-3, "epochs": 2, "augment": "robust", **_ADAM},
    "robust-15": {"model": "robust-lenet", "lr": 5e-3, "epochs": 15, "augment": "robust", **_ADAM},
    "robust-20": {"model": "robust-lenet", "lr": 5e-3, "epochs": 20, "augment": "robust", **_ADAM},
}


def split(mnist: MNIST) -> MNIST:
    """Training digits 0-54,999 to train on, 55,000-59,999 in the place of the test set."""
    train = Split(mnist.train.images[:TRAIN], mnist.train.labels[:TRAIN])
    val = Split(mnist.train.images[TRAIN:TRAIN + VAL], mnist.train.labels[TRAIN:TRAIN + VAL])
    return MNIST(train=train, test=val, root=mnist.root)


def cmd_stress(args: argparse.Namespace) -> None:
    val = split(load_mnist(args.data_dir, download=False)).test
    started = time.perf_counter()
    sets = make_stress_sets(val.images.numpy(), val.labels.numpy(), seed=1)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"{n}/{k}": getattr(s, k).numpy() for n, s in sets.items()
                                   for k in ("images", "labels")})
    args.out.write_bytes(buffer.getvalue())
    print(f"wrote {args.out}: {', '.join(f'{n} {len(s)}' for n, s in sets.items())} in "
          f"{time.perf_counter() - started:.0f} s")


def load_sets(path: Path) -> dict[str, Split]:
    with np.load(path, allow_pickle=False) as data:
        names = [k.removesuffix("/images") for k in data.files if k.endswith("/images")]
        return {n: Split(torch.from_numpy(data[f"{n}/images"]), torch.from_numpy(data[f"{n}/labels"])) for n in names}


def validation_accuracy(model: DigitClassifier, data: MNIST, stress: Path) -> dict[str, float]:
    sets = {"val": data.test, **load_sets(stress)}
    return {n: float((class_probabilities(model, s.images).argmax(1) == s.labels).double().mean())
            for n, s in sets.items()}


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lenet5.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.meta.get("config", {}).get("train_samples") != TRAIN:
        raise SystemExit(f"{args.checkpoint}: not trained on the first {TRAIN:,} digits alone")
    accuracy = validation_accuracy(checkpoint.model, split(load_mnist(args.data_dir, download=False)), args.stress)
    stress = [v for n, v in accuracy.items() if n not in ("val", "userlike")]
    print(json.dumps({"checkpoint": str(checkpoint.path), "epoch": checkpoint.meta.get("epoch"),
                      "config": checkpoint.meta.get("config"), "accuracy": accuracy, "worst_stress": min(stress),
                      "nondigits_unsure": nondigits_unsure(checkpoint)}))


def nondigits_unsure(checkpoint) -> dict[str, float]:
    """The share of each kind of validation non-digit the checkpoint's calibration marks unsure."""
    from lenet5.calibration import Calibration, judge, logits_of
    from lenet5.data.nondigits import make_nondigits

    calibration = Calibration.from_meta(checkpoint.meta)
    return {kind: float(judge(logits_of(checkpoint.model, torch.from_numpy(images)), calibration).unsure.double().mean())
            for kind, images in make_nondigits(seed=VAL_NONDIGIT_SEED).items()}


def run_one(name: str, args: argparse.Namespace) -> dict:
    options = {**CANDIDATES[name], **json.loads(args.override or "{}")}
    data = split(load_mnist(args.data_dir, download=False))
    config = TrainConfig(**options, threads=args.threads)
    result = fit(config, data, args.runs / name)
    model = result.model.eval()
    accuracy = validation_accuracy(model, data, args.stress)
    stress = [v for n, v in accuracy.items() if n not in ("val", "userlike")]
    return {"candidate": name, "options": options, "parameters": result.metrics["parameters"],
            "accuracy": accuracy, "worst_stress": min(stress), "train_seconds": result.metrics["train_seconds"],
            "device": str(next(model.parameters()).device), "val_history": [r["test_acc"] for r in result.history]}


def cmd_train(args: argparse.Namespace) -> None:
    names = args.candidates.split(",")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates: {unknown}; known: {', '.join(CANDIDATES)}")
    if len(names) > 1 and args.jobs > 1:  # one process per candidate, `jobs` at a time
        pending, running = list(names), []
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                command = [sys.executable, __file__, "train", "--candidates", name, "--data-dir", str(args.data_dir),
                           "--stress", str(args.stress), "--out", str(args.out), "--runs", str(args.runs),
                           "--threads", str(args.threads)] + (["--override", args.override] if args.override else [])
                running.append(subprocess.Popen(command))
            time.sleep(1)
            running = [p for p in running if p.poll() is None]
        return
    for name in names:
        row = run_one(name, args)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stress = commands.add_parser("stress")
    stress.add_argument("--data-dir", type=Path)
    stress.add_argument("--out", type=Path, required=True)
    train = commands.add_parser("train")
    train.add_argument("--data-dir", type=Path)
    train.add_argument("--stress", type=Path, required=True)
    train.add_argument("--candidates", required=True)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--runs", type=Path, default=Path("runs/robust-search"))
    train.add_argument("--jobs", type=int, default=1)
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--override", help="JSON options over the candidates' (e.g. '{\"epochs\": 1}')")
    evaluate = commands.add_parser("evaluate")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--data-dir", type=Path)
    evaluate.add_argument("--stress", type=Path, required=True)
    args = parser.parse_args()
    {"stress": cmd_stress, "train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)


if __name__ == "__main__":
    main()
