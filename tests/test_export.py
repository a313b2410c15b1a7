"""ONNX and TorchScript exports agree with PyTorch, with any batch size, and carry a model card."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenet5.checkpoint import load_checkpoint, save_checkpoint
from lenet5.cli import main
from lenet5.data.transforms import to_model_input
from lenet5.export import ExportError, check_export, export, export_checkpoint
from lenet5.models import create_model
from lenet5.train import TrainConfig, fit


@pytest.fixture(scope="module")
def trained_lenet5(mnist, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    fit(TrainConfig(model="lenet5", optimizer="adam", batch_size=64, epochs=1, train_samples=5_000,
                    test_samples=1_000), mnist, run)
    return load_checkpoint(run)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_1000_test_digits(trained_lenet5, mnist, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    result = export_checkpoint(trained_lenet5, out, fmt, mnist, check_images=1000)
    check = result["check"]
    assert check["identical_classes"] and check["same_class"] == 1000
    assert check["max_abs_difference"] < 1e-4
    card = (tmp_path / f"model.{fmt}.model-card.md").read_text()
    assert "# Model card: lenet5" in card and f"model.{fmt}" in card and f"{result['test_accuracy']:.2%}" in card
    assert "centre of mass at pixel (14, 14)" in card


def test_the_two_formats_of_one_stem_keep_their_own_cards(trained_lenet5, tmp_path):
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        export_checkpoint(trained_lenet5, tmp_path / f"model.{suffix}", fmt, None)
    for suffix in ("onnx", "pt"):
        card = (tmp_path / f"model.{suffix}.model-card.md").read_text()
        assert f"model.{suffix}" in card and f"model.{'pt' if suffix == 'onnx' else 'onnx'}" not in card


def test_onnx_has_a_dynamic_batch_and_the_1998_scores(mnist, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model("lenet5-1998")
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "m", model))
    export(checkpoint, tmp_path / "m.onnx", "onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):
        x = to_model_input(mnist.test.images[:n])
        scores = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            penalties = model.eval()(x).numpy()
        assert scores.shape == (n, 10)
        np.testing.assert_allclose(scores, -penalties, rtol=1e-4, atol=1e-3)  # scores = -RBF penalties
    assert check_export(checkpoint, tmp_path / "m.onnx", "onnx", mnist.test.images[:100])["identical_classes"]


def test_export_command_and_its_errors(trained_lenet5, mnist, tmp_path, capsys):
    out = tmp_path / "k.pt"
    code = main(["export", str(trained_lenet5.path), "--format", "torchscript", "--out", str(out),
                 "--data-dir", str(mnist.root), "--offline"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "same class on 1,000" in stdout and out.is_file()
    with pytest.raises(ExportError, match="unknown format"):
        export(trained_lenet5, tmp_path / "x", "tflite")
    assert main(["export", str(tmp_path / "missing.safetensors")]) == 1
