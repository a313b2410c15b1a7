"""What the machine can do: usable cores, the CPU's instruction-set class, fast bf16 or not.

Every answer here is read from the machine (CPU flags, affinity, the cgroup's quota) and from the
two variables that make PyTorch behave like a lesser CPU, so that a class can be emulated on any
machine and the choice follows: ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's kernels (convolutions,
matrix products), ``ATEN_CPU_CAPABILITY`` caps PyTorch's own vectorised kernels.

The flags say whether bf16 arithmetic is native, not whether it is fast: on a 2-core Intel Xeon
with AVX512-BF16 and no AMX, bf16 convolutions ran at 0.6x fp32's speed, where an AMD EPYC with
the same flags trained keras-lenet 1.5x faster in bf16. Where the flags promise native bf16, `bf16_probe` times one
convolution's forward and backward pass in both precisions, once per machine (the result is
cached), and bf16 is chosen only where it is clearly faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import platformdirs
import torch

from lenet5.errors import ConfigError

# oneDNN's ISA names, lowest to highest (docs: "CPU dispatcher control"); a cap below
# AVX512_CORE_BF16 leaves the CPU's bf16 instructions unused.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL")
log = logging.getLogger(__name__)
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
    """Start this script again as a CPU of class `cls` (EMULATE's caps in its environment, and none of
    another class's), unless it is so already or `cls` is None; returns only then. The caps are read
    when torch loads, so they must be in the environment from the process's start."""
    if not cls:
        return
    others = ({k for env in EMULATE.values() for k in env} | {"DNNL_MAX_CPU_ISA"}) - set(EMULATE[cls])
    if any(os.environ.get(k) != v for k, v in EMULATE[cls].items()) or others & set(os.environ):
        env = {k: v for k, v in os.environ.items() if k not in others}
        os.execve(sys.executable, [sys.executable, *sys.argv], {**env, **EMULATE[cls]})


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


BF16_CLASSES = ("amx", "avx512-bf16")  # the classes whose flags promise native bf16 arithmetic
BF16_MIN_SPEEDUP = 1.2  # bf16 is chosen over fp32 only where the probe runs it at least this much faster
_PROBE_VERSION = 4  # bump when the probe's workload changes: older cached results are then ignored
# (2: the fp32 pass by the native Winograd kernel, as training runs it since; 3: the file's layout, cached_probe's;
# 4: on one thread, in three rounds, kept only when they agree: two threads' times beside a busy core had
# cached bf16 as 1.67x faster where it is 0.46x)
PROBE_ROUNDS = 3  # a probe's forms are timed in this many alternating rounds...
PROBE_MAX_SPREAD = 1.5  # ...and its result is kept only if no form's slowest round is more than this x its fastest


@dataclass(frozen=True)
class Bf16Probe:
    """One convolution's forward and backward pass timed in fp32 and under bf16 autocast."""

    fp32_ms: float
    bf16_ms: float
    cached: bool = False  # read from this machine's cache rather than measured by this process
    spread: float = 1.0  # the slowest round over the fastest, of either precision (PROBE_MAX_SPREAD)

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.bf16_ms

    @property
    def pays(self) -> bool:
        return self.speedup >= BF16_MIN_SPEEDUP

    def short(self) -> str:
        return f"bf16 measured at {self.speedup:.2f}x fp32's speed here"

    def describe(self) -> str:
        verdict = "" if self.pays else f"; bf16 is chosen from {BF16_MIN_SPEEDUP:.1f}x"
        return (f"{self.short()}: {self.bf16_ms:.1f} ms against {self.fp32_ms:.1f} ms for a convolution's forward "
                f"and backward pass{verdict}")

    def as_dict(self) -> dict[str, float | bool | str]:
        return {"fp32_ms": self.fp32_ms, "bf16_ms": self.bf16_ms, "speedup": round(self.speedup, 3),
                "cached": self.cached, "file": str(_probe_cache_file())}


def _probe_cache_file(name: str = "bf16-probe", version: int = _PROBE_VERSION, extra: str | None = None) -> Path:
    """Where this machine's result of the probe `name` is kept: one file per CPU, flag set, usable core
    count, torch version and emulation caps (each changes the answer), and `extra`, what else does
    (the bf16 probe's: whether lenet5's native kernels run its fp32 pass)."""
    if extra is None and name == "bf16-probe":
        extra = _bf16_probe_key()
    caps = [f"{k}={os.environ.get(k, '')}" for k in sorted({k for env in EMULATE.values() for k in env}
                                                           | {"DNNL_MAX_CPU_ISA"})]
    key = "\n".join([cpu_model(), " ".join(sorted(cpu_flags())), str(usable_cores()), torch.__version__, *caps,
                     *([extra] if extra else [])])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(platformdirs.user_cache_dir("lenet5")) / "machine" / f"{name}-v{version}-{digest}.json"


def cached_probe(name: str, version: int, fields: tuple[str, ...],
                 measure: Callable[[], dict[str, float]], key: str = "") -> tuple[dict[str, float], bool]:
    """This machine's timings `fields` by `measure` (in ms, each within 1e-3..1e5), read from the machine's
    cache or measured once and kept there; and whether they were read. A missing, damaged or implausible
    file is measured again. A measurement whose rounds disagree (its "spread", as `time_alternately` gives
    it, over PROBE_MAX_SPREAD: another process was busy) is used by this process and not kept. `key`
    names whatever else changes the answer. Processes asking at once (torchrun's) measure once: the others read."""
    path = _probe_cache_file(name, version, key)
    saved = _read_times(path, fields)
    if saved:
        return saved, True
    with _probe_lock(path):
        saved = _read_times(path, fields)
        if saved:
            return saved, True
        measured = _plainly(measure)
        times = {f: measured.get(f) for f in fields}
        spread = measured.get("spread", 1.0)
        # else returned, not kept: measured again next time
        if _plausible(list(times.values())) and _plausible([spread]) and spread <= PROBE_MAX_SPREAD:
            try:
                from lenet5.fileio import atomic_write_json

                atomic_write_json(path, {"times": times, "spread": spread, "cpu": cpu_model(), "torch": torch.__version__})
            except OSError:
                pass  # a read-only cache: measure again next time
    return {**times, "spread": spread}, False


def time_alternately(runs: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """The best time in ms of each of `runs`, timed in PROBE_ROUNDS alternating rounds (about `seconds` in
    all) on one thread, and under "spread" the largest ratio of one run's slowest round to its fastest.

    One thread, whatever the process's count: a probe compares two forms of the same arithmetic, whose
    ratio one thread shows as two do, and one thread is not held up by another process on the other
    core. On two threads beside a busy core a pass took 30x its quiet time, in either order (a bf16
    probe cached bf16 as 1.67x faster where it runs at 0.46x); on one thread, in the same minutes, each
    form's times agreed within 1.2x and gave the quiet machine's verdict."""
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    with one_thread():
        for _ in range(PROBE_ROUNDS):
            for name, run in runs.items():
                rounds[name].append(best_seconds(run, seconds / (PROBE_ROUNDS * len(runs)), at_least=3) * 1e3)
    times = {name: round(min(ms), 4) for name, ms in rounds.items()}
    return {**times, "spread": round(max(max(ms) / min(ms) for ms in rounds.values()), 3)}


def _plainly(measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """measure() as plain eager PyTorch, whatever the caller runs under (a probe is asked for where it is
    first needed): without its dispatch modes (under fake tensors a probe would time nothing and cache
    that) or autocast. (On a thread of its own instead, a probe's parallel kernels ran 2-3x slower than
    on the caller's, with 2 threads: measured for tanh.)"""
    with contextlib.ExitStack() as plain:
        try:
            from torch.utils._python_dispatch import _disable_current_modes
        except ImportError:
            pass
        else:
            plain.enter_context(_disable_current_modes())
        plain.enter_context(torch.autocast("cpu", enabled=False))
        return measure()


def _plausible(times: list) -> bool:
    """Times in ms that a probe can have measured: not booleans, strings, NaN, infinities or absurd."""
    return all(type(t) in (int, float) and math.isfinite(t) and 1e-3 <= t <= 1e5 for t in times)


def _read_times(path: Path, fields: tuple[str, ...]) -> dict[str, float] | None:
    try:
        if path.stat().st_size > 4096:
            return None
        saved = json.loads(path.read_text())["times"]
        times = [saved[f] for f in fields]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return {f: float(t) for f, t in zip(fields, times)} if _plausible(times) else None


def best_seconds(run: Callable[[], object], seconds: float, at_least: int = 1) -> float:
    """The fastest of repeated calls of `run` over about `seconds` (at least `at_least` of them),
    after one warm-up call (thread pool, oneDNN's kernels for the shape)."""
    run()
    best, deadline, runs = math.inf, time.perf_counter() + seconds, 0
    while runs < at_least or time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        best, runs = min(best, time.perf_counter() - started), runs + 1
    return best


def _conv_pass(bf16: bool) -> Callable[[], None]:
    """One forward and backward pass of keras-lenet's second convolution (20 to 50 channels, 5x5, 14x14
    maps, 3/4 of that network's arithmetic) at batch 32, channels_last, as training runs it: in fp32 by
    lenet5's native Winograd kernel where it is available, in bf16 by oneDNN."""
    from lenet5 import native

    generator = torch.Generator().manual_seed(0)
    # the layer's initialisation draws from the global generator: forked, so that a run's seeded
    # stream is the same whether or not this machine's probe was cached
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        x = torch.randn(32, 20, 14, 14, generator=generator).to(memory_format=torch.channels_last).requires_grad_()
        conv = torch.nn.Conv2d(20, 50, 5, padding=2).to(memory_format=torch.channels_last)

    def one() -> None:
        with torch.inference_mode(False), torch.enable_grad():  # also when asked from under no_grad
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = native.conv5x5(x, conv)
            y.float().square().mean().backward()

    return one


def measure_bf16(seconds: float = 0.3) -> Bf16Probe:
    """Time the probe's pass in both precisions, alternating, about `seconds` in all (`time_alternately`)."""
    times = time_alternately({"fp32_ms": _conv_pass(bf16=False), "bf16_ms": _conv_pass(bf16=True)}, seconds)
    return Bf16Probe(round(times["fp32_ms"], 3), round(times["bf16_ms"], 3), spread=times["spread"])


@contextlib.contextmanager
def one_thread():
    """torch's thread count set to 1 for the duration, then put back (`time_alternately`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bf16_probe_key() -> str:
    """The bf16 probe times fp32 by the native kernels where they build, else by oneDNN: each its own result."""
    from lenet5 import native

    return f"native kernels: {native.in_use()}"


@lru_cache(maxsize=1)
def bf16_probe() -> Bf16Probe:
    """This machine's bf16 probe: read from the cache, or measured once (about 0.3 s) and cached. Only
    asked where the flags promise native bf16; emulated bf16 is known to be slow without it."""
    def measure() -> dict[str, float]:
        probe = measure_bf16()
        return {"fp32_ms": probe.fp32_ms, "bf16_ms": probe.bf16_ms, "spread": probe.spread}

    times, cached = cached_probe("bf16-probe", _PROBE_VERSION, ("fp32_ms", "bf16_ms"), measure, _bf16_probe_key())
    return Bf16Probe(times["fp32_ms"], times["bf16_ms"], cached=cached, spread=times.get("spread", 1.0))


@contextlib.contextmanager
def _probe_lock(path: Path, patience: float = 30.0):
    """An exclusive lock beside the probe's cache file, held while measuring; none where it cannot be
    had (no fcntl, a read-only cache) or after waiting `patience` seconds for a holder that is stuck."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a")
    except (ImportError, OSError):
        handle = None
    if handle is None:  # yielded outside the except: an error while measuring is not chained to this one
        yield
        return
    with handle:
        started = time.monotonic()
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > patience:
                    break
                if waited > 1 and not said:  # a probe takes under a second: say why the start waits
                    log.warning("waiting for another lenet5 process that is measuring this machine (%s; at most "
                                "%.0f s)", path.with_suffix(".lock"), patience)
                    said = True
                time.sleep(0.05)
            except OSError:  # a file system without locks
                break
        yield


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 or bf16
    reason: str
    slow: bool = False  # bf16 asked for where it is emulated, or measured slower than fp32


def choose_precision(requested: str, device: torch.device, bf16_pays: bool = True) -> PrecisionChoice:
    """Resolve --precision: `auto` takes bf16 only where it is fast on `device`, and only for a model
    whose layers are wide enough for it to pay (`bf16_pays`, a model's class attribute).

    On a CPU that means native bf16 arithmetic (AMX tiles or AVX512-BF16 dot products) usable by
    both PyTorch and oneDNN, measured faster than fp32 on this machine (`bf16_probe`); elsewhere
    bf16 is emulated, ~300x slower than fp32 on an AVX2-only EPYC (measured). On a GPU it means
    bf16 support (Ampere and later).
    """
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        slower = not fast
        why = f"{torch.cuda.get_device_name(device)} {'has' if fast else 'lacks'} bf16 support"
    elif device.type == "cpu":
        klass = cpu_class()
        native = f"CPU class {klass}: native bf16 ({'AMX' if klass == 'amx' else 'AVX512-BF16'})"
        if klass in BF16_CLASSES and (requested == "bf16" or requested == "auto" and bf16_pays):
            probe = bf16_probe()
            fast, slower = probe.pays, probe.speedup < 1
            why = f"{native}, {probe.describe()}"
        elif klass in BF16_CLASSES:  # fp32 either way: no need to time bf16
            fast, slower, why = True, False, native
        else:
            fast, slower = False, True
            why = f"CPU class {klass}: no native bf16 (AVX512-BF16 or AMX), bf16 would be emulated and slow"
    else:
        fast, slower, why = False, True, f"{device.type}: bf16 autocast not measured here"
    if requested == "auto":
        if fast and not bf16_pays:
            return PrecisionChoice("fp32", f"auto: {why}, but this model runs faster in fp32")
        return PrecisionChoice("bf16" if fast else "fp32", f"auto: {why}")
    if requested == "bf16" and slower:
        return PrecisionChoice("bf16", f"asked for, and slow here: {why}", slow=True)
    return PrecisionChoice(requested, "asked for")


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """The machine's matrix-product rate in FLOP/s, in this process with its threads: the best of
    repeated size^3 products over about `seconds` (the compute limit every share of peak refers to)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size ** 3 / best_seconds(lambda: a @ b, seconds)


def probe_used() -> dict | None:
    """The bf16 probe's figures if this process asked for them (for run.json), else None."""
    info = getattr(bf16_probe, "cache_info", None)
    return bf16_probe().as_dict() if info and info().currsize else None


def hardware_class(device: torch.device, probe: bool = True) -> str:
    """`gpu`, or the CPU's class: what recipes are chosen by. A CPU whose flags promise native bf16
    but whose bf16 the probe measured no faster than fp32 counts as `avx512`, the same CPU without it;
    `probe=False` gives the class by the flags alone, without timing anything."""
    if device.type == "cuda":
        return "gpu"
    klass = cpu_class()
    return "avx512" if probe and klass in BF16_CLASSES and not bf16_probe().pays else klass


def class_note(device: torch.device) -> str:
    """Why `hardware_class` differs from the CPU's flags, when it does ('' otherwise)."""
    if device.type != "cpu" or cpu_class() not in BF16_CLASSES or bf16_probe().pays:
        return ""
    return f" (CPU class {cpu_class()}, but {bf16_probe().short()})"
