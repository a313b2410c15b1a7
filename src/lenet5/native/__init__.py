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
are a plain C library, called through ctypes (`Kernels`): this module allocates every tensor, checks
its shape, type and layout, and passes its memory, so no ATen header is compiled.
When that is impossible (no compiler, a failed build, Windows) one warning is logged and the
PyTorch path is used instead; it is also used wherever the kernel does not apply (not CPU
fp32, autocast, tracing, export, torch.compile, torch.func transforms, other layer shapes).

Environment: LENET5_NATIVE=0 forces the PyTorch path; CXX names the compiler (default c++);
LENET5_NATIVE_MARCH builds for another CPU (a -march value, e.g. haswell for AVX2 only).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from lenet5.native.build import BuildError, library

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" (a Kernels) once loaded, or "error": why not; filled on first use
_disabled = threading.local()  # set by `disabled()`, per thread
# Builds the kernels for another CPU than this one (e.g. haswell: AVX2 only), as
# lenet5.hardware.EMULATE does for an emulated class, so that their vector width follows it.
MARCH_ENV = "LENET5_NATIVE_MARCH"


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_F = ctypes.c_float
_INT = ctypes.c_int
_STRIDES = ctypes.c_int64 * 4
_SIGNATURES = {
    "lenet5_vector_width": (_INT, []),
    "lenet5_parallel_threads": (_I64, [_INT]),
    "lenet5_conv_tanh_pool_forward": (None, [_P, _I64, _I64, _I64, _I64, _P, _STRIDES, _I64, _P, _I64, _P, _P, _P,
                                             _INT]),
    "lenet5_conv_tanh_pool_backward": (None, [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _STRIDES, _P, _P,
                                              _STRIDES, _P, _INT]),
    "lenet5_rmsprop_tensor": (None, [_P, _P, _INT, _P, _P, _I64, _F, _F, _F, _F, _F, _INT]),
    "lenet5_relu_max_pool_forward": (None, [_P, _INT, _I64, _I64, _I64, _I64, _P, _P, _INT]),
    "lenet5_relu_max_pool_backward": (None, [_P, _P, _INT, _I64, _I64, _I64, _I64, _P, _INT]),
    "lenet5_winograd_forward": (None, [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _INT]),
    "lenet5_winograd_backward": (None, [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _INT]),
    "lenet5_single_conv_pool_forward": (None, [_P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _INT]),
    "lenet5_single_conv_pool_backward": (None, [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _INT]),
    "lenet5_winograd_weight": (None, [_P, _STRIDES, _I64, _I64, _P, _I64, _P, _I64, _INT]),
    "lenet5_winograd_weight_grad": (None, [_P, _INT, _I64, _I64, _I64, _I64, _P, _STRIDES, _INT]),
}


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the two are views of one storage (empty tensors, whose storages all start at 0, share none)."""
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.is_cpu and t.dtype == torch.float32 for t in tensors)


def _vector_aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself where it is dense and starts on a 64-byte boundary (the kernels read it as whole
    vectors), else a copy that does: torch's CPU allocator aligns every allocation to 64 bytes."""
    return t if t.is_contiguous() and t.data_ptr() % 64 == 0 else t.clone(memory_format=torch.contiguous_format)


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


class Kernels:
    """The compiled library (conv_tanh_pool.cpp) behind a checked Python interface: each method
    allocates what the kernel writes, refuses tensors it was not written for (RuntimeError), and
    runs the kernel on torch's current thread count."""

    def __init__(self, path: str):
        self._lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.vector_width = int(self._lib.lenet5_vector_width())

    def parallel_threads(self) -> int:
        """The threads the kernels' parallel loops run on at torch's current thread count."""
        return int(self._lib.lenet5_parallel_threads(torch.get_num_threads()))

    def conv_tanh_pool_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int,
                               save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """avg_pool2d(tanh(conv2d(x, weight, bias, padding)), 2), and what the backward pass needs
        when `save` (empty tensors otherwise)."""
        if not _cpu_float32(x, weight, bias) or x.dim() != 4:
            raise RuntimeError("conv_tanh_pool: a 4-d input, its weight and bias must be float32 CPU tensors")
        x = x.contiguous()
        B, ci, h, w = x.shape
        co = weight.shape[0]
        oh, ow = h + 2 * padding - 4, w + 2 * padding - 4
        if weight.shape != (co, ci, 5, 5) or bias.shape != (co,) or oh <= 0 or ow <= 0 or oh % 2 or ow % 2:
            raise RuntimeError(f"conv_tanh_pool: unsupported shape (input {tuple(x.shape)}, weight "
                               f"{tuple(weight.shape)}, padding {padding})")
        blocks = -(-B // self.vector_width) * self.vector_width
        b = bias.contiguous()
        out = x.new_empty(B, co, oh // 2, ow // 2)
        xsave = x.new_empty(blocks * ci * (h + 2 * padding) * (w + 2 * padding) if save else 0)
        ssave = x.new_empty(blocks * co * oh * ow if save else 0)
        self._lib.lenet5_conv_tanh_pool_forward(
            x.data_ptr(), B, ci, h, w, weight.data_ptr(), _STRIDES(*weight.stride()), co, b.data_ptr(), padding,
            out.data_ptr(),
            xsave.data_ptr() if save else None, ssave.data_ptr() if save else None, torch.get_num_threads())
        return out, xsave, ssave

    def conv_tanh_pool_backward(self, grad: torch.Tensor, xsave: torch.Tensor, ssave: torch.Tensor,
                                weight: torch.Tensor, h: int, w: int, padding: int,
                                need_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input (empty unless `need_input`), weight and bias gradients from the output's."""
        if not _cpu_float32(grad, xsave, ssave, weight) or grad.dim() != 4:
            raise RuntimeError("conv_tanh_pool_backward: the gradient, the saved state and the weight must be "
                               "float32 CPU tensors")
        grad = grad.contiguous()
        xsave, ssave = _vector_aligned(xsave), _vector_aligned(ssave)  # e.g. views a saved-tensor hook returned
        B, co = grad.shape[:2]
        ci = weight.shape[1]
        hp, wp_ = h + 2 * padding, w + 2 * padding
        blocks = -(-B // self.vector_width) * self.vector_width
        if grad.shape != (B, co, (hp - 4) // 2, (wp_ - 4) // 2) or xsave.numel() != blocks * ci * hp * wp_ \
                or ssave.numel() != blocks * co * (hp - 4) * (wp_ - 4):
            raise RuntimeError("conv_tanh_pool_backward: the forward pass kept no state for this batch")
        gin = grad.new_empty(B if need_input else 0, ci, h, w)
        # the weight's own layout (channels_last in training), as DDP's gradient buckets expect
        gw, gb = torch.empty_like(weight), grad.new_empty(co)
        self._lib.lenet5_conv_tanh_pool_backward(
            grad.data_ptr(), B, ci, h, w, co, padding, xsave.data_ptr(), ssave.data_ptr(), weight.data_ptr(),
            _STRIDES(*weight.stride()), gin.data_ptr() if need_input else None, gw.data_ptr(), _STRIDES(*gw.stride()),
            gb.data_ptr(), torch.get_num_threads())
        return gin, gw, gb

    def rmsprop_step(self, params: list[torch.Tensor], grads: list[torch.Tensor], square_avgs: list[torch.Tensor],
                     copies: list[torch.Tensor], lr: float, alpha: float, eps: float, weight_decay: float,
                     applies_checked: bool = False) -> None:
        """PyTorch's RMSprop update of every tensor in place (see conv_tanh_pool.cpp). With
        `applies_checked`, the caller has just asked `rmsprop_applies` (devices, dtypes, layouts: the
        optimizer's every step), and only what it does not check is checked here."""
        if not len(params) == len(grads) == len(square_avgs):
            raise RuntimeError("rmsprop_step: list lengths differ")
        if copies and len(copies) != len(params):
            raise RuntimeError("rmsprop_step: one bfloat16 copy per parameter, or none")
        for t, (p, g, s) in enumerate(zip(params, grads, square_avgs)):  # everything is checked before any write
            if applies_checked:
                if _shares_memory(p, g) or _shares_memory(p, s) or _shares_memory(g, s) \
                        or copies and any(_shares_memory(copies[t], o) for o in (p, g, s)):
                    raise RuntimeError("rmsprop_step: tensors share memory")
                continue
            if not (p.is_cpu and g.is_cpu and s.is_cpu):
                raise RuntimeError("rmsprop_step: CPU tensors only")
            if not (p.dtype == s.dtype == torch.float32 and g.dtype in (torch.float32, torch.bfloat16)):
                raise RuntimeError("rmsprop_step: float32 parameters and averages, float32 or bfloat16 gradients only")
            if not (p.shape == g.shape == s.shape and p.stride() == g.stride() == s.stride()) \
                    or not (p.is_contiguous() or _channels_last(p)):
                raise RuntimeError("rmsprop_step: a parameter, its gradient and its average must share one dense "
                                   "layout")
            if _shares_memory(p, g) or _shares_memory(p, s) or _shares_memory(g, s):
                raise RuntimeError("rmsprop_step: tensors share memory")
            if copies:
                c = copies[t]
                if not c.is_cpu or c.dtype != torch.bfloat16 or c.shape != p.shape \
                        or c.stride() != p.stride() or any(_shares_memory(c, o) for o in (p, g, s)):
                    raise RuntimeError("rmsprop_step: each copy must be a bfloat16 tensor of its parameter's layout, "
                                       "of its own memory")
        # float32 arguments, each rounded from Python's double as C++'s float(double) rounds
        a, b, e, lr_, wd = alpha, 1 - alpha, eps, lr, weight_decay
        threads = torch.get_num_threads()
        for t, (p, g, s) in enumerate(zip(params, grads, square_avgs)):
            self._lib.lenet5_rmsprop_tensor(p.data_ptr(), g.data_ptr(), int(g.dtype == torch.bfloat16), s.data_ptr(),
                                            copies[t].data_ptr() if copies else None, p.numel(), a, b, e, lr_, wd,
                                            threads)

    @staticmethod
    def _check_pool_input(x: torch.Tensor, what: str) -> None:
        if x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError(f"relu_max_pool: {what} must be a 4-d float32 or bfloat16 CPU tensor")
        if not _channels_last(x):
            raise RuntimeError(f"relu_max_pool: {what} must be channels_last")

    def relu_max_pool_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """relu(max_pool2d(x, 2, 2)) and, per output, which input of its window it came from."""
        self._check_pool_input(x, "the input")
        N, C, H, W = x.shape
        if H % 2 or W % 2 or H == 0 or W == 0:
            raise RuntimeError("relu_max_pool: height and width must be even")
        y = torch.empty(N, C, H // 2, W // 2, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        which = torch.empty_like(y)  # positions 0-4 in x's own dtype (the bits' integer for bfloat16)
        self._lib.lenet5_relu_max_pool_forward(x.data_ptr(), int(x.dtype == torch.bfloat16), N, C, H, W, y.data_ptr(),
                                               which.data_ptr(), torch.get_num_threads())
        return y, which

    def relu_max_pool_backward(self, grad: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """The input's gradient from the output's and the forward pass's `which`."""
        self._check_pool_input(grad, "the gradient")
        if not which.is_cpu or which.dtype != grad.dtype or which.shape != grad.shape or not _channels_last(which):
            raise RuntimeError("relu_max_pool: the saved maxima do not match the gradient")
        N, C, OH, OW = grad.shape
        gx = torch.empty(N, C, 2 * OH, 2 * OW, dtype=grad.dtype, device=grad.device,
                         memory_format=torch.channels_last)
        self._lib.lenet5_relu_max_pool_backward(grad.data_ptr(), which.data_ptr(), int(grad.dtype == torch.bfloat16),
                                                N, C, OH, OW, gx.data_ptr(), torch.get_num_threads())
        return gx

    def _padded(self, n: int) -> int:
        return -(-n // self.vector_width) * self.vector_width

    def winograd_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A 5x5 weight (K, C, 5, 5), in any layout, as its Winograd transform U = G g G^T per channel
        pair, twice: [36, C, Kp] for the forward pass and transposed, [36, K, Cp], for the input's
        gradient (Cp and Kp rounded up to whole vectors, zeros past C and K)."""
        if not _cpu_float32(weight) or weight.dim() != 4 or weight.shape[2:] != (5, 5):
            raise RuntimeError("winograd: the weight must be a (K, C, 5, 5) float32 CPU tensor")
        K, C = weight.shape[:2]
        u = weight.new_zeros(36, C, self._padded(K))
        ut = weight.new_zeros(36, K, self._padded(C))
        self._lib.lenet5_winograd_weight(weight.data_ptr(), _STRIDES(*weight.stride()), K, C, u.data_ptr(),
                                         u.shape[2], ut.data_ptr(), ut.shape[2], torch.get_num_threads())
        return u, ut

    def _check_winograd(self, x: torch.Tensor, u: torch.Tensor, ut: torch.Tensor,
                        pad: int) -> tuple[int, int, int, int, int, int, int]:
        if not _cpu_float32(x) or x.dim() != 4 or not _channels_last(x):
            raise RuntimeError("winograd: the input must be a 4-d float32 CPU tensor, channels_last")
        N, C, H, W = x.shape
        K = ut.shape[1] if ut.dim() == 3 else -1
        if not _cpu_float32(u, ut) or u.shape != (36, C, self._padded(K)) or ut.shape != (36, K, self._padded(C)) \
                or not (u.is_contiguous() and ut.is_contiguous()):
            raise RuntimeError(f"winograd: the weight's transforms {tuple(u.shape)}, {tuple(ut.shape)} do not match "
                               f"the input's {C} channels")
        oh, ow = H + 2 * pad - 4, W + 2 * pad - 4
        if oh <= 0 or ow <= 0 or pad < 0:
            raise RuntimeError(f"winograd: a 5x5 convolution with padding {pad} has no output on {H}x{W}")
        return N, C, H, W, K, oh, ow

    def winograd_forward(self, x: torch.Tensor, u: torch.Tensor, ut: torch.Tensor, bias: torch.Tensor, pad: int,
                         pool: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """conv2d(x, weight, bias, padding=pad), channels_last, for a 5x5 weight given as its
        transforms (`winograd_weight`); with `pool`, relu(max_pool2d(that, 2)) and, per output,
        which input of its window it came from (as relu_max_pool_forward's), else None."""
        N, C, H, W, K, oh, ow = self._check_winograd(x, u, ut, pad)
        u = _vector_aligned(u)  # read as whole vectors; e.g. a view a saved-tensor hook returned may not be
        if not _cpu_float32(bias) or bias.shape != (K,):
            raise RuntimeError("winograd: the bias does not match the weight")
        if pool and (oh % 2 or ow % 2):
            raise RuntimeError(f"winograd: a {oh}x{ow} output has no 2x2 pooling")
        y = torch.empty(N, K, oh // 2 if pool else oh, ow // 2 if pool else ow, device=x.device,
                        memory_format=torch.channels_last)
        which = torch.empty_like(y) if pool else None
        b = bias.contiguous()  # kept alive over the call
        self._lib.lenet5_winograd_forward(x.data_ptr(), N, H, W, C, K, pad, u.data_ptr(), b.data_ptr(), y.data_ptr(),
                                          which.data_ptr() if pool else None, torch.get_num_threads())
        return y, which

    def winograd_backward(self, x: torch.Tensor, grad: torch.Tensor, u: torch.Tensor, ut: torch.Tensor,
                          weight: torch.Tensor, pad: int, need_input: bool,
                          which: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The input's gradient (None unless `need_input`), the weight's (in its own layout) and the
        bias's, from the output's gradient, for the forward pass's input x; with `which` (the
        pooled forward's), from the pooled output's gradient."""
        N, C, H, W, K, oh, ow = self._check_winograd(x, u, ut, pad)
        if which is not None:
            if oh % 2 or ow % 2:
                raise RuntimeError(f"winograd_backward: a {oh}x{ow} output has no 2x2 pooling")
            oh, ow = oh // 2, ow // 2
            if not _cpu_float32(which) or which.shape != (N, K, oh, ow) or not _channels_last(which):
                raise RuntimeError("winograd_backward: the saved maxima do not match the gradient")
        if not _cpu_float32(grad) or grad.shape != (N, K, oh, ow) or not _channels_last(grad):
            raise RuntimeError("winograd_backward: the gradient must be a float32 channels_last CPU tensor of the "
                               "output's shape")
        if not _cpu_float32(weight) or weight.shape != (K, C, 5, 5):
            raise RuntimeError("winograd_backward: the weight does not match its transforms")
        ut = _vector_aligned(ut)  # read as whole vectors; e.g. a view a saved-tensor hook returned may not be
        cp, kp, threads = self._padded(C), self._padded(K), torch.get_num_threads()
        du, db = u.new_zeros(threads, 36, cp, kp), u.new_zeros(threads, kp)
        dx = torch.empty(N, C, H, W, device=x.device, memory_format=torch.channels_last) if need_input else None
        self._lib.lenet5_winograd_backward(x.data_ptr(), grad.data_ptr(), which.data_ptr() if which is not None else None,
                                           N, H, W, C, K, pad, ut.data_ptr(),
                                           dx.data_ptr() if need_input else None, du.data_ptr(), db.data_ptr(),
                                           threads)
        gw = torch.empty_like(weight)  # the weight's own layout, as DDP's gradient buckets expect
        self._lib.lenet5_winograd_weight_grad(du.data_ptr(), threads, K, C, cp, kp, gw.data_ptr(),
                                              _STRIDES(*gw.stride()), threads)
        return dx, gw, db.sum(0)[:K]

    def _check_single(self, x: torch.Tensor, weight: torch.Tensor, pad: int) -> tuple[int, int, int, int, int, int]:
        if not _cpu_float32(x, weight) or x.dim() != 4 or x.shape[1] != 1 or not x.is_contiguous():
            raise RuntimeError("single_conv_pool: the input must be a dense (N, 1, H, W) float32 CPU tensor")
        N, _, H, W = x.shape
        K = weight.shape[0]
        if weight.shape != (K, 1, 5, 5) or not 0 < K <= 4 * self.vector_width:
            raise RuntimeError(f"single_conv_pool: unsupported weight {tuple(weight.shape)}")
        oh, ow = H + 2 * pad - 4, W + 2 * pad - 4
        if oh <= 0 or ow <= 0 or pad < 0 or oh % 2 or ow % 2:
            raise RuntimeError(f"single_conv_pool: a 5x5 convolution with padding {pad} on {H}x{W} has no even-sized "
                               "output to pool")
        return N, H, W, K, oh, ow

    def single_conv_pool_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """relu(max_pool2d(conv2d(x, weight, bias, padding=pad), 2)), channels_last, for one input
        channel and a 5x5 weight of at most 4 vectors of output channels; and, per output, which
        input of its window it came from (as relu_max_pool_forward's)."""
        N, H, W, K, oh, ow = self._check_single(x, weight, pad)
        if not _cpu_float32(bias) or bias.shape != (K,):
            raise RuntimeError("single_conv_pool: the bias does not match the weight")
        kp = self._padded(K)
        w = weight.new_zeros(25, kp)
        w[:, :K] = weight.detach().reshape(K, 25).t()
        b = bias.new_zeros(kp)
        b[:K] = bias.detach()
        y = torch.empty(N, K, oh // 2, ow // 2, device=x.device, memory_format=torch.channels_last)
        which = torch.empty_like(y)
        self._lib.lenet5_single_conv_pool_forward(x.data_ptr(), N, H, W, K, pad, w.data_ptr(), b.data_ptr(),
                                                  y.data_ptr(), which.data_ptr(), torch.get_num_threads())
        return y, which

    def single_conv_pool_backward(self, x: torch.Tensor, grad: torch.Tensor, which: torch.Tensor,
                                  weight: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's gradient (in its own layout) and the bias's from the pooled output's."""
        N, H, W, K, oh, ow = self._check_single(x, weight, pad)
        if not _cpu_float32(grad, which) or grad.shape != (N, K, oh // 2, ow // 2) or which.shape != grad.shape \
                or not (_channels_last(grad) and _channels_last(which)):
            raise RuntimeError("single_conv_pool_backward: the gradient and the saved maxima must be the output's, "
                               "channels_last")
        kp, threads = self._padded(K), torch.get_num_threads()
        parts = grad.new_zeros(threads, 26, kp)
        self._lib.lenet5_single_conv_pool_backward(x.data_ptr(), grad.data_ptr(), which.data_ptr(), N, H, W, K, pad,
                                                   parts.data_ptr(), threads)
        total = parts.sum(0)
        gw = torch.empty_like(weight)  # the weight's own layout
        gw.copy_(total[:25, :K].t().reshape(K, 1, 5, 5))
        return gw, total[25, :K].clone()


def _ops() -> Kernels | None:
    """The kernels, compiling and loading them on first call; None if unavailable."""
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
            _state["ops"] = Kernels(str(library(_state.get("march") or os.environ.get(MARCH_ENV) or default_march())))
        except (BuildError, OSError, RuntimeError) as e:
            _state["error"] = str(e)
            log.warning("native kernels unavailable (%s); falling back to the PyTorch path", e)
        return _state.get("ops")


def default_march() -> str:
    """The -march the kernels are built for without LENET5_NATIVE_MARCH: this CPU's ("native"), or the
    class PyTorch is capped to where that is lower (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: haswell,
    so the kernels' vectors are as wide as ATen's)."""
    from lenet5.hardware import cpu_class, cpu_flags

    capped, flags = cpu_class(), cpu_flags()
    if capped == "avx2" and "avx512f" in flags:
        return "haswell"
    if capped == "baseline" and "avx2" in flags:
        return "x86-64"
    return "native"


def kernels() -> Kernels | None:
    """The loaded kernels (compiling them if need be), or None where they are unavailable."""
    return _ops()


def available() -> bool:
    """True when the native kernels are compiled and loaded (compiling them if need be)."""
    return _ops() is not None


def in_use() -> bool:
    """`available()`, and not `disabled()` here: whether a layer the kernels cover runs by them."""
    return not getattr(_disabled, "on", False) and available()


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
