"""Self-contained checkpoints: safetensors weights plus the model's name, arguments and run config.

``NAME.safetensors`` holds the weights and, in its metadata, the same JSON that is written
beside it as ``NAME.json`` for people and tools. Loading needs only the .safetensors file, so
evaluate, predict, serve and export take a checkpoint path and nothing else.

Loading trusts nothing in the file: the header is bounded in size, the metadata is checked
field by field against the model registry (a known model, arguments its constructor takes, of
the types it declares), and the model is first built on the "meta" device (no memory) so that
every tensor's name, shape and dtype is compared with the file's before any weight is allocated.
A file that fails any check is a one-line CheckpointError.

A checkpoint records the data set it was trained on and its class names (one per output); one
written before lenet5 knew other data sets (no "dataset" in its metadata) is MNIST's.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import lenet5
from lenet5.calibration import check_calibration
from lenet5.errors import CheckpointError, one_line
from lenet5.fileio import atomic_write_bytes
from lenet5.models import DigitClassifier, create_model, list_models, model_class

FORMAT = "lenet5-checkpoint/1"
METADATA_KEY = "lenet5"
# A lenet5 header (tensor table and metadata) is a few kB; safetensors itself allows 100 MB.
MAX_HEADER_BYTES = 1 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
MAX_CLASSES = 1000


@dataclass
class Checkpoint:
    model: DigitClassifier
    meta: dict[str, Any]
    path: Path

    @property
    def dataset(self) -> str:
        return self.model.dataset

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.classes


def checkpoint_files(model: DigitClassifier, *, config: dict[str, Any] | None = None, epoch: int | None = None,
                     metrics: dict[str, Any] | None = None,
                     calibration: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
    """The bytes of ``NAME.safetensors`` and of its ``NAME.json`` sidecar. `calibration`: see
    lenet5.calibration (absent from older checkpoints, which then get its default rule)."""
    outputs = getattr(model, "init_args", {}).get("num_classes", 10)
    classes = model.classes if len(model.classes) == outputs else tuple(str(k) for k in range(outputs))
    meta = {
        "format": FORMAT,
        "model": model.registry_name,
        "model_args": getattr(model, "init_args", {}),
        "dataset": model.dataset,
        "classes": list(classes),
        "epoch": epoch,
        "metrics": metrics or {},
        "config": config or {},
        "lenet5_version": lenet5.__version__,
        "torch_version": torch.__version__,
    }
    if calibration is not None:
        meta["calibration"] = calibration
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    return weights, (json.dumps(meta, indent=2) + "\n").encode()


def save_checkpoint(path: str | Path, model: DigitClassifier, *, config: dict[str, Any] | None = None,
                    epoch: int | None = None, metrics: dict[str, Any] | None = None,
                    calibration: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically; returns the weights' path."""
    path = Path(path).with_suffix(".safetensors")
    weights, sidecar = checkpoint_files(model, config=config, epoch=epoch, metrics=metrics, calibration=calibration)
    atomic_write_bytes(path, weights)
    atomic_write_bytes(path.with_suffix(".json"), sidecar)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a .safetensors file, its .json sidecar, or a run folder (its best checkpoint)."""
    from lenet5.run_folder import RunFolder  # the run folder's layout is RunFolder's to know

    path = Path(path)
    if path.is_dir():
        for candidate in (RunFolder(path).best_weights, path / "best.safetensors"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: a folder with no checkpoints/best.safetensors in it")
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header (tensor table and metadata), read within MAX_HEADER_BYTES."""
    unreadable = f"{path}: not a readable safetensors checkpoint"
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
            if size > MAX_HEADER_BYTES:
                raise CheckpointError(f"{unreadable} (a header of {size:,} bytes; a lenet5 checkpoint's is a few kB)")
            raw = f.read(size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{unreadable} (header: {one_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{unreadable} (its header is not a JSON object)")
    return header


def _type_error(value: Any, kind: Any) -> str | None:
    """Why `value` is not of the scalar type `kind` (None when it is)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if kind in SCALARS:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"must be {SCALARS[kind]}, got {value!r}"[:120]
        if kind is float and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        return None
    if value is not None and not isinstance(value, (int, float, str, bool)):
        return f"must be a plain value, got {type(value).__name__}"
    return None


def _check_model_args(name: str, args: Any) -> str | None:
    """Why the constructor of model `name` would not accept `args` (None when it would)."""
    if not isinstance(args, dict):
        return f"model_args must be an object, got {type(args).__name__}"
    init = model_class(name).__init__
    parameters = {k: p for k, p in inspect.signature(init).parameters.items() if k != "self"}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that does not evaluate: check the names only
        hints = {}
    for key, value in args.items():
        if key not in parameters or parameters[key].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                              inspect.Parameter.POSITIONAL_ONLY):
            return f"model {name!r} takes no argument {key!r}"[:160]
        problem = _type_error(value, hints.get(key))
        if problem:
            return f"model argument {key!r} {problem}"
    return None


def check_metadata(path: Path, meta: Any) -> dict[str, Any]:
    """`meta` if it is a lenet5 checkpoint's metadata this version can use; else CheckpointError."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: damaged lenet5 metadata (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {str(meta.get('format'))[:60]!r}, "
                              f"this lenet5 reads {FORMAT!r}")
    name = meta.get("model")
    if not isinstance(name, str) or name not in list_models():
        raise CheckpointError(f"{path}: unknown model {str(name)[:60]!r}; this lenet5 has: {', '.join(list_models())}")
    problems = [_check_model_args(name, meta.get("model_args", {}))]
    epoch = meta.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
        problems.append(f"epoch must be a count of epochs, got {str(epoch)[:40]}")
    for key in ("metrics", "config"):
        if not isinstance(meta.get(key, {}), dict):
            problems.append(f"{key} must be an object, got {type(meta[key]).__name__}")
    for key in ("lenet5_version", "torch_version"):
        if not isinstance(meta.get(key, ""), str):
            problems.append(f"{key} must be a string")
    problems.append(_check_classes(meta))
    if meta.get("calibration") is not None:
        problems.append(check_calibration(meta["calibration"]))
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(f"{path}: damaged lenet5 metadata: {problem}")
    return meta


def _check_classes(meta: dict[str, Any]) -> str | None:
    """Why the recorded data set and class names are unusable (None when they are fine or absent)."""
    dataset, classes = meta.get("dataset", "mnist"), meta.get("classes")
    if not isinstance(dataset, str) or not 0 < len(dataset) <= 1000:
        return "dataset must be a data set's name"
    if classes is None:
        return None
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES \
            or not all(isinstance(c, str) and 0 < len(c) <= 100 for c in classes):
        return f"classes must be a list of 2 to {MAX_CLASSES} names"
    args = meta.get("model_args", {})
    outputs = args.get("num_classes", 10) if isinstance(args, dict) else 10
    if len(classes) != outputs:
        return f"{len(classes)} class names for a model with {outputs} outputs"
    return None


def _check_tensors(path: Path, header: dict[str, Any], name: str, args: dict[str, Any]) -> None:
    """Compare the file's tensor table with the model's, built on the meta device (no allocation)."""
    try:
        with torch.device("meta"):
            blueprint = create_model(name, **args).state_dict()
    except Exception as e:  # any constructor's refusal of its arguments
        raise CheckpointError(f"{path}: model {name!r} cannot be built from model_args: {one_line(e)}") from None
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    missing, unexpected = sorted(set(blueprint) - set(table)), sorted(set(table) - set(blueprint))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit model {name!r}: missing {missing[:3]}, "
                              f"unexpected {[k[:40] for k in unexpected[:3]]}")
    for key, want in blueprint.items():
        entry = table[key] if isinstance(table[key], dict) else {}
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if shape != list(want.shape) or not isinstance(dtype, str) or DTYPES.get(dtype) != want.dtype:
            got = f"{str(shape)[:40]} {str(dtype)[:8]}"
            raise CheckpointError(f"{path}: weights do not fit model {name!r}: {key} is {got}, "
                                  f"the model's is {list(want.shape)} {DTYPE_NAMES.get(want.dtype, want.dtype)}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes, with its weights, in eval mode."""
    path = resolve_checkpoint_path(path)
    header = read_header(path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file without lenet5 metadata (not written by lenet5)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: damaged lenet5 metadata ({one_line(e)})") from None
    meta = check_metadata(path, meta)
    name, args = meta["model"], meta.get("model_args", {})
    _check_tensors(path, header, name, args)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({one_line(e)})") from None
    # NaN weights (a diverged run, a damaged file) predict "8 at nan% confidence" without a word
    broken = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:
        raise CheckpointError(f"{path}: weights contain NaN or infinite values ({broken[:60]}): the run that wrote "
                              f"them diverged, or the file is damaged")
    try:
        model = create_model(name, **args)
        model.load_state_dict(tensors)
    except Exception as e:  # cannot happen after the checks above; still one line if it does
        raise CheckpointError(f"{path}: weights do not fit model {name!r}: {one_line(e)}") from None
    model.dataset = meta.get("dataset", "mnist")
    if "classes" in meta:
        model.classes = tuple(meta["classes"])
    elif args.get("num_classes", 10) != 10:  # no names recorded: the label numbers
        model.classes = tuple(str(k) for k in range(args["num_classes"]))
    return Checkpoint(model=model.to(device).eval(), meta=meta, path=path)


def store_calibration(checkpoint: Checkpoint, calibration: dict[str, Any]) -> Path:
    """Rewrite the checkpoint's file (and sidecar) with `calibration` in its metadata, weights unchanged."""
    meta = checkpoint.meta
    return save_checkpoint(checkpoint.path, checkpoint.model, config=meta.get("config"), epoch=meta.get("epoch"),
                           metrics=meta.get("metrics"), calibration=calibration)
