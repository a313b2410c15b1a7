"""Every registered model, parametrised over the registry as timm does."""

from __future__ import annotations

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


def test_fast_tanh_agrees_with_torch_tanh():
    """layers.tanh's claim: the sigmoid form agrees with torch.tanh to 2e-7, values and gradients."""
    from lenet5.models.layers import tanh

    x = torch.linspace(-12, 12, 200_001, requires_grad=True)
    fast = tanh(x)
    reference = torch.tanh(x.detach())
    assert (fast - reference).abs().max().item() <= 2e-7
    fast.sum().backward()
    assert (x.grad - (1 - reference ** 2)).abs().max().item() <= 5e-7
