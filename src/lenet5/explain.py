"""Feature maps: what every layer of a model computes for one digit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lenet5.data.transforms import to_model_input
from lenet5.errors import ConfigError
from lenet5.models import DigitClassifier
from lenet5.plots import figure_png
from lenet5.preprocess import prepare_file


@dataclass
class Explanation:
    prepared: np.ndarray  # the 28x28 uint8 digit the model saw
    maps: dict[str, np.ndarray]  # layer name -> (channels, H, W) or (units,)
    probabilities: np.ndarray  # (classes,)
    display_shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # the model's hints

    @property
    def digit(self) -> int:
        return int(self.probabilities.argmax())


@torch.no_grad()
def explain_digit(model: DigitClassifier, digit: np.ndarray) -> Explanation:
    """Activations of every layer for one MNIST-style digit (uint8 28x28)."""
    model.eval()
    device = next(model.parameters()).device
    x = to_model_input(torch.from_numpy(np.ascontiguousarray(digit))[None].to(device))
    maps = model.activations(x)
    probabilities = torch.softmax(model.logits(maps["output"]), 1)[0]
    return Explanation(prepared=digit, maps={k: v[0].float().cpu().numpy() for k, v in maps.items()},
                       probabilities=probabilities.cpu().numpy(), display_shapes=dict(model.display_shapes))


def explain_file(model: DigitClassifier, image: str | Path | bytes) -> Explanation:
    return explain_digit(model, prepare_file(image))


MAX_MAPS = 512  # maps per layer a figure may ask for (the widest layer of the registered models has 96)


def check_max_maps(max_maps: int) -> None:
    if not 1 <= max_maps <= MAX_MAPS:
        raise ConfigError(f"--max-maps must be 1 to {MAX_MAPS}, got {max_maps}")


def plot_explanation(explanation: Explanation, title: str = "", max_maps: int = 16,
                     classes: tuple[str, ...] | None = None) -> bytes:
    """One figure: the input, each layer's maps (one row per layer), and the class probabilities
    (labelled with `classes`, by default the class numbers)."""
    check_max_maps(max_maps)
    from matplotlib.figure import Figure

    layers = [(k, v) for k, v in explanation.maps.items() if k not in ("input", "output")]
    # one column per map shown, no more than the widest layer has (1,000 columns took minutes and
    # gigabytes), and at least the few that the probability bars need (1 or 2 failed to lay out)
    widest = max((v.shape[0] for _, v in layers if v.ndim == 3 and v.shape[1] > 1), default=1)
    maps_shown = min(max_maps, widest)
    columns = max(maps_shown, 4)
    fig = Figure(figsize=(columns * 0.75 + 1.6, (len(layers) + 2) * 0.95), dpi=110, layout="constrained")
    grid = fig.add_gridspec(len(layers) + 2, columns + 1)
    ax = fig.add_subplot(grid[0:2, 0:2])
    ax.imshow(explanation.prepared, cmap="gray")
    ax.set_title("input (28x28)", fontsize=8)
    ax.axis("off")
    bars = fig.add_subplot(grid[0:2, 3:columns + 1])
    k = len(explanation.probabilities)
    names = list(classes) if classes and len(classes) == k else [str(d) for d in range(k)]
    bars.bar(range(k), explanation.probabilities, color=["C1" if d == explanation.digit else "C0" for d in range(k)])
    bars.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=7 if k <= 20 else 5)
    bars.set_ylim(0, 1)
    bars.set_title(f"prediction: {names[explanation.digit]} ({explanation.probabilities.max():.1%})", fontsize=9)
    for row, (name, value) in enumerate(layers, start=2):
        label = fig.add_subplot(grid[row, 0])
        label.axis("off")
        label.text(0.5, 0.5, f"{name}\n{'x'.join(map(str, value.shape))}", ha="center", va="center", fontsize=7)
        if value.ndim == 3 and value.shape[1] > 1:
            shown = value[:maps_shown]
            scale = np.abs(value).max() or 1.0
            for k, channel in enumerate(shown):
                cell = fig.add_subplot(grid[row, k + 1])
                cell.imshow(channel, cmap="RdBu_r", vmin=-scale, vmax=scale)
                cell.axis("off")
        else:
            vector = value.reshape(-1)
            cell = fig.add_subplot(grid[row, 1:columns + 1])
            if name in explanation.display_shapes:
                scale = np.abs(vector).max() or 1.0
                cell.imshow(vector.reshape(explanation.display_shapes[name]), cmap="RdBu_r", vmin=-scale, vmax=scale)
                cell.set_aspect("equal")
            else:
                cell.imshow(vector[None, :], cmap="RdBu_r", aspect="auto",
                            vmin=-np.abs(vector).max(), vmax=np.abs(vector).max())
            cell.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_png(fig)
