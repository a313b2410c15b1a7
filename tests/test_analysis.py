"""evaluate --report and explain, on a briefly trained model and real test digits."""

from __future__ import annotations

import base64
import io
import json

import torch
from PIL import Image

from lenet5.analysis import calibration, confusion_matrix, per_class, rejection_curve, rejection_for_error
from lenet5.checkpoint import load_checkpoint
from lenet5.cli import main
from lenet5.explain import explain_digit
from lenet5.models import create_model
from lenet5.serve.predictor import layer_images
from lenet5.train import TrainConfig, fit


def test_figures_on_a_hand_made_example():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 2])
    matrix = confusion_matrix(labels, predicted, classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    rows = per_class(matrix)
    assert rows[1]["precision"] == 2 / 3 and rows[1]["recall"] == 2 / 3 and rows[2]["precision"] == 0.5
    confidence = torch.tensor([0.9, 0.2, 0.8, 0.7, 0.3, 0.6])
    correct = labels == predicted
    rejected, error = rejection_curve(confidence, correct)
    # Rejecting the two least confident (both wrong) leaves 4 digits, all right.
    assert abs(rejection_for_error(rejected, error, 0.0) - 2 / 6) < 1e-9
    assert abs(error[0] - 2 / 6) < 1e-9  # nothing rejected: 2 of 6 wrong
    calib = calibration(torch.tensor([0.95, 0.95, 0.55, 0.55]), torch.tensor([True, True, True, False]), bins=10)
    assert abs(calib["ece"] - (0.5 * 0.05 + 0.5 * 0.05)) < 1e-6


def _picture_sizes(explanation) -> dict[str, tuple[int, int]]:
    """(width, height) of each layer's picture on the served page."""
    return {layer["name"]: Image.open(io.BytesIO(base64.b64decode(layer["png"].split(",", 1)[1]))).size
            for layer in layer_images(explanation.maps, explanation.display_shapes)}


def test_report_and_explain_commands(mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LENET5_OFFLINE", "1")
    config = TrainConfig(model="lenet5", optimizer="adam", batch_size=64, epochs=1, train_samples=5_000,
                         test_samples=1_000)
    run = fit(config, mnist, tmp_path / "run").run_dir
    code = main(["evaluate", str(run), "--data-dir", str(mnist.root), "--test-samples", "1000",
                 "--report", str(tmp_path / "report"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["test_images"] == 1000 and abs(summary["test_accuracy"] - result["test_accuracy"]) < 1e-6
    assert sum(c["support"] for c in summary["per_class"]) == 1000
    assert 0 <= summary["rejection_for_0.5%_error"] <= 1 and 0 <= summary["ece"] < 0.2
    csv_rows = (tmp_path / "report" / "confusion.csv").read_text().splitlines()
    assert len(csv_rows) == 11 and sum(sum(map(int, r.split(",")[1:])) for r in csv_rows[1:]) == 1000
    for name in ("confusion.png", "misclassified.png", "rejection.png", "calibration.png", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 500, name

    checkpoint = load_checkpoint(run)
    explanation = explain_digit(checkpoint.model, mnist.test.images[0].numpy())
    assert list(explanation.maps)[1:5] == ["C1", "S2", "C3", "S4"]
    assert explanation.maps["C1"].shape == (6, 28, 28) and explanation.maps["F6"].shape == (84,)
    assert abs(explanation.probabilities.sum() - 1) < 1e-5 and explanation.digit == 7
    # The model, not the viewer, says how a vector layer is drawn: classic LeNet-5's F6 is a strip,
    # the 1998 network's F6 the 7x12 bitmap its RBF output compares with.
    assert explanation.display_shapes == {}
    assert _picture_sizes(explanation)["F6"] == (84, 4)
    paper = explain_digit(create_model("lenet5-1998"), mnist.test.images[0].numpy())
    assert paper.display_shapes == {"F6": (12, 7)}
    assert _picture_sizes(paper)["F6"] == (7, 12) and _picture_sizes(paper)["C5"] == (120, 4)
    code = main(["explain", str(run), "--test-index", "0", "--data-dir", str(mnist.root),
                 "--out", str(tmp_path / "maps.png")])
    out, _ = capsys.readouterr()
    assert code == 0 and "predicted 7" in out and (tmp_path / "maps.png").stat().st_size > 5000
    assert main(["explain", str(run)]) == 2  # neither an image nor --test-index
