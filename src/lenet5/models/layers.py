"""Building blocks shared by the architectures."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lenet5 import native


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) = 2 sigmoid(2x) - 1, with the derivative 1 - y^2 taken from the saved output.

    Speed trick: PyTorch's CPU tanh and tanh_backward kernels are slow (about 1 ms forward and
    0.8 ms backward on 602k floats here, 30x an elementwise multiply), while sigmoid is fast.
    This pair of kernels is 3.4x faster forward + backward on LeNet-5's C1 activations
    (128x6x28x28, 2 cores) and agrees with torch.tanh to 2e-7. Written in the
    forward/setup_context form so that torch.func transforms (vmap, vjp) work through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * 2).mul_(2).sub_(1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad - grad * y * y


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh, fast on CPU; plain torch.tanh where a tracer, exporter or compiler needs standard ops."""
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting() \
            or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return torch.tanh(x)
    return _SigmoidTanh.apply(x)


class Tanh(nn.Module):
    """Drop-in for nn.Tanh that uses the fast CPU path above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh(x)


def conv_relu_pool(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """max_pool2d(relu(conv(x)), 2), computed as relu(max_pool2d(conv(x), 2)).

    Speed trick: ReLU is monotonic, so both orders give the same values and the same gradients
    (a window's maximum is positive in both or in neither), and pooling first runs the ReLU and
    its backward on a quarter of the values. Tested against the Sequential order for every model
    that uses it. On a CPU both run as one native kernel, forward and backward (lenet5.native),
    where the layout and shape allow, and so does the convolution, with them: by Winograd's
    F(2x2, 5x5) for 8 or more input channels (`native.winograd_conv_pool`, each output tile a
    pooling window), by a direct kernel for a first layer of one input channel
    (`native.single_conv_pool`).
    """
    if native.single_conv_pool_applies(x, conv):
        return native.single_conv_pool(x, conv)
    if native.winograd_pool_applies(x, conv):
        return native.winograd_conv_pool(x, conv)
    x = native.conv5x5(x, conv)
    if native.relu_max_pool_applies(x):
        return native.relu_max_pool(x)
    return F.relu(F.max_pool2d(x, 2, 2))


def conv_tanh_pool(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """avg_pool2d(tanh(conv(x)), 2): LeNet-5's convolution stage.

    Speed trick: on CPU in fp32 one fused native kernel computes all three, forward and backward
    (lenet5.native; compiled on first use); elsewhere, or without a compiler, PyTorch's ops.
    """
    if native.applies(x, conv):
        return native.conv_tanh_pool(x, conv)
    return F.avg_pool2d(tanh(conv(x)), 2)
