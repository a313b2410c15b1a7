"""The native conv + tanh + pool kernels agree with PyTorch, and the PyTorch path stands in without them."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lenet5 import native
from lenet5.data.transforms import to_model_input
from lenet5.models import create_model
from lenet5.native.build import BuildError, compiler

LAYERS = {"C1": (1, 6, 28, 2), "C3": (6, 16, 14, 0)}  # in, out channels, input size, padding


@pytest.fixture(scope="module")
def kernels():
    """Skips only when there is no compiler at all; a compiler that fails is a failure."""
    try:
        compiler()
    except BuildError as e:
        pytest.skip(str(e))
    assert native.available(), native.why_unavailable()


def reference(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.avg_pool2d(torch.tanh(conv(x)), 2)


def layer_input(layer: str, batch: int, source: str, mnist) -> torch.Tensor:
    if source == "random":
        c, _, size, _ = LAYERS[layer]
        return torch.randn(batch, c, size, size)
    images = to_model_input(mnist.test.images[:batch])  # (B, 1, 28, 28)
    if layer == "C3":  # what C3 sees: real C1 + S2 feature maps
        with torch.no_grad():
            images = reference(images, create_model("lenet5").features[0])
    return images


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # 1e-5 relative to the tensor's scale: sums over hundreds of products round differently.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("source", ["random", "mnist"])
@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("layer", ["C1", "C3"])
def test_forward_and_gradients_match_pytorch(kernels, mnist, layer, batch, source):
    torch.manual_seed(batch)
    cin, cout, _, padding = LAYERS[layer]
    conv = nn.Conv2d(cin, cout, 5, padding=padding)
    x = layer_input(layer, batch, source, mnist).requires_grad_()
    assert native.applies(x, conv)
    expected = reference(x, conv)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad)
    actual = native.conv_tanh_pool(x, conv)
    actual_grads = torch.autograd.grad(actual, (x, conv.weight, conv.bias), grad)
    assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e)


def test_gradients_do_not_depend_on_the_thread_count(kernels):
    torch.manual_seed(0)
    conv, x = nn.Conv2d(6, 16, 5), torch.randn(100, 6, 14, 14, requires_grad=True)
    grads = {}
    threads = torch.get_num_threads()
    for n in (1, 3):
        torch.set_num_threads(n)
        try:
            y = native.conv_tanh_pool(x, conv)
            grads[n] = torch.autograd.grad(y, (x, conv.weight, conv.bias), torch.ones_like(y))
        finally:
            torch.set_num_threads(threads)
    for one, three in zip(grads[1], grads[3]):
        assert torch.equal(one, three)  # bit for bit: blocks are summed in a fixed order


def test_the_kernels_refuse_or_copy_what_they_were_not_written_for(kernels):
    """Each wrapper checks what the C code would otherwise read as float32 vectors."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(6, 16, 5), torch.randn(5, 6, 14, 14)
    k = native.kernels()
    double_bias = copy.deepcopy(conv)
    double_bias.bias.data = double_bias.bias.data.double()
    assert not native.applies(x, double_bias)  # the PyTorch path, not float64 bits read as float32
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        k.conv_tanh_pool_forward(x, double_bias.weight, double_bias.bias, 0, True)
    # saved state that a saved-tensors hook hands back as a view off the 64-byte boundary: copied, same result
    out, xsave, ssave = k.conv_tanh_pool_forward(x, conv.weight.detach(), conv.bias.detach(), 0, True)
    grad = torch.randn_like(out)
    expected = k.conv_tanh_pool_backward(grad, xsave, ssave, conv.weight.detach(), 14, 14, 0, True)
    shifted = torch.empty(xsave.numel() + 1)[1:]
    shifted.copy_(xsave)
    assert shifted.data_ptr() % 64 != 0
    for got, want in zip(k.conv_tanh_pool_backward(grad, shifted, ssave, conv.weight.detach(), 14, 14, 0, True),
                         expected):
        assert torch.equal(got, want)
    # pooling outputs go where the input is, whatever the default device
    p = pool_input((2, 4, 8, 8), torch.float32)
    with torch.device("meta"):
        y, which = k.relu_max_pool_forward(p)
        assert y.is_cpu and which.is_cpu and k.relu_max_pool_backward(torch.ones_like(y), which).is_cpu
    torch.testing.assert_close(y, F.relu(F.max_pool2d(p, 2, 2)), rtol=0, atol=0, equal_nan=True)


def test_fused_rmsprop_steps_an_empty_parameter(kernels):
    """Every empty tensor's storage starts at 0: that is not shared memory."""
    from lenet5.train.optim import FusedRMSprop

    params = [torch.zeros(0, requires_grad=True), torch.ones(3, requires_grad=True)]
    optimizer = FusedRMSprop(params, lr=0.1)
    for q in params:
        q.grad = torch.ones_like(q)
    assert native.rmsprop_applies(params, [q.grad for q in params],
                                  [torch.zeros_like(q) for q in params])
    optimizer.step()
    assert params[0].numel() == 0 and bool((params[1] < 1).all())


def test_training_step_matches_pytorch_path(kernels, mnist):
    torch.manual_seed(0)
    model = create_model("lenet5").to(memory_format=torch.channels_last)  # as training runs it
    x, y = to_model_input(mnist.train.images[:77]), mnist.train.labels[:77]

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model.loss(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step()
    with native.disabled():
        assert not native.applies(x, model.features[0])
        expected_loss, expected_grads = step()
    assert_close(loss, expected_loss)
    for g, e, p in zip(grads, expected_grads, model.parameters()):
        assert_close(g, e)
        assert g.stride() == p.stride()  # read and written in the weights' channels_last layout (DDP's buckets)
    c3 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1].weight
    assert c3.stride() != c3.contiguous().stride()  # a layout the kernel reads and writes by its strides
    activations = model.activations(x)  # the unfused stages, for the feature-map viewer
    assert_close(activations["output"], model(x))


def test_pytorch_path_where_the_kernel_does_not_apply(kernels):
    model = create_model("lenet5")
    conv, x = model.features[0], torch.rand(4, 1, 28, 28)
    assert native.applies(x, conv)
    assert not native.applies(x.double(), copy.deepcopy(conv).double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.applies(x, conv)
    assert not native.applies(torch.rand(4, 1, 27, 27), conv)  # odd conv output: no 2x2 pooling
    # torch.func transforms and tracing see standard ops, and give what eager gives
    jacobian = torch.func.jacrev(lambda t: model(t).sum())(x)
    torch.testing.assert_close(jacobian, torch.autograd.grad(model(x.requires_grad_()).sum(), x)[0], atol=1e-5, rtol=0)
    traced = torch.jit.trace(model, x.detach())
    torch.testing.assert_close(traced(x.detach()), model(x.detach()), atol=1e-5, rtol=0)


SCRIPT = """
import torch
from lenet5 import native
from lenet5.models import create_model
model = create_model("lenet5")
optimizer = torch.optim.Adam(model.parameters())
x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
for _ in range(2):
    optimizer.zero_grad()
    loss = model.loss(model(x), y)
    loss.backward()
    optimizer.step()
print("available", native.available(), "loss", round(loss.item(), 3))
"""


@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/c++"}, {"LENET5_NATIVE": "0"}], ids=["no-compiler", "off"])
def test_trains_on_the_pytorch_path_without_kernels(tmp_path, env):
    run_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}  # an empty cache: nothing built before
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "available False loss" in done.stdout
    if "CXX" in env:
        assert "falling back to the PyTorch path" in done.stderr and "/nonexistent/c++" in done.stderr
    assert not (tmp_path / "lenet5" / "native").exists() or not any((tmp_path / "lenet5" / "native").rglob("*.so"))


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or "avx2" not in open("/proc/cpuinfo").read(),
                    reason="needs an x86 CPU with AVX2")
def test_the_emulated_avx2_class_builds_the_kernels_for_avx2(kernels):
    """lenet5.hardware.EMULATE["avx2"] also narrows lenet5's own kernels to 8 floats per vector."""
    from lenet5.hardware import EMULATE

    code = ("import torch; from lenet5 import native; assert native.available(), native.why_unavailable(); "
            "print(native.kernels().vector_width)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **EMULATE["avx2"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "8"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or "avx512f" not in open("/proc/cpuinfo").read(),
                    reason="needs an AVX-512 CPU to cap")
def test_pytorchs_own_caps_narrow_the_kernels_too(kernels):
    """ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 alone (README's way to act as an avx2 CPU)
    build the kernels for AVX2, without LENET5_NATIVE_MARCH: a class's figures are not AVX-512 kernels'."""
    code = ("import torch; from lenet5 import native; assert native.available(), native.why_unavailable(); "
            "print(native.default_march(), native.kernels().vector_width)")
    env = {k: v for k, v in os.environ.items() if k != "LENET5_NATIVE_MARCH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["haswell", "8"]


AVX2_POOLING = """
import torch
from torch.nn import functional as F
from lenet5 import native
assert native.kernels().vector_width == 8
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for shape in ((3, 20, 28, 28), (2, 50, 14, 14), (2, 7, 6, 10)):
        x = (torch.randint(-3, 4, shape) * 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
        ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = native.relu_max_pool(ours_x), F.relu(F.max_pool2d(theirs_x, 2, 2))
        grad = torch.randn(theirs.shape).to(dtype)
        ours.backward(grad)
        theirs.backward(grad)
        assert torch.equal(ours, theirs) and torch.equal(ours_x.grad, theirs_x.grad), (dtype, shape)
print("same")
"""


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or "avx2" not in open("/proc/cpuinfo").read(),
                    reason="needs an x86 CPU with AVX2")
def test_the_avx2_build_pools_as_pytorch_does(kernels):
    """The pooling kernel's 8-float vectors (the code an AVX2-only CPU runs), bit for bit as PyTorch."""
    from lenet5.hardware import EMULATE

    out = subprocess.run([sys.executable, "-c", AVX2_POOLING], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **EMULATE["avx2"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "same"


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels share torch's OpenMP threads on Linux")
def test_the_kernels_run_on_torchs_threads_with_one_openmp_runtime(kernels):
    """Built without -fopenmp, at::parallel_for is a plain loop: the kernels ran on one thread
    whatever the thread count (they did, until the build passed it)."""
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            assert native.kernels().parallel_threads() == threads
    finally:
        torch.set_num_threads(before)
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes  # torch's libgomp, not a second pool beside it


def rmsprop_pair(weight_decay: float, **options):
    from lenet5.train.optim import FusedRMSprop

    torch.manual_seed(0)
    shapes = [(32, 1, 3, 3), (64, 32, 3, 3), (128, 9216 // 64), (10,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ours[1] = ours[1].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    settings = dict(lr=1e-3, alpha=0.9, eps=1e-7, weight_decay=weight_decay, foreach=True, **options)
    return FusedRMSprop(ours, **settings), torch.optim.RMSprop(theirs, **settings), ours, theirs


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_fused_rmsprop_takes_pytorchs_steps(kernels, weight_decay):
    fused, plain, ours, theirs = rmsprop_pair(weight_decay)
    for step in range(3):
        grads = [torch.randn_like(p) * 10 ** -step for p in ours]  # shrinking: the average remembers
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone(memory_format=torch.preserve_format)
        before = [p.detach().clone() for p in theirs]
        fused.step()
        plain.step()
        assert native.rmsprop_applies(ours, [p.grad for p in ours], [fused.state[p]["square_avg"] for p in ours])
        for a, b, b0 in zip(ours, theirs, before):
            # each step to float rounding: of its size, and of the weight it is added to (one ulp);
            # the next step starts from PyTorch's weights
            ulp = 2 * torch.finfo(torch.float32).eps * b0.abs().max().item()
            torch.testing.assert_close(a - b0, b - b0, rtol=1e-5, atol=ulp)
            a.data.copy_(b)
        for a, b in zip(fused.state.values(), plain.state.values()):
            torch.testing.assert_close(a["square_avg"], b["square_avg"], rtol=1e-6, atol=0)
            assert a["step"] == b["step"] == step + 1
    # the same state_dict: a run saved by one resumes in the other
    plain.load_state_dict(fused.state_dict())
    fused.load_state_dict(plain.state_dict())


def test_fused_rmsprop_leaves_what_it_does_not_cover_to_pytorch(kernels, monkeypatch):
    calls = []
    original = native.rmsprop_step
    monkeypatch.setattr(native, "rmsprop_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    hooks = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(lambda *_: hooks.append(1))
    try:
        for options, context, native_calls in (({"momentum": 0.9}, contextlib.nullcontext(), 0),
                                               ({}, native.disabled(), 0), ({}, contextlib.nullcontext(), 1)):
            calls.clear()
            hooks.clear()
            fused, plain, ours, theirs = rmsprop_pair(0.0, **options)
            for p, q in zip(ours, theirs):
                p.grad = torch.ones_like(p)
                q.grad = torch.ones_like(q)
            with context:
                fused.step()
            assert len(calls) == native_calls and len(hooks) == 1  # the step hooks run once either way
            plain.step()
            for a, b in zip(ours, theirs):
                if native_calls:
                    assert_close(a, b)
                else:
                    assert torch.equal(a, b)  # RMSprop's own step, bit for bit
            assert [s["step"].dtype for s in fused.state.values()] == [s["step"].dtype for s in plain.state.values()]
    finally:
        handle.remove()


def test_fused_rmsprop_state_loads_both_ways(kernels):
    fused, plain, ours, theirs = rmsprop_pair(1e-4)
    for params in (ours, theirs):
        for p in params:
            p.grad = torch.full_like(p, 0.5)
    fused.step()
    plain.step()
    saved_fused, saved_plain = copy.deepcopy(fused.state_dict()), copy.deepcopy(plain.state_dict())
    fused.load_state_dict(saved_plain)
    plain.load_state_dict(saved_fused)
    for mine, theirs_state in ((fused.state_dict(), saved_plain), (plain.state_dict(), saved_fused)):
        assert mine["param_groups"] == theirs_state["param_groups"]
        for k, state in mine["state"].items():
            assert state["step"].dtype == theirs_state["state"][k]["step"].dtype and state["step"] == 1
            torch.testing.assert_close(state["square_avg"], theirs_state["state"][k]["square_avg"], rtol=1e-6, atol=0)


def test_the_rmsprop_kernel_refuses_tensors_that_do_not_match(kernels):
    p, g, s = torch.zeros(4), torch.ones(4), torch.zeros(2)  # an average of the wrong size (a bad checkpoint)
    step = native.kernels().rmsprop_step
    assert not native.rmsprop_applies([p], [g], [s])
    with pytest.raises(RuntimeError, match="share one dense layout"):
        step([p], [g], [s], [], 1e-3, 0.9, 1e-7, 0.0)
    with pytest.raises(RuntimeError, match="share memory"):
        step([p], [p], [torch.zeros(4)], [], 1e-3, 0.9, 1e-7, 0.0)
    with pytest.raises(RuntimeError, match="float32"):
        step([p.double()], [g.double()], [torch.zeros(4).double()], [], 1e-3, 0.9, 1e-7, 0.0)
    s = torch.zeros(4)
    for bad in (torch.zeros(4), torch.zeros(5, dtype=torch.bfloat16), p.view(torch.bfloat16)[:4]):
        with pytest.raises(RuntimeError, match="copy"):  # float32, the wrong size, the weight's own memory
            step([p], [g.bfloat16()], [s], [bad], 1e-3, 0.9, 1e-7, 0.0)
    with pytest.raises(RuntimeError, match="one bfloat16 copy per parameter"):
        step([p, p.clone()], [g, g.clone()], [s, s.clone()], [g.bfloat16()], 1e-3, 0.9, 1e-7, 0.0)
    assert not native.rmsprop_applies([p], [g], [s], [torch.zeros(4)])  # a float32 gradient beside a copy
    assert not native.rmsprop_applies([p], [g.bfloat16()], [s])  # a bfloat16 gradient without one
    assert native.rmsprop_applies([p], [g.bfloat16()], [s], [torch.zeros(4, dtype=torch.bfloat16)])
    assert not any(t.abs().sum() for t in (p, s))  # nothing was written by a refused call


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_the_rmsprop_kernel_on_bf16_copies_steps_as_autocasts_casts_would(kernels, weight_decay):
    """Gradients read as bfloat16 and copies written as bfloat16: the same float32 step as from the
    gradients cast to float32, and each copy exactly the new weight's `.to(torch.bfloat16)`
    (round to nearest even, ties included; NaN stays NaN)."""
    torch.manual_seed(1)
    p = torch.randn(70_001) * torch.logspace(-30, 3, 70_001)  # many exponents, an odd length (vector tails)
    p[:4] = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), float("nan")])  # ties both ways
    g = (torch.randn_like(p) * 1e-2).bfloat16()
    s1 = torch.rand_like(p)
    s2 = s1.clone()
    p2, copy = p.clone(), torch.empty_like(p, dtype=torch.bfloat16)
    args = (1e-3, 0.9, 1e-7, weight_decay)
    native.kernels().rmsprop_step([p], [g.float()], [s1], [], *args)
    native.kernels().rmsprop_step([p2], [g], [s2], [copy], *args)
    torch.testing.assert_close(p2, p, rtol=0, atol=0, equal_nan=True)  # the NaN weight's average is NaN with decay
    torch.testing.assert_close(s2, s1, rtol=0, atol=0, equal_nan=True)
    expected = p2.to(torch.bfloat16)
    finite = ~p2.isnan()  # NaN stays NaN (torch's own casts disagree on its bits: 0x7fc0 or 0xffff)
    assert torch.equal(copy.isnan(), ~finite) and int(finite.sum()) == len(p2) - 1
    assert torch.equal(copy[finite].view(torch.int16), expected[finite].view(torch.int16))  # bit for bit
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8)])
    q, c = ties.clone(), torch.empty(3, dtype=torch.bfloat16)
    native.kernels().rmsprop_step([q], [torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], [c],
                                         1e-3, 0.9, 1e-7, 0.0)
    assert torch.equal(q, ties) and c.tolist() == [1.0, 1.0 + 2 ** -6, -1.0]  # to even: down, up, down


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("readelf"), reason="reads the ELF dynamic section")
def test_the_kernels_library_needs_no_torch_library(kernels):
    """A plain C library (no ATen headers to compile: a first build in seconds), whose only OpenMP
    runtime is the libgomp torch itself loads."""
    from lenet5.native.build import library

    needed = subprocess.run(["readelf", "-d", str(library())], capture_output=True, text=True, check=True).stdout
    libraries = {line.split("[")[1].split("]")[0] for line in needed.splitlines() if "(NEEDED)" in line}
    assert not {name for name in libraries if "torch" in name or "c10" in name}, libraries
    assert "libgomp.so.1" in libraries or not native.build.openmp_flags(compiler())



def pool_input(shape, dtype) -> torch.Tensor:
    """Values on a coarse grid (many ties within a window, zeros, negatives) with a NaN and -inf."""
    torch.manual_seed(2)
    x = (torch.randint(-3, 4, shape) * 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 5, 4] = float("-inf")
    x[0, 2, 0:2, 0:2] = torch.tensor([[-0.0, -1.0], [-0.5, -1.0]])  # a window whose maximum is -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 20, 28, 28), (2, 50, 14, 14), (2, 7, 6, 10)])
def test_relu_max_pool_is_pytorchs_bit_for_bit(kernels, dtype, shape):
    """Values, and where each gradient goes among tied maxima: as relu(max_pool2d(x, 2, 2))."""
    x = pool_input(shape, dtype)
    assert native.relu_max_pool_applies(x)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = native.relu_max_pool(ours_x)
    theirs = F.relu(F.max_pool2d(theirs_x, 2, 2))
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    numbers = ~theirs.isnan()  # NaN's own bits differ between torch's float32 and bfloat16 kernels
    assert torch.equal(ours.signbit()[numbers], theirs.signbit()[numbers]) and ours[0, 2, 0, 0].signbit()  # relu(-0.0)
    grad = torch.randn(theirs.shape).to(dtype)  # NCHW-contiguous, as a flatten's backward gives it
    ours.backward(grad)
    theirs.backward(grad)
    assert ours_x.grad.dtype == dtype
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=0, atol=0, equal_nan=True)
    assert (theirs_x.grad != 0).sum() > 0  # gradients reached the input at all


def test_relu_max_pool_leaves_other_tensors_to_pytorch(kernels):
    x = pool_input((2, 4, 8, 8), torch.float32)
    assert not native.relu_max_pool_applies(x.contiguous())  # NCHW with 4 channels: another layout
    assert not native.relu_max_pool_applies(x[:, :, :7, :7].contiguous(memory_format=torch.channels_last))  # odd
    assert not native.relu_max_pool_applies(x.double().contiguous(memory_format=torch.channels_last))
    with native.disabled():
        assert not native.relu_max_pool_applies(x)
    with pytest.raises(RuntimeError, match="even"):
        native.kernels().relu_max_pool_forward(x[:, :, :7, :7].contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="channels_last"):
        native.kernels().relu_max_pool_forward(x.contiguous())
    y, which = native.kernels().relu_max_pool_forward(x)
    with pytest.raises(RuntimeError, match="do not match"):
        native.kernels().relu_max_pool_backward(torch.ones_like(y), which[:1])


@pytest.mark.parametrize("name", ["keras-lenet", "slim-lenet-valid"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_models_with_max_pooling_train_the_same_with_the_native_kernel(kernels, mnist, name, precision,
                                                                      monkeypatch):
    """A training step's outputs and gradients with the kernel and without it (fp32, and under bf16
    autocast), on channels_last weights as training keeps them."""
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    x, y = to_model_input(mnist.train.images[:32]), mnist.train.labels[:32]
    calls = []
    original = native.relu_max_pool
    monkeypatch.setattr(native, "relu_max_pool", lambda t: calls.append(t.dtype) or original(t))
    monkeypatch.setattr(native, "winograd_applies", lambda x, conv: False)  # their own tests: rounding differs
    monkeypatch.setattr(native, "single_conv_pool_applies", lambda x, conv: False)
    runs = []
    for context in (contextlib.nullcontext(), native.disabled()):
        model.zero_grad()
        with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(x)
        model.loss(outputs.float(), y).backward()
        runs.append((outputs.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls == [torch.bfloat16 if precision == "bf16" else torch.float32] * 2  # both stages, native once
    (out_a, grads_a), (out_b, grads_b) = runs
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


WINOGRAD_CASES = [  # (batch, input channels, output channels, height, width, padding)
    (32, 20, 50, 14, 14, 2),  # keras-lenet's second convolution
    (5, 16, 32, 12, 12, 0),  # slim-lenet-valid's
    (3, 9, 7, 11, 12, 2),  # odd sizes: partial tiles, partial vectors
    (4, 20, 50, 13, 9, 1),
    (70, 8, 3, 5, 6, 0),  # several images per block, a last block short of images
    (70, 8, 3, 8, 6, 0),  # the same with an even-sized output (4x2), for the pooled path
]


def _winograd_against_float64(n, c, k, h, w, pad, pool=False):
    """With `pool`, relu(max_pool2d(conv)) by the pooled path, on inputs with blank rows (windows
    of equal maxima, the bias)."""
    torch.manual_seed(n * 1000 + c)
    conv = torch.nn.Conv2d(c, k, 5, padding=pad).to(memory_format=torch.channels_last)
    x = torch.randn(n, c, h, w)
    if pool:
        x[:, :, : h // 2] = 0
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    y = native.winograd_conv_pool(x, conv) if pool else native.winograd_conv(x, conv)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
    y64 = torch.nn.functional.conv2d(x64, w64, b64, padding=pad)
    if pool:
        y64 = torch.nn.functional.relu(torch.nn.functional.max_pool2d(y64, 2))
    g = torch.randn_like(y64)
    y64.backward(g)
    y.backward(g.float())

    def error(a, b):  # largest error against the largest value
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    return conv, x, y, {"output": error(y, y64), "input gradient": error(x.grad, x64.grad),
                        "weight gradient": error(conv.weight.grad, w64.grad),
                        "bias gradient": error(conv.bias.grad, b64.grad)}


@pytest.mark.parametrize("pool", [False, True])
def test_winograd_reads_saved_transforms_a_hook_hands_back_off_the_vector_boundary(kernels, pool):
    """A saved-tensors hook (offloading, compression) may return its tensors as views that do not start
    on a 64-byte boundary; the kernels read the weight's transforms as whole vectors, so such views are
    copied first: the same gradients, no crash (it was a segmentation fault)."""
    def off_boundary(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 3 or t.shape[0] != 36:  # the transforms, (36, C, K) and (36, K, C)
            return t
        shifted = torch.empty(t.numel() + 1)[1:].view(t.shape)
        shifted.copy_(t)
        assert shifted.data_ptr() % 64 != 0
        return shifted

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(20, 50, 5, padding=2).to(memory_format=torch.channels_last)
    x = torch.randn(4, 20, 14, 14).to(memory_format=torch.channels_last)
    run = native.winograd_conv_pool if pool else native.winograd_conv
    grads = []
    for hooks in (False, True):
        xg = x.clone().requires_grad_()
        conv.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, off_boundary if hooks else (lambda t: t)):
            y = run(xg, conv)
        y.square().sum().backward()
        grads.append((xg.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", [c for c in WINOGRAD_CASES if c[3] % 2 == c[4] % 2 == 0])
def test_winograd_convolution_with_pooling_agrees_with_float64(kernels, case):
    """The pooled path (ReLU and 2x2 max pooling on the output tiles, the backward unpooling into
    them) against PyTorch in float64, ties going to the first maximum as PyTorch's."""
    conv, x, y, errors = _winograd_against_float64(*case, pool=True)
    n, c, k, h, w, pad = case
    assert y.shape == (n, k, (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2)
    limits = {"output": 1e-5, "input gradient": 1e-5, "weight gradient": 1e-4, "bias gradient": 1e-5}
    assert all(errors[name] < limits[name] for name in limits), errors


@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_winograd_convolution_agrees_with_float64(kernels, case):
    """Winograd F(2x2, 5x5), forward and backward, against PyTorch's convolution in float64:
    within 1e-5 of the largest value (oneDNN's own float32 error is about 1e-6), the weight's
    gradient, a sum over every tile of the batch, within 1e-4."""
    conv, x, y, errors = _winograd_against_float64(*case)
    n, c, k, h, w, pad = case
    assert y.shape == (n, k, h + 2 * pad - 4, w + 2 * pad - 4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.grad.stride() == conv.weight.stride()  # the weight's own layout
    limits = {"output": 1e-5, "input gradient": 1e-5, "weight gradient": 1e-4, "bias gradient": 1e-5}
    assert all(errors[name] < limits[name] for name in limits), errors


AVX2_WINOGRAD = f"""
import torch, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from lenet5 import native
from test_native import WINOGRAD_CASES, _winograd_against_float64
assert native.kernels().vector_width == 8
for case in WINOGRAD_CASES:
    for pool in (False, True) if case[3] % 2 == case[4] % 2 == 0 else (False,):
        errors = _winograd_against_float64(*case, pool=pool)[3]
        assert errors["output"] < 1e-5 and errors["input gradient"] < 1e-5 and errors["weight gradient"] < 1e-4, \
            (case, pool, errors)
print("agrees")
"""


def test_the_avx2_build_computes_winograd_convolutions_right(kernels):
    """The Winograd kernels' 8-float build (an AVX2-only CPU's: other register tiles, other partial
    vectors), against float64."""
    from lenet5.hardware import EMULATE

    out = subprocess.run([sys.executable, "-c", AVX2_WINOGRAD], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **EMULATE["avx2"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "agrees"


def test_winograd_without_the_input_gradient(kernels):
    """A frozen input (the first layer's case) skips the input's gradient; the weight's is the same."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(20, 50, 5, padding=2).to(memory_format=torch.channels_last)
    x = torch.randn(6, 20, 14, 14).to(memory_format=torch.channels_last)
    native.winograd_conv(x, conv).square().sum().backward()
    frozen = conv.weight.grad.clone()
    conv.zero_grad()
    native.winograd_conv(x.clone().requires_grad_(), conv).square().sum().backward()
    assert torch.equal(frozen, conv.weight.grad)


def test_where_winograd_applies(kernels):
    conv = torch.nn.Conv2d(20, 50, 5, padding=2).to(memory_format=torch.channels_last)
    x = torch.randn(2, 20, 14, 14).to(memory_format=torch.channels_last)
    assert native.winograd_applies(x, conv)
    assert not native.winograd_applies(x.contiguous(), conv)  # NCHW: oneDNN
    assert not native.winograd_applies(x.bfloat16(), conv)
    assert not native.winograd_applies(x[:, :4], torch.nn.Conv2d(4, 50, 5, padding=2))  # too thin to gain
    assert not native.winograd_applies(x, torch.nn.Conv2d(20, 50, 5, padding=2, stride=2))
    assert not native.winograd_applies(x, torch.nn.Conv2d(20, 50, 3, padding=1))
    assert not native.winograd_applies(x, torch.nn.Conv2d(20, 50, 5, padding=2, bias=False))
    assert not native.winograd_applies(x[:, :, :2, :2], torch.nn.Conv2d(20, 50, 5))  # no output
    big = torch.randn(1, 20, 66, 66).to(memory_format=torch.channels_last)  # 1089 tiles an image: oneDNN's
    assert native.winograd_applies(big[:, :, :64, :64].contiguous(memory_format=torch.channels_last), conv)
    assert not native.winograd_applies(big, conv)
    assert not native.winograd_applies(x, torch.nn.Conv2d(20, 200, 5, padding=2))  # too wide
    with native.disabled():
        assert not native.winograd_applies(x, conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.winograd_applies(x, conv)


def test_the_winograd_kernels_refuse_what_they_were_not_written_for(kernels):
    ops = native.kernels()
    w = torch.randn(50, 20, 5, 5)
    u, ut = ops.winograd_weight(w)
    x = torch.randn(2, 20, 14, 14).to(memory_format=torch.channels_last)
    b = torch.zeros(50)
    with pytest.raises(RuntimeError, match="channels_last"):
        ops.winograd_forward(x.contiguous(), u, ut, b, 2)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.winograd_forward(x[:, :10].contiguous(memory_format=torch.channels_last), u, ut, b, 2)
    with pytest.raises(RuntimeError, match="bias"):
        ops.winograd_forward(x, u, ut, b[:10], 2)
    with pytest.raises(RuntimeError, match="no output"):
        ops.winograd_forward(x[:, :, :1, :1].contiguous(memory_format=torch.channels_last), u, ut, b, 0)
    with pytest.raises(RuntimeError, match="gradient"):
        ops.winograd_backward(x, torch.zeros(2, 50, 14, 14), u, ut, w, 2, True)  # not channels_last
    with pytest.raises(RuntimeError, match="no 2x2 pooling"):
        ops.winograd_forward(x[:, :, :13].contiguous(memory_format=torch.channels_last), u, ut, b, 2, pool=True)
    y, which = ops.winograd_forward(x, u, ut, b, 2, pool=True)
    with pytest.raises(RuntimeError, match="saved maxima"):
        ops.winograd_backward(x, y, u, ut, w, 2, True, which[:1])
    odd = x[:, :, :13, :13].contiguous(memory_format=torch.channels_last)  # a 13x13 output: no whole windows
    pooled = torch.zeros(2, 50, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="no 2x2 pooling"):
        ops.winograd_backward(odd, pooled, u, ut, w, 2, True, pooled.clone())
    strided_bias = torch.randn(100)[::2]  # a copy made for the call must outlive it
    assert torch.equal(ops.winograd_forward(x, u, ut, strided_bias, 2)[0],
                       ops.winograd_forward(x, u, ut, strided_bias.contiguous(), 2)[0])
    with pytest.raises(RuntimeError, match="weight"):
        ops.winograd_weight(torch.randn(50, 20, 3, 3))


def test_keras_lenet_trains_the_same_with_winograd(kernels, mnist, monkeypatch):
    """keras-lenet's training step with the Winograd convolution (its ReLU and pooling on the
    output tiles) and with oneDNN's: the same outputs and gradients but for rounding, and the
    Winograd path really taken (once, conv2)."""
    torch.manual_seed(0)
    model = create_model("keras-lenet").to(memory_format=torch.channels_last)
    x, y = to_model_input(mnist.train.images[:32]), mnist.train.labels[:32]
    calls = []
    original = native.winograd_conv_pool
    monkeypatch.setattr(native, "winograd_conv_pool", lambda t, conv: calls.append(conv) or original(t, conv))
    runs = []
    for use in (True, False):
        model.zero_grad()
        if not use:
            monkeypatch.setattr(native, "winograd_applies", lambda t, conv: False)
        outputs = model(x)
        model.loss(outputs, y).backward()
        runs.append((outputs.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls == [model.features[3]]
    (out_a, grads_a), (out_b, grads_b) = runs
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


SINGLE_CASES = [  # (batch, output channels, height, width, padding)
    (32, 20, 28, 28, 2),  # keras-lenet's first convolution
    (32, 16, 28, 28, 0),  # slim-lenet-valid's
    (5, 7, 10, 12, 2),  # one partial vector of channels, rows shorter than a register tile
    (3, 31, 6, 8, 2),  # four vectors with AVX2
]


def _single_against_float64(n, k, h, w, pad):
    torch.manual_seed(n * 100 + k)
    conv = torch.nn.Conv2d(1, k, 5, padding=pad).to(memory_format=torch.channels_last)
    x = torch.rand(n, 1, h, w)
    x[:, :, : h // 3] = 0  # blank rows, as MNIST's borders: windows of equal maxima (the bias)
    y = native.single_conv_pool(x, conv)
    w64, b64 = (t.detach().double().requires_grad_() for t in (conv.weight, conv.bias))
    y64 = torch.nn.functional.relu(torch.nn.functional.max_pool2d(
        torch.nn.functional.conv2d(x.double(), w64, b64, padding=pad), 2))
    g = torch.randn_like(y64)
    y64.backward(g)
    y.backward(g.float())

    def error(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    return conv, y, {"output": error(y, y64), "weight gradient": error(conv.weight.grad, w64.grad),
                     "bias gradient": error(conv.bias.grad, b64.grad)}


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_the_one_channel_convolution_with_pooling_agrees_with_float64(kernels, case):
    """relu(max_pool(conv(x))) of one input channel, its weight's and bias's gradients, against
    PyTorch in float64, on images with blank rows (ties in the pooling windows go to the first
    maximum, as PyTorch's)."""
    conv, y, errors = _single_against_float64(*case)
    n, k, h, w, pad = case
    assert y.shape == (n, k, (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.grad.stride() == conv.weight.stride()
    assert all(e < 1e-5 for e in errors.values()), errors


AVX2_SINGLE = f"""
import torch, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from lenet5 import native
from test_native import SINGLE_CASES, _single_against_float64
assert native.kernels().vector_width == 8
for case in SINGLE_CASES:
    errors = _single_against_float64(*case)[2]
    assert all(e < 1e-5 for e in errors.values()), (case, errors)
print("agrees")
"""


def test_the_avx2_build_computes_the_one_channel_convolution_right(kernels):
    from lenet5.hardware import EMULATE

    out = subprocess.run([sys.executable, "-c", AVX2_SINGLE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **EMULATE["avx2"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "agrees"


def test_where_the_one_channel_kernel_applies(kernels):
    conv = torch.nn.Conv2d(1, 20, 5, padding=2)
    x = torch.rand(2, 1, 28, 28)
    assert native.single_conv_pool_applies(x, conv)
    assert not native.single_conv_pool_applies(x.requires_grad_(), conv)  # an input's gradient: PyTorch's
    x = x.detach()
    assert not native.single_conv_pool_applies(x[:, :, :, ::2], conv)  # strided
    assert not native.single_conv_pool_applies(x[:, :, :27, :27], conv)  # odd output: no 2x2 pooling
    assert not native.single_conv_pool_applies(torch.rand(2, 3, 28, 28), torch.nn.Conv2d(3, 20, 5, padding=2))
    assert not native.single_conv_pool_applies(x, torch.nn.Conv2d(1, 200, 5, padding=2))  # too many channels
    assert not native.single_conv_pool_applies(x.double(), conv.double())
    with native.disabled():
        assert not native.single_conv_pool_applies(x, conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.single_conv_pool_applies(x, conv)


def test_the_one_channel_kernel_refuses_what_it_was_not_written_for(kernels):
    ops = native.kernels()
    w, b = torch.randn(20, 1, 5, 5), torch.zeros(20)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(RuntimeError, match="dense"):
        ops.single_conv_pool_forward(x[:, :, :, ::2], w, b, 2)
    with pytest.raises(RuntimeError, match="even-sized"):
        ops.single_conv_pool_forward(x[:, :, :27].contiguous(), w, b, 2)
    with pytest.raises(RuntimeError, match="bias"):
        ops.single_conv_pool_forward(x, w, b[:3], 2)
    y, which = ops.single_conv_pool_forward(x, w, b, 2)
    with pytest.raises(RuntimeError, match="channels_last"):
        ops.single_conv_pool_backward(x, y.contiguous(), which, w, 2)


@pytest.mark.parametrize("name", ["keras-lenet", "slim-lenet-valid"])
def test_models_train_the_same_with_every_native_kernel(kernels, mnist, name):
    """A training step on real digits with every native kernel (one-channel convolution and pooling,
    Winograd, ReLU and pooling) and with PyTorch's ops alone: the same outputs and gradients but
    for rounding."""
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    x, y = to_model_input(mnist.train.images[:32]), mnist.train.labels[:32]
    assert native.single_conv_pool_applies(x, model.features[0])
    runs = []
    for context in (contextlib.nullcontext(), native.disabled()):
        model.zero_grad()
        with context:
            outputs = model(x)
        model.loss(outputs, y).backward()
        runs.append((outputs.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = runs
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_a_library_of_several_units_is_built_whole_or_refused(kernels, tmp_path, monkeypatch):
    """The kernels' library is compiled as several units at once and linked (lenet5.native.build):
    every unit's functions are in it, its header is part of the cache key, and a unit that does not
    compile is a BuildError naming the compiler's complaint, with no object file or library left."""
    import ctypes

    from lenet5.native import build

    monkeypatch.setattr(build, "user_cache_dir", lambda name: str(tmp_path / "cache" / name))  # any OS
    header, first, second = tmp_path / "twice.h", tmp_path / "first.cpp", tmp_path / "second.cpp"
    header.write_text("#pragma once\ninline int twice(int x) { return 2 * x; }\n")
    first.write_text('#include "twice.h"\nextern "C" int lenet5_first() { return twice(1); }\n')
    second.write_text('#include "twice.h"\nextern "C" int lenet5_second() { return twice(20); }\n')
    monkeypatch.setitem(build.UNITS, first, (first, second))
    monkeypatch.setattr(build, "HEADERS", (header,))

    library = build.library(source=first, parallel=False)
    lib = ctypes.CDLL(str(library))
    assert (lib.lenet5_first(), lib.lenet5_second()) == (2, 40)
    assert build.library(source=first, parallel=False) == library  # cached
    header.write_text("#pragma once\ninline int twice(int x) { return x + x; }\n")
    assert build.library(source=first, parallel=False) != library  # a changed header is a new build

    second.write_text('#include "twice.h"\nextern "C" int lenet5_second() { return twice(undeclared); }\n')
    with pytest.raises(BuildError, match=r"failed \(exit \d+\): .*undeclared"):
        build.library(source=first, parallel=False)
    built = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert built == ["lenet5_first.so", "lenet5_first.so", "lenet5_first.so.sha256", "lenet5_first.so.sha256"], built


def _two_unit_sources(tmp_path, monkeypatch):
    from lenet5.native import build

    monkeypatch.setattr(build, "user_cache_dir", lambda name: str(tmp_path / "cache" / name))  # any OS
    first, second = tmp_path / "first.cpp", tmp_path / "second.cpp"
    first.write_text('extern "C" int lenet5_first() { return 2; }\n')
    second.write_text('extern "C" int lenet5_second() { return 40; }\n')
    monkeypatch.setitem(build.UNITS, first, (first, second))
    monkeypatch.setattr(build, "HEADERS", ())
    return build, first


def test_a_library_cut_short_is_built_again_not_loaded(kernels, tmp_path, monkeypatch):
    """A library truncated by a crash or power loss after its rename made every later process die of
    SIGBUS when it loaded it; its checksum, written after it, now sends it back to the compiler."""
    import ctypes

    build, first = _two_unit_sources(tmp_path, monkeypatch)
    library = build.library(source=first, parallel=False)
    whole = library.read_bytes()
    for damaged in (whole[:4096], b""):
        library.write_bytes(damaged)
        assert build.library(source=first, parallel=False) == library
        assert library.read_bytes() == whole  # rebuilt (this compiler's output is deterministic)
    assert ctypes.CDLL(str(library)).lenet5_second() == 40
    assert not list(library.parent.glob(".build-*"))  # no build directory left behind


def test_a_compiler_given_with_arguments_is_run_with_them(kernels, tmp_path, monkeypatch):
    """CXX="ccache g++" is how build tools are told to use a wrapper: the words are the command."""
    import ctypes
    import shutil

    build, first = _two_unit_sources(tmp_path, monkeypatch)
    cxx = build.compiler()
    monkeypatch.setenv("CXX", f"{shutil.which('env')} {' '.join(cxx)}")
    assert build.compiler() == [shutil.which("env"), *cxx]
    assert ctypes.CDLL(str(build.library(source=first, parallel=False))).lenet5_first() == 2


def test_a_killed_openmp_build_is_an_error_not_a_one_thread_library(kernels, tmp_path, monkeypatch):
    """A compiler killed by a signal (out of memory, say) tells nothing about -fopenmp: the build is an
    error for this process, and nothing one-threaded is cached under the OpenMP build's name; a
    compiler that refuses the flag is this machine's answer, and one thread beats no kernels."""
    build, first = _two_unit_sources(tmp_path, monkeypatch)
    monkeypatch.setattr(build, "openmp_flags", lambda cxx: ["-fopenmp"])
    monkeypatch.setattr(build, "_is_gcc", lambda cxx: True)
    real, calls = build._build, []

    def killed_with_openmp(cxx, march, units, output, openmp=()):
        calls.append(list(openmp))
        return (-9, "") if openmp else real(cxx, march, units, output, openmp)

    monkeypatch.setattr(build, "_build", killed_with_openmp)
    with pytest.raises(BuildError, match=r"exit -9"):
        build.library(source=first)
    assert calls == [["-fopenmp"]] and not list((tmp_path / "cache").rglob("*.so"))

    def refused(cxx, march, units, output, openmp=()):
        calls.append(list(openmp))
        return (1, "/usr/bin/ld: cannot find -lgomp") if openmp else real(cxx, march, units, output, openmp)

    calls.clear()
    monkeypatch.setattr(build, "_build", refused)
    assert build.library(source=first).is_file() and calls == [["-fopenmp"], []]

    def bad_march(cxx, march, units, output, openmp=()):  # nothing to do with OpenMP: one attempt, one message
        calls.append(list(openmp))
        return 1, "cc1plus: error: bad value 'bogus' for '-march=' switch"

    calls.clear()
    monkeypatch.setattr(build, "_build", bad_march)
    with pytest.raises(BuildError, match="bad value 'bogus'"):
        build.library(march="bogus", source=first)
    assert calls == [["-fopenmp"]]


def test_every_source_the_build_reads_ships_with_the_package():
    """An installed lenet5 compiles its kernels from the sources in its package: each unit and header
    the build reads must match pyproject.toml's package data (kernels.h once did not)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    from lenet5.native import build, sdlm_pass

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lenet5"]
    package = Path(build.__file__).resolve().parents[1]
    needed = {*(unit for units in build.UNITS.values() for unit in units), *build.HEADERS, sdlm_pass.SOURCE}
    for path in needed:
        assert path.is_file(), path
        relative = path.resolve().relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), f"{relative} is not package data"


@pytest.mark.parametrize("name, penalise", [("keras-lenet", "input"), ("keras-lenet", "weight"), ("lenet5", "input")])
def test_a_gradient_penalty_differentiates_through_the_kernels(kernels, mnist, monkeypatch, name, penalise):
    """A gradient penalty differentiates a backward pass (create_graph=True). The kernels' backward
    is differentiable once, so then each native layer recomputes itself with PyTorch's ops: the
    penalised step's gradients are PyTorch's but for rounding (it failed before). With respect to the
    input: ReLU+pooling, Winograd with its pooling, or conv+tanh+pool; to the first weight: the
    one-channel kernel (which takes inputs that need no gradient)."""
    calls = []
    recompute = native._backward_with_graph
    monkeypatch.setattr(native, "_backward_with_graph", lambda *args: calls.append(1) or recompute(*args))
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    x, y = to_model_input(mnist.train.images[:16]), mnist.train.labels[:16]
    first = model.features[0]
    runs = []
    for context in (contextlib.nullcontext(), native.disabled()):
        model.zero_grad()
        given = x.clone().requires_grad_(penalise == "input")
        with context:
            loss = model.loss(model(given), y)
        wrt = given if penalise == "input" else first.weight
        (g,) = torch.autograd.grad(loss, wrt, create_graph=True)
        (loss + 10 * g.pow(2).sum()).backward()
        runs.append([p.grad.clone() for p in model.parameters()])
        if not calls:  # the first run must have gone through the kernels' differentiable backward
            pytest.fail("no native layer computed the double backward")
    native_grads, pytorch_grads = runs
    for a, b in zip(native_grads, pytorch_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
    assert any(b.abs().max() > 0 for b in pytorch_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_differentiable_unpooling_is_the_kernels_backward(kernels, dtype):
    """A double backward through ReLU+pooling unpools with PyTorch's ops from `which` alone (the
    forward keeps no input for it): the same gradient as the kernel's backward, bit for bit, ties and
    ReLU-blocked windows included."""
    torch.manual_seed(0)
    x = torch.randn(5, 20, 12, 14).round().to(dtype).contiguous(memory_format=torch.channels_last)  # ties, zeros
    _, which = native._ops().relu_max_pool_forward(x)
    grad = torch.randn(5, 20, 6, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    expected = native._ops().relu_max_pool_backward(grad, which)
    for layout in (grad, grad.contiguous(), grad.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)):
        got = native._unpool(layout, which)  # a double backward's gradient may come in any layout
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected)
    index = which.view(torch.int16) if dtype == torch.bfloat16 else which
    assert (index == 4).any() and (index < 4).any()  # both kinds of window were there


def test_a_failed_build_is_reported_by_the_line_that_names_the_problem():
    from lenet5.native.build import _complaint

    compiler = ("In file included from /home/me/error-analysis/kernels.cpp:20:\n"
                "/home/me/error-analysis/kernels.h:3:5: error: 'foo' was not declared in this scope\n"
                "    3 | foo\n      | ^~~\n")
    assert _complaint(compiler) == "/home/me/error-analysis/kernels.h:3:5: error: 'foo' was not declared in this scope"
    linker = "/usr/bin/ld: cannot find -lgomp: No such file or directory\ncollect2: error: ld returned 1 exit status\n"
    assert _complaint(linker) == "/usr/bin/ld: cannot find -lgomp: No such file or directory"
    assert _complaint("something odd\nlast line\n") == "last line"
    assert _complaint("") == "no output"
