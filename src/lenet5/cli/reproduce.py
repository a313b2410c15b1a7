"""`lenet5 reproduce lecun1998`: one reproduction, or --seeds N of them as child processes and their summary."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from lenet5.cli.common import ConsoleProgress, add_data_options, check_run_name, error_line, load_data
from lenet5.errors import ConfigError
from lenet5.fileio import atomic_write_text
from lenet5.hardware import check_threads
from lenet5.reproduce import PAPER_TEST_ERROR, RECIPE_FIELDS, reproduce_lecun1998
from lenet5.run_folder import RunFolder
from lenet5.runtime import resolve_device
from lenet5.train import TrainingError

# What a reproduction is started with, at their defaults; --resume continues one as it was started.
PLANNED = {"distortions": False, "batch_size": 1, "epochs": 20, "seed": 0, "seeds": 1, "name": None}


def cmd_reproduce(args: argparse.Namespace) -> int:
    check_run_name(args.name)
    changed = [f"--{k.replace('_', '-')}" for k, v in PLANNED.items() if getattr(args, k) != v]
    if args.resume and changed:  # they were silently ignored
        raise ConfigError(f"{', '.join(changed)} may not be given with --resume, which continues a reproduction as "
                          f"it was started (only --jobs, --threads and --device, this machine's settings, may)")
    if args.batch_size <= 0 or args.epochs <= 0:
        raise ConfigError("--batch-size and --epochs must be positive")
    if not 0 < args.seeds <= MAX_SEEDS or args.jobs <= 0:
        raise ConfigError(f"--seeds must be 1 to {MAX_SEEDS:,} and --jobs positive")
    check_threads(args.threads)
    if not args.resume and not 0 <= args.seed <= 2**32 - args.seeds:
        raise ConfigError(f"--seed {args.seed} with --seeds {args.seeds}: the seeds run from --seed to --seed + --seeds"
                          f" - 1, and each must be 0 to 2**32 - 1")
    resolve_device(args.device)  # before any folder is made (each seed would fail on its own)
    if args.seeds > 1 or (args.resume and (args.resume / SEEDS_FILE).is_file()):
        return _reproduce_seeds(args)
    if args.jobs != 1:
        raise ConfigError("--jobs trains several seeds at once: give --seeds N too (one seed trains on its own)")
    mode = "distortions" if args.distortions else "plain"
    run_dir = args.resume or args.out_dir / (args.name or f"{datetime.now():%Y%m%d-%H%M%S}-lecun1998-{mode}")
    if args.resume:
        RunFolder(run_dir).require()
        _require_reproduction(run_dir)
    else:
        RunFolder(run_dir).claim()  # before loading the data; fit checks again
    command = " ".join(["lenet5", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"] else "lenet5 reproduce lecun1998"
    result, report = reproduce_lecun1998(
        load_data(args), run_dir, distortions=args.distortions, batch_size=args.batch_size, epochs=args.epochs,
        seed=args.seed, threads=args.threads, device=args.device, resume_run=bool(args.resume),
        callbacks=[] if args.quiet else [ConsoleProgress()], command=command)
    m = result.metrics
    paper = PAPER_TEST_ERROR[bool(args.distortions)]
    print(f"test error {m['test_error']:.2%} after {m['epochs']} passes (paper: {paper:.2%}); report: {report}")
    return 0


def _require_reproduction(run_dir: Path) -> None:
    """ConfigError unless `run_dir` holds a lecun1998 reproduction (a plain `train` run was once resumed,
    its options silently ignored, and crashed writing the report)."""
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        what = "its config.json is damaged"
    elif config.get("model") != "lenet5-1998":
        what = f"a run of {str(config.get('model'))[:60]}"
    elif config.get("optimizer") != "sdlm" or not config.get("eval_train"):
        what = "a lenet5-1998 run trained without --optimizer sdlm --eval-train"
    else:
        return
    raise ConfigError(f"{run_dir}: not a lecun1998 reproduction ({what}); continue a training run with "
                      f"lenet5 train --resume")


MAX_SEEDS = 10_000  # seeds of one multi-seed reproduction
SEEDS_FILE = "seeds.json"  # marks a folder of per-seed reproductions, and says how to continue it


def _read_seed_plan(path: Path) -> dict[str, Any]:
    """The plan a multi-seed folder was started with, checked field by field (ConfigError if damaged)."""
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: damaged ({error_line(e)[:120]}); start a new multi-seed run instead") from None

    def whole(v: Any, low: int, high: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))

    checks = {"seeds": lambda v: isinstance(v, list) and 0 < len(v) <= MAX_SEEDS and len(set(v)) == len(v)
                                 and all(whole(k, 0, 2**32 - 1) for k in v),
              "distortions": lambda v: isinstance(v, bool), "batch_size": lambda v: whole(v, 1, 10**6),
              "epochs": lambda v: whole(v, 1, 10**6), "device": lambda v: isinstance(v, str) and 0 < len(v) <= 20,
              "threads": lambda v: whole(v, 0, 10**6)}
    if not isinstance(plan, dict):
        raise ConfigError(f"{path}: damaged (not a JSON object); start a new multi-seed run instead")
    bad = [k for k, ok in checks.items() if k not in plan or not ok(plan[k])]
    bad += [k for k in RECIPE_FIELDS if not number(plan.get(k))]
    if bad:
        raise ConfigError(f"{path}: damaged ({', '.join(bad)} missing or of the wrong kind); start a new multi-seed "
                          f"run instead")
    return plan


def _reproduce_seeds(args: argparse.Namespace) -> int:
    """--seeds N: one reproduction per seed in FOLDER/seed-K (run as child processes, --jobs at a time,
    each continued if interrupted), then summary.md/json over the seeds next to the paper's figure."""
    from concurrent.futures import ThreadPoolExecutor

    from lenet5.reproduce import (describe_recipe, lecun1998_config, plus_minus_sd, recipe_settings,
                                  write_seed_summary)

    def recipe(distortions: bool, batch_size: int) -> dict[str, float]:  # this version's j and distortions
        return recipe_settings(lecun1998_config(distortions=distortions, batch_size=batch_size))

    if args.resume:
        parent = args.resume
        plan = _read_seed_plan(parent / SEEDS_FILE)
        planned, now = recipe_settings(plan), recipe(plan["distortions"], plan["batch_size"])
        unstarted = [k for k in plan["seeds"] if not RunFolder(parent / f"seed-{k}").holds_run()]
        if planned != now and unstarted:  # those seeds would run another recipe (started ones keep their own)
            raise ConfigError(f"{parent}: its seeds were planned with {describe_recipe(planned, plan['distortions'])}, "
                              f"and this version's recipe uses {describe_recipe(now, plan['distortions'])}; start a "
                              f"new multi-seed run instead")
    else:
        mode = "distortions" if args.distortions else "plain"
        parent = args.out_dir / (args.name or f"{datetime.now():%Y%m%d-%H%M%S}-lecun1998-{mode}-{args.seeds}-seeds")
        if parent.exists() and any(parent.iterdir()):
            raise ConfigError(f"{parent}: already exists and is not empty; choose another --name, or continue "
                              f"it with --resume {parent}")
        plan = {"seeds": list(range(args.seed, args.seed + args.seeds)), "distortions": args.distortions,
                "batch_size": args.batch_size, "epochs": args.epochs, "device": args.device,
                "threads": args.threads or (1 if args.jobs > 1 else 0),
                **recipe(args.distortions, args.batch_size)}
        parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(parent / SEEDS_FILE, json.dumps(plan, indent=2) + "\n")
    data_dir = load_data(args).root  # fetched and verified once; the children read it offline
    command = " ".join(["lenet5", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"] else "lenet5 reproduce lecun1998"

    children: set[subprocess.Popen] = set()  # running seeds, stopped with the parent (SIGTERM reaches it alone)
    stopping, lock = threading.Event(), threading.Lock()

    def one(seed: int) -> tuple[int, str]:
        run_dir = parent / f"seed-{seed}"
        child = [sys.executable, "-m", "lenet5", "reproduce", "lecun1998", "--quiet", "--offline",
                 "--data-dir", str(data_dir)]
        if (run_dir / "report.md").is_file():
            return seed, "done before"
        # this machine's --threads and --device when given, else the plan's (a plan may come from a bigger machine)
        host = ["--device", args.device if args.device != "auto" else plan["device"],
                "--threads", str(args.threads or plan["threads"])]
        if RunFolder(run_dir).holds_run():
            child += ["--resume", str(run_dir), *host]
        else:
            child += ["--seed", str(seed), "--out-dir", str(parent), "--name", run_dir.name,
                      "--batch-size", str(plan["batch_size"]), "--epochs", str(plan["epochs"]), *host]
            child += ["--distortions"] if plan["distortions"] else []
        with lock:
            if stopping.is_set():
                return seed, "failed: stopped"
            process = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            children.add(process)
        try:
            stdout, stderr = process.communicate()
        finally:
            with lock:
                children.discard(process)
        lines = (stdout if process.returncode == 0 else stderr or stdout).strip().splitlines()
        return seed, ("" if process.returncode == 0 else "failed: ") + (lines[-1] if lines else f"exit {process.returncode}")

    failed = False
    with ThreadPoolExecutor(args.jobs) as pool:
        try:
            for seed, outcome in pool.map(one, plan["seeds"]):
                print(f"seed {seed}: {outcome}", flush=True)
                failed |= outcome.startswith("failed")
        except KeyboardInterrupt:  # Ctrl-C reaches the children too, SIGTERM only this process: pass it on
            with lock:
                stopping.set()
                for process in children:
                    process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    finished = {k: parent / f"seed-{k}" for k in plan["seeds"] if (parent / f"seed-{k}" / "report.md").is_file()}
    if not finished:
        raise TrainingError(f"{parent}: no seed finished")
    summary = write_seed_summary(parent, finished, distortions=plan["distortions"], command=command,
                                 planned=plan["seeds"])
    print(f"test error over {summary['seeds']} seeds: {summary['mean']:.2%}{plus_minus_sd(summary)} "
          f"(min {summary['min']:.2%}, max {summary['max']:.2%}; paper {summary['paper_test_error']:.2%}); "
          f"summary: {parent / 'summary.md'}")
    if failed:
        print(f"some seeds did not finish; continue them with: lenet5 reproduce lecun1998 --resume {parent}")
    return 1 if failed else 0



def add_parser(commands: argparse._SubParsersAction) -> None:
    """`lenet5 reproduce` and its options."""
    rep = commands.add_parser("reproduce", help="reproduce a published result, with a report",
                              description="Reproduce a published recipe and write report.md beside the run.")
    rep.add_argument("recipe", choices=["lecun1998"], help="lecun1998: LeNet-5 trained as in LeCun et al. 1998")
    rep.add_argument("--distortions", action="store_true", help="train on randomly distorted digits (paper: 0.8%%)")
    rep.add_argument("--batch-size", type=int, default=PLANNED["batch_size"],
                     help="patterns per update (default: 1, the paper's, by a native per-pattern pass on CPU; "
                          "16 for the mini-batch variant with the rate scaled by 16)")
    rep.add_argument("--epochs", type=int, default=PLANNED["epochs"], help="passes over the training set (default: 20, as the paper)")
    rep.add_argument("--seed", type=int, default=PLANNED["seed"], help="seed (default: 0); the first of --seeds")
    rep.add_argument("--seeds", type=int, default=PLANNED["seeds"], help="run this many seeds (--seed, --seed+1, ...) into "
                     "FOLDER/seed-K and summarise them: mean +- sd and min-max of the test error (default: 1)")
    rep.add_argument("--jobs", type=int, default=1, help="with --seeds: seeds trained at once, each on one thread "
                     "unless --threads says otherwise (per-pattern training uses one core)")
    rep.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's)")
    rep.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:N or auto (default: auto; the CPU when --batch-size is 1)")
    rep.add_argument("--out-dir", type=Path, default=Path("runs"), help="parent of run folders (default: runs)")
    rep.add_argument("--name", help="run folder name (default: DATE-TIME-lecun1998-plain|distortions)")
    rep.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted reproduction")
    rep.add_argument("--quiet", action="store_true", help="print only the final summary")
    add_data_options(rep)
    rep.set_defaults(handler=cmd_reproduce)
