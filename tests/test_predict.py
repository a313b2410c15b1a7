"""Preparing users' images MNIST-style and predicting them, on images made here from MNIST digits."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet5.cli import main
from lenet5.data.userlike import make_user_images
from lenet5.preprocess import ImageError, load_grey, prepare_digit, prepare_file
from lenet5.train import TrainConfig, fit


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A keras-lenet trained briefly (2 passes over 20,000 images): about 98% on MNIST."""
    run = tmp_path_factory.mktemp("predict") / "run"
    config = TrainConfig(model="keras-lenet", optimizer="adam", batch_size=64, epochs=2, train_samples=20_000,
                         test_samples=2_000)
    return fit(config, mnist, run)


def test_an_mnist_digit_survives_preparation_unchanged_in_shape(mnist):
    digit = mnist.test.images[0].numpy()
    prepared = prepare_digit(digit.astype(np.float32) / 255)
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8
    ys, xs = np.nonzero(prepared > 30)
    assert ys.max() - ys.min() <= 20 and xs.max() - xs.min() <= 20  # fitted into 20x20
    weights = prepared.astype(float)
    cy = (np.arange(28)[:, None] * weights).sum() / weights.sum()
    cx = (np.arange(28)[None, :] * weights).sum() / weights.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # centre of mass where MNIST has it
    agreement = np.corrcoef(prepared.ravel().astype(float), digit.ravel().astype(float))[0, 1]
    assert agreement > 0.9


def test_dark_on_light_and_light_on_dark_give_the_same_digit(mnist):
    digit = mnist.test.images[1].numpy()
    big = np.asarray(Image.fromarray(digit).resize((300, 300), Image.Resampling.BICUBIC))
    canvas = np.zeros((500, 400), dtype=np.uint8)
    canvas[40:340, 70:370] = big
    light_on_dark = prepare_file(encode(canvas))
    dark_on_light = prepare_file(encode(255 - canvas, "JPEG"))
    assert np.abs(light_on_dark.astype(int) - dark_on_light.astype(int)).mean() < 12


def test_transparent_canvas_drawings_are_flattened(mnist):
    digit = np.asarray(Image.fromarray(mnist.test.images[2].numpy()).resize((280, 280)))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)  # black strokes on a transparent canvas
    rgba[..., 3] = digit
    prepared = prepare_file(encode(rgba, mode="RGBA"))
    assert prepared.max() > 200 and prepared[0].max() == 0


@pytest.mark.parametrize("make, message", [
    (lambda: b"", "empty file"),
    (lambda: b"<html>not an image</html>", "not an image file"),
    (lambda: encode(np.full((50, 80), 255, np.uint8)), "no ink found"),
    (lambda: encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")[:300],
     "damaged or truncated"),
])
def test_bad_inputs_get_a_reason(make, message):
    with pytest.raises(ImageError, match=message):
        prepare_file(make(), "upload")


def test_a_decompression_bomb_is_refused_before_decoding():
    # A valid 12,000 x 12,000 grey PNG (144 MP) that compresses to a few hundred kilobytes.
    raw = zlib.compress(b"".join(b"\x00" + bytes(12_000) for _ in range(12_000)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12_000, 12_000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="144 MP, more than the 25 MP accepted"):
        load_grey(png, "bomb.png")


def test_user_like_images_are_predicted_about_as_well_as_mnist(mnist, trained):
    """200 test digits redrawn as users' photos and drawings, through the whole predict path."""
    from lenet5.predict import predict_files

    n = 200
    users = make_user_images(mnist.test.images[:n].numpy(), mnist.test.labels[:n].numpy(), seed=1)
    folder = trained.run_dir / "users"
    folder.mkdir()
    paths = []
    for i, user in enumerate(users):
        paths.append(folder / f"{i:03d}.{user.extension}")
        paths[-1].write_bytes(user.data)
    predictions = predict_files(trained.model, paths)
    assert all(p.error is None for p in predictions)
    accuracy = np.mean([p.digit == u.label for p, u in zip(predictions, users)])
    mnist_accuracy = trained.history[-1]["test_acc"]
    assert accuracy >= mnist_accuracy - 0.03, (accuracy, mnist_accuracy)


def test_predict_command_reports_each_file(mnist, trained, tmp_path, capsys):
    good = tmp_path / "seven.png"
    good.write_bytes(encode(255 - np.asarray(Image.fromarray(mnist.test.images[0].numpy()).resize((200, 200)))))
    (tmp_path / "notes.txt").write_text("not an image")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code = main(["predict", str(trained.run_dir), str(good), str(bad), "--json",
                 "--save-prepared", str(tmp_path / "prepared")])
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert code == 1 and "1 of 2 file(s) could not be used" in err
    assert rows[0]["digit"] == 7 and rows[0]["error"] is None and len(rows[0]["top3"]) == 3
    assert rows[1]["digit"] is None and "broken.png" in rows[1]["error"]
    assert (tmp_path / "prepared" / "seven.28x28.png").is_file()
    code = main(["predict", str(trained.run_dir), str(tmp_path), "--csv"])  # a folder: its images only
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == "file,digit,label,confidence,top3,error,unsure" and "notes.txt" not in out
    # the run's checkpoints/ folder is that checkpoint, as for evaluate (it once fell to the bundled model)
    assert main(["predict", str(trained.run_dir / "checkpoints"), str(good), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["digit"] == 7 and "bundled" not in err


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n0 setgray 4 4 moveto 24 24 lineto stroke showpage\n%%EOF\n"


def test_only_the_listed_formats_are_decoded(tmp_path):
    """PostScript named .png is refused, never handed to Ghostscript: Pillow would open it."""
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # a real EPS, as far as Pillow can tell
    with pytest.raises(ImageError, match=r"upload: not an image file this tool can read \(PNG, JPEG"):
        prepare_file(EPS, "upload")
    (tmp_path / "digit.png").write_bytes(EPS)
    with pytest.raises(ImageError, match="digit.png: not an image file"):
        prepare_file(tmp_path / "digit.png")


@pytest.mark.parametrize("kind", ["PNG 16-bit", "TIFF 16-bit", "TIFF float 0-1", "TIFF float 0-255", "TIFF 32-bit"])
def test_deep_and_float_images_are_scaled_not_clipped(mnist, trained, kind):
    """MNIST test digits written at 16 bits, 32 bits and as floats are prepared like their 8-bit selves."""
    from lenet5.predict import predict_files

    digits, labels = mnist.test.images[:5].numpy(), mnist.test.labels[:5].numpy()
    fmt = kind.split()[0]
    paths = []
    for i, digit in enumerate(digits):
        big = 255 - np.asarray(Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC))  # dark on light
        deep = {"PNG 16-bit": big.astype(np.uint16) * 257, "TIFF 16-bit": big.astype(np.uint16) * 257,
                "TIFF float 0-1": big.astype(np.float32) / 255, "TIFF float 0-255": big.astype(np.float32),
                "TIFF 32-bit": big.astype(np.int32) * 65793}[kind]
        path = trained.run_dir / f"deep-{kind.replace(' ', '_')}-{i}.{fmt.lower()}"
        path.write_bytes(encode(deep, fmt))
        assert np.abs(prepare_file(path).astype(int) - prepare_file(encode(big)).astype(int)).max() <= 2
        paths.append(path)
    predictions = predict_files(trained.model, paths)
    assert [p.error for p in predictions] == [None] * 5
    assert sum(p.digit == label for p, label in zip(predictions, labels)) >= 4


def test_a_large_image_is_shrunk_before_it_is_made_float(mnist):
    """A 5000x5000 1-bit PNG (a few KB) decodes to at most 1024x1024 and gives the same digit."""
    from lenet5.imagefile import WORK_SIDE

    digit = mnist.test.images[0].numpy()
    small = np.asarray(Image.fromarray(digit).resize((500, 500), Image.Resampling.BICUBIC)) > 100
    big = Image.fromarray(np.kron(small, np.ones((10, 10), bool)))  # mode "1", 5000x5000
    buffer = io.BytesIO()
    big.save(buffer, "PNG", optimize=True)
    grey = load_grey(buffer.getvalue(), "big.png")
    assert grey.dtype == np.float32 and max(grey.shape) <= WORK_SIDE
    reference = prepare_file(encode(small.astype(np.uint8) * 255))
    assert np.abs(prepare_digit(grey).astype(int) - reference.astype(int)).mean() < 3


def run_predict(args: list[str], seconds: float = 60) -> int:
    """main(args) in a thread, so that a read that hangs fails the test instead of stalling it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(main(args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"lenet5 {' '.join(args)} did not finish within {seconds} s"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
def test_devices_and_fifos_are_refused_without_reading_them(trained, tmp_path, capsys):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code = run_predict(["predict", str(trained.run_dir), "/dev/zero", str(fifo), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 1
    assert rows[0]["error"] == "zero: a character device, not an image file"
    assert rows[1]["error"] == "pipe.png: a named pipe (FIFO), not an image file"


def test_an_empty_path_is_an_error_not_the_current_folder(trained, capsys):
    code = main(["predict", str(trained.run_dir), ""])
    assert code == 2 and 'input 1 is an empty path ("")' in capsys.readouterr().err


def test_save_prepared_gives_same_named_inputs_their_own_files(mnist, trained, tmp_path, capsys):
    paths = []
    for i, (folder, name) in enumerate([("a", "1.png"), ("b", "1.png"), ("a", "1.jpg")]):
        (tmp_path / folder).mkdir(exist_ok=True)
        paths.append(tmp_path / folder / name)
        big = np.asarray(Image.fromarray(mnist.test.images[i].numpy()).resize((112, 112)))
        paths[-1].write_bytes(encode(big, "JPEG" if name.endswith("jpg") else "PNG"))
    out = tmp_path / "prepared"
    assert main(["predict", str(trained.run_dir), *map(str, paths), "--json", "--save-prepared", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["prepared_file"]).name for r in rows] == ["1.28x28.png", "1-2.28x28.png", "1-3.28x28.png"]
    saved = [np.asarray(Image.open(r["prepared_file"])) for r in rows]
    assert len({a.tobytes() for a in saved}) == 3  # three different digits, none overwritten


def test_a_small_digit_on_a_large_page_is_found(mnist):
    """A '1' 10 px high on a 160x160 page covers under 0.1% of it; its ink is still found and fitted."""
    from lenet5.data.stress import small_file

    ones = [d for d, label in zip(mnist.test.images[:200].numpy(), mnist.test.labels[:200]) if label == 1][:10]
    rng = np.random.default_rng(0)
    for digit in ones:
        data = small_file(digit, rng)
        assert (load_grey(data) < 0.5).mean() < 0.001
        prepared = prepare_file(data, "small.png")
        rows = np.nonzero(prepared.max(1) > 0)[0]
        assert rows.max() - rows.min() + 1 >= 19  # fitted to MNIST's 20-pixel box
