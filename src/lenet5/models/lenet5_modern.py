"""LeNet-5's budget, spent the modern way: at most the 1998 network's 60,000 parameters.

The 1998 network spends 48,120 of its 60,000 parameters on C5, one fully connected layer over
5x5 maps, and 340,908 connections (multiply-adds) per digit on everything. This network spends
its parameters on convolutions instead: five 3x3 convolutions, each followed by batch
normalisation and ReLU, two max-poolings, and global average pooling into a 10-way linear
layer (no large dense layer at all). Deeper stacks of small kernels see as far as LeNet's 5x5
ones with fewer weights per output (VGG, Simonyan & Zisserman 2015); batch normalisation (Ioffe
& Szegedy 2015) lets it train at high rates; global average pooling (Lin et al., "Network in
network", 2014) replaces the dense head. It is trained with the `modern` recipe (augmentation, a
one-cycle schedule, label smoothing, weight averaging); docs/results/lenet5-modern/ has its
results and the command.
"""

from __future__ import annotations

import torch
from torch import nn

from lenet5.models.registry import DigitClassifier, register_model

PAPER_PARAMETERS = 60_000  # LeNet-5 (1998), the budget this network keeps to


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 'same' convolution, batch norm, ReLU (no conv bias: the batch norm's shift is one)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


@register_model("lenet5-modern")
class LeNet5Modern(DigitClassifier):
    """LeNet-5's 60k-parameter budget with modern layers: five 3x3 conv + batch norm + ReLU, two max-pools, global average pooling (56,210 params)."""

    def __init__(self, widths: tuple[int, ...] = (24, 32, 48, 48, 32), num_classes: int = 10):
        super().__init__()
        if len(widths) != 5 or min(widths) < 1:
            raise ValueError(f"widths must be five positive channel counts, got {widths}")
        w1, w2, w3, w4, w5 = widths
        self.block1 = nn.Sequential(_conv(1, w1), _conv(w1, w2), nn.MaxPool2d(2))  # (B, w2, 14, 14)
        self.block2 = nn.Sequential(_conv(w2, w3), _conv(w3, w4), nn.MaxPool2d(2))  # (B, w4, 7, 7)
        self.block3 = _conv(w4, w5)  # (B, w5, 7, 7)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w5, num_classes))  # logits

    def stages(self) -> list[tuple[str, nn.Module]]:
        b1, b2 = self.block1, self.block2
        return [("conv1", b1[0]), ("conv2", b1[1]), ("pool1", b1[2]), ("conv3", b2[0]), ("conv4", b2[1]),
                ("pool2", b2[2]), ("conv5", self.block3), ("output", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(x))))
