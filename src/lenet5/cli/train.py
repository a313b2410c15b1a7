"""`lenet5 train`: options (a recipe, a --config file, typed options) onto a TrainConfig, then fit or resume."""

from __future__ import annotations

import argparse
import dataclasses
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from lenet5 import distributed
from lenet5.cli.common import (ConsoleProgress, add_config_options, add_data_options, check_run_name, load_data,
                               print_calibration)
from lenet5.data.catalog import canonical_name
from lenet5.errors import ConfigError
from lenet5.hardware import check_threads, class_note, hardware_class
from lenet5.models import model_class
from lenet5.run_folder import RunFolder
from lenet5.runtime import note_recipe, resolve_device
from lenet5.train import TrainConfig, fit, resume
from lenet5.train.config import HOST_SETTINGS, RECIPES


def _load_data_ranked(args: argparse.Namespace, world: distributed.World, dataset: str):
    """Under torchrun, the first process of each machine downloads and decodes; the rest then read."""
    if not world.distributed:
        return load_data(args, dataset)
    data = load_data(args, dataset) if world.local_rank == 0 else None
    distributed.barrier()
    return data if data is not None else load_data(args, dataset)


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
            print_calibration(calibration, path)
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



def add_parser(commands: argparse._SubParsersAction) -> None:
    """`lenet5 train` and its options."""
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
