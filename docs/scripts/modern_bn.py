"""Does re-estimating batch norm's statistics on undistorted digits help lenet5-modern? Validation only.

    python docs/scripts/modern_bn.py --data-dir ../shared/mnist RUN_DIR [RUN_DIR ...]

The `modern` recipe trains on distorted digits, so the running means and variances that batch
norm keeps (averaged with the weights by the EMA) describe distorted digits, and the averaged
weights' statistics are averages of statistics, not the statistics of the averaged weights. Each
RUN_DIR's best checkpoint (the epoch chosen on the 5,000 held-out training images) is evaluated on
those images as it is, then after one pass over the 55,000 training digits, undistorted, that
recomputes every batch norm layer's statistics (the cumulative average, as SWA's update_bn). The
test set is not read: a gain here would be the reason to try it there, once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lenet5.checkpoint import load_checkpoint
from lenet5.data.transforms import to_model_input

sys.path.insert(0, str(Path(__file__).parent))
import modern_arch  # noqa: E402, F401  (registers the searched architectures, arch-*, so their runs load too)
from modern_tta import runs_and_splits  # noqa: E402


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (torch.cat([model(b).argmax(1) for b in x.split(2000)]) == y).float().mean().item()


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, batch: int = 500) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    for b in x.split(batch):
        model(b)
    model.eval()


def main() -> None:
    runs, train, val = runs_and_splits(__doc__.splitlines()[0])
    xt, xv = to_model_input(train.images), to_model_input(val.images)
    for run in runs:
        model = load_checkpoint(run / "checkpoints" / "best.safetensors").model.eval()
        before = accuracy(model, xv, val.labels)
        recalibrate(model, xt)
        after = accuracy(model, xv, val.labels)
        print(f"{run}: validation accuracy {before:.2%} as trained, {after:.2%} with statistics of undistorted digits",
              flush=True)


if __name__ == "__main__":
    main()
