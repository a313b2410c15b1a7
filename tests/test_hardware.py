"""The machine's class, usable cores and the precision choice, on this CPU and on emulated lesser ones."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from lenet5.hardware import CPU_CLASSES, EMULATE, choose_precision, cpu_class, cpu_flags, usable_cores

ORDER = {name: rank for rank, name in enumerate(reversed(CPU_CLASSES))}  # baseline 0 ... amx 4


def native_class() -> str:
    flags = cpu_flags()
    if "avx512f" in flags and "avx512bw" in flags:
        return "amx" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if "avx2" in flags else "baseline"


def in_subprocess(env: dict[str, str]) -> dict:
    code = ("import json, torch; from lenet5.hardware import cpu_class, choose_precision as c; "
            "d = torch.device('cpu'); "
            "from lenet5.hardware import BF16_CLASSES, bf16_probe; "
            "pays = bf16_probe().pays if cpu_class() in BF16_CLASSES else None; "
            "print(json.dumps({'class': cpu_class(), 'auto': c('auto', d).precision, 'reason': c('auto', d).reason, "
            "'bf16_slow': c('bf16', d).slow, 'pays': pays}))")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(not cpu_flags(), reason="reads /proc/cpuinfo (Linux)")
def test_class_of_this_cpu_follows_its_flags():
    assert cpu_class() == native_class()


# (the caps that emulate a lesser CPU, the class they cap to)
EMULATED = [(env, name) for name, env in EMULATE.items()] + [({"ATEN_CPU_CAPABILITY": "default"}, "baseline")]


@pytest.mark.skipif(not cpu_flags(), reason="reads /proc/cpuinfo (Linux)")
@pytest.mark.parametrize("env, cap", EMULATED, ids=[c for _, c in EMULATED])
def test_emulated_classes_choose_their_precision(env, cap):
    """The emulation caps give the lesser class (never more than the CPU has), and auto picks bf16
    exactly where bf16 is native and measured faster than fp32; asking for bf16 elsewhere is
    flagged as slow. Without native bf16 the probe is never run."""
    expected = min(cap, native_class(), key=ORDER.__getitem__)
    seen = in_subprocess(env)
    assert seen["class"] == expected
    native_bf16 = expected in ("amx", "avx512-bf16")
    fast = native_bf16 and seen["pays"]
    assert seen["auto"] == ("bf16" if fast else "fp32")
    assert seen["bf16_slow"] is (not fast)
    assert expected in seen["reason"]
    assert ("measured at" in seen["reason"]) is native_bf16


def test_explicit_precisions_are_kept():
    cpu = torch.device("cpu")
    assert choose_precision("fp32", cpu).precision == "fp32"
    assert choose_precision("bf16", cpu).precision == "bf16"
    assert choose_precision("auto", cpu).precision in ("fp32", "bf16")


def test_usable_cores_follow_affinity():
    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
               "from lenet5.hardware import usable_cores; print(usable_cores())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == "1"


def test_auto_keeps_fp32_for_a_model_whose_layers_are_too_narrow_for_bf16():
    from lenet5.models import model_class

    cpu = torch.device("cpu")
    assert model_class("keras-lenet").bf16_pays and not model_class("lenet5").bf16_pays
    assert not model_class("lenet5-1998").bf16_pays
    narrow = choose_precision("auto", cpu, bf16_pays=False)
    assert narrow.precision == "fp32"
    if choose_precision("auto", cpu).precision == "bf16":
        assert "runs faster in fp32" in narrow.reason
    assert choose_precision("bf16", cpu, bf16_pays=False).precision == "bf16"  # asked for: kept


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This process as a CPU whose flags promise AVX512-BF16, with a probe result the test sets."""
    from lenet5 import hardware

    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx512-bf16")

    def measured(fp32_ms: float, bf16_ms: float) -> None:
        monkeypatch.setattr(hardware, "bf16_probe", lambda: hardware.Bf16Probe(fp32_ms, bf16_ms))
    return measured


def test_native_bf16_measured_slower_than_fp32_is_not_chosen(bf16_cpu):
    """A CPU with AVX512-BF16 whose bf16 runs at half fp32's speed (a 2-core Intel Xeon, measured)
    trains in fp32 under auto, warns for --precision bf16, and gets the fp32 recipes."""
    from lenet5.hardware import class_note, hardware_class
    from lenet5.train.config import RECIPES

    cpu = torch.device("cpu")
    bf16_cpu(10.0, 20.0)
    auto = choose_precision("auto", cpu)
    assert auto.precision == "fp32" and "bf16 measured at 0.50x fp32's speed" in auto.reason
    assert choose_precision("bf16", cpu).slow
    assert hardware_class(cpu) == "avx512" and "CPU class avx512-bf16, but bf16 measured at 0.50x" in class_note(cpu)
    fast = RECIPES["fast"].options_for(hardware_class(cpu))
    assert fast["model"] == "slim-lenet-valid" and fast.get("precision", "auto") != "bf16"
    bf16_cpu(15.0, 10.0)  # 1.5x: an AMD EPYC with the same flags, measured
    assert choose_precision("auto", cpu).precision == "bf16" and not choose_precision("bf16", cpu).slow
    assert hardware_class(cpu) == "avx512-bf16" and class_note(cpu) == ""
    assert RECIPES["fast"].options_for("avx512-bf16") == {**RECIPES["fast"].options_for("avx512"), "precision": "fp32"}
    bf16_cpu(11.0, 10.0)  # 1.1x: too little to be worth bf16's rounding, but asked for, not slow either
    auto = choose_precision("auto", cpu)
    assert auto.precision == "fp32" and "bf16 is chosen from 1.2x" in auto.reason
    assert not choose_precision("bf16", cpu).slow


def test_no_probe_where_the_answer_is_fp32_anyway(bf16_cpu, monkeypatch):
    from lenet5 import hardware

    def no_probe():
        raise AssertionError("probed")
    monkeypatch.setattr(hardware, "bf16_probe", no_probe)
    cpu = torch.device("cpu")
    assert choose_precision("auto", cpu, bf16_pays=False).precision == "fp32"  # lenet5, lenet5-1998
    assert choose_precision("fp32", cpu).precision == "fp32"
    with pytest.raises(AssertionError, match="probed"):
        choose_precision("auto", cpu)


def test_the_bf16_probe_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    from lenet5 import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "measure_bf16", lambda: calls.append(1) or hardware.Bf16Probe(12.0, 6.0))
    hardware.bf16_probe.cache_clear()
    try:
        first = hardware.bf16_probe()
        hardware.bf16_probe.cache_clear()  # a new process
        again = hardware.bf16_probe()
        assert calls == [1] and not first.cached and again.cached and again.speedup == 2.0
        [saved] = (tmp_path / "lenet5" / "machine").glob("bf16-probe-v*.json")
        assert json.loads(saved.read_text())["times"]["bf16_ms"] == 6.0
        assert hardware.probe_used()["speedup"] == 2.0  # for run.json
        for damaged in ("{not json", '{"times": {"fp32_ms": Infinity, "bf16_ms": 1}}', '{"times": {"fp32_ms": 1}}',
                        '{"times": {"fp32_ms": true, "bf16_ms": 1}}', '{"times": {"fp32_ms": "3", "bf16_ms": 1}}',
                        '{"times": {"fp32_ms": 0, "bf16_ms": 1}}', "[" * 100_000, '{"times": [1, 2]}',
                        '{"times": {"fp32_ms": 1e308, "bf16_ms": 1}}', "[]", '{"fp32_ms": 1, "bf16_ms": 1}'):
            saved.write_text(damaged)  # measured again, not a traceback nor a silly choice
            hardware.bf16_probe.cache_clear()
            calls.clear()
            assert not hardware.bf16_probe().cached and calls == [1], damaged[:40]
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # another emulated class: its own result
        assert hardware._probe_cache_file() != saved
    finally:
        hardware.bf16_probe.cache_clear()


def test_a_probe_whose_rounds_disagree_is_used_and_not_kept(monkeypatch, tmp_path):
    """Beside a busy core a probe's rounds scatter (two threads' passes took 30x their quiet time, in
    either order, and bf16 was cached as 1.67x faster where it runs at 0.46x): such a result serves the
    process that measured it, and the next process measures again."""
    from lenet5 import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    results = iter([{"a_ms": 5.0, "b_ms": 2.0, "spread": 3.1}, {"a_ms": 4.0, "b_ms": 8.0, "spread": 1.1}])
    calls = []

    def measure():
        calls.append(1)
        return next(results)

    times, cached = hardware.cached_probe("test-probe", 1, ("a_ms", "b_ms"), measure)
    assert (times["a_ms"], times["b_ms"], cached) == (5.0, 2.0, False)
    assert not list(tmp_path.rglob("test-probe-*.json"))
    times, cached = hardware.cached_probe("test-probe", 1, ("a_ms", "b_ms"), measure)
    assert (times["a_ms"], times["b_ms"], cached) == (4.0, 8.0, False) and len(calls) == 2
    times, cached = hardware.cached_probe("test-probe", 1, ("a_ms", "b_ms"), measure)
    assert (times["a_ms"], times["b_ms"], cached) == (4.0, 8.0, True) and len(calls) == 2


def test_probes_time_on_one_thread_and_report_their_spread(monkeypatch):
    """One thread is not held up by another process on the other core; the thread count is put back."""
    from lenet5 import hardware

    seen = []
    monkeypatch.setattr(hardware, "best_seconds", lambda run, seconds, at_least=1: seen.append(torch.get_num_threads())
                        or {"fast": 0.001, "slow": 0.002}[run()])
    threads = torch.get_num_threads()
    times = hardware.time_alternately({"a": lambda: "fast", "b": lambda: "slow"}, 0.01)
    assert times == {"a": 1.0, "b": 2.0, "spread": 1.0}
    assert seen == [1] * 2 * hardware.PROBE_ROUNDS and torch.get_num_threads() == threads


def test_the_bf16_probe_keeps_apart_results_with_and_without_the_native_kernels(monkeypatch):
    """Its fp32 pass runs by lenet5's native kernels where they build, else by oneDNN: two answers."""
    from lenet5 import hardware, native

    with_kernels = hardware._probe_cache_file()
    with native.disabled():
        assert hardware._probe_cache_file() != with_kernels


@pytest.mark.skipif(cpu_class() not in ("amx", "avx512-bf16"), reason="times native bf16 (emulated, it takes seconds)")
def test_the_bf16_probe_times_both_precisions():
    from lenet5.hardware import measure_bf16

    threads = torch.get_num_threads()
    with torch.no_grad():  # as from an evaluation: the probe needs gradients all the same
        probe = measure_bf16(0.05)
    assert 0 < probe.fp32_ms < 1000 and 0 < probe.bf16_ms < 1000
    assert torch.get_num_threads() == threads  # measured on one thread, then given back


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks")
def test_the_probe_lock_serialises_and_never_waits_forever(tmp_path, caplog):
    """torchrun's processes on one machine take turns to measure; a holder that is stuck (stopped
    with Ctrl-Z, say) delays the others by the lock's patience, not for ever."""
    import fcntl
    import time

    from lenet5.hardware import _probe_lock

    path = tmp_path / "machine" / "bf16-probe.json"
    with _probe_lock(path):
        with open(path.with_suffix(".lock"), "a") as other:  # another process's attempt while it is held
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path.with_suffix(".lock"), "a") as stuck:
        fcntl.flock(stuck, fcntl.LOCK_EX)
        started = time.monotonic()
        with _probe_lock(path, patience=0.3):
            waited = time.monotonic() - started
        assert 0.25 < waited < 5
        with caplog.at_level(logging.WARNING, logger="lenet5.hardware"):
            with _probe_lock(path, patience=1.3):  # a wait of over a second is said, once
                pass
    assert caplog.text.count("waiting for another lenet5 process that is measuring this machine") == 1


def test_the_probe_leaves_the_global_random_stream_alone():
    """The probe's layer is initialised on a forked generator: a seeded run draws the same numbers
    whether this machine's probe result was cached or measured on the way."""
    from lenet5 import hardware

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    hardware._conv_pass(bf16=False)()  # fp32 only: emulated bf16 would be slow on a CI machine
    assert torch.equal(torch.rand(4), expected)


def test_emulating_a_class_drops_another_classs_caps(tmp_path):
    """benchmarks/suite.py --cpu-class avx512 started under the avx2 caps ran avx2 kernels beside an
    AVX-512 matrix product, and was labelled avx2: the class asked for is the class run."""
    script = tmp_path / "which.py"
    script.write_text("import os, sys\nfrom lenet5.hardware import EMULATE, restart_emulating\n"
                      "restart_emulating(sys.argv[1])\n"
                      "print(sorted((k, os.environ[k]) for k in {k for e in EMULATE.values() for k in e} if k in os.environ))\n")
    env = {**os.environ, **EMULATE["avx2"]}
    out = subprocess.run([sys.executable, str(script), "avx512"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(EMULATE["avx512"].items()))


def test_the_suite_refuses_a_part_it_does_not_have(tmp_path):
    """A misspelt part ran nothing and wrote a JSON of the machine alone, with exit status 0."""
    suite = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "suite.py")
    out = subprocess.run([sys.executable, suite, "--parts", "trainig,contention", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no part 'trainig'" in out.stderr and "training" in out.stderr
    assert not (tmp_path / "x.json").exists()
