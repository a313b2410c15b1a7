"""What the service does with one request's input: validate it, prepare it, predict, answer.

Runs in worker threads; the model is read-only, so requests need no lock. Every refusal is a
`RequestRefused` carrying the HTTP status and a one-line message.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lenet5.calibration import Calibration, judge
from lenet5.checkpoint import load_checkpoint
from lenet5.data import describe_dataset
from lenet5.data.transforms import to_model_input
from lenet5.explain import explain_digit
from lenet5.models import count_parameters, describe
from lenet5.preprocess import ImageError, load_grey, prepare_digit

SIDE = 28  # JSON pixels are MNIST's 28x28
JSON_TYPES = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object", list: "an array"}


class RequestRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def pixels_from_json(body: bytes) -> tuple[np.ndarray, bool]:
    """A JSON body {"pixels": 28x28 numbers 0-255, "prepare": bool} -> (float64 array, prepare).

    The shape and every value are checked in Python before numpy sees them: numpy would turn
    true into 1 and "7" into 7.0, and overflow on an integer of 400 digits.
    """
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestRefused(400, "the JSON is nested too deeply") from None
    except ValueError:  # includes bad UTF-8 and integers longer than Python's 4,300 digits
        raise RequestRefused(400, "the body is not valid JSON") from None
    if not isinstance(payload, dict) or "pixels" not in payload:
        raise RequestRefused(422, 'expected a JSON object with "pixels": a 28x28 array')
    prepare = payload.get("prepare", True)
    if not isinstance(prepare, bool):
        raise RequestRefused(422, '"prepare" must be true or false')
    rows = payload["pixels"]
    expected = "pixels must be a 28x28 array of numbers"
    if not isinstance(rows, list):
        raise RequestRefused(422, f"{expected}, got {JSON_TYPES.get(type(rows), 'a number')}")
    if not all(isinstance(row, list) for row in rows):
        raise RequestRefused(422, f"{expected}, got an array whose items are not all arrays")
    widths = {len(row) for row in rows}
    if len(rows) != SIDE or widths != {SIDE}:
        got = f"{len(rows)}x{widths.pop()}" if len(widths) == 1 else f"{len(rows)} rows of different lengths"
        raise RequestRefused(422, f"pixels must be 28x28, got {got}")
    for row in rows:
        for value in row:
            if type(value) not in (int, float):  # bool is a subclass of int: refused here too
                raise RequestRefused(422, f"{expected}, got {JSON_TYPES[type(value)]}")
            if isinstance(value, float) and not math.isfinite(value):
                raise RequestRefused(422, "pixels contain NaN or infinite values")
            if not 0 <= value <= 255:
                raise RequestRefused(422, "pixels must be in 0..255")
    return np.array(rows, dtype=np.float64), prepare


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _diverging(values: np.ndarray) -> np.ndarray:
    """Blue (negative), white (0), red (positive) as uint8 RGB, scaled by the largest |value|."""
    scale = float(np.abs(values).max()) or 1.0
    v = np.clip(values / scale, -1, 1)[..., None]
    white, red, blue = np.array([255, 255, 255.0]), np.array([178, 24, 43.0]), np.array([33, 102, 172.0])
    rgb = np.where(v >= 0, white + (red - white) * v, white + (blue - white) * -v)
    return rgb.astype(np.uint8)


def layer_images(maps: dict[str, np.ndarray], display_shapes: dict[str, tuple[int, int]] | None = None
                 ) -> list[dict[str, Any]]:
    """Each layer's maps as one PNG: channels side by side (1-px gaps), vectors as a strip 4 pixels
    tall, or as the picture the model's `display_shapes` names (the 1998 network's F6: 7x12)."""
    display_shapes = display_shapes or {}
    layers = []
    for name, value in maps.items():
        if name == "input":
            continue
        if value.ndim == 3 and value.shape[1] > 1:
            c, h, w = value.shape
            tiles = np.full((h, c * (w + 1) - 1), np.nan, dtype=np.float32)
            for k in range(c):
                tiles[:, k * (w + 1):k * (w + 1) + w] = value[k]
            rgb = _diverging(np.nan_to_num(tiles))
            rgb[np.isnan(tiles)] = 240
        else:
            vector = value.reshape(-1)
            shape = display_shapes.get(name)
            rgb = _diverging(vector.reshape(shape) if shape else np.repeat(vector[None, :], 4, axis=0))
        layers.append({"name": name, "shape": list(value.shape), "png": _png(rgb)})
    return layers


class Predictor:
    def __init__(self, checkpoint: str | Path):
        loaded = load_checkpoint(checkpoint, "cpu")
        self.model, self.meta, self.path = loaded.model, loaded.meta, loaded.path
        self.calibration = Calibration.from_meta(self.meta)

    def info(self) -> dict[str, Any]:
        spec = describe_dataset(self.model.dataset)
        noun = spec.noun if spec else "an image"
        return {"name": self.meta["model"], "description": describe(self.meta["model"]),
                "parameters": count_parameters(self.model), "epoch": self.meta.get("epoch"),
                "metrics": self.meta.get("metrics", {}), "checkpoint": self.path.name,
                "dataset": self.model.dataset, "dataset_title": spec.title if spec else self.model.dataset,
                "classes": list(self.model.classes), "noun": noun,
                "calibration": self.calibration.to_meta() | {"rule": self.calibration.rule()},
                "input": f"an image of {noun}, any size; or 28x28 pixels 0-255, ink high"}

    def from_image(self, data: bytes, maps: bool) -> dict[str, Any]:
        """An uploaded image, decoded within `lenet5.imagefile`'s bounds like `lenet5 predict`'s files."""
        try:
            prepared = prepare_digit(load_grey(data, "upload"), "upload")
        except ImageError as e:
            raise RequestRefused(422, str(e)) from None
        return self.answer(prepared, maps)

    def from_json(self, body: bytes, maps: bool) -> dict[str, Any]:
        array, prepare = pixels_from_json(body)
        if prepare:
            try:
                digit = prepare_digit((array / 255).astype(np.float32), "pixels")
            except ImageError as e:
                raise RequestRefused(422, str(e)) from None
        else:
            digit = np.round(array).astype(np.uint8)
        return self.answer(digit, maps)

    def answer(self, digit: np.ndarray, maps: bool) -> dict[str, Any]:
        started = time.perf_counter()
        if maps:
            explanation = explain_digit(self.model, digit)
            outputs = torch.from_numpy(explanation.maps["output"])[None]
        else:  # the fast path: no activations kept
            with torch.no_grad():
                outputs = self.model(to_model_input(torch.from_numpy(digit)[None]))
        with torch.no_grad():
            judgement = judge(self.model.logits(outputs), self.calibration)
        probabilities = judgement.probabilities[0].numpy()
        rounded = [round(float(p), 6) for p in probabilities]
        index = int(np.argmax(probabilities))
        reason = judgement.reason(0)
        result = {"digit": index, "label": self.model.classes[index], "confidence": max(rounded),
                  "unsure": reason is not None, "unsure_reason": reason, "calibrated": self.calibration.fitted,
                  "probabilities": rounded,
                  "prepared": _png(digit), "model": self.meta["model"]}
        if maps:
            result["maps"] = layer_images(explanation.maps, explanation.display_shapes)
        result["inference_ms"] = round(1000 * (time.perf_counter() - started), 3)
        return result
