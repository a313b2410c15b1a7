"""What the machine can do: usable cores, the CPU's instruction-set class, fast bf16 or not.

Every answer here is read from the machine (CPU flags, affinity, the cgroup's quota) and from the
two variables that make PyTorch behave like a lesser CPU, so that a class can be emulated on any
machine and the choice follows: ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's kernels (convolutions,
matrix products), ``ATEN_CPU_CAPABILITY`` caps PyTorch's own vectorised kernels.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from lenet5.errors import ConfigError

# oneDNN's ISA names, lowest to highest (docs: "CPU dispatcher control"); a cap below
# AVX512_CORE_BF16 leaves the CPU's bf16 instructions unused.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL")
CPU_CLASSES = ("amx", "avx512-bf16", "avx512", "avx2", "baseline")
# The variables that make this process behave like a CPU of a lesser class (set before torch is
# imported, e.g. in a child process's environment); MKL's cap also lowers the matmul peak.
EMULATE = {
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "LENET5_NATIVE_MARCH": "haswell"},  # lenet5's own native kernels, built for AVX2 only
}


def restart_emulating(cls: str | None) -> None:
    """Start this script again as a CPU of class `cls` (EMULATE's caps in its environment), unless
    they are set already or `cls` is None; returns only then. The caps are read when torch loads,
    so they must be in the environment from the process's start."""
    if cls and any(os.environ.get(k) != v for k, v in EMULATE[cls].items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **EMULATE[cls]})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _onednn_cap() -> int:
    """Index of ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) in _ONEDNN_ISAS; top if unset."""
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return _ONEDNN_ISAS.index(value) if value in _ONEDNN_ISAS else len(_ONEDNN_ISAS) - 1


def cpu_class() -> str:
    """The CPU's class for choosing precision and recipes: amx, avx512-bf16, avx512, avx2 or baseline.

    The class is what *both* PyTorch's kernels and oneDNN's may use on this CPU, after the
    emulation caps, because a bf16 or AVX-512 training step runs through both.
    """
    flags = cpu_flags()
    aten = torch.backends.cpu.get_cpu_capability().upper()  # DEFAULT, AVX2, AVX512 (honours ATEN_CPU_CAPABILITY)
    onednn = _onednn_cap()
    if not flags:  # not Linux: trust PyTorch's own probes
        flags = frozenset(name for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"),
                                                    ("amx_bf16", "_is_amx_tile_supported"))
                          if getattr(torch.cpu, probe, lambda: False)())
    if aten == "AVX512" and onednn >= _ONEDNN_ISAS.index("AVX512_CORE"):
        if "amx_bf16" in flags and onednn >= _ONEDNN_ISAS.index("AVX512_CORE_AMX"):
            return "amx"
        if "avx512_bf16" in flags and onednn >= _ONEDNN_ISAS.index("AVX512_CORE_BF16"):
            return "avx512-bf16"
        return "avx512"
    if aten in ("AVX2", "AVX512") and onednn >= _ONEDNN_ISAS.index("AVX2"):
        return "avx2"
    return "baseline"


def usable_cores() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup CPU quota.

    os.cpu_count() is the host's count; a container limited to 2 CPUs of a 64-core host that
    starts 64 threads spends its time descheduled at barriers.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else max(1, cores)


THREADS_PER_CORE = 4  # the most threads an option may ask per usable core: more only waits at barriers


def thread_limit_problem(threads: int, option: str = "--threads") -> str | None:
    """Why `threads` is no thread count for this machine (None when it is one; 0 means the default).

    Thousands of OpenMP threads on a few cores do not train faster; they hang or crash the process
    (--threads 100000 ended in a segmentation fault on a 2-core machine).
    """
    most = THREADS_PER_CORE * usable_cores()
    if threads < 0:
        return f"{option} must not be negative, got {threads}"
    if threads > most:
        return (f"{option} must be at most {most} ({THREADS_PER_CORE} per core of the {usable_cores()} this process "
                f"may use), got {threads}")
    return None


def check_threads(threads: int, advice: str = "") -> None:
    """ConfigError (with `advice` after the reason) unless `threads` is a thread count for this machine."""
    problem = thread_limit_problem(threads)
    if problem:
        raise ConfigError(problem + advice)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 or bf16
    reason: str
    slow: bool = False  # bf16 asked for where it is emulated


def choose_precision(requested: str, device: torch.device, bf16_pays: bool = True) -> PrecisionChoice:
    """Resolve --precision: `auto` takes bf16 only where it is fast on `device`, and only for a model
    whose layers are wide enough for it to pay (`bf16_pays`, a model's class attribute).

    On a CPU that means native bf16 arithmetic (AMX tiles or AVX512-BF16 dot products) usable by
    both PyTorch and oneDNN; elsewhere bf16 is emulated, ~300x slower than fp32 on an AVX2-only
    EPYC (measured). On a GPU it means bf16 support (Ampere and later).
    """
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        why = f"{torch.cuda.get_device_name(device)} {'has' if fast else 'lacks'} bf16 support"
    elif device.type == "cpu":
        klass = cpu_class()
        fast = klass in ("amx", "avx512-bf16")
        why = (f"CPU class {klass}: native bf16 ({'AMX' if klass == 'amx' else 'AVX512-BF16'})" if fast
               else f"CPU class {klass}: no native bf16 (AVX512-BF16 or AMX), bf16 would be emulated and slow")
    else:
        fast, why = False, f"{device.type}: bf16 autocast not measured here"
    if requested == "auto":
        if fast and not bf16_pays:
            return PrecisionChoice("fp32", f"auto: {why}, but this model runs faster in fp32")
        return PrecisionChoice("bf16" if fast else "fp32", f"auto: {why}")
    if requested == "bf16" and not fast:
        return PrecisionChoice("bf16", f"asked for, and slow here: {why}", slow=True)
    return PrecisionChoice(requested, "asked for")


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """The machine's matrix-product rate in FLOP/s, in this process with its threads: the best of
    repeated size^3 products over about `seconds` (the compute limit every share of peak refers to)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool, oneDNN/MKL set-up
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == math.inf:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def hardware_class(device: torch.device) -> str:
    """`gpu`, or the CPU's class: what recipes are chosen by."""
    return "gpu" if device.type == "cuda" else cpu_class()
