"""Does test-time shift averaging help lenet5-modern? Measured on the validation split only.

    python docs/scripts/modern_tta.py --data-dir ../shared/mnist RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a `lenet5 train --recipe modern` run folder; its best checkpoint (the epoch chosen
on the 5,000 held-out training images) is evaluated on those same images: as it is, and with the
class probabilities averaged over the image and its 4 (or 8) one-pixel shifts. The test set is not
read: a gain here would be the reason to try it there, once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from lenet5.checkpoint import load_checkpoint
from lenet5.data import load_mnist
from lenet5.data.dataset import Split
from lenet5.data.transforms import to_model_input
from lenet5.train.loop import split_validation

SHIFTS = {"none": [(0, 0)], "4 shifts": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)],
          "8 shifts": [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]}


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) pixels, the background filling in."""
    return torch.roll(F.pad(x, (1, 1, 1, 1)), (dy, dx), (2, 3))[:, :, 1:-1, 1:-1]


def runs_and_splits(description: str) -> tuple[list[Path], Split, Split]:
    """The command line's run folders, and the training digits they trained on and the validation
    digits they were chosen on (`--val-split`, as the recipe's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--val-split", type=int, default=5000, help="as the recipe's --val-split")
    args = parser.parse_args()
    train, val = split_validation(load_mnist(args.data_dir, download=False).train, args.val_split)
    return args.runs, train, val


def main() -> None:
    runs, _, val = runs_and_splits(__doc__.splitlines()[0])
    x = to_model_input(val.images)
    for run in runs:
        model = load_checkpoint(run / "checkpoints" / "best.safetensors").model.eval()
        with torch.no_grad():
            accuracy = {name: (sum(model.probabilities(shifted(x, dy, dx)) for dy, dx in shifts).argmax(1)
                               == val.labels).float().mean().item() for name, shifts in SHIFTS.items()}
        print(run, "validation accuracy:", ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items()), flush=True)


if __name__ == "__main__":
    main()
