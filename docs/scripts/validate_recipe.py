"""Train a recipe with the last 10,000 training images held out, and report accuracy on them.

Settings for docs/results/datasets.md were chosen this way, never on the test set:

    python docs/scripts/validate_recipe.py --dataset fashion-mnist --data-dir DIR --out runs/val-lenet5 \
        --model lenet5 --optimizer adam --lr 3e-3 --schedule onecycle --batch-size 128 --epochs 20 --flip

Every `lenet5 train` option is accepted (one per TrainConfig field); the run folder's "test"
figures are the held-out training images'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lenet5.cli import add_config_options
from lenet5.data import load_dataset
from lenet5.train import TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--held-out", type=int, default=10_000, help="training images held out (default: 10,000)")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    args = parser.parse_args()
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig.from_dict(options)
    data = load_dataset(config.dataset, args.data_dir, download=False).validation_split(args.held_out)
    result = fit(config, data, args.out)
    print(json.dumps({"options": options, "validation_acc": [round(r["test_acc"], 4) for r in result.history],
                      "seconds": round(result.metrics["seconds"], 1)}))


if __name__ == "__main__":
    main()
