"""tanh's two forms on this CPU: the probe's own figures (`lenet5.models.layers._measure_tanh`), one
forward and backward through autograd per size (what sets `layers.SIGMOID_TANH_MIN_SIZE`), and a
training pass (forward, loss, backward) of the networks whose tanh runs through `layers.tanh`, with
either form forced for the large tensors, alternating round by round: lenet5 on PyTorch's ops
(`LENET5_NATIVE=0`, as without a compiler) and lenet5-1998 (mini-batch; per-pattern training has its
own tanh in C++).

    python docs/scripts/tanh_forms.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python docs/scripts/tanh_forms.py
    MKL_ENABLE_INSTRUCTIONS=SSE4_2 python docs/scripts/tanh_forms.py   # MKL on a slower path, as on the EPYC
"""

from __future__ import annotations

import math
import os
import statistics
import time

os.environ.setdefault("LENET5_NATIVE", "0")  # lenet5's convolutions' tanh through layers.tanh too

import torch  # noqa: E402

from lenet5.models import create_model, layers  # noqa: E402
from lenet5.hardware import cpu_model  # noqa: E402
from lenet5.runtime import flush_denormals, tune_allocator  # noqa: E402


def pass_ms(model: torch.nn.Module, batch: int, reps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28, generator=generator), torch.randint(0, 10, (batch,), generator=generator)

    def one() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(model(x), y).backward()

    one()
    started = time.perf_counter()
    for _ in range(reps):
        one()
    return (time.perf_counter() - started) / reps * 1e3


def autograd_us(form, shape: tuple[int, ...], reps: int = 200) -> float:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad = torch.ones_like(x)

    def one() -> None:
        x.grad = None
        form(x).backward(grad)

    one()
    started = time.perf_counter()
    for _ in range(reps):
        one()
    return (time.perf_counter() - started) / reps * 1e6


def main() -> None:
    tune_allocator()
    flush_denormals()
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "-")
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}, MKL_ENABLE_INSTRUCTIONS={mkl}")
    for _ in range(3):
        print(f"probe (ms, forward + backward through autograd on 64x6x28x28): {layers._measure_tanh()}")
    chosen = layers.tanh_by_sigmoid()
    print(f"this machine's choice: {'the sigmoid form' if chosen else 'torch.tanh'}")
    for shape in ((16, 120), (256, 120), (16, 6, 28, 28), (32, 6, 28, 28), (64, 6, 28, 28), (256, 6, 28, 28)):
        mine, torchs = (statistics.median(autograd_us(f, shape) for _ in range(3))
                        for f in (layers._SigmoidTanh.apply, torch.tanh))
        print(f"{'x'.join(map(str, shape)):>11} ({math.prod(shape):>9,} floats): forward + backward through autograd: "
              f"torch.tanh {torchs:7.1f} us, sigmoid form {mine:7.1f} us")
    for name, batch, reps in (("lenet5", 256, 20), ("lenet5-1998", 16, 200), ("lenet5-1998", 256, 20)):
        model = create_model(name)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(5):
            for sigmoid in (True, False):
                layers.tanh_by_sigmoid = lambda sigmoid=sigmoid: sigmoid
                times[sigmoid].append(pass_ms(model, batch, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name} batch {batch}: torch.tanh {med[False]:.2f} ms, sigmoid form {med[True]:.2f} ms a training pass "
              f"(median of 5 rounds): torch.tanh {med[True] / med[False]:.2f}x the sigmoid form's speed")


if __name__ == "__main__":
    main()
