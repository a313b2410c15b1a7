"""Where the blog post's training step spends its time: each layer of keras-lenet at batch 32, forward and
backward, against the matrix-product peak measured in the same process.

    python benchmarks/keras_layers.py [--cpu-class avx2] [--precision fp32|bf16] [--profile]

It answers whether the blog post's run can go much faster on a CPU: a layer that already runs near the
peak leaves nothing to win but by doing fewer operations. Each figure is the median of 7 rounds of 40
calls; the whole step is lenet5's own (`TrainStep`: channels_last weights, the native RMSprop pass), on
random images (its cost does not depend on the pixels). `--profile` adds the step's operations by
torch.profiler: what each costs per step, by operation and shape, where its time goes. Where
lenet5's native convolutions apply, they get rows of their own (each with its ReLU and pooling);
every GFLOP/s figure counts the direct convolution's operations, so Winograd's, which does fewer,
can read above 100% of the peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

from lenet5.hardware import EMULATE, restart_emulating

if __name__ == "__main__" and "--cpu-class" in sys.argv:  # the caps must be in place before torch loads
    restart_emulating(sys.argv[sys.argv.index("--cpu-class") + 1])

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lenet5.data.transforms import to_model_input  # noqa: E402
from lenet5 import native  # noqa: E402
from lenet5.hardware import cpu_class, matmul_peak  # noqa: E402
from lenet5.runtime import flush_denormals, tune_allocator  # noqa: E402
from lenet5.train.config import TrainConfig  # noqa: E402
from lenet5.train.step import TrainStep  # noqa: E402

BATCH = 32  # the blog post's


def median_ms(fn, calls: int = 40, rounds: int = 7) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - started) / calls)
    return statistics.median(times) * 1e3


def flops(fn) -> int:
    """The operations' nominal FLOPs: a convolution's as computed directly, whichever way lenet5
    computes it (the counter cannot see into the native kernels, and Winograd's are fewer)."""
    with native.disabled(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def blog_step(precision: str) -> tuple[TrainStep, Callable[[], None], torch.Tensor]:
    """The blog post's training step as `lenet5 train` runs it (keras-lenet, RMSprop, batch 32), on
    random images (its cost does not depend on the pixels): the step, a function running one step
    on a random batch, and the images."""
    flush_denormals()
    tune_allocator()  # as `lenet5 train` does
    step = TrainStep.build(TrainConfig(precision=precision), torch.device("cpu"), 1875)
    step.wrap(compile=False)  # as fit() does: bf16 runs on the optimizer's bfloat16 copies of the weights
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (60_000,), generator=generator)

    def train_step() -> None:
        idx = torch.randint(0, 60_000, (BATCH,), generator=generator)
        objective, _ = step.objective(*step.outputs(to_model_input(images[idx]), BATCH), labels[idx])
        step.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        step.optimizer.step()

    return step, train_step, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-class", choices=sorted(EMULATE), help="emulate a lesser CPU")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--profile", action="store_true", help="also list the step's operations by torch.profiler")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    step, train_step, images = blog_step(args.precision)
    model = step.model

    conv1, conv2 = model.features[0], model.features[3]
    dense, output = model.classifier[1], model.classifier[3]
    x1 = to_model_input(images[:BATCH]).to(dtype)
    x2 = torch.randn(BATCH, conv1.out_channels, 14, 14, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    x3 = torch.randn(BATCH, dense.in_features, dtype=dtype).requires_grad_()
    weights = {m: (m.weight.detach().to(dtype).requires_grad_(), m.bias.detach().to(dtype).requires_grad_())
               for m in (conv1, conv2, dense)}
    if dtype == torch.float32:  # the step's own channels_last fp32 tensors
        weights[conv1], weights[conv2] = (conv1.weight, conv1.bias), (conv2.weight, conv2.bias)

    def layer(m, x, op):
        w, b = weights[m]
        y = op(x, w, b)
        g = torch.randn_like(y)
        inputs = [t for t in (x, w, b) if t.requires_grad]
        return (lambda: op(x, w, b)), (lambda: torch.autograd.grad(y, inputs, g, retain_graph=True))

    def conv(x, w, b):
        return F.conv2d(x, w, b, padding=2)

    # lenet5's own paths where they apply (fp32 CPU, see lenet5.native), each with its ReLU and pooling
    def winograd(x, w, b):
        return native._WinogradConv.apply(x, w, b, 2, True)

    def one_channel(x, w, b):
        return native._SingleConvPool.apply(x, w, b, 2)

    native_paths = {conv1: native.single_conv_pool_applies(x1, conv1), conv2: native.winograd_pool_applies(x2, conv2)}
    layers = [("conv1 (1->20, 5x5, 28x28)", conv1, x1, conv)]
    if native_paths[conv1]:
        layers.append(("conv1 + ReLU + pooling, lenet5's one-channel kernel", conv1, x1, one_channel))
    layers.append(("conv2 (20->50, 5x5, 14x14)", conv2, x2, conv))
    if native_paths[conv2]:
        layers.append(("conv2 + ReLU + pooling by Winograd F(2x2, 5x5), lenet5's path", conv2, x2, winograd))
    layers.append(("dense (2450->500)", dense, x3, F.linear))
    rows = []
    for name, m, x, op in layers:
        forward, backward = layer(m, x, op)
        fwd_flops = flops(layer(m, x, conv)[0] if op in (winograd, one_channel) else forward)  # as if direct
        counted = op is not conv or not native_paths.get(m, False)  # in the step: lenet5's path, not oneDNN's
        rows.append((f"{name} forward", median_ms(forward), fwd_flops, counted))
        rows.append((f"{name} backward", median_ms(backward), fwd_flops * (2 if x.requires_grad else 1), counted))
    del output
    # The dense layer's weight gradient, g^T x: its 1.2M-float output with the caches warm, and after
    # a 32 MB write has pushed them out, as the rest of a training step does.
    g, x = torch.randn(BATCH, dense.out_features, dtype=dtype), torch.randn(BATCH, dense.in_features, dtype=dtype)
    sweep = torch.empty(8 << 20)
    warm_ms = median_ms(lambda: g.t() @ x)
    sweep_ms = median_ms(lambda: sweep.fill_(1.0))
    cold_ms = median_ms(lambda: (sweep.fill_(1.0), g.t() @ x)) - sweep_ms
    step_flops = flops(train_step)
    step_ms = median_ms(train_step, calls=20)
    peak = matmul_peak(dtype)

    print(f"`python benchmarks/keras_layers.py{' --cpu-class ' + args.cpu_class if args.cpu_class else ''}"
          f" --precision {args.precision}{' --profile' if args.profile else ''}`\n")
    print(f"CPU class {cpu_class()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.precision} matmul peak (2048^3) {peak / 1e9:.0f} GFLOP/s\n")
    print("| keras-lenet, batch 32 | ms | GFLOP/s | share of peak |")
    print("|---|---:|---:|---:|")
    layers_ms = 0.0
    for name, ms, n, counted in rows:
        layers_ms += ms if counted else 0.0
        print(f"| {name} | {ms:.3f} | {n / ms / 1e6:.0f} | {n / ms / 1e6 / (peak / 1e9):.0%} |")
    print(f"| the layers above together, each as lenet5's step runs it | {layers_ms:.3f} | | |")
    print(f"| the whole training step (lenet5's TrainStep) | {step_ms:.3f} | {step_flops / step_ms / 1e6:.0f} "
          f"| {step_flops / step_ms / 1e6 / (peak / 1e9):.0%} |")
    print(f"| the dense weight gradient alone (g^T x), caches warm | {warm_ms:.3f} | | |")
    print(f"| the same after a 32 MB write | {cold_ms:.3f} | | |")
    run_flops = 3 * (60_000 + 10_000 / 3) * step_flops / BATCH  # 3 epochs, each with the test set's forward pass
    print(f"\nThe blog post's run: {run_flops / 1e12:.2f} TFLOP; at this peak it takes at least "
          f"{run_flops / peak:.0f} s, and its steps alone at this step's rate {run_flops / (step_flops / step_ms * 1e3):.0f} s.")
    if args.profile:
        profile(train_step)


def profile(train_step, steps: int = 100) -> None:
    """The step's operations, by torch.profiler: self time per step, by name and input shapes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nThe step's operations, {steps} steps under torch.profiler ({total / steps / 1e3:.3f} ms of "
          "operations a step):\n")
    print("| operation | input shapes | calls a step | ms a step |")
    print("|---|---|---:|---:|")
    for e in events[:16]:
        shapes = ", ".join(str(list(s)) for s in e.input_shapes if s) or "-"
        print(f"| {e.key} | {shapes} | {e.count / steps:g} | {e.self_cpu_time_total / steps / 1e3:.3f} |")


if __name__ == "__main__":
    main()
