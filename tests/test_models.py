"""Every registered model, parametrised over the registry as timm does."""

from __future__ import annotations

import json

import pytest
import torch

from lenet5.errors import ConfigError
from lenet5.models import count_parameters, create_model, describe, list_models

# A new architecture must state its parameter count here: the test fails until it does.
EXPECTED_PARAMETERS = {
    "keras-lenet": 1_256_080,  # the reference notebook's summary
    "lenet5": 61_706,
    "lenet5-1998": 60_000,  # the paper, section II.B
    "lenet5-modern": 56_042,  # within the paper's 60,000
    "slim-lenet": 21_258,
    "slim-lenet-valid": 18_378,
    "robust-lenet": 82_258,
}


@pytest.mark.parametrize("name", list_models())
def test_model_shapes_parameters_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    assert describe(name), "the docstring's first line describes the model"
    x = torch.rand(5, 1, 28, 28)
    outputs = model(x)
    logits = model.logits(outputs)
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    probabilities = model.probabilities(x)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(5))
    assert torch.equal(probabilities.argmax(1), logits.argmax(1))
    loss = model.loss(outputs, torch.arange(5))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.registry_name == name


@pytest.mark.parametrize("name", list_models())
def test_model_batch_independence(name):
    """Each image's output depends on that image only (no batch statistics leak in eval mode)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_keras_lenet_starts_like_keras():
    model = create_model("keras-lenet")
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0  # Keras initialises biases to zero


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="unknown model .lenet7.; choose one of: keras-lenet, lenet5, lenet5-1998, lenet5-modern"):
        create_model("lenet7")
    with pytest.raises(ConfigError, match="model 'lenet5'"):
        create_model("lenet5", widht=3)


@pytest.mark.parametrize("name", list_models())
def test_activations_name_every_layer_and_end_in_the_output(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        maps = model.activations(x)
        outputs = model(x)
    names = list(maps)
    assert names[0] == "input" and names[-1] == "output" and len(names) >= 6
    torch.testing.assert_close(maps["output"], outputs)
    for key, value in maps.items():
        assert value.shape[0] == 2 and torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", ["keras-lenet", "slim-lenet", "slim-lenet-valid", "robust-lenet"])
def test_pooling_before_relu_is_the_same_function(name, mnist):
    """Their forward pools before the ReLU (faster); values and gradients equal the Sequential order.
    (PyTorch's ops both ways: the native kernels, which round differently, have tests of their own.)"""
    from lenet5 import native

    torch.manual_seed(0)
    model = create_model(name)
    x = (mnist.train.images[:64].float() / 255).unsqueeze(1)
    y = mnist.train.labels[:64]
    with native.disabled():
        fast = model.loss(model(x), y)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = model.loss(model.classifier(model.features(x)), y)
    plain.backward()
    assert torch.equal(fast, plain)
    for a, p in zip(fast_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-7)


def test_the_sigmoid_form_of_tanh_agrees_with_torch_tanh():
    """_SigmoidTanh's claim: it agrees with torch.tanh to 2e-7, values and gradients."""
    from lenet5.models.layers import _SigmoidTanh

    x = torch.linspace(-12, 12, 200_001, requires_grad=True)
    fast = _SigmoidTanh.apply(x)
    reference = torch.tanh(x.detach())
    assert (fast - reference).abs().max().item() <= 2e-7
    fast.sum().backward()
    assert (x.grad - (1 - reference ** 2)).abs().max().item() <= 5e-7


@pytest.mark.parametrize("sigmoid_faster", [True, False])
def test_tanh_takes_the_form_this_machine_measured_faster(monkeypatch, tmp_path, sigmoid_faster):
    """The probe times both forms once per machine and caches the times; tanh then takes the sigmoid
    form for large float32 tensors where it ran at least 1.2x faster (torch.tanh, MKL's, was 3.4x
    slower than the sigmoid form on an AMD EPYC, 3.1-3.5x faster on a Xeon)."""
    from lenet5.models import layers

    measured = layers._measure_tanh(0.02)  # real timings of both forms
    assert set(measured) == {"torch_ms", "sigmoid_ms", "spread"} and all(0 < t < 1e3 for t in measured.values())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    times = {"torch_ms": 0.3, "sigmoid_ms": 0.2 if sigmoid_faster else 0.26}  # 1.5x faster, or only 1.15x
    monkeypatch.setattr(layers, "_measure_tanh", lambda: times)
    layers.tanh_by_sigmoid.cache_clear()
    try:
        small = torch.randn(256, 120, requires_grad=True)  # C5's activations at batch 256
        assert type(layers.tanh(small).grad_fn).__name__ == "TanhBackward0"  # torch's at this size, either way
        assert layers.tanh_by_sigmoid.cache_info().currsize == 0  # and nothing measured for it
        x = torch.randn(layers.SIGMOID_TANH_MIN_SIZE, requires_grad=True)
        state = torch.get_rng_state()
        y = layers.tanh(x)  # measured here, at the first use in this "process"
        assert torch.equal(torch.get_rng_state(), state)  # a seeded run's random stream is untouched
        assert ("Sigmoid" in type(y.grad_fn).__name__) == sigmoid_faster
        torch.testing.assert_close(y, torch.tanh(x), rtol=0, atol=2e-7)
        assert type(layers.tanh(x.bfloat16()).grad_fn).__name__ != "_SigmoidTanhBackward"  # float32 only
        [saved] = (tmp_path / "lenet5" / "machine").glob("tanh-probe-v*.json")
        assert json.loads(saved.read_text())["times"] == times
        monkeypatch.setattr(layers, "_measure_tanh", lambda: pytest.fail("measured twice"))
        layers.tanh_by_sigmoid.cache_clear()  # a new process: reads the cache
        assert layers.tanh_by_sigmoid() == sigmoid_faster
    finally:
        layers.tanh_by_sigmoid.cache_clear()


def test_the_tanh_probe_times_plain_kernels_whatever_the_first_caller_runs_under(monkeypatch, tmp_path):
    """The first tanh call may come from under vmap or fake tensors (a shape or memory estimate). Under
    a torch.func transform tanh is torch.tanh and nothing is measured (autograd cannot be timed there);
    under fake tensors the probe runs as plain PyTorch, so it does not cache fake timings."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lenet5.models import layers

    from lenet5 import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "PROBE_MAX_SPREAD", float("inf"))  # kept however busy the machine (a test's concern)
    measure, seen = layers._measure_tanh, []

    def spy() -> dict[str, float]:  # what the probe's own tensors are
        seen.append(type(torch.empty(1)).__name__)
        return measure(0.02)

    monkeypatch.setattr(layers, "_measure_tanh", spy)
    layers.tanh_by_sigmoid.cache_clear()
    try:
        x = torch.randn(2, layers.SIGMOID_TANH_MIN_SIZE)
        y = torch.func.vmap(layers.tanh)(x)
        torch.testing.assert_close(y, torch.tanh(x), rtol=0, atol=0)
        grads = torch.func.grad(lambda v: layers.tanh(v).sum())(x[0])
        torch.testing.assert_close(grads, 1 - torch.tanh(x[0]) ** 2)
        assert seen == [] and not list(tmp_path.rglob("tanh-probe-*.json"))
        with FakeTensorMode() as fake:
            layers.tanh(fake.from_tensor(x))
        assert seen == ["Tensor"]  # plain tensors: real timings
        [saved] = (tmp_path / "lenet5" / "machine").glob("tanh-probe-v*.json")
        assert all(1e-3 <= t <= 1e3 for t in json.loads(saved.read_text())["times"].values())
    finally:
        layers.tanh_by_sigmoid.cache_clear()


def test_the_sigmoid_form_differentiates_in_forward_mode_too():
    """jvp (torch.func.jvp, jacfwd, hessian) through the sigmoid form, as through torch.tanh."""
    from lenet5.models.layers import _SigmoidTanh

    x, t = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    (y, dy), (y_ref, dy_ref) = torch.func.jvp(_SigmoidTanh.apply, (x,), (t,)), torch.func.jvp(torch.tanh, (x,), (t,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref)
