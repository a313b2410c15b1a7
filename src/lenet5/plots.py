"""Figures, rendered to PNG bytes so callers can write them atomically."""

from __future__ import annotations

import io
from typing import Sequence


def plot_curves(history: Sequence[dict], title: str = "") -> bytes:
    """The blog post's two figures side by side: loss vs. epochs and accuracy vs. epochs,
    each with a train and a test curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the CLI and CI are headless
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_error_curves(history: Sequence[dict], reference: float | None = None, title: str = "") -> bytes:
    """Training and test error (%) per pass, as the paper's Figure 5; `reference` is the paper's
    final test error, drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_digit_gallery(images: Sequence, captions: Sequence[str], columns: int = 12, title: str = "") -> bytes:
    """A grid of 28x28 digits (uint8 or float arrays, ink high) with a caption under each."""
    import matplotlib

    matplotlib.use("Agg")
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
            ax.set_title(captions[k], fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
