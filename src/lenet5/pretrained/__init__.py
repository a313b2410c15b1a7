"""The model that ships with the package: `lenet5 predict IMAGE`, `explain` and `serve` use it when
no checkpoint is given, so reading your own digits needs no training and no network.

It is the `robust` recipe's run (`lenet5 train --recipe robust --seed 0 --threads 2`), its best
checkpoint copied here with `python docs/scripts/bundle_model.py RUN` (which also writes
MODEL_CARD.md). Its metadata records the recipe's config, which tests/test_pretrained.py checks
against the recipe, so the shipped weights are what the documented command makes.
"""

from __future__ import annotations

from pathlib import Path

from lenet5.errors import CheckpointError

BUNDLED = Path(__file__).resolve().parent / "robust-lenet.safetensors"
RECIPE = "robust"
SEED = 0
THREADS = 2  # bit-for-bit re-creation holds for a given thread count on a given CPU class


def bundled_checkpoint() -> Path:
    """The path of the shipped checkpoint (CheckpointError if the installation lost it)."""
    if not BUNDLED.is_file():
        raise CheckpointError(f"the bundled model is missing from this installation ({BUNDLED}); "
                              "reinstall lenet5 or pass a checkpoint")
    return BUNDLED
