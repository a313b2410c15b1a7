"""Figures, rendered to PNG bytes so callers can write them atomically.

Every figure is a `matplotlib.figure.Figure` rendered by its own canvas: no pyplot, no backend
switch, so plotting from the library leaves a notebook's figures and backend as they were.
"""

from __future__ import annotations

import io
from typing import Sequence


def plot_curves(history: Sequence[dict], title: str = "") -> bytes:
    """The blog post's two figures side by side: loss vs. epochs and accuracy vs. epochs,
    each with a train and a test curve."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, key, label in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"test_{key}"] for r in history], "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        ax.set_title(f"{label} vs. epochs")
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return figure_png(fig)


def plot_error_curves(history: Sequence[dict], reference: float | None = None, title: str = "") -> bytes:
    """Training and test error (%) per pass, as the paper's Figure 5; `reference` is the paper's
    final test error, drawn as a line."""
    from matplotlib.figure import Figure

    passes = [r["epoch"] for r in history]
    fig = Figure(figsize=(6.5, 4.2), dpi=110, layout="constrained")
    ax = fig.subplots()
    if "train_eval_acc" in history[0]:
        ax.plot(passes, [100 * (1 - r["train_eval_acc"]) for r in history], "o-", label="training set error")
    ax.plot(passes, [100 * (1 - r["test_acc"]) for r in history], "s-", label="test set error")
    if reference is not None:
        ax.axhline(100 * reference, color="grey", linestyle="--", label=f"paper: {100 * reference:.2f}% test error")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training set iterations (passes)")
    ax.set_ylabel("error rate (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Error vs. passes (cf. LeCun et al. 1998, Fig. 5)")
    return figure_png(fig)


def plot_digit_gallery(images: Sequence, captions: Sequence[str], columns: int = 12, title: str = "") -> bytes:
    """A grid of 28x28 images (uint8 or float arrays, ink high) with a caption under each."""
    from matplotlib.figure import Figure

    n = max(1, len(images))
    columns = min(columns, n)
    rows = -(-n // columns)
    fig = Figure(figsize=(columns * 0.85, rows * 1.0 + (0.4 if title else 0)), dpi=110, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], cmap="gray_r", vmin=0, vmax=255 if str(images[k].dtype) == "uint8" else 1)
            ax.set_title(captions[k], fontsize=7 if len(captions[k]) <= 12 else 5, pad=2)  # "T-shirt/top->Shirt 93%"
    if title:
        fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_confusion(matrix: Sequence[Sequence[int]], title: str = "", names: Sequence[str] | None = None) -> bytes:
    """Counts of (true, predicted) pairs, log-coloured so that single errors show; axes labelled
    with the class names."""
    import numpy as np
    from matplotlib.colors import LogNorm

    counts = np.asarray(matrix)
    k = len(counts)
    names = list(names) if names is not None else [str(d) for d in range(k)]
    side = max(6.0, 0.32 * k + 2)  # 47 classes need room for their counts
    fig = _figure(side, side * 0.87)
    ax = fig.subplots()
    image = ax.imshow(counts + 0.5, cmap="Blues", norm=LogNorm(vmin=0.5, vmax=counts.max() + 0.5))
    for (i, j), value in np.ndenumerate(counts):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7 if k <= 20 else 5,
                    color="white" if value > counts.max() / 8 else "black")
    ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=8 if k <= 20 else 6)
    ax.set_yticks(range(k), names, fontsize=8 if k <= 20 else 6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix (test set)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return figure_png(fig)


def plot_rejection(rejected: Sequence[float], error: Sequence[float], target: float | None = None,
                   title: str = "") -> bytes:
    """Test error against the fraction of least-confident digits rejected."""
    fig = _figure(6, 4.2)
    ax = fig.subplots()
    ax.plot([100 * r for r in rejected], [100 * e for e in error], "-")
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", label=f"{100 * target:.1f}% error")
        ax.legend()
    ax.set_xlim(0, 10)  # the interesting part: the error is usually gone well before 10%
    ax.set_xlabel("rejected (%), least confident first")
    ax.set_ylabel("error on the accepted digits (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Rejection curve")
    return figure_png(fig)


def plot_calibration(confidence: Sequence[float], accuracy: Sequence[float], counts: Sequence[int],
                     title: str = "") -> bytes:
    """Reliability diagram: accuracy against confidence, per confidence bin."""
    fig = _figure(5, 4.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    shown = [(c, a) for c, a, n in zip(confidence, accuracy, counts) if n]
    ax.plot([c for c, _ in shown], [a for _, a in shown], "o-", label="model")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Calibration")
    return figure_png(fig)
