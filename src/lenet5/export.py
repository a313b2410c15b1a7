"""Export a checkpoint to ONNX or TorchScript, check it against PyTorch, and write its model card.

The exported graph takes float32 images (N, 1, 28, 28), ink 1.0 on background 0.0, prepared the
MNIST way (see `lenet5.preprocess`; `lenet5 predict --save-prepared` shows what that gives), with
any N, and returns scores (N, classes): the argmax is the class and a softmax gives probabilities,
whatever the model's own output is (logits, or the 1998 network's RBF penalties negated).
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lenet5.checkpoint import Checkpoint
from lenet5.data import Dataset, describe_dataset
from lenet5.data.transforms import to_model_input
from lenet5.errors import Lenet5Error
from lenet5.fileio import atomic_write_bytes, atomic_write_text
from lenet5.models import count_parameters, describe

FORMATS = ("onnx", "torchscript")


class ExportError(Lenet5Error):
    """The export failed, or the exported model disagrees with PyTorch."""


class Scores(nn.Module):
    """The model followed by its `logits`: one output convention for every exported model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model(images))


def _onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    import onnx  # noqa: F401  (a clear ImportError before torch's own)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, input_names=["images"],
                                    output_names=["scores"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        program.save(str(Path(tmp) / "model.onnx"))
        return (Path(tmp) / "model.onnx").read_bytes()


def export(checkpoint: Checkpoint, path: str | Path, fmt: str) -> Path:
    """Write the model in `fmt` to `path` atomically; returns the path."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    module = Scores(checkpoint.model.to("cpu").to(memory_format=torch.contiguous_format)).eval()
    example = torch.rand(2, 1, 28, 28)
    path = Path(path)
    try:
        if fmt == "onnx":
            data = _onnx_bytes(module, example)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, example)
                buffer = io.BytesIO()
                torch.jit.save(traced, buffer)  # TorchScript is deprecated in recent torch; still asked for
            data = buffer.getvalue()
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): "
                          "pip install 'lenet5[export]'") from None
    return atomic_write_bytes(path, data)


@torch.no_grad()
def check_export(checkpoint: Checkpoint, path: str | Path, fmt: str, images: torch.Tensor) -> dict[str, Any]:
    """Run the exported model and PyTorch on the same digits: max |difference| and class agreement."""
    x = to_model_input(images)
    reference = Scores(checkpoint.model.to("cpu")).eval()(x).numpy()
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("checking an ONNX export needs onnxruntime: pip install 'lenet5[export]'") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = np.concatenate([session.run(None, {"images": x[i:i + 500].numpy()})[0]
                                   for i in range(0, len(x), 500)])  # two batch sizes: dynamic batch
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path), map_location="cpu")
        exported = torch.cat([loaded(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()
    agree = int((exported.argmax(1) == reference.argmax(1)).sum())
    result = {"images": len(x), "max_abs_difference": float(np.abs(exported - reference).max()),
              "same_class": agree, "identical_classes": agree == len(x)}
    if not np.isfinite(result["max_abs_difference"]):  # NaN scores agree on argmax 0 and compare as nothing
        raise ExportError(f"{path}: the exported model or PyTorch gives scores that are not finite numbers")
    if not result["identical_classes"]:
        raise ExportError(f"{path}: the exported model disagrees with PyTorch on {len(x) - agree} of {len(x)} digits")
    return result


def model_card(checkpoint: Checkpoint, *, test_accuracy: float | None, export_check: dict[str, Any] | None = None,
               exported: Path | None = None) -> str:
    meta, model = checkpoint.meta, checkpoint.model
    config = meta.get("config", {})
    recipe = ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("device", "threads", "eval_batch_size"))
    spec = describe_dataset(checkpoint.dataset)
    title = spec.title if spec else checkpoint.dataset
    accuracy = f"{test_accuracy:.2%} on the {title} test set" if test_accuracy is not None else "not measured"
    if spec:
        data = (f"{spec.title} ({spec.source}): 28x28 grey images of {len(spec.classes)} classes"
                + (f", {spec.split_sizes[0]:,} for training and {spec.split_sizes[1]:,} for testing." if spec.split_sizes else "."))
    else:
        data = f"{checkpoint.dataset}: 28x28 grey images of {len(checkpoint.classes)} classes."
    names = ", ".join(f"{k} {name}" for k, name in enumerate(checkpoint.classes))
    limits = ("Recognising single handwritten digits 0-9, for teaching and experiments. One digit per image;\n"
              "no rejection of non-digits beyond the confidence (`lenet5 evaluate --report` gives the\n"
              "rejection curve). Trained on 1990s US writers' digits; other writing styles may do worse."
              if checkpoint.dataset == "mnist" else
              f"Recognising one image of the {title} classes above, for teaching and experiments; no rejection\n"
              "of other images beyond the confidence (`lenet5 evaluate --report` gives the rejection curve).\n"
              "`lenet5 predict` prepares images the way MNIST's digits were prepared, which may differ from how\n"
              "this data set's images were made.")
    check = ""
    if export_check:
        check = (f"\n## Export check\n\n`{exported.name if exported else 'export'}` against PyTorch on "
                 f"{export_check['images']:,} test images: max |score difference| "
                 f"{export_check['max_abs_difference']:.2e}, same predicted class on "
                 f"{export_check['same_class']:,} of {export_check['images']:,}.\n")
    return f"""# Model card: {meta['model']}

## Model
{describe(meta['model'])}
Registry name `{meta['model']}`, arguments {meta.get('model_args') or '{}'}, {count_parameters(model):,} trainable
parameters. Checkpoint `{checkpoint.path.name}`, epoch {meta.get('epoch')}, written by lenet5
{meta.get('lenet5_version')} with torch {meta.get('torch_version')}.
{f"This card describes the export `{exported.name}`." + chr(10) if exported else ""}
## Data
{data}
Classes, by output index: {names}.

## Training recipe
{recipe or 'not recorded'}

## Performance
Test accuracy: **{accuracy}**. Training-time figures of the checkpoint: {meta.get('metrics') or 'none recorded'}.
{check}
## Input and preprocessing
Float32 tensor (N, 1, 28, 28), ink 1.0 on background 0.0 (MNIST bytes / 255). The digit must be
prepared as MNIST's were: light on dark, its bounding box scaled to fit 20x20 keeping the aspect
ratio (anti-aliased), placed in the 28x28 field with its centre of mass at pixel (14, 14).
`lenet5 predict` does this for any photo or drawing (`lenet5.preprocess.prepare_file`); without
it, accuracy on users' images collapses (measured: 16% with a plain resize, docs/results/userlike).
Output: scores (N, {len(checkpoint.classes)}); argmax = class index (above), softmax = probabilities.

## Intended use and limits
{limits}
"""


def card_path(out: Path) -> Path:
    """`model.onnx` -> `model.onnx.model-card.md`: the ONNX and TorchScript exports of one stem
    each keep their own card (named by the stem alone, the second export overwrote the first's)."""
    tail = out.suffix.encode()[:64].decode(errors="ignore") + ".model-card.md"
    stem = out.stem.encode()[:255 - len(tail.encode())].decode(errors="ignore")  # NAME_MAX: a long legal name
    return out.with_name(stem + tail)


def export_checkpoint(checkpoint: Checkpoint, out: str | Path, fmt: str, data: Dataset | None,
                      check_images: int = 1000) -> dict[str, Any]:
    """Export, check against PyTorch on test digits and write its model card beside it (`card_path`)."""
    from lenet5.evaluate import evaluate

    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; the export needs a file name (e.g. {out / 'model.onnx'})")
    export(checkpoint, out, fmt)
    result: dict[str, Any] = {"path": str(out), "format": fmt, "bytes": out.stat().st_size}
    accuracy = None
    if data is not None:
        from lenet5.evaluate import check_classes

        check_classes(checkpoint.model, data)
        result["check"] = check_export(checkpoint, out, fmt, data.test.images[:check_images])
        accuracy = evaluate(checkpoint.model.to("cpu"), data.test.images, data.test.labels)[1]
        result["test_accuracy"] = accuracy
    card = card_path(out)
    atomic_write_text(card, model_card(checkpoint, test_accuracy=accuracy, export_check=result.get("check"),
                                       exported=out))
    result["model_card"] = str(card)
    return result
