"""`lenet5 predict`, `explain`, `export` and `serve`: a checkpoint (or the bundled model) put to use."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from lenet5.cli.common import (BUNDLED_HELP, DEVICE_HELP, EXIT_ERROR, add_data_options, checkpoint_or_bundled,
                               is_checkpoint, load_data)
from lenet5.errors import ConfigError
from lenet5.hardware import check_threads
from lenet5.predict import predict_checkpoint


def cmd_predict(args: argparse.Namespace) -> int:
    items = list(args.items)  # strings: an empty one is an error of its own, not "."
    if args.checkpoint is None and items[0] and is_checkpoint(Path(items[0])):
        if len(items) == 1:
            raise ConfigError(f"{items[0]} is a checkpoint: give the images to predict after it")
        args.checkpoint, items = Path(items[0]), items[1:]
    args.checkpoint, args.inputs = checkpoint_or_bundled(args.checkpoint), items
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
    if args.checkpoint is None and items and (len(items) == 2 or is_checkpoint(items[0])):
        args.checkpoint, items = items[0], items[1:]
    if len(items) > 1:
        raise ConfigError(f"explain takes one image, not {len(items)}")
    check_max_maps(args.max_maps)  # before any work
    args.image = items[0] if items else None
    args.checkpoint = checkpoint_or_bundled(args.checkpoint)
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
    checkpoint = load_checkpoint(checkpoint_or_bundled(args.checkpoint))  # as predict, explain and serve
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
    args.checkpoint = checkpoint_or_bundled(args.checkpoint)
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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """`lenet5 predict`, `explain`, `export` and `serve`, with their options."""
    pr = commands.add_parser("predict", help="predict the digit in your own images",
                             description="Read each image (PNG, JPEG, BMP, GIF, WebP, TIFF; any size, colour or "
                                         "grey, dark-on-light or light-on-dark), prepare it the way MNIST digits "
                                         "were prepared, and predict its digit. A file that cannot be used gets "
                                         "a one-line reason and the others go on; the exit status is 1 if any failed.")
    pr.add_argument("items", nargs="+", metavar="[CHECKPOINT] IMAGE|DIR",
                    help=BUNDLED_HELP + ", then image files or folders of them")
    pr.add_argument("--checkpoint", type=Path, help="the checkpoint, given by name (then every item is an image)")
    out = pr.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    pr.add_argument("--save-prepared", type=Path, metavar="DIR", help="save each prepared 28x28 input as a PNG here")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.set_defaults(handler=cmd_predict)

    ex = commands.add_parser("explain", help="draw every layer's feature maps for one digit",
                             description="Prepare the image MNIST-style, run it through the model and draw the "
                                         "input, every layer's activation maps and the class probabilities.")
    ex.add_argument("items", nargs="*", metavar="[CHECKPOINT] [IMAGE]",
                    help=BUNDLED_HELP + ", then an image file (or use --test-index)")
    ex.add_argument("--checkpoint", type=Path, help="the checkpoint, given by name")
    ex.add_argument("--test-index", type=int, help="explain test image N of the data set instead of an image")
    ex.add_argument("--out", type=Path, help="PNG to write (default: IMAGE-NAME.maps.png here)")
    ex.add_argument("--max-maps", type=int, default=16, help="maps shown per layer (default: 16)")
    ex.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_data_options(ex, "checkpoint")
    ex.set_defaults(handler=cmd_explain)

    xp = commands.add_parser("export", help="export to ONNX or TorchScript, checked against PyTorch",
                             description="Export a checkpoint (input: float images N x 1 x 28 x 28, MNIST-style, "
                                         "any N; output: scores N x 10), check the export against PyTorch on test "
                                         "digits, and write a model card beside it.")
    xp.add_argument("checkpoint", type=Path, nargs="?",
                    help=BUNDLED_HELP)
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
                    help=BUNDLED_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MB (default: 4)")
    sv.add_argument("--threads", type=int, default=1, help="torch threads per request (default: 1)")
    sv.add_argument("--workers", type=int, default=1, help="server processes, e.g. one per core (default: 1)")
    sv.set_defaults(handler=cmd_serve)
