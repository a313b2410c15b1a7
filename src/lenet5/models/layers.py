"""Building blocks shared by the architectures."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lenet5 import hardware, native


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) = 2 sigmoid(2x) - 1, with the derivative 1 - y^2 taken from the saved output.

    For CPUs whose PyTorch tanh is slow: its forward is MKL's vector tanh, which was slow on the 2-core
    AMD EPYC of the first measurements (about 1 ms forward and 0.8 ms backward on 602k floats, 30x an
    elementwise multiply), where this pair was 3.4x faster forward + backward on LeNet-5's C1
    activations (128x6x28x28). On an Intel Xeon torch.tanh was 3.1-3.5x faster than this pair instead,
    so `tanh` takes it only where `tanh_by_sigmoid` measured it 1.2x faster on the machine. Agrees with
    torch.tanh to 2e-7 (tested). Written in the forward/setup_context form so that torch.func
    transforms (vmap, vjp) work through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * 2).mul_(2).sub_(1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad - grad * y * y

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:  # forward mode: torch.func.jvp, jacfwd, hessian
        (y,) = ctx.saved_tensors
        return tangent - tangent * y * y


_TANH_PROBE_VERSION = 4  # bump when _measure_tanh changes: older cached results are then ignored (4: one thread)
SIGMOID_TANH_MIN_SPEEDUP = 1.2  # the sigmoid form is taken only where it ran at least this much faster


def _measure_tanh(seconds: float = 0.1) -> dict[str, float]:
    """Milliseconds of the best forward + backward pass through autograd of each form on C1's
    activations at batch 64 (301k floats, float32), alternating, about `seconds` in all, on one
    thread (`hardware.time_alternately`), as plain eager PyTorch (`hardware.cached_probe`)."""
    with torch.inference_mode(False):  # also when asked from under inference_mode
        x = torch.randn(64, 6, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad = torch.ones(x.shape)

    def timed(form) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(False), torch.enable_grad():  # also when asked from under no_grad
                torch.autograd.grad(form(x), x, grad)
        return run

    return hardware.time_alternately({"torch_ms": timed(torch.tanh), "sigmoid_ms": timed(_SigmoidTanh.apply)}, seconds)


@functools.lru_cache(maxsize=1)
def tanh_by_sigmoid() -> bool:
    """Whether the sigmoid form of tanh ran at least SIGMOID_TANH_MIN_SPEEDUP times faster than
    torch.tanh on this machine's CPU: measured once per machine (about 0.1 s) and cached with the
    bf16 probe's result (lenet5.hardware)."""
    times, _ = hardware.cached_probe("tanh-probe", _TANH_PROBE_VERSION, ("torch_ms", "sigmoid_ms"), _measure_tanh)
    return times["torch_ms"] >= SIGMOID_TANH_MIN_SPEEDUP * times["sigmoid_ms"]


# Below this many floats torch.tanh is taken everywhere: this autograd Function's own cost (about
# 45 us a call, forward and backward) outweighed the kernels' difference at 30,720 floats and below in
# every measurement, with MKL's tanh on its fast path and on its SSE4.2 path; on the SSE4.2 path the
# sigmoid form was faster from 150,528 floats on, and at 75,264 either form by run
# (docs/results/xeon-avx512-bf16/tanh-forms.txt).
SIGMOID_TANH_MIN_SIZE = 1 << 17


def _transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is running: torch.tanh then, which every
    transform knows, and no probe, which could not time autograd there."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh, by the faster form for large float32 tensors on a CPU; plain torch.tanh where a tracer,
    exporter, compiler or torch.func transform needs standard ops, and for other dtypes (the sigmoid
    form loses bf16's few bits near 0, and `tanh_by_sigmoid` measured float32)."""
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting() \
            or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or _transformed() \
            or x.dtype != torch.float32 or x.numel() < SIGMOID_TANH_MIN_SIZE or not tanh_by_sigmoid():
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
