"""The `lenet5` command: a thin layer that parses options, calls the library and prints.

Errors the user can fix (lenet5.errors) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import typing
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

import lenet5
from lenet5 import distributed
from lenet5.data.catalog import canonical_name, dataset_names
from lenet5.data.dataset import DATA_ENV, MIRRORS_ENV, check_files, load_dataset, resolve_data_dir
from lenet5.errors import ConfigError, Lenet5Error, one_line
from lenet5.evaluate import evaluate_checkpoint
from lenet5.hardware import check_threads, class_note, hardware_class
from lenet5.models import count_parameters, create_model, describe, list_models, model_class
from lenet5.predict import predict_checkpoint
from lenet5.reproduce import PAPER_TEST_ERROR, RECIPE_FIELDS, reproduce_lecun1998
from lenet5.run_folder import RunFolder
from lenet5.runtime import flush_denormals, note_recipe, resolve_device, tune_allocator
from lenet5.fileio import atomic_write_text
from lenet5.train import Callback, TrainConfig, TrainingError, fit, resume
from lenet5.train.config import HOST_SETTINGS, RECIPES

OFFLINE_ENV = "LENET5_OFFLINE"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143  # 128 + SIGINT, 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that it stops a run as cleanly: torchrun sends it to
    the other processes of a run when one fails, and job schedulers and `kill` send it too."""


def _terminate(signum, frame) -> None:
    # Once: a second SIGTERM (torchrun forwarding the one a scheduler sent the whole group) ends the
    # process at once, as a SIGTERM did before, instead of interrupting the first one's clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


# ---------------------------------------------------------------- progress shown to the user
class DownloadProgress:
    """A byte progress bar per downloaded file (hidden when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.name = ""

    def __call__(self, name: str, done: int, total: int) -> None:
        if name != self.name or self.bar is None:
            self.close()
            self.name = name
            self.bar = tqdm(total=total, desc=f"downloading {name}", unit="B", unit_scale=True, disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleProgress(Callback):
    """Keras-style output: a header, a progress bar per epoch, one line of figures per epoch."""

    def __init__(self, classes: int = 10) -> None:
        self.bar: tqdm | None = None
        self.classes = classes

    def on_train_begin(self, run_dir, config, env, start_epoch) -> None:
        rev = f", git {env['git_revision']}" if env.get("git_revision") else ""
        where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
        print(f"lenet5 {env['lenet5']}{rev} | torch {env['torch']} | {env['device']} ({where})")
        model = create_model(config.model, num_classes=self.classes, **config.model_args())
        extra = f" | {env['precision']}"
        if env.get("world_size"):
            extra += f" | {env['world_size']} processes ({env['backend']}), global batch"
        print(f"model {config.model} ({count_parameters(model):,} parameters) | {config.optimizer} lr {config.lr:g} "
              f"| {config.schedule} schedule | batch {config.batch_size} | {config.epochs} epochs | seed {config.seed}"
              + extra)
        print(f"data {config.dataset} ({self.classes} classes)")
        print(f"precision {env['precision']}: {env['precision_reason']}")
        if env["precision_slow"]:
            print("warning: --precision bf16 will be slow on this machine; --precision auto picks fp32 here",
                  file=sys.stderr, flush=True)
        print(f"run folder: {run_dir}" + (f" (resuming after epoch {start_epoch})" if start_epoch else ""),
              flush=True)

    def on_epoch_begin(self, epoch, epochs, steps) -> None:
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, disable=None)

    def on_batch_end(self, step, loss, accuracy) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {accuracy:.2%}", refresh=False)

    def on_epoch_end(self, record) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"epoch {record['epoch']:>2}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}"
              + (f"  |  val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}" if "val_acc" in record else "")
              + f"  |  test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%}"
              f"  |  lr {record['lr']:.2e}  {record['seconds']:.1f} s", flush=True)


# ---------------------------------------------------------------- options
def _field_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field. Unset options stay out of the namespace (SUPPRESS),
    so a --config file or a resumed run's config.json is only overridden by what was typed."""
    group = parser.add_argument_group("training options (TrainConfig; defaults reproduce the blog post's run)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default is not None else "")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                               metavar=None if f.metadata.get("choices") else f.name.upper(), help=help_text)


def add_data_options(parser: argparse.ArgumentParser, dataset: str | None = None) -> None:
    """The options of where data comes from; with `dataset` ("checkpoint" or a default name), --dataset too
    (`train` has it from TrainConfig)."""
    group = parser.add_argument_group("data")
    if dataset == "checkpoint":
        group.add_argument("--dataset", metavar="NAME", help="evaluate on this data set: " + ", ".join(dataset_names())
                           + " (default: the one the checkpoint was trained on; its classes must be the checkpoint's)")
    elif dataset:
        group.add_argument("--dataset", metavar="NAME", default=dataset,
                           help=f"data set: {', '.join(dataset_names())} (default: {dataset})")
    group.add_argument("--data-dir", type=Path, default=None,
                       help=f"folder with the data set's files (default: for mnist ${DATA_ENV}, else "
                            f"{resolve_data_dir(None).parent}/NAME)")
    group.add_argument("--offline", action=argparse.BooleanOptionalAction,
                       default=os.environ.get(OFFLINE_ENV, "") not in ("", "0"),
                       help=f"never download; missing files are an error (default: ${OFFLINE_ENV}, else off)")
    group.add_argument("--mirror", action="append", metavar="URL",
                       help=f"download from this mirror (repeatable; default: for mnist ${MIRRORS_ENV}, else the "
                            "data set's built-in list)")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds before a stalled download (no byte, or under 1 KiB/s over that "
                       "time) is abandoned")
    group.add_argument("--retries", type=int, default=2, help="retries per mirror for transient failures")


MAX_TIMEOUT_S, MAX_RETRIES = 86_400, 100  # a day without a byte; a hundred tries a mirror


def load_data(args: argparse.Namespace, dataset: str = "mnist"):
    # NaN passed "<= 0" and reached the socket as a traceback; inf overflowed its clock
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        raise ConfigError(f"--timeout must be positive seconds, at most {MAX_TIMEOUT_S}, got {args.timeout}")
    if not 0 <= args.retries <= MAX_RETRIES:
        raise ConfigError(f"--retries must be from 0 to {MAX_RETRIES}, got {args.retries}")
    progress = DownloadProgress()
    try:
        return load_dataset(dataset, args.data_dir, download=not args.offline, mirrors=args.mirror,
                            timeout=args.timeout, retries=args.retries, progress=progress)
    finally:
        progress.close()


# ---------------------------------------------------------------- commands
def _load_data_ranked(args: argparse.Namespace, world: distributed.World, dataset: str):
    """Under torchrun, the first process of each machine downloads and decodes; the rest then read."""
    if not world.distributed:
        return load_data(args, dataset)
    data = load_data(args, dataset) if world.local_rank == 0 else None
    distributed.barrier()
    return data if data is not None else load_data(args, dataset)


def check_run_name(name: str | None) -> None:
    """A --name is one folder inside --out-dir ('../x', '/tmp/x', 'a/b' and '.' wrote elsewhere)."""
    if name is not None and (name in (".", "..") or "/" in name or os.sep in name or (os.altsep or "/") in name):
        raise ConfigError(f"--name {name[:80]!r}: a run's folder name, without '/' (the folder goes in --out-dir)")


def _train_base(args: argparse.Namespace, given: dict, hardware: str | None) -> dict:
    """The options under the typed ones: the recipe's for `hardware`, then a --config file's."""
    base = RECIPES[args.recipe].options_for(hardware) if args.recipe else {}
    if args.config:
        base.update(TrainConfig.from_json(args.config).to_dict())
    if "optimizer" in given and "lr" not in given:
        base.pop("lr", None)  # the new optimizer's default rate, not the old one's
    if "model" in given and "label_smoothing" not in given and not model_class(given["model"]).label_smoothing_ok:
        base.pop("label_smoothing", None)  # a recipe's, for its own network (lenet5-1998 has no logits)
    return base


def _replaced_by_typed(recipe: dict, given: dict) -> str:
    """What the recipe line must add when typed options replace some of the recipe's (it describes the
    recipe as chosen, e.g. a validation split that --val-split 0 then removes)."""
    def option(name: str, value: Any) -> str:
        flag = name.replace("_", "-")
        return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"

    replaced = [option(k, given[k]) for k in recipe if k in given and given[k] != recipe[k]]
    return f"; replaced by your options: {', '.join(replaced)}" if replaced else ""


def cmd_train(args: argparse.Namespace) -> int:
    check_run_name(getattr(args, "name", None))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    check_threads(given.get("threads", 0))  # before the data (a download, perhaps); fit checks again
    note_recipe(None)  # until a recipe is chosen below (a process may train more than once: the tests, the API)
    if args.resume:
        if args.config or args.recipe or set(given) - {"epochs", *HOST_SETTINGS}:
            raise ConfigError("--resume continues a run with its own config.json; only --epochs and the host "
                              f"settings ({', '.join('--' + h.replace('_', '-') for h in HOST_SETTINGS)}) may be given with it")
        saved = TrainConfig.from_json(RunFolder(args.resume).require().config)
        args.run_dir = args.resume  # for the hint after Ctrl-C or a lost peer
        device, dataset = given.get("device") or saved.device, saved.dataset
    else:
        if args.calibrate is None and args.recipe:
            args.calibrate = RECIPES[args.recipe].calibrate
        hardware = None
        if args.recipe:
            where = resolve_device(given.get("device", "auto"))
            # the bf16 probe runs only for a recipe whose options differ by class
            hardware = hardware_class(where, probe=bool(RECIPES[args.recipe].by_class))
            chosen = RECIPES[args.recipe].options_for(hardware)
            note_recipe(args.recipe, hardware, RECIPES[args.recipe].why_for(hardware),
                        {k: v for k, v in chosen.items() if k not in given})
            if not args.quiet and int(os.environ.get("RANK", 0)) == 0:
                note = class_note(where) if RECIPES[args.recipe].by_class else ""
                print(f"recipe {args.recipe} for {hardware}{note}: {RECIPES[args.recipe].why_for(hardware)}"
                      + _replaced_by_typed(chosen, given))
        config = TrainConfig.from_dict({**_train_base(args, given, hardware), **given})
        if args.calibrate and canonical_name(config.dataset) != "mnist":  # its held-out and stress sets are MNIST's
            raise ConfigError(f"--calibrate fits the digit service's 'unsure' rule on MNIST digits; it does not apply "
                              f"to --dataset {config.dataset[:80]}: add --no-calibrate")
        if args.calibrate and not 0 < config.train_samples < 60_000:
            raise ConfigError("--calibrate needs training digits the run does not train on: give --train-samples "
                              "below 60,000 (e.g. 55000), or --no-calibrate")
        device, dataset = config.device, config.dataset
    world = distributed.init(device)  # a no-op unless torchrun started this process
    if not args.resume and args.recipe and world.distributed:
        agreed = distributed.broadcast(hardware)  # each machine measured its own bf16: rank 0's class for all
        if agreed != hardware:
            config = TrainConfig.from_dict({**_train_base(args, given, agreed), **given})
            note_recipe(args.recipe, agreed, RECIPES[args.recipe].why_for(agreed),
                        {k: v for k, v in RECIPES[args.recipe].options_for(agreed).items() if k not in given})
    try:
        if args.resume:
            data = _load_data_ranked(args, world, dataset)
            progress = [] if args.quiet or not world.is_main else [ConsoleProgress(len(data.classes))]
            result = resume(args.resume, data, epochs=given.get("epochs"),
                            callbacks=progress, **{k: v for k, v in given.items() if k in HOST_SETTINGS})
        else:
            name = args.name or distributed.broadcast(f"{datetime.now():%Y%m%d-%H%M%S}-{config.model}")
            run_dir = args.out_dir / name
            RunFolder(run_dir).claim()  # before loading the data; fit checks again
            args.run_dir = run_dir
            data = _load_data_ranked(args, world, dataset)
            progress = [] if args.quiet or not world.is_main else [ConsoleProgress(len(data.classes))]
            result = fit(config, data, run_dir, callbacks=progress)
    except RuntimeError as e:
        lost = distributed.peer_lost(e, world, getattr(args, "run_dir", None))
        if lost is None:
            raise
        raise lost from e
    finally:
        distributed.shutdown()
    if not world.is_main:
        return 0
    if args.calibrate:  # the last checkpoint and the best, which predict and serve take from a run folder
        from lenet5.calibration import calibrate_checkpoints

        folder = RunFolder(result.run_dir)
        paths = [folder.last_weights] + ([folder.best_weights] if folder.best_weights.is_file() else [])
        for calibration, path in calibrate_checkpoints(paths, load_data(args), device=given.get("device", "auto")):
            _print_calibration(calibration, path)
    m = result.metrics
    if m["best_selected_by"] == "val_acc":
        best = (f"best validation accuracy {m['best_val_acc']:.2%} at epoch {m['best_epoch']} "
                f"(test accuracy there {m['best_test_acc']:.2%})")
    else:
        best = f"best {m['best_test_acc']:.2%} at epoch {m['best_epoch']} (chosen on the test set)"
    print(f"test accuracy {m['test_acc']:.2%} (error {m['test_error']:.2%}) after {m['epochs']} epochs; "
          f"{best}; {m['seconds']:.1f} s")
    print(f"wrote {result.run_dir}/: config.json history.csv history.json curves.png metrics.json "
          "checkpoints/{last,best}.safetensors")
    return 0


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
        raise ConfigError(f"{path}: damaged ({_one_line(e)[:120]}); start a new multi-seed run instead") from None

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


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.batch_size <= 0 or args.test_samples < 0:
        raise ConfigError("--batch-size must be positive and --test-samples not negative")
    if args.stress and (args.report or args.test_samples):
        raise ConfigError("--stress uses the whole test set and writes no report: leave out --report and --test-samples")
    if args.report:
        from lenet5.analysis import report_folder

        report_folder(args.report)  # refused before the evaluation, not after it
    from lenet5.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint, resolve_device(args.device))
    data = load_data(args, args.dataset or checkpoint.dataset)
    if args.stress:
        return _evaluate_stress(args, data)
    result = evaluate_checkpoint(args.checkpoint, data, device=args.device, batch_size=args.batch_size,
                                 test_samples=args.test_samples)
    if args.report:
        from lenet5.analysis import write_report

        data.test = data.test.take(args.test_samples, "--test-samples")
        summary = write_report(checkpoint, data, args.report)
        result["rejection_for_0.5%_error"] = summary["rejection_for_0.5%_error"]
        result["ece"] = summary["ece"]
        result["report"] = str(args.report / "report.md")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']}: {result['model']} ({result['parameters']:,} parameters), "
              f"epoch {result['epoch']}, trained on {result['trained_on']}; test set of {result['dataset']}")
        print(f"test accuracy {result['test_accuracy']:.2%}  error {result['test_error']:.2%} "
              f"({result['errors']} of {result['test_images']:,})  loss {result['test_loss']:.4f}")
        if args.report:
            print(f"rejecting {result['rejection_for_0.5%_error']:.2%} brings the error to 0.5%; "
                  f"calibration error {result['ece']:.4f}; report: {result['report']}")
    return 0


def _announce_stress(path: Path) -> None:
    print(f"making the stress sets from the test digits, once (a few minutes on 2 cores); cache: {path}",
          file=sys.stderr, flush=True)


def _evaluate_stress(args: argparse.Namespace, mnist) -> int:
    from lenet5.evaluate import evaluate_stress

    result = evaluate_stress(args.checkpoint, mnist, device=args.device, batch_size=args.batch_size,
                             cache_dir=args.stress_dir, on_make=_announce_stress)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']}: {result['model']} ({result['parameters']:,} parameters), epoch {result['epoch']}")
    print(f"unsure: {result['calibration']}")
    print(f"{'set':<14} {'images':>7} {'accuracy':>9} {'unsure':>8} {'accuracy when sure':>19}")
    for row in result["digits"]:
        sure = "-" if row["accuracy_when_sure"] is None else f"{row['accuracy_when_sure']:.2%}"
        print(f"{row['set']:<14} {row['images']:>7,} {row['accuracy']:>9.2%} {row['unsure']:>8.2%} {sure:>19}")
    for row in result["nondigits"]:
        print(f"{'non-digits: ' + row['set']:<24} {row['images']:>7,} {'':>9} {row['unsure']:>8.2%}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lenet5.calibration import calibrate_checkpoint, check_target_error

    check_target_error(args.target_error)  # before loading the data and making the held-out sets (a minute)
    calibration, path = calibrate_checkpoint(args.checkpoint, load_data(args), device=args.device,
                                             target_error=args.target_error)
    _print_calibration(calibration, path)
    return 0


def _print_calibration(calibration, path: Path) -> None:
    print(f"{path}: {calibration.rule()}")
    print(f"fitted on {calibration.heldout}: {calibration.heldout_rejected:.2%} of them marked unsure, "
          f"error {calibration.heldout_error:.2%} on the rest")


def _is_checkpoint(path: Path) -> bool:
    """Whether a command's first item names a checkpoint rather than an image or a folder of them."""
    # as load_checkpoint reads them: a file, a run folder, or its checkpoints/ folder (best.safetensors)
    return path.suffix == ".safetensors" or RunFolder(path).is_run_folder() or (path / "best.safetensors").is_file()


def _checkpoint_or_bundled(checkpoint: Path | None) -> Path:
    """The checkpoint given, else the model shipped with the package (and a line saying so)."""
    if checkpoint is not None:
        return checkpoint
    from lenet5.pretrained import RECIPE, bundled_checkpoint

    path = bundled_checkpoint()
    print(f"using the bundled model ({path.stem}, the {RECIPE} recipe's; give a checkpoint to use your own)",
          file=sys.stderr)
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    items = list(args.items)  # strings: an empty one is an error of its own, not "."
    if args.checkpoint is None and items[0] and _is_checkpoint(Path(items[0])):
        if len(items) == 1:
            raise ConfigError(f"{items[0]} is a checkpoint: give the images to predict after it")
        args.checkpoint, items = Path(items[0]), items[1:]
    args.checkpoint, args.inputs = _checkpoint_or_bundled(args.checkpoint), items
    predictions, calibration = predict_checkpoint(args.checkpoint, args.inputs, device=args.device,
                                                  save_prepared=args.save_prepared)
    if not predictions:
        raise ConfigError("no image files found in the given folders")
    if args.json:
        print(json.dumps([p.as_dict() | {"calibrated": calibration.fitted} for p in predictions], indent=2))
    elif args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["file", "digit", "label", "confidence", "top3", "error", "unsure"])
        for p in predictions:
            writer.writerow([p.file, "" if p.digit is None else p.digit, p.label or "",
                             "" if p.confidence is None else f"{p.confidence:.4f}",
                             " ".join(f"{name}:{v:.3f}" for (_, v), name in zip(p.top3, p.top3_labels)), p.error or "",
                             "" if p.unsure is None else str(p.unsure).lower()])
    else:
        width = max(len(p.file) for p in predictions)
        label_width = max([5] + [len(p.label) for p in predictions if p.label])
        print(f"{'file':<{width}}  {'class':>{label_width}}  confidence  top-3")
        for p in predictions:
            if p.error:
                print(f"{p.file:<{width}}  error: {p.error.removeprefix(Path(p.file).name + ': ')}")
            else:
                top = "  ".join(f"{name} {v:.1%}" for (_, v), name in zip(p.top3, p.top3_labels))
                unsure = f"  unsure: {p.unsure_reason}" if p.unsure else ""
                print(f"{p.file:<{width}}  {p.label:>{label_width}}  {p.confidence:>10.1%}  {top}{unsure}")
        print(f"unsure: {calibration.rule()}")
    failed = sum(p.error is not None for p in predictions)
    if failed:
        print(f"lenet5 predict: {failed} of {len(predictions)} file(s) could not be used", file=sys.stderr)
    return EXIT_ERROR if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lenet5.checkpoint import load_checkpoint
    from lenet5.explain import check_max_maps, explain_digit, explain_file, plot_explanation
    from lenet5.fileio import atomic_write_bytes
    from lenet5.runtime import resolve_device

    items = [Path(item) for item in args.items if item]
    if args.checkpoint is None and items and (len(items) == 2 or _is_checkpoint(items[0])):
        args.checkpoint, items = items[0], items[1:]
    if len(items) > 1:
        raise ConfigError(f"explain takes one image, not {len(items)}")
    check_max_maps(args.max_maps)  # before any work
    args.image = items[0] if items else None
    args.checkpoint = _checkpoint_or_bundled(args.checkpoint)
    checkpoint = load_checkpoint(args.checkpoint, resolve_device(args.device))
    if (args.image is None) == (args.test_index is None):
        raise ConfigError("give an IMAGE or --test-index N (one of them)")
    if args.image is not None:
        explanation = explain_file(checkpoint.model, args.image)
        source = str(args.image)
    else:
        from lenet5.evaluate import check_classes

        data = load_data(args, args.dataset or checkpoint.dataset)
        check_classes(checkpoint.model, data)
        if not 0 <= args.test_index < len(data.test):
            raise ConfigError(f"--test-index must be in 0..{len(data.test) - 1}")
        explanation = explain_digit(checkpoint.model, data.test.images[args.test_index].numpy())
        label = checkpoint.classes[int(data.test.labels[args.test_index])]
        source = f"{data.title} test image {args.test_index} (label {label})"
    out = args.out or Path(f"{Path(source).stem if args.image else f'test-{args.test_index}'}.maps.png")
    atomic_write_bytes(out, plot_explanation(explanation, f"{checkpoint.meta['model']}: {source}", args.max_maps,
                                             checkpoint.classes))
    layers = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in explanation.maps.items())
    print(f"{source}: predicted {checkpoint.classes[explanation.digit]} ({explanation.probabilities.max():.1%})")
    print(f"layers: {layers}")
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lenet5.checkpoint import load_checkpoint
    from lenet5.export import card_path, export_checkpoint

    if args.check_images <= 0:
        raise ConfigError("--check-images must be positive")
    checkpoint = load_checkpoint(_checkpoint_or_bundled(args.checkpoint))  # as predict, explain and serve
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    out = args.out or Path(f"{checkpoint.meta['model']}{suffix}")
    source = {checkpoint.path.resolve(), checkpoint.path.with_suffix(".json").resolve()}
    if out.resolve() in source or card_path(out).resolve() in source:
        raise ConfigError(f"--out {out}: that is the checkpoint being exported (or its sidecar); choose another path")
    data = None if args.no_check else load_data(args, args.dataset or checkpoint.dataset)
    result = export_checkpoint(checkpoint, out, args.format, data, args.check_images)
    print(f"wrote {result['path']} ({args.format}, {result['bytes']:,} bytes) and {result['model_card']}")
    if "check" in result:
        c = result["check"]
        print(f"check on {c['images']:,} test images: max |difference| {c['max_abs_difference']:.2e}, "
              f"same class on {c['same_class']:,}; test accuracy {result['test_accuracy']:.2%}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    args.checkpoint = _checkpoint_or_bundled(args.checkpoint)
    try:
        import uvicorn  # noqa: F401 - here so that a missing extra is a one-line error

        from lenet5.serve import create_app
        from lenet5.serve.run import check_port, run_server
    except ImportError as e:
        raise ConfigError(f"lenet5 serve needs {e.name}: pip install 'lenet5[serve]'") from None
    import torch

    if not 0 < args.port < 65536 or args.threads < 0 or args.workers < 1:
        raise ConfigError("--port must be 1-65535, --threads not negative, --workers >= 1")
    if not (math.isfinite(args.max_body_mb) and 0.001 <= args.max_body_mb <= 1024):  # NaN passed "<= 0"
        raise ConfigError(f"--max-body-mb must be from 0.001 to 1024 (megabytes), got {args.max_body_mb}")
    check_threads(args.threads)
    # One thread per request: a single digit is too small to split, and requests run in parallel.
    torch.set_num_threads(args.threads or 1)
    check_port(args.host, args.port)  # before "serving on ...": a busy port is one line and exit 1
    max_body = int(args.max_body_mb * 1024 * 1024)
    app = create_app(args.checkpoint, max_body=max_body)  # loads the checkpoint: errors show here, once
    info = app.state.predictor.info()
    print(f"serving {info['name']} ({info['parameters']:,} parameters) on http://{args.host}:{args.port}/ "
          f"with {args.workers} worker process(es) (API docs: /docs)", flush=True)
    if args.workers == 1:
        run_server(app, host=args.host, port=args.port)
    else:
        from lenet5.serve.app import SETTINGS_ENV

        os.environ[SETTINGS_ENV] = json.dumps({"checkpoint": str(args.checkpoint), "max_body": max_body,
                                               "threads": args.threads or 1})
        run_server("lenet5.serve.app:app_from_environment", factory=True, workers=args.workers, host=args.host,
                   port=args.port)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = [{"name": n, "parameters": count_parameters(create_model(n)), "description": describe(n)}
            for n in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'model':<{width}}  {'parameters':>10}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['parameters']:>10,}  {r['description']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    data = load_data(args, args.dataset)
    if args.what == "stress":
        return _data_stress(args, data)
    print(f"{data.title} in {data.root}: {len(data.classes)} classes ({', '.join(data.classes[:12])}"
          f"{', ...' if len(data.classes) > 12 else ''})")
    for path, status in check_files(data):  # every file re-verified in full each time `lenet5 data` runs
        print(f"  {path.name:<40} {path.stat().st_size:>11,} bytes  {status}")
    for name, split in (("train", data.train), ("test", data.test)):
        counts = split.class_counts(len(data.classes))
        print(f"  {name:<5} {len(split):>7,} images 28x28, per class: {' '.join(map(str, counts))}")
    return 0


def _data_stress(args: argparse.Namespace, mnist) -> int:
    from lenet5.data.stress import load_stress_sets

    sets, nondigits, path = load_stress_sets(mnist.test, args.stress_dir, refresh=args.refresh,
                                             on_make=_announce_stress)
    print(f"stress sets of the MNIST test digits in {path}")
    for name, split in sets.items():
        print(f"  {name:<13} {len(split):>6,} digits")
    for name, images in nondigits.items():
        print(f"  non-digits: {name:<10} {len(images):>6,} images")
    if args.samples:
        from lenet5.fileio import atomic_write_bytes
        from lenet5.plots import plot_digit_gallery

        rows = [("clean", mnist.test.images)] + [(n, s.images) for n, s in sets.items()] + list(nondigits.items())
        images = [r[i].numpy() for _, r in rows for i in range(12)]
        captions = [name if i == 0 else "" for name, _ in rows for i in range(12)]
        atomic_write_bytes(args.samples, plot_digit_gallery(images, captions, columns=12,
                                                            title="Stress sets and non-digits, as the model sees them"))
        print(f"wrote {args.samples}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenet5", description=(
        "Train, evaluate and use LeNet-5 recognisers on MNIST and other 28x28 data sets (--dataset). "
        "`lenet5 train` with no options reproduces the blog post's Keras LeNet run."))
    parser.add_argument("--version", action="version", version=f"lenet5 {lenet5.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model, writing a run folder",
                                description="Train a model; every epoch updates the run folder "
                                            "(config, history, curves, metrics, checkpoints).")
    add_config_options(train)
    run = train.add_argument_group("run folder")
    run.add_argument("--out-dir", type=Path, default=Path("runs"), help="parent of run folders (default: runs)")
    run.add_argument("--name", help="run folder name (default: DATE-TIME-MODEL)")
    run.add_argument("--recipe", choices=sorted(RECIPES), help="start from a named recipe (options typed here "
                     "override it): " + "; ".join(f"{k}: {v.summary}" for k, v in RECIPES.items()).replace("%", "%%"))
    run.add_argument("--config", type=Path, help="start from this config.json (over --recipe; options typed here "
                     "override it)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                     help="after training, fit the last and best checkpoints' temperature and 'unsure' thresholds on the "
                          "training digits after --train-samples (as `lenet5 calibrate`; default: the recipe's "
                          "choice, else no)")
    run.add_argument("--quiet", action="store_true", help="print only the final summary")
    add_data_options(train)
    train.set_defaults(handler=cmd_train)

    ev = commands.add_parser("evaluate", help="test loss and accuracy of a checkpoint")
    ev.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint or a run folder (uses its best)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    ev.add_argument("--batch-size", type=int, default=512, help="images per evaluation step (default: 512)")
    ev.add_argument("--test-samples", type=int, default=0, help="first N test images only (default: all)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--report", type=Path, metavar="DIR",
                    help="also write report.md with per-class precision/recall, confusion matrix (PNG, CSV), "
                         "misclassified images, rejection curve and calibration into DIR")
    ev.add_argument("--stress", action="store_true",
                    help="accuracy on every stress set (thick, thin, rotated, low resolution, small, off-centre, "
                         "inverted, photographed, user-like: lenet5.data.stress) next to the clean test set, the "
                         "share marked unsure, and the share of non-digits marked unsure (MNIST checkpoints)")
    ev.add_argument("--stress-dir", type=Path, metavar="DIR",
                    help="where the stress sets are cached (default: the user cache, see `lenet5 data stress`)")
    add_data_options(ev, "checkpoint")
    ev.set_defaults(handler=cmd_evaluate)

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

    pr = commands.add_parser("predict", help="predict the digit in your own images",
                             description="Read each image (PNG, JPEG, BMP, GIF, WebP, TIFF; any size, colour or "
                                         "grey, dark-on-light or light-on-dark), prepare it the way MNIST digits "
                                         "were prepared, and predict its digit. A file that cannot be used gets "
                                         "a one-line reason and the others go on; the exit status is 1 if any failed.")
    pr.add_argument("items", nargs="+", metavar="[CHECKPOINT] IMAGE|DIR",
                    help="a .safetensors checkpoint or a run folder (uses its best; default: the bundled model), "
                         "then image files or folders of them")
    pr.add_argument("--checkpoint", type=Path, help="the checkpoint, given by name (then every item is an image)")
    out = pr.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    pr.add_argument("--save-prepared", type=Path, metavar="DIR", help="save each prepared 28x28 input as a PNG here")
    pr.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    pr.set_defaults(handler=cmd_predict)

    ex = commands.add_parser("explain", help="draw every layer's feature maps for one digit",
                             description="Prepare the image MNIST-style, run it through the model and draw the "
                                         "input, every layer's activation maps and the class probabilities.")
    ex.add_argument("items", nargs="*", metavar="[CHECKPOINT] [IMAGE]",
                    help="a .safetensors checkpoint or a run folder (uses its best; default: the bundled model), "
                         "then an image file (or use --test-index)")
    ex.add_argument("--checkpoint", type=Path, help="the checkpoint, given by name")
    ex.add_argument("--test-index", type=int, help="explain test image N of the data set instead of an image")
    ex.add_argument("--out", type=Path, help="PNG to write (default: IMAGE-NAME.maps.png here)")
    ex.add_argument("--max-maps", type=int, default=16, help="maps shown per layer (default: 16)")
    ex.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add_data_options(ex, "checkpoint")
    ex.set_defaults(handler=cmd_explain)

    xp = commands.add_parser("export", help="export to ONNX or TorchScript, checked against PyTorch",
                             description="Export a checkpoint (input: float images N x 1 x 28 x 28, MNIST-style, "
                                         "any N; output: scores N x 10), check the export against PyTorch on test "
                                         "digits, and write a model card beside it.")
    xp.add_argument("checkpoint", type=Path, nargs="?",
                    help="a .safetensors checkpoint or a run folder (uses its best; default: the bundled model)")
    xp.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default: onnx")
    xp.add_argument("--out", type=Path, help="output file (default: MODEL.onnx or MODEL.pt here)")
    xp.add_argument("--check-images", type=int, default=1000, help="test digits for the check (default: 1000)")
    xp.add_argument("--no-check", action="store_true", help="skip the check and the test accuracy (no data needed)")
    add_data_options(xp, "checkpoint")
    xp.set_defaults(handler=cmd_export)

    sv = commands.add_parser("serve", help="HTTP prediction service and the draw-a-digit page",
                             description="Serve POST /v1/predict, GET /v1/model, GET /healthz, OpenAPI docs at "
                                         "/docs and a page to draw a digit on at /.")
    sv.add_argument("checkpoint", type=Path, nargs="?",
                    help="a .safetensors checkpoint or a run folder (uses its best; default: the bundled model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MB (default: 4)")
    sv.add_argument("--threads", type=int, default=1, help="torch threads per request (default: 1)")
    sv.add_argument("--workers", type=int, default=1, help="server processes, e.g. one per core (default: 1)")
    sv.set_defaults(handler=cmd_serve)

    cal = commands.add_parser("calibrate", help="fit a checkpoint's temperature and 'unsure' threshold",
                              description="Fit a temperature and an 'unsure' threshold (lenet5.calibration) on "
                                          "the training digits the run did not train on and their stress versions, "
                                          "and store them in the checkpoint, for predict and serve.")
    cal.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint or a run folder (uses its best)")
    cal.add_argument("--target-error", type=float, default=0.005,
                     help="error allowed on the held-out digits not marked unsure (default: 0.005)")
    cal.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add_data_options(cal)
    cal.set_defaults(handler=cmd_calibrate)

    models = commands.add_parser("models", help="list the registered models with their parameter counts")
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    models.set_defaults(handler=cmd_models)

    data = commands.add_parser("data", help="download, verify and describe a data set; make the stress sets",
                               description="Fetch any missing file of the data set (unless --offline), verify "
                                           "every file against its published checksum, and show what is there. "
                                           "`lenet5 data stress` makes the stress sets and non-digits "
                                           "(lenet5.data.stress, from MNIST's test digits) and caches them.")
    data.add_argument("what", nargs="?", choices=["stress"], help="stress: make (or show) the cached stress sets")
    data.add_argument("--stress-dir", type=Path, metavar="DIR", help="cache folder of the stress sets "
                      "(default: the user cache)")
    data.add_argument("--refresh", action="store_true", help="stress: make the sets again even if cached")
    data.add_argument("--samples", type=Path, metavar="PNG", help="stress: draw 12 digits of every set into PNG")
    add_data_options(data, "mnist")
    data.set_defaults(handler=cmd_data)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, Lenet5Error) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return one_line(error, limit=1000)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "reproduce"):
        # Process-wide speed settings belong to the program, not the library (both measured in
        # lenet5.runtime): the heap keeps activation pages, and denormals are flushed.
        tune_allocator()
        flush_denormals()
    # Training writes files that must not be cut short (a default SIGTERM killed the process mid-step
    # without a word); the handler is put back afterwards for callers of main() such as the tests.
    previous = signal.signal(signal.SIGTERM, _terminate) \
        if args.command in ("train", "reproduce") and threading.current_thread() is threading.main_thread() else None
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"lenet5 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (Lenet5Error, OSError) as e:  # OSError: a file or device failed us (a full disk, say)
        print(f"lenet5 {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        hint = f" ({distributed.resume_hint(getattr(args, 'run_dir', None))})" if args.command == "train" else ""
        rank = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE')}: " \
            if distributed.launched_by_torchrun() else ""
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"lenet5 {args.command}: {rank}{what}{hint}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
