"""Slim two-convolution LeNets for CPUs without fast bf16: the recipe `fast` there.

Design: the blog post's Keras LeNet (conv, pool, conv, pool, dense) cut to the arithmetic a
2-core CPU does in seconds per epoch in fp32: 16 and 32 channels instead of 20 and 50, the second
convolution unpadded (10x10 outputs instead of 14x14), no hidden dense layer; 1.6M multiply-adds
per image against keras-lenet's 6.5M. `slim-lenet-valid` leaves the first convolution unpadded
too, as the 1998 network's C1 (24x24 outputs, then 8x8 after the second): 1.05M multiply-adds,
and the `fast` recipe's network since. Two epochs of either reach 99.1-99.2% test accuracy
(docs/results/fast-recipes/ has the search that chose them, with the candidates they beat).
"""

from __future__ import annotations

import torch
from torch import nn

from lenet5.models.layers import conv_relu_pool
from lenet5.models.registry import DigitClassifier, register_model


@register_model("slim-lenet")
class SlimLeNet(DigitClassifier):
    """Slim LeNet: conv 16@5x5 same, pool, conv 32@5x5, pool, dense 10 (21,258 params; 4x fewer FLOPs than keras-lenet)."""

    padding = 2  # the first convolution's

    def __init__(self, conv1: int = 16, conv2: int = 32, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, conv1, 5, padding=self.padding), nn.ReLU(),  # (B, 16, 28, 28)
            nn.MaxPool2d(2, 2),  # (B, 16, 14, 14)
            nn.Conv2d(conv1, conv2, 5), nn.ReLU(),  # (B, 32, 10, 10)
            nn.MaxPool2d(2, 2),  # (B, 32, 5, 5)
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, 28, 28)).numel()  # 800 with the defaults
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))  # logits

    def stages(self) -> list[tuple[str, nn.Module]]:
        f, c = self.features, self.classifier
        return [("conv1", f[0:2]), ("pool1", f[2:3]), ("conv2", f[3:5]), ("pool2", f[5:6]), ("output", c)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.features, with each ReLU after its pooling (the same function, see conv_relu_pool)
        x = conv_relu_pool(conv_relu_pool(x, self.features[0]), self.features[3])
        return self.classifier(x)


@register_model("slim-lenet-valid")
class SlimLeNetValid(SlimLeNet):
    """Slim LeNet, both convolutions unpadded: conv 16@5x5, pool, conv 32@5x5, pool, dense 10 (18,378 params; 6x fewer FLOPs than keras-lenet)."""

    padding = 0  # (B, 16, 24, 24) -> pool (12x12) -> (B, 32, 8, 8) -> pool (4x4): 512 features
