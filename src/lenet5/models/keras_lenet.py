"""The Keras "LeNet" of the blog post "LeNet-5: The 22-year-old neural network".

Source: its notebook LeNet_5_on_MNIST.ipynb (../shared/docs/REFERENCE.md section 1).
"""

from __future__ import annotations

import torch
from torch import nn

from lenet5.models.layers import conv_relu_pool
from lenet5.models.registry import DigitClassifier, register_model


@register_model("keras-lenet")
class KerasLeNet(DigitClassifier):
    """Keras blog-post LeNet: conv 20@5x5 same, pool, conv 50@5x5 same, pool, dense 500, dense 10 (1,256,080 params)."""

    def __init__(self, conv1: int = 20, conv2: int = 50, hidden: int = 500, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, conv1, 5, padding=2), nn.ReLU(),  # (B, 20, 28, 28)
            nn.MaxPool2d(2, 2),  # (B, 20, 14, 14)
            nn.Conv2d(conv1, conv2, 5, padding=2), nn.ReLU(),  # (B, 50, 14, 14)
            nn.MaxPool2d(2, 2),  # (B, 50, 7, 7)
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, 28, 28)).numel()  # 2450 with the defaults
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),  # logits; softmax lives in the loss
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Keras' defaults, so the RMSprop recipe sees the same starting scale: Glorot-uniform
        # kernels and zero biases (PyTorch's default is Kaiming-uniform with random biases).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[tuple[str, nn.Module]]:
        f, c = self.features, self.classifier
        return [("conv1", f[0:2]), ("pool1", f[2:3]), ("conv2", f[3:5]), ("pool2", f[5:6]),
                ("dense", c[0:3]), ("output", c[3:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.features, with each ReLU after its pooling (the same function, see conv_relu_pool)
        x = conv_relu_pool(conv_relu_pool(x, self.features[0]), self.features[3])
        return self.classifier(x)
