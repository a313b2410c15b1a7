"""The figures: real PNGs, made without touching the caller's matplotlib state."""

from __future__ import annotations

import subprocess
import sys

from lenet5.plots import plot_curves, plot_digit_gallery

HISTORY = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.1 / e, "train_acc": 1 - 0.1 / e, "test_acc": 1 - 0.12 / e}
           for e in (1, 2, 3)]


def test_curves_are_a_png():
    png = plot_curves(HISTORY, "title")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_plotting_leaves_the_callers_backend_and_figures_alone():
    """A notebook's pyplot backend and open figures survive the library's plots (issue 11)."""
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np
figure = plt.figure()
from lenet5.plots import plot_curves, plot_digit_gallery
plot_curves({HISTORY!r})
plot_digit_gallery([np.zeros((28, 28), dtype=np.uint8)], ["0"])
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert plt.get_fignums() == [figure.number], plt.get_fignums()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_gallery_png():
    import numpy as np

    png = plot_digit_gallery([np.full((28, 28), 255, dtype=np.uint8)] * 3, ["a", "b", "c"], title="t")
    assert png.startswith(b"\x89PNG")
