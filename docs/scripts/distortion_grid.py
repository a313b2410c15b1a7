"""Draw docs/images/distortions.png: MNIST training digits and random distortions of each.

    python docs/scripts/distortion_grid.py --data-dir ../shared/mnist
    python docs/scripts/distortion_grid.py --data-dir ../shared/mnist --strength 0.5 \
        --out docs/images/distortions-half.png     # the 1998 reproduction's (lenet5.reproduce)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lenet5.data import load_mnist
from lenet5.data.distort import DEFAULT_RANGES, random_affine
from lenet5.data.transforms import to_model_input
from lenet5.plots import plot_digit_gallery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--strength", type=float, default=1.0, help="every range times this")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "images" / "distortions.png")
    args = parser.parse_args()
    mnist = load_mnist(args.data_dir, download=False)
    originals = to_model_input(mnist.train.images[:10])
    generator = torch.Generator().manual_seed(0)
    ranges = DEFAULT_RANGES.scaled(args.strength)
    columns = [originals] + [random_affine(originals, ranges, generator=generator) for _ in range(7)]
    images, captions = [], []
    for row in range(10):  # one row per digit: the original, then seven distortions of it
        for k, batch in enumerate(columns):
            images.append(batch[row, 0].numpy())
            captions.append("original" if k == 0 else f"random {k}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(plot_digit_gallery(images, captions, columns=len(columns),
                                            title=f"Random planar affine distortions, {ranges}"))


if __name__ == "__main__":
    main()
