"""The native per-pattern SDLM pass of lenet5-1998 (sdlm_pass.cpp), loaded through ctypes.

Built on first use by `lenet5.native.build` (a plain C ABI, no ATen headers: about a second)
and cached like the other kernels. Unavailable, with the reason in `why_unavailable()`, when
there is no compiler, the build fails, LENET5_NATIVE=0, or inside `lenet5.native.disabled()`;
callers then take the PyTorch path (lenet5.train.perpattern does).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

from lenet5 import native
from lenet5.native import MARCH_ENV
from lenet5.native.build import BuildError, library

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("sdlm_pass.cpp")
ABI = 1  # lenet5_sdlm_pass_abi() of the source this module was written for
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib" once loaded, or "error"; "march" if configured

_float_p, _ptr_p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_void_p)


def _library() -> ctypes.CDLL | None:
    if "lib" in _state or "error" in _state:
        return _state.get("lib")  # type: ignore[return-value]
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")  # type: ignore[return-value]
        if os.environ.get("LENET5_NATIVE", "1") == "0":
            _state["error"] = "disabled by LENET5_NATIVE=0"
            return None
        try:
            _state["lib"] = load(_state.get("march") or os.environ.get(MARCH_ENV) or "native")  # type: ignore[arg-type]
        except (BuildError, OSError, AttributeError) as e:
            _state["error"] = str(e)
            log.warning("native per-pattern pass unavailable (%s); falling back to the PyTorch path", e)
        return _state.get("lib")  # type: ignore[return-value]


def load(march: str = "native") -> ctypes.CDLL:
    """The pass built for `march` (once, then cached) and loaded; BuildError or OSError if impossible.
    `run` uses the one for this CPU (or `configure`'s); another is for comparisons."""
    lib = ctypes.CDLL(str(library(march, source=SOURCE, parallel=False)))
    if lib.lenet5_sdlm_pass_abi() != ABI:
        raise BuildError(f"the compiled per-pattern pass has interface {lib.lenet5_sdlm_pass_abi()}, not {ABI}")
    lib.lenet5_sdlm_pass.restype = ctypes.c_int64
    lib.lenet5_sdlm_pass.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, _ptr_p, _ptr_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def available() -> bool:
    """True when the native pass is compiled and loaded (compiling it if need be) and not disabled."""
    return why_unavailable() is None


def why_unavailable() -> str | None:
    """Why `available()` is False, or None."""
    if getattr(native._disabled, "on", False):
        return "disabled by lenet5.native.disabled()"
    _library()
    return _state.get("error")  # type: ignore[return-value]


def configure(march: str) -> None:
    """Build for another CPU (e.g. "haswell" to emulate an AVX2-only machine); call before first use."""
    if "lib" in _state:
        raise RuntimeError("the native per-pattern pass is already loaded")
    _state["march"] = march


def run(images: torch.Tensor, labels: torch.Tensor, params: list[torch.Tensor], steps: list[torch.Tensor],
        prototypes: torch.Tensor, pairs: torch.Tensor, j: float,
        lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on `images` (n, 28, 28) float32 in [0, 1] in order, one SDLM update per pattern, updating
    `params` (the model's 12 tensors, contiguous float32) in place with `steps` (same shapes).
    `pairs` (k, 2) int32: C3's (output map, input map) per kernel. Returns each pattern's loss
    (float32) and whether it was classified correctly before its update (bool). `lib`: a `load`ed
    build to use instead of this CPU's.

    The caller (lenet5.train.perpattern) checks shapes against the model; this checks memory."""
    lib = lib or _library()
    if lib is None:
        raise RuntimeError(f"the native per-pattern pass is unavailable: {why_unavailable()}")
    tensors = [images, labels, prototypes, pairs, *params, *steps]
    if any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        raise ValueError("the native per-pattern pass needs contiguous CPU tensors")
    if images.dtype != torch.float32 or labels.dtype != torch.int64 or pairs.dtype != torch.int32 \
            or any(t.dtype != torch.float32 for t in [prototypes, *params, *steps]):
        raise ValueError("the native per-pattern pass needs float32 images and parameters, int64 labels")
    n = len(labels)
    if images.shape != (n, 28, 28) or len(params) != 12 or len(steps) != 12:
        raise ValueError("the native per-pattern pass needs (n, 28, 28) images, n labels and 12 parameters")
    pair_out, pair_in = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    losses = torch.empty(n, dtype=torch.float32)
    correct = torch.empty(n, dtype=torch.uint8)
    param_ptrs = (ctypes.c_void_p * 12)(*[t.data_ptr() for t in params])
    step_ptrs = (ctypes.c_void_p * 12)(*[t.data_ptr() for t in steps])
    status = lib.lenet5_sdlm_pass(images.data_ptr(), labels.data_ptr(), n, param_ptrs, step_ptrs,
                                  prototypes.data_ptr(), pair_out.data_ptr(), pair_in.data_ptr(), len(pairs), j,
                                  losses.data_ptr(), correct.data_ptr())
    if status != 0:
        raise ValueError("the native per-pattern pass refused its arguments (labels outside 0-9 or a bad C3 table)")
    return losses, correct.bool()
