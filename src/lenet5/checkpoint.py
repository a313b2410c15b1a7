"""Self-contained checkpoints: safetensors weights plus the model's name, arguments and run config.

``NAME.safetensors`` holds the weights and, in its metadata, the same JSON that is written
beside it as ``NAME.json`` for people and tools. Loading needs only the .safetensors file, so
evaluate, predict, serve and export take a checkpoint path and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import lenet5
from lenet5.errors import CheckpointError, Lenet5Error
from lenet5.fileio import atomic_write_bytes, atomic_write_json
from lenet5.models import DigitClassifier, create_model

FORMAT = "lenet5-checkpoint/1"
METADATA_KEY = "lenet5"


@dataclass
class Checkpoint:
    model: DigitClassifier
    meta: dict[str, Any]
    path: Path


def save_checkpoint(path: str | Path, model: DigitClassifier, *, config: dict[str, Any] | None = None,
                    epoch: int | None = None, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically; returns the weights' path."""
    path = Path(path).with_suffix(".safetensors")
    meta = {
        "format": FORMAT,
        "model": model.registry_name,
        "model_args": getattr(model, "init_args", {}),
        "epoch": epoch,
        "metrics": metrics or {},
        "config": config or {},
        "lenet5_version": lenet5.__version__,
        "torch_version": torch.__version__,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)}))
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a .safetensors file, its .json sidecar, or a run folder (its best checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.safetensors", path / "best.safetensors"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: a folder with no checkpoints/best.safetensors in it")
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes, with its weights, in eval mode."""
    path = resolve_checkpoint_path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: safetensors file without lenet5 metadata (not written by lenet5)")
    try:
        meta = json.loads(header[METADATA_KEY])
        name, args = meta["model"], meta.get("model_args", {})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged lenet5 metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this lenet5 reads {FORMAT!r}")
    try:
        model = create_model(name, **args)
    except Lenet5Error as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit model {name!r}: {' '.join(first[1:3]) or first[0]}") from None
    return Checkpoint(model=model.to(device).eval(), meta=meta, path=path)
