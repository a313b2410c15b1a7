"""LeNet-5 as most courses teach it: the 1998 layer sizes with today's simplifications.

Source: LeCun et al. 1998, section II.B, simplified the common way: full C3 connections instead
of Table I, plain average pooling instead of trainable subsampling, tanh instead of the scaled
squashing, a linear 10-way output with softmax cross-entropy instead of the RBF layer.
The faithful network is `lenet5-1998`.
"""

from __future__ import annotations

import torch
from torch import nn

from lenet5.models.layers import Tanh, conv_tanh_pool
from lenet5.models.registry import DigitClassifier, register_model


@register_model("lenet5")
class LeNet5(DigitClassifier):
    """Classic textbook LeNet-5: conv 6@5x5 (pad 2), avgpool, conv 16@5x5, avgpool, 120, 84, 10, tanh (61,706 params)."""

    # Its convolutions have 1-16 channels: on an AVX512-BF16 EPYC, training at batch 256 ran 19,921 img/s
    # in fp32 (native kernels) and 15,375 under bf16 autocast (docs/results/benchmarks-cpu.md).
    bf16_pays = False

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), Tanh(),  # C1: (B, 6, 28, 28)
            nn.AvgPool2d(2, 2),  # S2: (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), Tanh(),  # C3: (B, 16, 10, 10)
            nn.AvgPool2d(2, 2),  # S4: (B, 16, 5, 5)
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, 28, 28)).numel()  # 400
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120), Tanh(),  # C5
            nn.Linear(120, 84), Tanh(),  # F6
            nn.Linear(84, num_classes),  # output logits
        )

    def stages(self) -> list[tuple[str, nn.Module]]:
        f, c = self.features, self.classifier
        return [("C1", f[0:2]), ("S2", f[2:3]), ("C3", f[3:5]), ("S4", f[5:6]),
                ("C5", c[0:3]), ("F6", c[3:5]), ("output", c[5:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `features` stage by stage, with each conv + tanh + pool fused where a native kernel can
        # (same numbers to fp32 rounding; `stages()` keeps the unfused modules for the viewer).
        f = self.features
        x = conv_tanh_pool(x, f[0])  # C1 + S2: (B, 6, 14, 14)
        x = conv_tanh_pool(x, f[3])  # C3 + S4: (B, 16, 5, 5)
        return self.classifier(x)
