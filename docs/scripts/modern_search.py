"""The search that chose the `modern` recipe for lenet5-modern: candidates compared on validation.

Every candidate trains `lenet5-modern` with `--val-split 5000` (the same 5,000 held-out training
images for all) for each seed; the table ranks candidates by their mean validation accuracy at
the epoch each run selects, and shows the test accuracy of that epoch only for the record (the
test set chooses nothing here). Candidates run as parallel processes:

    python docs/scripts/modern_search.py --device cuda --data-dir MNIST --jobs 8 --seeds 0 1 --out DIR

Accuracy does not depend on the device the search ran on beyond run-to-run noise; the recipe's
time on a 2-core CPU is measured separately (docs/results/lenet5-modern/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

BASE = ["--model", "lenet5-modern", "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "5e-4",
        "--batch-size", "128", "--schedule", "onecycle", "--label-smoothing", "0.1", "--ema", "0.999",
        "--val-split", "5000"]
CANDIDATES = {
    "e10-distort": ["--epochs", "10", "--distort"],
    "e15-distort": ["--epochs", "15", "--distort"],
    "e15-warp": ["--epochs", "15", "--augment", "warp"],
    "e20-distort": ["--epochs", "20", "--distort"],
    "e20-warp": ["--epochs", "20", "--augment", "warp"],
    "e15-distort-noema": ["--epochs", "15", "--distort", "--ema", "0"],
    "e15-distort-nols": ["--epochs", "15", "--distort", "--label-smoothing", "0"],
    "e15-distort-lr6e-3": ["--epochs", "15", "--distort", "--lr", "6e-3"],
    "e15-distort-wd5e-2": ["--epochs", "15", "--distort", "--weight-decay", "5e-2"],
    "e15-distort-ema9995": ["--epochs", "15", "--distort", "--ema", "0.9995"],
    "e15-distort-b256": ["--epochs", "15", "--distort", "--batch-size", "256", "--lr", "5e-3"],
    "e15-distort-sgd": ["--epochs", "15", "--distort", "--optimizer", "sgd", "--lr", "0.1", "--nesterov"],
    # the distortions' strength, after it mattered for the 1998 network (docs/results/lecun1998-rate/)
    "e15-distort-x0.5": ["--epochs", "15", "--distort", "--distort-strength", "0.5"],
    "e15-distort-x0.75": ["--epochs", "15", "--distort", "--distort-strength", "0.75"],
    # smaller batches: twice the updates per epoch, at the recipe's rate and at half of it
    "e15-distort-b64": ["--epochs", "15", "--distort", "--batch-size", "64"],
    "e15-distort-b64-lr1.5e-3": ["--epochs", "15", "--distort", "--batch-size", "64", "--lr", "1.5e-3"],
    "e15-distort-b32": ["--epochs", "15", "--distort", "--batch-size", "32"],
    # longer: batch 64 chose its last epoch for every seed
    "e25-distort-b64": ["--epochs", "25", "--distort", "--batch-size", "64"],
    # stroke width varied (dilation or erosion, lenet5.data.augment.stroke_width) after the distortions
    "e15-distort-b64-stroke": ["--epochs", "15", "--distort", "--batch-size", "64", "--augment", "stroke_width"],
    # a rotation of up to 10 degrees after the distortions (lenet5.data.augment.rotate), which make none
    "e15-distort-b64-rotate": ["--epochs", "15", "--distort", "--batch-size", "64", "--augment", "rotate"],
    # architectures within 60,000 parameters at the chosen recipe (docs/scripts/modern_arch.py)
    **{f"e15-distort-b64-{arch}": ["--epochs", "15", "--distort", "--batch-size", "64", "--model", f"arch-{arch}"]
       for arch in ("deep14", "deep7", "hires")},
}
ARCH_LAUNCHER = Path(__file__).with_name("modern_arch.py")  # registers the arch-* models, then runs lenet5


def run(name: str, options: list[str], seed: int, args: argparse.Namespace) -> dict:
    run_name = f"{name}-s{seed}"
    launcher = [str(ARCH_LAUNCHER)] if any(o.startswith("arch-") for o in options) else ["-m", "lenet5"]
    command = [sys.executable, *launcher, "train", *BASE, *options, "--seed", str(seed), "--device", args.device,
               "--threads", str(args.threads), "--data-dir", args.data_dir, "--out-dir", str(args.runs),
               "--name", run_name, "--quiet", *args.extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"name": name, "seed": seed, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    metrics = json.loads((args.runs / run_name / "metrics.json").read_text())
    return {"name": name, "seed": seed, "val_acc": metrics["best_val_acc"], "test_acc": metrics["best_test_acc"],
            "best_epoch": metrics["best_epoch"], "last_test_acc": metrics["test_acc"],
            "train_seconds": metrics["train_seconds"], "wall_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="*", help="candidate names (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="where the table and the JSON go")
    parser.add_argument("--runs", type=Path, help="where the run folders go (default: OUT/runs)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options added to every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.runs = args.runs or args.out / "runs"
    names = args.only or list(CANDIDATES)
    jobs = [(n, s) for n in names for s in args.seeds]
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:  # each result is written as it comes (a cut-off search keeps them)
        futures = [pool.submit(run, name, CANDIDATES[name], seed, args) for name, seed in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            print(json.dumps(results[-1]), flush=True)
            (args.out / "modern_search.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = []
    for name in names:
        mine = [r for r in results if r["name"] == name and "error" not in r]
        errors = [r for r in results if r["name"] == name and "error" in r]
        if not mine:
            rows.append((0.0, f"| {name} | failed: {errors[0]['error']} | | | |"))
            continue
        val = statistics.mean(r["val_acc"] for r in mine)
        test = statistics.mean(r["test_acc"] for r in mine)
        rows.append((val, f"| {name} | {100 * val:.2f}% | {100 * test:.2f}% | "
                          f"{', '.join(str(r['best_epoch']) for r in mine)} | "
                          f"{statistics.mean(r['train_seconds'] for r in mine):.0f} |"))
    header = (f"`python docs/scripts/modern_search.py --device {args.device} --seeds {' '.join(map(str, args.seeds))}`"
              f" (base: `{' '.join(BASE)}`)\n\n| candidate | mean val acc | mean test acc (record only) | "
              f"epoch chosen | training s |\n|---|---:|---:|---|---:|")
    table = "\n".join([header] + [row for _, row in sorted(rows, reverse=True)])
    (args.out / "modern_search.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
