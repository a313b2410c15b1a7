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
