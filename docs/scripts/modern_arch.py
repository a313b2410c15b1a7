"""Architectures searched for lenet5-modern within the 1998 network's 60,000 parameters.

Each variant is a stack of conv + batch norm + ReLU blocks (the first a 5x5 convolution, the
rest 3x3), 2x2 max-pooling where the spec says "P", then global average pooling into a linear
layer, as lenet5-modern. This script registers them as models named `arch-<variant>` and runs
the lenet5 command line, so the search trains them exactly as the product trains its own:

    python docs/scripts/modern_arch.py train --model arch-deep7 [other lenet5 train options]
    python docs/scripts/modern_arch.py --list      # parameters and multiply-adds per digit
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lenet5.models.registry import DigitClassifier, register_model

# conv widths in order ("P": 2x2 max-pooling); the first convolution is 5x5, the others 3x3
VARIANTS: dict[str, list[int | str]] = {
    "base": [32, "P", 32, 48, "P", 72],  # lenet5-modern itself (56,042 parameters), for --list
    "deep14": [32, "P", 32, 32, 48, "P", 60],  # a third convolution at 14x14, a narrower last one
    "deep7": [32, "P", 32, 48, "P", 40, 48],  # a second convolution at 7x7
    "hires": [32, 32, "P", 48, "P", 72],  # lenet5-modern's layers with C2 at 28x28: 1.8x the arithmetic, same weights
}


def _block(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def _variant(name: str, spec: list[int | str]) -> type[DigitClassifier]:
    class Variant(DigitClassifier):
        bf16_pays = False

        def __init__(self, num_classes: int = 10):
            super().__init__()
            stages, c_in = [], 1
            for item in spec:
                if item == "P":
                    stages[-1] = nn.Sequential(stages[-1], nn.MaxPool2d(2))
                    continue
                stages.append(_block(c_in, int(item), 5 if c_in == 1 else 3))
                c_in = int(item)
            self.convs = nn.ModuleList(stages)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

        def stages(self) -> list[tuple[str, nn.Module]]:
            return [(f"C{i + 1}", s) for i, s in enumerate(self.convs)] + [("output", self.head)]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for stage in self.convs:
                x = stage(x)
            return self.head(x)

    Variant.__name__ = f"Arch_{name}"
    return register_model(f"arch-{name}")(Variant)


CLASSES = {name: _variant(name, spec) for name, spec in VARIANTS.items()}


def multiply_adds(spec: list[int | str]) -> int:
    total, c_in, side = 0, 1, 28
    for item in spec:
        if item == "P":
            side //= 2
            continue
        total += c_in * int(item) * (25 if c_in == 1 else 9) * side * side
        c_in = int(item)
    return total


if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        for name, spec in VARIANTS.items():
            params = sum(p.numel() for p in CLASSES[name]().parameters())
            print(f"arch-{name}: {spec} {params:,} parameters, {multiply_adds(spec) / 1e6:.2f}M multiply-adds a digit")
        sys.exit(0)
    from lenet5.cli import main

    sys.exit(main(sys.argv[1:]))
