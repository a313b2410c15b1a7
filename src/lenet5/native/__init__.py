"""Fused native CPU kernels: LeNet-5's small convolutions (conv + tanh + 2x2 average pooling),
keras-lenet's 2x2 max pooling with its ReLU, its two convolutions with them (the first, of one
input channel, directly; the second by Winograd's F(2x2, 5x5), 2.8x fewer multiply-adds in its
products), and RMSprop's update in one pass (the blog post's optimizer).

oneDNN runs LeNet-5's 1->6 and 6->16 channel 5x5 convolutions at a fraction of the CPU's fp32
peak, and tanh and pooling each add a pass over memory. `conv_tanh_pool` does all three in one
C++ kernel (conv_tanh_pool.cpp), forward and backward, vectorised across images for AVX-512 or
AVX2 and parallel over the batch on PyTorch's own thread pool (built with -fopenmp against torch's
libgomp where that applies: `build.openmp_flags`).

The kernels are compiled on first use with the machine's compiler and cached (see `build`). They
are a plain C library, called through ctypes (`library.Kernels`), which allocates every tensor, checks
its shape, type and layout, and passes its memory, so no ATen header is compiled. This module holds
the autograd functions and decides where each kernel applies.
When that is impossible (no compiler, a failed build, Windows) one warning is logged and the
PyTorch path is used instead; it is also used wherever the kernel does not apply (not CPU
fp32, autocast, tracing, export, torch.compile, torch.func transforms, other layer shapes).

Environment: LENET5_NATIVE=0 forces the PyTorch path; CXX names the compiler (default c++);
LENET5_NATIVE_MARCH builds for another CPU (a -march value, e.g. haswell for AVX2 only).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from lenet5.native.library import (MARCH_ENV, Kernels, _channels_last, _cpu_float32, _ops, available, configure,
                                   default_march, kernels, why_unavailable)

__all__ = ["Kernels", "MARCH_ENV", "WINOGRAD_MIN_CHANNELS", "applies", "available", "configure", "conv5x5",
           "conv_tanh_pool", "default_march", "disabled", "in_use", "kernels", "relu_max_pool",
           "relu_max_pool_applies", "rmsprop_applies", "rmsprop_step", "single_conv_pool",
           "single_conv_pool_applies", "why_unavailable", "winograd_applies", "winograd_conv", "winograd_conv_pool",
           "winograd_pool_applies"]


_disabled = threading.local()  # set by `disabled()`, per thread


def in_use() -> bool:
    """`available()`, and not `disabled()` here: whether a layer the kernels cover runs by them."""
    return not getattr(_disabled, "on", False) and available()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block (on this thread) `applies` is False: the PyTorch path runs, for A/B comparisons."""
    before = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = before


def _backward_with_graph(ctx, grad: torch.Tensor, layer, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """A backward pass that is itself differentiable, for a double backward (`create_graph=True`,
    e.g. a gradient penalty; grad mode is then on inside backward): `layer` recomputed by PyTorch's
    ops from the saved `inputs` and its gradients taken with a graph. The kernels' own backward is
    differentiable once only; this path runs only when a second derivative is asked for."""
    needs = ctx.needs_input_grad[:len(inputs)]
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.autocast("cpu", enabled=False):  # the forward pass ran in float32, whatever the caller's autocast
        out = layer(*inputs)
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True)) if wanted else iter(())
    return tuple(next(grads) if need else None for need in needs) + (None,) * (len(ctx.needs_input_grad) - len(inputs))


class _ConvTanhPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, save: bool):
        out, xsave, ssave = _ops().conv_tanh_pool_forward(x, weight, bias, padding, save)
        ctx.save_for_backward(xsave, ssave, weight, x, bias)
        ctx.shape = (x.shape[2], x.shape[3], padding)
        return out

    @staticmethod
    def backward(ctx, grad):
        xsave, ssave, weight, x, bias = ctx.saved_tensors
        h, w, padding = ctx.shape
        if torch.is_grad_enabled():
            return _backward_with_graph(ctx, grad, lambda x, w, b: F.avg_pool2d(torch.tanh(F.conv2d(x, w, b, padding=padding)), 2),
                                        (x, weight, bias))
        gx, gw, gb = _ops().conv_tanh_pool_backward(grad, xsave, ssave, weight, h, w, padding,
                                                    ctx.needs_input_grad[0])
        return (gx if ctx.needs_input_grad[0] else None), gw, gb, None, None


def _watched() -> bool:
    """Whether a tracer, exporter, compiler, autocast or torch.func transform watches: standard ops only."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() \
        or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") \
        or torch._C._functorch.peek_interpreter_stack() is not None


def _plain_5x5(conv: nn.Conv2d) -> bool:
    p = conv.padding
    return conv.bias is not None and conv.kernel_size == (5, 5) and conv.stride == (1, 1) \
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros" \
        and not isinstance(p, str) and p[0] == p[1]


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the native kernel can compute pool(tanh(conv(x))) for this input and layer."""
    if getattr(_disabled, "on", False):
        return False
    if x.dim() != 4 or conv.bias is None or not _cpu_float32(x, conv.weight, conv.bias):
        return False
    if _watched() or not _plain_5x5(conv):
        return False
    p = conv.padding
    out_h, out_w = x.shape[2] + 2 * p[0] - 4, x.shape[3] + 2 * p[0] - 4
    return out_h > 0 and out_w > 0 and out_h % 2 == 0 and out_w % 2 == 0 and available()


def conv_tanh_pool(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """avg_pool2d(tanh(conv(x)), 2) by the fused kernel; the caller checks `applies` first."""
    # Inside Function.forward grad mode is off, so whether to keep what backward needs is decided here.
    save = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad or conv.bias.requires_grad)
    return _ConvTanhPool.apply(x, conv.weight, conv.bias, conv.padding[0], save)


class _ReluMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, which = _ops().relu_max_pool_forward(x)
        ctx.save_for_backward(which)
        return y

    @staticmethod
    def backward(ctx, grad):
        (which,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # a double backward: see _unpool
            return _unpool(grad, which)
        # the next layer's gradient may come back in another layout (a flatten reads NCHW order)
        return _ops().relu_max_pool_backward(grad.contiguous(memory_format=torch.channels_last), which)


def _unpool(grad: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """relu_max_pool_backward in PyTorch's ops, differentiable: each output's gradient to the input
    its window's `which` names (0-3, row by row; 4: none). It is linear in `grad` and, almost
    everywhere, constant in the input, so a double backward needs `which` only, not the input (which
    the forward pass would otherwise have to keep alive)."""
    index = which.view(torch.int16) if which.dtype == torch.bfloat16 else which  # the bits are the integer
    n, c, oh, ow = grad.shape
    tiles = torch.stack([grad * (index == k) for k in range(4)], -1).reshape(n, c, oh, ow, 2, 2)
    return tiles.permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * oh, 2 * ow).contiguous(memory_format=torch.channels_last)


def relu_max_pool_applies(x: torch.Tensor) -> bool:
    """Whether the native kernel can compute relu(max_pool2d(x, 2, 2)) for this tensor: a CPU
    float32 or bfloat16 channels_last batch of even height and width, no tracer, exporter, compiler
    or torch.func transform watching; and the kernels loaded."""
    if getattr(_disabled, "on", False):
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4 \
            or x.shape[2] % 2 or x.shape[3] % 2 or 0 in x.shape \
            or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return available()


def relu_max_pool(x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(x, 2, 2)) by the native kernel, forward and backward; the caller checks
    `relu_max_pool_applies` first."""
    return _ReluMaxPool.apply(x)


# The smallest input channel count for which the Winograd path runs: its transforms cost about
# as much per channel as its products save, so a thin input (keras-lenet's first convolution
# has one channel) stays with oneDNN.
WINOGRAD_MIN_CHANNELS = 8
# The largest layers it takes: its buffers hold a block of whole images per thread (and the weight
# gradient's partial sums one per thread), so big images or wide layers stay with oneDNN, which was
# not measured against it there. 1024 tiles: a 64x64 output.
WINOGRAD_MAX_CHANNELS, WINOGRAD_MAX_TILES = 128, 1024


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, given, weight, bias, pad: int, pool: bool):
        x = given.contiguous(memory_format=torch.channels_last)
        u, ut = _ops().winograd_weight(weight)
        y, which = _ops().winograd_forward(x, u, ut, bias, pad, pool)
        # `given` too: a double backward differentiates through the input itself, not a copy of it
        ctx.save_for_backward(x, u, ut, weight, bias, given, *([which] if pool else []))
        ctx.pad, ctx.pool = pad, pool
        return y

    @staticmethod
    def backward(ctx, grad):
        x, u, ut, weight, bias, given, *which = ctx.saved_tensors
        if torch.is_grad_enabled():
            def layer(x, w, b):
                y = F.conv2d(x, w, b, padding=ctx.pad)
                return F.relu(F.max_pool2d(y, 2)) if ctx.pool else y
            return _backward_with_graph(ctx, grad, layer, (given, weight, bias))
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx, dw, db = _ops().winograd_backward(x, grad, u, ut, weight, ctx.pad, ctx.needs_input_grad[0],
                                              which[0] if which else None)
        return dx, dw, db, None, None


def winograd_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether `winograd_conv` can compute conv(x): a CPU float32 channels_last batch with at
    least WINOGRAD_MIN_CHANNELS channels into a 5x5, stride 1, square zero-padded convolution with
    a bias; no tracer, exporter, compiler, autocast or torch.func transform watching; the kernels
    loaded."""
    if getattr(_disabled, "on", False) or x.dim() != 4 or conv.bias is None \
            or not _cpu_float32(x, conv.weight, conv.bias) or not _channels_last(x) \
            or not WINOGRAD_MIN_CHANNELS <= x.shape[1] <= WINOGRAD_MAX_CHANNELS \
            or conv.out_channels > WINOGRAD_MAX_CHANNELS or x.shape[0] == 0:
        return False
    if not _plain_5x5(conv) or _watched():
        return False
    p = conv.padding
    if x.shape[2] + 2 * p[0] < 5 or x.shape[3] + 2 * p[0] < 5 \
            or ((x.shape[2] + 2 * p[0] - 3) // 2) * ((x.shape[3] + 2 * p[0] - 3) // 2) > WINOGRAD_MAX_TILES:
        return False
    return available()


class _SingleConvPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pad: int):
        y, which = _ops().single_conv_pool_forward(x, weight, bias, pad)
        ctx.save_for_backward(x, which, weight, bias)
        ctx.pad = pad
        return y

    @staticmethod
    def backward(ctx, grad):
        x, which, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _backward_with_graph(ctx, grad, lambda x, w, b: F.relu(F.max_pool2d(F.conv2d(x, w, b, padding=ctx.pad), 2)),
                                        (x, weight, bias))
        gw, gb = _ops().single_conv_pool_backward(x, grad.contiguous(memory_format=torch.channels_last), which,
                                                  weight, ctx.pad)
        return None, gw, gb, None


def single_conv_pool_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the one-channel kernel can compute relu(max_pool2d(conv(x), 2)): a dense CPU float32
    batch of one channel that needs no gradient (the data, as for a first layer), a plain 5x5
    convolution with a bias, at most 4 vectors of output channels and an even-sized output;
    nothing watching; the kernels loaded."""
    if getattr(_disabled, "on", False) or x.dim() != 4 or x.shape[1] != 1 or x.shape[0] == 0 \
            or x.requires_grad or not x.is_contiguous() or not _plain_5x5(conv) \
            or not _cpu_float32(x, conv.weight, conv.bias):
        return False
    p = conv.padding[0]
    oh, ow = x.shape[2] + 2 * p - 4, x.shape[3] + 2 * p - 4
    if oh <= 0 or ow <= 0 or oh % 2 or ow % 2 or _watched() or not available():
        return False
    return conv.out_channels <= 4 * _ops().vector_width


def single_conv_pool(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)) by the one-channel kernel; the caller checks
    `single_conv_pool_applies` first."""
    return _SingleConvPool.apply(x, conv.weight, conv.bias, conv.padding[0])


def conv5x5(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x), by Winograd where it applies (8 or more input channels), else by PyTorch."""
    return winograd_conv(x, conv) if winograd_applies(x, conv) else conv(x)


def winograd_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) by Winograd F(2x2, 5x5), forward and backward; channels_last out. The caller checks
    `winograd_applies` first."""
    return _WinogradConv.apply(x, conv.weight, conv.bias, conv.padding[0], False)


def winograd_pool_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """`winograd_applies`, and an even-sized output: each Winograd tile is then a pooling window."""
    p = conv.padding
    return winograd_applies(x, conv) and (x.shape[2] + 2 * p[0]) % 2 == 0 and (x.shape[3] + 2 * p[0]) % 2 == 0


def winograd_conv_pool(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)) with the convolution by Winograd and the ReLU and pooling done
    on its output tiles (no full-size output or gradient in memory); the caller checks
    `winograd_pool_applies` first."""
    return _WinogradConv.apply(x, conv.weight, conv.bias, conv.padding[0], True)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def rmsprop_applies(params: list[torch.Tensor], grads: list[torch.Tensor], square_avgs: list[torch.Tensor],
                    copies: list[torch.Tensor] | None = None) -> bool:
    """Whether `rmsprop_step` can update these tensors: CPU, float32 parameters and averages, each
    gradient float32 (bfloat16 where the parameter has a bfloat16 copy), each parameter, gradient,
    average and copy in one dense layout, no autograd or tracing watching; and the kernels loaded."""
    if getattr(_disabled, "on", False) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    copies = copies or [None] * len(params)
    for p, g, s, c in zip(params, grads, square_avgs, copies, strict=True):
        grad_dtype = torch.float32 if c is None else torch.bfloat16
        if p.device.type != "cpu" or not (p.dtype == s.dtype == torch.float32) or g.dtype != grad_dtype \
                or g.is_sparse or not (p.shape == g.shape == s.shape) or not (p.stride() == g.stride() == s.stride()) \
                or not _dense(p) or g.device != p.device or s.device != p.device:
            return False
        if c is not None and (c.dtype != torch.bfloat16 or c.device != p.device or c.stride() != p.stride()
                              or c.shape != p.shape):
            return False
    return available()


def rmsprop_step(params: list[torch.Tensor], grads: list[torch.Tensor], square_avgs: list[torch.Tensor],
                 copies: list[torch.Tensor] | None = None, *, lr: float, alpha: float, eps: float,
                 weight_decay: float) -> None:
    """PyTorch's RMSprop update (no momentum, not centred) in one pass per tensor, in place; with
    `copies`, each parameter's bfloat16 copy is rewritten from the new weights in the same pass
    (rounded as `.to(torch.bfloat16)` rounds) and the gradients are the copies' (bfloat16). The
    caller checks `rmsprop_applies` first."""
    _ops().rmsprop_step(params, grads, square_avgs, copies or [], lr, alpha, eps, weight_decay, applies_checked=True)
