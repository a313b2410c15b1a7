"""Accuracy of `lenet5 predict` on MNIST test digits redrawn as users' images.

Each of the first N test digits is redrawn by `lenet5.data.userlike` (large canvas, off-centre,
dark ink on white or coloured paper or chalk on a board, thick or thin strokes, blur, noise,
uneven light, PNG/JPEG/BMP/WebP/GIF/TIFF), written to a file and predicted through the whole
`predict` path. For comparison, in the same run: the model on the original MNIST digits, and
the same files prepared naively (grey, resized to 28x28, inverted if the background is light),
as many LeNet demos do.

    python docs/scripts/userlike_accuracy.py CHECKPOINT --data-dir ../shared/mnist --out docs/results/userlike
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lenet5.checkpoint import load_checkpoint
from lenet5.data import load_mnist
from lenet5.data.userlike import make_user_images
from lenet5.plots import plot_digit_gallery
from lenet5.predict import class_probabilities, predict_files
from lenet5.preprocess import load_grey


def naive(path: Path) -> np.ndarray:
    grey = load_grey(path)
    if np.median(grey) > 0.5:
        grey = 1 - grey
    return np.asarray(Image.fromarray((grey * 255).astype(np.uint8)).resize((28, 28), Image.Resampling.BILINEAR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    mnist = load_mnist(args.data_dir, download=False)
    checkpoint = load_checkpoint(args.checkpoint)
    images, labels = mnist.test.images[: args.images], mnist.test.labels[: args.images]
    users = make_user_images(images.numpy(), labels.numpy(), seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, user in enumerate(users):
            paths.append(Path(tmp) / f"{i:05d}.{user.extension}")
            paths[-1].write_bytes(user.data)
        predictions = predict_files(checkpoint.model, paths)
        naive_digits = torch.from_numpy(np.stack([naive(p) for p in paths]))
        # shown as the user sees it (the gallery draws high values dark)
        sample = [255 - np.asarray(Image.open(p).convert("L").resize((84, 84))) for p in paths[:12]]
    failed = [p.file for p in predictions if p.error]
    user_acc = float(np.mean([p.digit == u.label for p, u in zip(predictions, users)]))
    mnist_acc = float((class_probabilities(checkpoint.model, images).argmax(1) == labels).float().mean())
    naive_acc = float((class_probabilities(checkpoint.model, naive_digits).argmax(1) == labels).float().mean())
    result = {
        "checkpoint": str(args.checkpoint), "model": checkpoint.meta["model"], "images": len(users),
        "seed": args.seed, "mnist_accuracy": mnist_acc, "user_like_accuracy": user_acc,
        "gap_points": 100 * (mnist_acc - user_acc), "naive_preprocessing_accuracy": naive_acc,
        "unreadable": failed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "userlike_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    gallery = sample + [p.prepared for p in predictions[:12]]
    captions = [f"user, {u.label}" for u in users[:12]] + [f"prepared -> {p.digit}" for p in predictions[:12]]
    (args.out / "userlike_samples.png").write_bytes(plot_digit_gallery(
        gallery, captions, columns=12, title="User-like images (top) and what the model sees after preparation"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
