"""The machine's class, usable cores and the precision choice, on this CPU and on emulated lesser ones."""

from __future__ import annotations

import json
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
            "print(json.dumps({'class': cpu_class(), 'auto': c('auto', d).precision, 'reason': c('auto', d).reason, "
            "'bf16_slow': c('bf16', d).slow}))")
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
    exactly where bf16 is native; asking for bf16 elsewhere is flagged as slow."""
    expected = min(cap, native_class(), key=ORDER.__getitem__)
    seen = in_subprocess(env)
    assert seen["class"] == expected
    native_bf16 = expected in ("amx", "avx512-bf16")
    assert seen["auto"] == ("bf16" if native_bf16 else "fp32")
    assert seen["bf16_slow"] is (not native_bf16)
    assert expected in seen["reason"]


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
