"""examples/tutorial.ipynb runs top to bottom (short settings), so it never rots."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tutorial.ipynb"


def test_tutorial_notebook_executes(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LENET5_TUTORIAL_FAST", "1")
    monkeypatch.setenv("LENET5_TUTORIAL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LENET5_DATA", str(mnist_dir))
    monkeypatch.setenv("LENET5_OFFLINE", "1")
    (tmp_path / "runs").mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "test accuracy" in outputs and "predicted" in outputs
    assert "torch.Size([60000, 28, 28])" in outputs
    assert (tmp_path / "runs" / "tutorial-fast" / "curves.png").is_file()
    # Its figures reach the notebook as images: pyplot's inline backend was not switched off by a
    # library call (the digits, the curves after fit, the feature maps, the user's digit).
    pictures = [base64.b64decode(o["data"]["image/png"]) for cell in notebook.cells if cell.cell_type == "code"
                for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) == 4, f"{len(pictures)} figures shown"  # 2 when a library call switches to Agg (checked)
    for png in pictures:
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and min(image.size) > 100
