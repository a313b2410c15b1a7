"""Compile the native kernels with the machine's C++ compiler, once, and cache the library.

The library is built for this CPU (`-march=native`: AVX-512 or AVX2 as the machine has), so the
cache key is the hash of the source, the torch version (whose OpenMP runtime the kernels share),
the compiler (its command and version) and its flags, and the CPU's feature flags; a new torch,
compiler or machine gets a fresh build. Builds go to  platformdirs.user_cache_dir("lenet5")/native/<key>/,
each compiled in a directory of its own, flushed to disk, renamed into place and then given its
checksum, so processes starting together (torchrun ranks) never load a half-written file, and a
library cut short by a crash is built again rather than loaded.

No ninja, no pybind11 and no ATen headers: each library is a plain C ABI that lenet5.native calls
through ctypes with the memory of tensors it allocated, so a cold build takes seconds. The kernels'
library is two translation units (conv_tanh_pool.cpp and winograd.cpp, sharing kernels.h), compiled
at once, one compiler per unit, and linked: on 2 cores of an Intel Xeon that takes as long as the
larger unit, where the single source of before took 5 s. (Registered as torch operators, the first
kernels took eight: parsing ATen's headers was most of it, and a user's first run waited for it.)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from platformdirs import user_cache_dir

SOURCE = Path(__file__).with_name("conv_tanh_pool.cpp")
# The kernels' library: its translation units, compiled in parallel, and the header they include.
UNITS = {SOURCE: (SOURCE, SOURCE.with_name("winograd.cpp"))}
HEADERS = (SOURCE.with_name("kernels.h"),)
log = logging.getLogger("lenet5.native")


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why."""


def compiler() -> list[str]:
    """The C++ compiler's command: $CXX as build tools honour it (arguments included, as in
    CXX="ccache g++"), else c++ or g++ on PATH."""
    words = shlex.split(os.environ.get("CXX", ""))
    if not words:
        found = shutil.which("c++") or shutil.which("g++")
        words = [found] if found else []
    if not words or not shutil.which(words[0]):
        given = os.environ.get("CXX")
        raise BuildError(f"no C++ compiler found ({'CXX=' + given if given else 'no c++ or g++ on PATH'})")
    return words


@functools.lru_cache(maxsize=4)
def _identity(cxx: tuple[str, ...]) -> bytes:
    """The compiler's command and the first line of its --version, for the cache key: a compiler
    upgraded in place is a new build."""
    try:
        done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
        version = done.stdout.splitlines()[0] if done.stdout else ""
    except (OSError, subprocess.SubprocessError):
        version = ""
    return "\0".join([*cxx, version]).encode()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def openmp_flags(cxx: list[str]) -> list[str]:
    """`-fopenmp` where the kernels then run on torch's own OpenMP threads, else nothing.

    Built without OpenMP, the kernels' parallel loops are plain loops and run on one thread
    whatever torch's thread count (until this flag, they did). With
    GCC's -fopenmp the library needs libgomp.so.1, and the loader binds that to the libgomp torch
    has already loaded (the same soname; torch's rpath finds it too): one runtime, one thread
    pool, and torch.set_num_threads counts for the kernels as for ATen's own. So only where torch
    runs on a libgomp.so.1 (Linux CPU builds; a wheel's renamed copy would not be the one the
    loader binds to). The compiler must be GCC too (clang's -fopenmp brings LLVM's runtime as a
    second pool): `library` asks it before building, and builds without the flag otherwise.
    """
    if sys.platform != "linux" or not torch._C.has_openmp:
        return []
    try:
        with open("/proc/self/maps") as maps:
            if not any(line.rstrip().endswith("/libgomp.so.1") for line in maps):
                return []
    except OSError:
        return []
    return ["-fopenmp"]


def _is_gcc(cxx: list[str]) -> bool:
    """Whether `cxx` is GCC itself, asked from its predefined macros (a wrapper's name says nothing)."""
    try:
        done = subprocess.run([*cxx, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    macros = done.stdout
    return done.returncode == 0 and "__GNUC__" in macros and "__clang__" not in macros and "__INTEL" not in macros


def _flags(march: str, openmp: list[str] = ()) -> list[str]:
    return ["-O3", f"-march={march}", "-fno-math-errno", "-std=c++17", "-fPIC", "-w", *openmp]


def _complaint(errors: str) -> str:
    """The line of a compiler's output that says what went wrong: its first error (": error:", "fatal
    error"), else the linker's own line ("ld: cannot find -lgomp", not collect2's summary after it),
    else its last line (GCC ends an error with the source line and a caret, which name nothing)."""
    lines = [line.strip() for line in errors.strip().splitlines() if line.strip()]
    own = [line for line in lines if not line.startswith("collect2")]
    for wanted in (lambda line: ": error:" in line or "fatal error" in line, lambda line: "ld:" in line):
        found = next((line for line in own if wanted(line)), None)
        if found:
            return found
    return lines[-1] if lines else "no output"


def _build(cxx: list[str], march: str, units: tuple[Path, ...], output: Path,
           openmp: list[str] = ()) -> tuple[int, str]:
    """Compile every unit to an object file, all at once (one compiler process each), then link them
    into the shared library `output`; (exit status, error output) of the first step that failed, or (0, "")."""
    objects = [output.with_name(f"{output.name}.{unit.stem}.o") for unit in units]
    compilers: list[subprocess.Popen] = []
    try:
        for unit, obj in zip(units, objects):
            compilers.append(subprocess.Popen([*cxx, *_flags(march, openmp), "-c", str(unit), "-o", str(obj)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        failed = (0, "")
        for process in compilers:
            _, err = process.communicate()
            if process.returncode != 0 and not failed[0]:
                failed = (process.returncode, err)
        if failed[0]:
            return failed
        done = subprocess.run([*cxx, "-shared", *openmp, *map(str, objects), "-o", str(output)],
                              capture_output=True, text=True)
        return done.returncode, done.stderr
    finally:
        for process in compilers:  # none left running (one could not start, or Ctrl-C) before the cleanup
            if process.poll() is None:
                process.kill()
                process.wait()
        for obj in objects:
            obj.unlink(missing_ok=True)


def library(march: str = "native", source: Path = SOURCE, parallel: bool = True) -> Path:
    """Path of the compiled library of `source` for this CPU (or `march`), building it on first use;
    `parallel=False` for a source with no parallel loops (built without OpenMP)."""
    if sys.platform == "win32":
        raise BuildError("native kernels are built on Linux and macOS only")
    cxx = compiler()
    openmp = openmp_flags(cxx) if parallel else []
    units = UNITS.get(source, (source,))
    headers = HEADERS if source in UNITS else ()
    key_parts = [*(path.read_bytes() for path in (*units, *headers)), torch.__version__.encode(), _identity(tuple(cxx)),
                 march.encode(), _cpu_flags().encode(), " ".join(_flags(march, openmp)).encode()]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    name = "lenet5_native.so" if source == SOURCE else f"lenet5_{source.stem}.so"
    target = Path(user_cache_dir("lenet5")) / "native" / key / name
    if _intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(target.parent)
    command = " ".join(cxx)
    # A directory of this build's own: objects and the library before its rename cannot collide with
    # another build's (threads, or containers whose process ids repeat, sharing one cache).
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        partial = work / name
        if openmp and not _is_gcc(cxx):
            log.warning("%s is not GCC: the native kernels are built without OpenMP and run on one thread", command)
            openmp = []
        status, errors = _build(cxx, march, units, partial, openmp)
        if status > 0 and openmp and _about_openmp(errors):
            # the compiler or linker refused the flag (e.g. no libgomp.so to link): that is this machine's
            # answer, and one thread beats no kernels. A compiler killed by a signal (status < 0, e.g. out of
            # memory) says nothing about the flag: that is an error, and the next process builds again; so
            # does any other complaint (a bad -march): built again without the flag it would fail again.
            log.warning("building the native kernels with -fopenmp failed (%s); building them for one thread",
                        _complaint(errors))
            status, errors = _build(cxx, march, units, partial)
        if status != 0:
            raise BuildError(f"{command} failed (exit {status}): {_complaint(errors)}")
        _publish(partial, target)
    except OSError as e:
        raise BuildError(f"{command} could not run or its library could not be stored: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _about_openmp(errors: str) -> bool:
    """Whether a failed build's messages are about OpenMP (its flag, header or runtime library)."""
    return any(word in errors.lower() for word in ("openmp", "omp", "gomp"))


def _record(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether `library` is a whole build: its checksum, written after it, matches. A library cut short
    (a crash or power loss after the rename) can crash the process that loads it (SIGBUS), so it is
    built again instead of loaded."""
    try:
        return _record(library).read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    except OSError:
        return False


def _publish(partial: Path, target: Path) -> None:
    """Move a finished build into place: on disk before the rename, its checksum after it."""
    from lenet5.fileio import atomic_write_bytes

    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    os.replace(partial, target)
    atomic_write_bytes(_record(target), (digest + "\n").encode())


def _remove_abandoned_builds(folder: Path, age: float = 3600.0) -> None:
    """Build directories left by processes killed while compiling (torchrun stops ranks with SIGTERM),
    once older than `age` seconds: no build takes that long."""
    for stale in folder.glob(".build-*"):
        try:
            if time.time() - stale.stat().st_mtime > age:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
