"""The kernels' C library: compiled on first use (`lenet5.native.build`), loaded with ctypes, and called
through `Kernels`, which allocates every tensor, checks its shape, type and layout, and passes its memory."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch

from lenet5.native.build import BuildError, library

log = logging.getLogger("lenet5.native")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" (a Kernels) once loaded, or "error": why not; filled on first use
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


def why_unavailable() -> str | None:
    """The reason `available()` is False, or None."""
    _ops()
    return _state.get("error")  # type: ignore[return-value]


def configure(march: str) -> None:
    """Build for another CPU (e.g. "haswell" to emulate an AVX2-only machine); call before first use."""
    if "ops" in _state:
        raise RuntimeError("the native kernels are already loaded")
    _state["march"] = march


