"""`lenet5 evaluate`, `calibrate`, `models` and `data`: what a checkpoint, the registry and a data set hold."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lenet5.cli.common import CHECKPOINT_HELP, DEVICE_HELP, add_data_options, load_data, print_calibration
from lenet5.data.dataset import check_files
from lenet5.errors import ConfigError
from lenet5.evaluate import evaluate_checkpoint
from lenet5.models import count_parameters, create_model, describe, list_models
from lenet5.runtime import resolve_device


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
    print_calibration(calibration, path)
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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`lenet5 evaluate`, `calibrate`, `models` and `data`, with their options."""
    ev = commands.add_parser("evaluate", help="test loss and accuracy of a checkpoint")
    ev.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
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

    cal = commands.add_parser("calibrate", help="fit a checkpoint's temperature and 'unsure' threshold",
                              description="Fit a temperature and an 'unsure' threshold (lenet5.calibration) on "
                                          "the training digits the run did not train on and their stress versions, "
                                          "and store them in the checkpoint, for predict and serve.")
    cal.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    cal.add_argument("--target-error", type=float, default=0.005,
                     help="error allowed on the held-out digits not marked unsure (default: 0.005)")
    cal.add_argument("--device", default="auto", help=DEVICE_HELP)
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
