"""The draw-a-digit page in a real Chromium, driven by Playwright: draw MNIST test digits
stroke by stroke with the mouse and check the page shows the right digit and the maps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lenet5.train import TrainConfig, fit
from serving import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic"]


def strokes(digit: np.ndarray, cell: float, origin: tuple[float, float]) -> list[list[tuple[float, float]]]:
    """The digit's ink as horizontal pen strokes, one per run of inked pixels in each row."""
    out = []
    for row in range(28):
        ink = np.append(digit[row] > 100, False)
        col = 0
        while col < 28:
            if ink[col]:
                start = col
                while ink[col]:
                    col += 1
                y = origin[1] + (row + 0.5) * cell
                out.append([(origin[0] + (start + 0.5) * cell, y), (origin[0] + (col - 0.5) * cell, y)])
            col += 1
    return out


@pytest.fixture(scope="module")
def page_server(mnist, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is needed for the browser test and is not at {CHROMIUM}")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    run = os.environ.get("LENET5_PAGE_CHECKPOINT")  # for the docs' screenshot: a fully trained model
    if not run:
        run = tmp_path_factory.mktemp("page") / "run"
        fit(TrainConfig(model="lenet5", optimizer="adam", batch_size=64, epochs=2, train_samples=20_000,
                        test_samples=1_000), mnist, run)
    with Server(run) as running:
        yield running


def test_drawing_digits_shows_the_right_answer_and_the_maps(page_server, mnist, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
            page.goto(page_server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('lenet5')")
            box = page.locator("#canvas").bounding_box()
            cell = box["width"] / 28
            for index in (0, 1, 2, 3):  # test digits 7, 2, 1, 0
                page.keyboard.press("Escape")
                assert page.locator("#digit").inner_text() == "?"
                digit, label = mnist.test.images[index].numpy(), int(mnist.test.labels[index])
                for (x0, y0), (x1, y1) in strokes(digit, cell, (box["x"], box["y"])):
                    page.mouse.move(x0, y0)
                    page.mouse.down()
                    page.mouse.move(x1, y1, steps=3)
                    page.mouse.up()
                page.wait_for_function(f"document.getElementById('digit').textContent === '{label}'", timeout=15_000)
                page.wait_for_function("document.querySelectorAll('#maps img').length >= 6")
                page.wait_for_function("[...document.querySelectorAll('#maps img')].every(i => i.complete && i.naturalWidth > 0)")
            layers = page.eval_on_selector_all("#maps img", "imgs => imgs.map(i => i.dataset.layer)")
            assert len(layers) >= 6 and layers[-1] == "output"
            assert page.eval_on_selector("#prepared", "img => img.naturalWidth") == 28
            widths = page.eval_on_selector_all("#bars .fill", "els => els.map(e => parseFloat(e.style.width))")
            assert len(widths) == 10 and max(widths) == widths[int(mnist.test.labels[3])]
            shot = Path(os.environ.get("LENET5_PAGE_SCREENSHOT", tmp_path / "page.png"))
            page.set_viewport_size({"width": 1100, "height": 900})
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            page.click("#clear")
            assert page.locator("#digit").inner_text() == "?"
        finally:
            browser.close()
