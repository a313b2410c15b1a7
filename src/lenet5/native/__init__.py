"""Fused native CPU kernels: LeNet-5's small convolutions (conv + tanh + 2x2 average pooling),
keras-lenet's 2x2 max pooling with its ReLU, and RMSprop's update in one pass (the blog post's
optimizer).

oneDNN runs LeNet-5's 1->6 and 6->16 channel 5x5 convolutions at a fraction of the CPU's fp32
peak, and tanh and pooling each add a pass over memory. `conv_tanh_pool` does all three in one
C++ kernel (conv_tanh_pool.cpp), forward and backward, vectorised across images for AVX-512 or
AVX2 and parallel over the batch on PyTorch's own thread pool (built with -fopenmp against torch's
libgomp where that applies: `build.openmp_flags`).

The kernels are compiled on first use with the machine's compiler and cached (see `build`).
When that is impossible (no compiler, a failed build, Windows) one warning is logged and the
PyTorch path is used instead; it is also used wherever the kernel does not apply (not CPU
fp32, autocast, tracing, export, torch.compile, torch.func transforms, other layer shapes).

Environment: LENET5_NATIVE=0 forces the PyTorch path; CXX names the compiler (default c++);
LENET5_NATIVE_MARCH builds for another CPU (a -march value, e.g. haswell for AVX2 only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lenet5.native.build import BuildError, library

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" once loaded, or "error": why not; filled on first use
_disabled = threading.local()  # set by `disabled()`, per thread
# Builds the kernels for another CPU than this one (e.g. haswell: AVX2 only), as
# lenet5.hardware.EMULATE does for an emulated class, so that their vector width follows it.
MARCH_ENV = "LENET5_NATIVE_MARCH"


def _ops():
    """torch.ops.lenet5_native, compiling and loading it on first call; None if unavailable."""
    if "ops" in _state or "error" in _state:
        return _state.get("ops")
    with _lock:
        if "ops" in _state or "error" in _state:
            return _state.get("ops")
        if os.environ.get("LENET5_NATIVE", "1") == "0":
            _state["error"] = "disabled by LENET5_NATIVE=0"
            log.info("native kernels %s; using the PyTorch path", _state["error"])
            return None
        try:
            torch.ops.load_library(str(library(_state.get("march") or os.environ.get(MARCH_ENV) or "native")))
            _state["ops"] = torch.ops.lenet5_native
        except (BuildError, OSError, RuntimeError) as e:
            _state["error"] = str(e)
            log.warning("native kernels unavailable (%s); falling back to the PyTorch path", e)
        return _state.get("ops")


def available() -> bool:
    """True when the native kernels are compiled and loaded (compiling them if need be)."""
    return _ops() is not None


def why_unavailable() -> str | None:
    """The reason `available()` is False, or None."""
    _ops()
    return _state.get("error")  # type: ignore[return-value]


def configure(march: str) -> None:
    """Build for another CPU (e.g. "haswell" to emulate an AVX2-only machine); call before first use."""
    if "ops" in _state:
        raise RuntimeError("the native kernels are already loaded")
    _state["march"] = march


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block (on this thread) `applies` is False: the PyTorch path runs, for A/B comparisons."""
    before = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = before


class _ConvTanhPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding: int, save: bool):
        out, xsave, ssave = _ops().conv_tanh_pool_forward(x, weight, bias, padding, save)
        ctx.save_for_backward(xsave, ssave, weight)
        ctx.shape = (x.shape[2], x.shape[3], padding)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xsave, ssave, weight = ctx.saved_tensors
        h, w, padding = ctx.shape
        gx, gw, gb = _ops().conv_tanh_pool_backward(grad, xsave, ssave, weight, h, w, padding,
                                                           ctx.needs_input_grad[0])
        if gw.stride() != weight.stride():  # the gradient takes its weight's layout (channels_last), as DDP expects
            gw = torch.empty_like(weight).copy_(gw)
        return (gx if ctx.needs_input_grad[0] else None), gw, gb, None, None


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the native kernel can compute pool(tanh(conv(x))) for this input and layer."""
    if getattr(_disabled, "on", False):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or conv.weight.dtype != torch.float32:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() \
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu") \
            or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    k, p = conv.kernel_size, conv.padding
    if conv.bias is None or k != (5, 5) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 \
            or conv.padding_mode != "zeros" or isinstance(p, str) or p[0] != p[1]:
        return False
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
    @once_differentiable
    def backward(ctx, grad):
        (which,) = ctx.saved_tensors
        # the next layer's gradient may come back in another layout (a flatten reads NCHW order)
        return _ops().relu_max_pool_backward(grad.contiguous(memory_format=torch.channels_last), which)


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
    _ops().rmsprop_step(params, grads, square_avgs, copies or [], lr, alpha, eps, weight_decay)
