"""The model that ships with the package: `lenet5 predict IMAGE`, `explain` and `serve` use it when
no checkpoint is given, so reading your own digits needs no training and no network.

It is the last epoch of the `robust` recipe's run (`lenet5 train --recipe robust`, seed 0),
calibrated with `lenet5 calibrate` and copied here with its sidecar; MODEL_CARD.md beside it says
what it is and how well it reads which digits. Its metadata records the run's config, which
tests/test_pretrained.py checks against the recipe, so the shipped weights are what the
documented command makes. The trainer is deterministic for a fixed thread count on a given CPU
class; this run (on an avx512-bf16 CPU, so in bf16 autocast) had its thread governor hold 1 thread
in every epoch (its history records it), so `lenet5 train --recipe robust --threads 1` on a CPU
of that class is the command to re-create it. That re-creation was not re-run.
"""

from __future__ import annotations

from pathlib import Path

from lenet5.errors import CheckpointError

BUNDLED = Path(__file__).resolve().parent / "robust-lenet.safetensors"
RECIPE = "robust"
SEED = 0


def bundled_checkpoint() -> Path:
    """The path of the shipped checkpoint (CheckpointError if the installation lost it)."""
    if not BUNDLED.is_file():
        raise CheckpointError(f"the bundled model is missing from this installation ({BUNDLED}); "
                              "reinstall lenet5 or pass a checkpoint")
    return BUNDLED
