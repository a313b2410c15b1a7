"""What a trained model gets right and wrong on the test set: the figures of `evaluate --report`,
with the classes named as the data set names them."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from lenet5.checkpoint import Checkpoint
from lenet5.data import Dataset
from lenet5.errors import ConfigError
from lenet5.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from lenet5.plots import plot_calibration, plot_confusion, plot_digit_gallery, plot_rejection
from lenet5.evaluate import check_classes
from lenet5.predict import class_probabilities

REJECTION_TARGET = 0.005  # the paper reports the rejection needed for 0.5% error


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).view(classes, classes)


def per_class(matrix: torch.Tensor, names: tuple[str, ...] | None = None) -> list[dict[str, float]]:
    tp = matrix.diag().double()
    precision = tp / matrix.sum(0).clamp(min=1)
    recall = tp / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    names = names or tuple(str(d) for d in range(len(matrix)))
    return [{"digit": d, "class": names[d], "precision": float(precision[d]), "recall": float(recall[d]),
             "f1": float(f1[d]), "support": int(matrix[d].sum())} for d in range(len(matrix))]


def rejection_curve(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Error on the accepted digits when the k least confident are rejected, for every k."""
    order = confidence.argsort(descending=True)  # most confident first: accept a prefix
    errors = (~correct[order]).double().cumsum(0)
    accepted = torch.arange(1, len(order) + 1, dtype=torch.double)
    rejected = 1 - accepted / len(order)
    return rejected.flip(0), (errors / accepted).flip(0)


def rejection_for_error(rejected: torch.Tensor, error: torch.Tensor, target: float) -> float:
    """Smallest rejected fraction at which the error on the accepted digits is at most `target`."""
    ok = torch.nonzero(error <= target).flatten()
    return float(rejected[ok[0]]) if len(ok) else 1.0


def calibration(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Reliability per confidence bin and the expected calibration error (ECE)."""
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidence, edges[1:-1], right=True)
    conf, acc, counts, ece = [], [], [], 0.0
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        counts.append(n)
        conf.append(float(confidence[mask].mean()) if n else float((edges[b] + edges[b + 1]) / 2))
        acc.append(float(correct[mask].double().mean()) if n else 0.0)
        ece += n / len(confidence) * abs(conf[-1] - acc[-1]) if n else 0.0
    return {"confidence": conf, "accuracy": acc, "counts": counts, "ece": ece}


def report_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a folder a report can be written into (ConfigError if it is a file)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; the report needs a folder (it writes several files)")
    return out


def write_report(checkpoint: Checkpoint, data: Dataset, out_dir: str | Path, *, gallery_cap: int = 300) -> dict[str, Any]:
    """Write the analysis of `checkpoint` on `data`'s test set into `out_dir`; returns its figures."""
    out = report_folder(out_dir)
    model, test = checkpoint.model, data.test
    check_classes(model, data)
    names = model.classes
    probs = class_probabilities(model, test.images)
    confidence, predicted = probs.max(1)
    labels = test.labels
    correct = predicted == labels
    matrix = confusion_matrix(labels, predicted, len(names))
    classes = per_class(matrix, names)
    rejected, error = rejection_curve(confidence, correct)
    reject_for_target = rejection_for_error(rejected, error, REJECTION_TARGET)
    calib = calibration(confidence, correct)
    wrong = torch.nonzero(~correct).flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)]  # the most confident mistakes first
    name = checkpoint.meta["model"]

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["true\\predicted", *names])
    for d, label in enumerate(names):
        writer.writerow([label, *matrix[d].tolist()])
    atomic_write_text(out / "confusion.csv", text.getvalue())
    atomic_write_bytes(out / "confusion.png", plot_confusion(matrix.tolist(), f"{name}: confusion matrix ({data.title} test set)",
                                                             names))
    shown = wrong[:gallery_cap]
    atomic_write_bytes(out / "misclassified.png", plot_digit_gallery(
        [test.images[i].numpy() for i in shown],
        [f"{names[int(labels[i])]}->{names[int(predicted[i])]} {float(confidence[i]):.0%}" for i in shown], columns=12,
        title=f"{len(wrong)} misclassified test images" + (f", the {gallery_cap} most confident" if len(wrong) > gallery_cap else "")
        + " (true->predicted, confidence)"))
    atomic_write_bytes(out / "rejection.png", plot_rejection(rejected.tolist()[::10], error.tolist()[::10], REJECTION_TARGET,
                                                             f"{name}: rejection curve"))
    atomic_write_bytes(out / "calibration.png", plot_calibration(calib["confidence"], calib["accuracy"], calib["counts"],
                                                                 f"{name}: calibration (ECE {calib['ece']:.4f})"))
    accuracy = float(correct.double().mean())
    summary = {
        "checkpoint": str(checkpoint.path), "model": name, "epoch": checkpoint.meta.get("epoch"), "dataset": data.name,
        "test_images": len(labels), "test_accuracy": accuracy, "test_error": 1 - accuracy,
        "misclassified": len(wrong), "rejection_for_0.5%_error": reject_for_target, "ece": calib["ece"],
        "per_class": classes,
    }
    atomic_write_json(out / "report.json", summary)
    rows = "\n".join(f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
                     for c in classes)
    atomic_write_text(out / "report.md", f"""# Test-set report: {name}

Checkpoint `{checkpoint.path}` (epoch {checkpoint.meta.get('epoch')}, trained on {checkpoint.dataset}), on the
{data.title} test set.

- Test accuracy **{accuracy:.2%}**, error {1 - accuracy:.2%}: {len(wrong)} of {len(labels):,} images misclassified.
- Rejecting the least confident **{reject_for_target:.2%}** of the images brings the error on the rest to
  0.5% or less (LeCun et al. 1998 report this figure for their classifiers).
- Expected calibration error (15 bins): {calib['ece']:.4f}.

| class | precision | recall | F1 | support |
|---:|---:|---:|---:|---:|
{rows}

![confusion matrix](confusion.png) (counts in `confusion.csv`)

![rejection curve](rejection.png)

![calibration](calibration.png)

![misclassified images](misclassified.png)
""")
    return summary
