"""A LeNet with today's parts, for digits beyond MNIST's look: the model of `--recipe robust`.

Design: LeNet's shape (convolution and pooling stages, then a linear classifier; LeCun et al.
1998, section II) with three parts from later work: pairs of 3x3 convolutions in place of one
larger one (Simonyan and Zisserman 2015, "Very deep convolutional networks", section 2.3: the
same receptive field with fewer weights and one more non-linearity), batch normalisation after
every convolution (Ioffe and Szegedy 2015), and ReLU with max pooling. Three pooling stages
bring the 28x28 input to 3x3 x 96 features, so the classifier sees where the strokes are,
coarsely; stroke width, blur and resolution changes are learnt from `lenet5.data.augment`.

82,258 parameters (329 KB in fp32); 8.6M multiply-adds per image, about keras-lenet's cost
(6.5M): an epoch of 55,000 augmented digits took about 20 s on 2 CPU cores in bf16. Its widths
and depth are a design choice, not searched; the validation-split runs that set its recipe's
length and augmentation ranges are docs/scripts/robust_search.py, results in docs/results/stress/.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lenet5.models.registry import DigitClassifier, register_model


def _conv_bn(inputs: int, outputs: int, kernel: int) -> nn.Sequential:
    # no bias: batch normalisation's shift replaces it
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(outputs))


@register_model("robust-lenet")
class RobustLeNet(DigitClassifier):
    """Robust LeNet: conv 24@5x5, pool, conv 48@3x3 x2, pool, conv 96@3x3, pool, dense 10; batch norm, ReLU (82,258 params)."""

    def __init__(self, conv1: int = 24, conv2: int = 48, conv3: int = 96, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(1, conv1, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 24, 14, 14)
            _conv_bn(conv1, conv2, 3), nn.ReLU(),  # (B, 48, 14, 14)
            _conv_bn(conv2, conv2, 3), nn.ReLU(), nn.MaxPool2d(2),  # (B, 48, 7, 7)
            _conv_bn(conv2, conv3, 3), nn.ReLU(), nn.MaxPool2d(2),  # (B, 96, 3, 3)
        )
        with torch.no_grad():
            flat = self.features.eval()(torch.zeros(1, 1, 28, 28)).numel()  # 864 with the defaults
        self.features.train()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))  # logits

    def stages(self) -> list[tuple[str, nn.Module]]:
        f, c = self.features, self.classifier
        return [("conv1", f[0:2]), ("pool1", f[2:3]), ("conv2", f[3:5]), ("conv3", f[5:7]), ("pool2", f[7:8]),
                ("conv4", f[8:10]), ("pool3", f[10:11]), ("output", c)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.features, with each ReLU after its pooling where one follows (the same function: ReLU
        # is monotonic, see layers.conv_relu_pool), so the ReLU runs on a quarter of the values
        f = self.features
        x = F.relu(F.max_pool2d(f[0](x), 2))
        x = F.relu(f[3](x))
        x = F.relu(F.max_pool2d(f[5](x), 2))
        x = F.relu(F.max_pool2d(f[8](x), 2))
        return self.classifier(x)
