"""Test-set evaluation of a model or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lenet5.checkpoint import load_checkpoint
from lenet5.data import Dataset
from lenet5.data.transforms import to_model_input
from lenet5.errors import ConfigError
from lenet5.models import DigitClassifier, count_parameters
from lenet5.runtime import resolve_device

# Images per evaluation step. Speed: on CPU a chunk's activations should stay in cache; batch
# inference of lenet5 runs at 50k images/s in chunks of 512 against 28k in chunks of 2,000 and
# 23k in one chunk of 10,000 (2 cores, measured; keras-lenet: 10k, 6.4k, 6.0k).
EVAL_BATCH = 512


@torch.no_grad()
def evaluate(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean loss and accuracy over uint8 images (N, 28, 28) and their labels, on their device."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        x = to_model_input(images[start:start + batch_size])
        y = labels[start:start + batch_size]
        outputs = model(x)
        total_loss += model.loss(outputs, y) * len(y)
        correct += (model.logits(outputs).argmax(1) == y).sum()
    model.train(was_training)
    n = max(1, len(labels))
    return (total_loss / n).item(), (correct.double() / n).item()


def _names(classes: tuple[str, ...]) -> str:
    shown = ", ".join(classes[:5])
    return f"{len(classes)} classes: {shown}{', ...' if len(classes) > 5 else ''}"


def check_classes(model: DigitClassifier, data: Dataset) -> None:
    """ConfigError unless `data`'s labels mean what the model's outputs mean: the same class names
    in the same order (an idx: folder without names only needs labels the model has outputs for)."""
    same = tuple(data.classes) == tuple(model.classes)
    fits = not data.named and len(data.classes) <= len(model.classes)
    if not (same or fits):
        raise ConfigError(f"the checkpoint was trained on {model.dataset} ({_names(model.classes)}) and cannot be "
                          f"evaluated on {data.name} ({_names(data.classes)}): the class lists differ")


def evaluate_checkpoint(path: str | Path, data: Dataset, *, device: str = "auto", batch_size: int = EVAL_BATCH,
                        test_samples: int = 0) -> dict[str, Any]:
    """Test loss, accuracy and error of a checkpoint on `data`'s test split, with what it is.
    A data set whose classes differ from the checkpoint's is a ConfigError."""
    dev = resolve_device(device)
    checkpoint = load_checkpoint(path, dev)
    check_classes(checkpoint.model, data)
    checkpoint.model.to(memory_format=torch.channels_last)  # faster convolutions, as in training
    test = data.test.take(test_samples, "--test-samples").to(dev)
    loss, accuracy = evaluate(checkpoint.model, test.images, test.labels, batch_size)
    return {
        "checkpoint": str(checkpoint.path),
        "model": checkpoint.meta["model"],
        "trained_on": checkpoint.dataset,
        "dataset": data.name,
        "parameters": count_parameters(checkpoint.model),
        "epoch": checkpoint.meta.get("epoch"),
        "test_images": len(test),
        "test_loss": loss,
        "test_accuracy": accuracy,
        "test_error": 1 - accuracy,
        "errors": round((1 - accuracy) * len(test)),
    }


def evaluate_stress(path: str | Path, mnist: Dataset, *, device: str = "auto", batch_size: int = EVAL_BATCH,
                    cache_dir: str | Path | None = None, on_make: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Accuracy of a checkpoint on the clean test set and on every stress set (`lenet5.data.stress`,
    made once and cached), with the share its calibration marks unsure and the accuracy on the rest;
    and the share of non-digits (`lenet5.data.nondigits`) it marks unsure."""
    from lenet5.calibration import Calibration, judge, logits_of
    from lenet5.data.stress import load_stress_sets

    checkpoint = load_checkpoint(path, resolve_device(device))
    checkpoint.model.to(memory_format=torch.channels_last)
    calibration = Calibration.from_meta(checkpoint.meta)
    sets, nondigits, cache = load_stress_sets(mnist.test, cache_dir, on_make=on_make)
    rows = []
    for name, split in {"clean": mnist.test, **sets}.items():
        judgement = judge(logits_of(checkpoint.model, split.images, batch_size), calibration)
        correct = judgement.probabilities.argmax(1) == split.labels
        unsure = judgement.unsure
        sure = ~unsure
        rows.append({"set": name, "images": len(split), "accuracy": float(correct.double().mean()),
                     "unsure": float(unsure.double().mean()),
                     "accuracy_when_sure": float(correct[sure].double().mean()) if sure.any() else None})
    others = []
    for name, images in nondigits.items():
        judgement = judge(logits_of(checkpoint.model, images, batch_size), calibration)
        others.append({"set": name, "images": len(images), "unsure": float(judgement.unsure.double().mean()),
                       "unlike_digits": float(judgement.unlike_digits.double().mean())})
    return {"checkpoint": str(checkpoint.path), "model": checkpoint.meta["model"],
            "parameters": count_parameters(checkpoint.model), "epoch": checkpoint.meta.get("epoch"),
            "calibration": calibration.rule(), "stress_cache": str(cache), "digits": rows, "nondigits": others}
