"""The `lenet5` command: a thin layer that parses options, calls the library and prints.

One module per group of commands, each with its `add_parser` and its `cmd_*` handlers; `main` runs one.
Errors the user can fix (lenet5.errors) become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

import lenet5
from lenet5 import distributed
from lenet5.cli import evaluate, reproduce, train, use
from lenet5.cli.common import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, add_config_options,
                               error_line)
from lenet5.errors import ConfigError, Lenet5Error
from lenet5.runtime import flush_denormals, tune_allocator

__all__ = ["add_config_options", "build_parser", "main"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that it stops a run as cleanly: torchrun sends it to
    the other processes of a run when one fails, and job schedulers and `kill` send it too."""


def _terminate(signum, frame) -> None:
    # Once: a second SIGTERM (torchrun forwarding the one a scheduler sent the whole group) ends the
    # process at once, as a SIGTERM did before, instead of interrupting the first one's clean-up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenet5", description=(
        "Train, evaluate and use LeNet-5 recognisers on MNIST and other 28x28 data sets (--dataset). "
        "`lenet5 train` with no options reproduces the blog post's Keras LeNet run."))
    parser.add_argument("--version", action="version", version=f"lenet5 {lenet5.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (train, reproduce, evaluate, use):
        group.add_parser(commands)
    return parser


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
        print(f"lenet5 {args.command}: error: {error_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (Lenet5Error, OSError) as e:  # OSError: a file or device failed us (a full disk, say)
        print(f"lenet5 {args.command}: error: {error_line(e)}", file=sys.stderr)
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
