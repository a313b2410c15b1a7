"""LeNet-5's budget, spent the modern way: at most the 1998 network's 60,000 parameters.

The 1998 network spends 48,120 of its 60,000 parameters on C5, one fully connected layer over
5x5 maps. This network spends them on convolutions: C1's 5x5 kernels stay (32 of them), then
three 3x3 convolutions, each followed by batch normalisation and ReLU, two max-poolings, and
global average pooling into a 10-way linear layer instead of a dense head. Stacks of small
kernels see as far as LeNet's 5x5 ones with fewer weights per output (VGG, Simonyan & Zisserman
2015); batch normalisation (Ioffe & Szegedy 2015) lets it train at high rates; global average
pooling (Lin et al., "Network in network", 2014) replaces the dense layers. Most weights sit
where the maps are 7x7, so a digit costs 6.7M multiply-adds (keras-lenet: 6.5M). It is trained
with the `modern` recipe (augmentation, a one-cycle schedule, label smoothing, a weight
average); docs/results/lenet5-modern/ has its results and the commands.
"""

from __future__ import annotations

import torch
from torch import nn

from lenet5.models.registry import DigitClassifier, register_model

PAPER_PARAMETERS = 60_000  # LeNet-5 (1998), the budget this network keeps to


def _bn_relu(conv: nn.Conv2d) -> nn.Sequential:
    """conv, batch norm, ReLU (the conv has no bias: the batch norm's shift is one)."""
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


@register_model("lenet5-modern")
class LeNet5Modern(DigitClassifier):
    """LeNet-5's 60k-parameter budget with modern layers: 5x5 and three 3x3 conv + batch norm + ReLU, two max-pools, global average pooling (56,042 params)."""

    # Narrow layers: bf16 would not pay on a CPU (see DigitClassifier.bf16_pays).
    bf16_pays = False

    def __init__(self, widths: tuple[int, int, int, int] = (32, 32, 48, 72), num_classes: int = 10):
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive channel counts, got {widths}")
        w1, w2, w3, w4 = widths
        self.C1 = nn.Sequential(_bn_relu(nn.Conv2d(1, w1, 5, padding=2, bias=False)), nn.MaxPool2d(2))  # (B, w1, 14, 14)
        self.C2 = _bn_relu(nn.Conv2d(w1, w2, 3, padding=1, bias=False))  # (B, w2, 14, 14)
        self.C3 = nn.Sequential(_bn_relu(nn.Conv2d(w2, w3, 3, padding=1, bias=False)), nn.MaxPool2d(2))  # (B, w3, 7, 7)
        self.C4 = _bn_relu(nn.Conv2d(w3, w4, 3, padding=1, bias=False))  # (B, w4, 7, 7)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w4, num_classes))  # logits

    def stages(self) -> list[tuple[str, nn.Module]]:
        return [("C1", self.C1), ("C2", self.C2), ("C3", self.C3), ("C4", self.C4), ("output", self.head)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.C4(self.C3(self.C2(self.C1(x)))))
