"""Predict the class of users' image files with a checkpoint, one clear line per unreadable file.

Classes are named as the checkpoint's data set names them (digits for MNIST, "Sneaker" for
Fashion-MNIST); `digit` keeps its old name in the JSON but is the class index for every data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from lenet5.calibration import DEFAULT, Calibration, judge, logits_of
from lenet5.checkpoint import load_checkpoint
from lenet5.data.transforms import to_model_input
from lenet5.errors import ConfigError
from lenet5.fileio import atomic_write_bytes
from lenet5.models import DigitClassifier
from lenet5.preprocess import ImageError, prepare_file
from lenet5.runtime import resolve_device

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    file: str
    digit: int | None = None  # the class index (a digit for MNIST)
    confidence: float | None = None
    top3: list[tuple[int, float]] = field(default_factory=list)
    label: str | None = None  # the class name
    top3_labels: list[str] = field(default_factory=list)
    unsure: bool | None = None  # by the checkpoint's calibration (lenet5.calibration)
    unsure_reason: str | None = None  # "low confidence" or "unlike the digits it knows"
    error: str | None = None
    prepared: np.ndarray | None = field(default=None, repr=False)  # the 28x28 the model saw
    prepared_file: str | None = None  # where --save-prepared wrote it

    def as_dict(self) -> dict:
        row = {"file": self.file, "digit": self.digit, "label": self.label, "confidence": self.confidence,
               "unsure": self.unsure, "unsure_reason": self.unsure_reason,
               "top3": [{"digit": d, "label": name, "probability": p} for (d, p), name in zip(self.top3, self.top3_labels)],
               "error": self.error}
        return row | ({"prepared_file": self.prepared_file} if self.prepared_file else {})


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted, not recursive)."""
    paths: list[Path] = []
    for number, given in enumerate(inputs, 1):
        if str(given) == "":  # Path("") is the current folder: never what an empty argument meant
            raise ConfigError(f"input {number} is an empty path (\"\"): give an image file or a folder")
        item = Path(given)
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        else:
            paths.append(item)
    return paths


@torch.no_grad()
def class_probabilities(model: DigitClassifier, digits: torch.Tensor, batch_size: int = 512,
                        temperature: float = 1.0) -> torch.Tensor:
    """(N, 28, 28) uint8 MNIST-style images -> (N, classes) probabilities (at a calibration's temperature)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.probabilities(to_model_input(digits[i:i + batch_size].to(device)), temperature).cpu()
           for i in range(0, len(digits), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(model.classes))


def predict_files(model: DigitClassifier, paths: Sequence[str | Path],
                  calibration: Calibration = DEFAULT) -> list[Prediction]:
    """Prepare every file MNIST-style and classify all of them in one batch, with the calibration's
    confidence and unsure mark. A file that cannot be used gets its reason in `error`; the others
    are unaffected."""
    predictions = [Prediction(file=str(p)) for p in paths]
    ready = []
    for prediction in predictions:
        try:
            prediction.prepared = prepare_file(prediction.file, Path(prediction.file).name)
            ready.append(prediction)
        except ImageError as e:
            prediction.error = str(e)
    if ready:
        judgement = judge(logits_of(model, torch.from_numpy(np.stack([p.prepared for p in ready]))), calibration)
        for i, (prediction, p) in enumerate(zip(ready, judgement.probabilities)):
            values, digits = p.topk(min(3, len(p)))
            prediction.top3 = [(int(d), float(v)) for d, v in zip(digits, values)]
            prediction.top3_labels = [model.classes[d] for d, _ in prediction.top3]
            prediction.digit, prediction.confidence = prediction.top3[0]
            prediction.label = prediction.top3_labels[0]
            prediction.unsure_reason = judgement.reason(i)
            prediction.unsure = prediction.unsure_reason is not None
    return predictions


def predict_checkpoint(checkpoint: str | Path, inputs: Iterable[str | Path], *, device: str = "auto",
                       save_prepared: str | Path | None = None) -> tuple[list[Prediction], Calibration]:
    """Load a checkpoint and predict every image file or folder of images in `inputs`; also returns
    the calibration the unsure marks follow (the checkpoint's, or the default rule)."""
    paths = expand_inputs(inputs)
    loaded = load_checkpoint(checkpoint, resolve_device(device))
    calibration = Calibration.from_meta(loaded.meta)
    predictions = predict_files(loaded.model, paths, calibration)
    if save_prepared:
        save_prepared_digits(predictions, Path(save_prepared))
    return predictions, calibration


def save_prepared_digits(predictions: Sequence[Prediction], folder: Path) -> None:
    """Write each prepared 28x28 input as FOLDER/STEM.28x28.png, and its name into
    `prediction.prepared_file`. Inputs with the same stem (a/1.png, b/1.png, 1.jpg) get
    STEM-2, STEM-3, ... in the order given, so none overwrites another."""
    from PIL import Image
    import io

    used: set[str] = set()
    for prediction in predictions:
        if prediction.prepared is None:
            continue
        stem, count = Path(prediction.file).stem, 1
        name = f"{stem}.28x28.png"
        while name.lower() in used:  # lower: case-insensitive file systems would still collide
            count += 1
            name = f"{stem}-{count}.28x28.png"
        used.add(name.lower())
        buffer = io.BytesIO()
        Image.fromarray(prediction.prepared).save(buffer, "PNG")
        atomic_write_bytes(folder / name, buffer.getvalue())
        prediction.prepared_file = str(folder / name)
