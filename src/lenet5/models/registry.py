"""Models registered by name and built by one factory, in the manner of timm's `create_model`."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from lenet5.errors import ConfigError


class DigitClassifier(nn.Module):
    """Base of every registered model.

    Input: float images (B, 1, 28, 28) with ink 1 and background 0, as MNIST's bytes / 255.
    Each model maps that to its own input convention inside `forward`, so every entry point
    (training, evaluation, prediction, export) feeds the same thing.

    Most models output logits. A model whose outputs are something else (the 1998 network's
    RBF penalties, where the smallest wins) overrides `loss` and `logits`; the rest of the
    toolkit only ever calls those two, so it never needs to know.
    """

    registry_name: str = ""
    init_args: dict[str, Any]
    # What the outputs mean: the data set trained on and its class names, by output index. Set by
    # whoever knows (training, from its data set; loading, from the checkpoint); MNIST by default.
    dataset: str = "mnist"
    classes: tuple[str, ...] = tuple("0123456789")
    # Whether bf16 autocast speeds training up where bf16 is native (`--precision auto` asks):
    # true for wide layers; a model of narrow layers or with exact fp32 arithmetic says no.
    bf16_pays: bool = True
    # How viewers draw a layer whose output is a vector: name -> (rows, columns) of the picture
    # that layer means (the 1998 network's F6 is the 7x12 bitmap its RBF output compares with).
    display_shapes: dict[str, tuple[int, int]] = {}

    # Whether `loss` takes label_smoothing (a model whose outputs are not logits says no).
    label_smoothing_ok: bool = True

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean training loss of a batch (cross-entropy, against targets smoothed by `label_smoothing`)."""
        return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Scores whose argmax is the prediction and whose softmax is the class probabilities."""
        return outputs

    def probabilities(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Class probabilities (B, classes) of input images x: the one expression every caller uses.
        A `temperature` above 1 softens them (lenet5.calibration fits one per checkpoint)."""
        return torch.softmax(self.logits(self(x)) / temperature, 1)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The network as named stages run in order (a model may override `activations` instead)."""
        raise NotImplementedError(f"{type(self).__name__} names no stages")

    def activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage's output by name, from `input` to `output`: the feature maps."""
        maps = {"input": x}
        for name, stage in self.stages():
            x = stage(x)
            maps[name] = x
        return maps


M = TypeVar("M", bound=type[DigitClassifier])
_REGISTRY: dict[str, type[DigitClassifier]] = {}


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make the model available to `create_model(name)` and the CLI."""

    def add(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_class(name: str) -> type[DigitClassifier]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs: Any) -> DigitClassifier:
    """Build a registered model; its name and arguments are kept for checkpoints."""
    cls = model_class(name)
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: {e}") from None
    model.init_args = dict(kwargs)
    return model


def describe(name: str) -> str:
    """First line of the model's docstring: what it is and where it comes from."""
    doc = (model_class(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
