"""Fetching, verifying, caching and loading MNIST, against a real server on 127.0.0.1."""

from __future__ import annotations

import os
import re
import time
import types
from pathlib import Path

import pytest

from lenet5.data import FILES, fetch_mnist, load_mnist
import lenet5.data.download as download_module
from lenet5.data.download import download_file
from lenet5.data.mnist import sha256_of
from lenet5.errors import DataError, DownloadError
from mirror import Mirror
from test_idx import TEST_COUNTS, copy_mnist

LABELS = next(f for f in FILES if f.name == "t10k-labels-idx1-ubyte.gz")
IMAGES = next(f for f in FILES if f.name == "t10k-images-idx3-ubyte.gz")


def download(mirror, modes, dest, file=LABELS, **kwargs):
    kwargs = {"timeout": 5.0, "retries": 0, "backoff": 0.0, **kwargs}
    return download_file(file.name, file.size, file.sha256, dest, [mirror.url(m) for m in modes], **kwargs)


def test_downloads_all_four_files_verified_then_loads_them(mnist_dir, tmp_path):
    dest = tmp_path / "mnist"
    seen = []
    with Mirror(mnist_dir) as mirror:
        mnist = load_mnist(dest, mirrors=[mirror.url("good")], progress=lambda n, d, t: seen.append((n, d, t)))
        assert sum(mirror.hits.values()) == 4
        load_mnist(dest, mirrors=[mirror.url("good")])  # everything is cached now
        assert sum(mirror.hits.values()) == 4
    for file in FILES:
        assert sha256_of(dest / file.name) == file.sha256
    assert sorted(p.name for p in dest.iterdir()) == sorted(f.name for f in FILES)  # no temp files left
    assert mnist.test.class_counts() == TEST_COUNTS
    assert seen[-1] == ("t10k-labels-idx1-ubyte.gz", LABELS.size, LABELS.size)


def test_bad_mirrors_are_skipped_until_a_good_one(mnist_dir, tmp_path):
    with Mirror(mnist_dir) as mirror:
        path = download(mirror, ["missing", "html", "wrong", "truncated", "cut", "good"], tmp_path, file=IMAGES)
        assert mirror.hits[f"/good/{IMAGES.name}"] == 1
    assert sha256_of(path) == IMAGES.sha256


def test_every_failure_is_named_and_nothing_is_left_behind(mnist_dir, tmp_path):
    with Mirror(mnist_dir) as mirror, pytest.raises(DownloadError) as err:
        download(mirror, ["missing", "html", "wrong", "truncated", "cut"], tmp_path, file=IMAGES)
    message = str(err.value)
    assert message.startswith("t10k-images-idx3-ubyte.gz: could not be downloaded")
    for reason in ("missing/t10k-images-idx3-ubyte.gz: HTTP 404", "html/t10k-images-idx3-ubyte.gz: served an HTML page",
                   "wrong/t10k-images-idx3-ubyte.gz: checksum mismatch",
                   "truncated/t10k-images-idx3-ubyte.gz: truncated: expected 1648877 bytes, got 824438",
                   "cut/t10k-images-idx3-ubyte.gz: truncated: expected 1648877 bytes, got 824438"):
        assert reason in message
    assert list(tmp_path.iterdir()) == []


def assert_gives_up_quickly(mnist_dir: Path, tmp_path: Path, route: str, match: str) -> None:
    """A download from `route` of the test mirror fails within 2.5 s with `match`, leaving no file."""
    with Mirror(mnist_dir) as mirror:
        started = time.monotonic()
        with pytest.raises(DownloadError, match=match):
            download(mirror, [route], tmp_path, timeout=0.3)
        assert time.monotonic() - started < 2.5
    assert list(tmp_path.iterdir()) == []


def test_a_hanging_server_times_out(mnist_dir, tmp_path):
    assert_gives_up_quickly(mnist_dir, tmp_path, "hang", r"timed out after 0.3 s")


def test_a_trickle_is_stalled_and_mirrors_that_are_no_urls_are_named(mnist_dir, tmp_path, monkeypatch):
    """One byte at a time kept every read inside the socket's timeout, so --timeout never fired; a
    --mirror that was a local path was a ValueError traceback; retry pauses doubled without end."""
    assert_gives_up_quickly(mnist_dir, tmp_path, "trickle", r"stalled: \d+ bytes in 0.\d s \(under 1 KiB/s\)")
    for bad, why in (("/work/shared/mnist", "not an http(s) URL (for local files, use --data-dir)"),
                     ("notaurl", "not an http(s) URL"), ("ftp://127.0.0.1/", "not an http(s) URL"),
                     ("http://[::1/", "not a usable URL (Invalid IPv6 URL)"),
                     ("http://127.0.0.1:99999/", "not a usable URL (Port out of range 0-65535)"),
                     ("http://127.0.0.1:0/", "port 0 is no port to download from")):
        with pytest.raises(DownloadError, match=rf"mirror '{re.escape(bad)}': {re.escape(why)}"):
            download_file(LABELS.name, LABELS.size, LABELS.sha256, tmp_path, [bad])
    pauses = []  # the downloader's own clock only: the trickling server thread may still be sleeping
    monkeypatch.setattr(download_module, "time", types.SimpleNamespace(sleep=pauses.append, monotonic=time.monotonic))
    with pytest.raises(DownloadError):  # refused connections are retried, with capped pauses
        download_file(LABELS.name, LABELS.size, LABELS.sha256, tmp_path, ["http://127.0.0.1:9/"], retries=8,
                      backoff=1.0, timeout=1.0)
    assert pauses == [1, 2, 4, 8, 16, 30, 30, 30]


def test_transient_errors_are_retried(mnist_dir, tmp_path):
    with Mirror(mnist_dir) as mirror:
        download(mirror, ["flaky"], tmp_path, retries=1)
        assert mirror.hits[f"/flaky/{LABELS.name}"] == 2
    with Mirror(mnist_dir) as mirror, pytest.raises(DownloadError, match="HTTP 503"):
        download(mirror, ["flaky"], tmp_path / "again", retries=0)


def test_offline_never_touches_the_network(mnist_dir, tmp_path):
    with Mirror(mnist_dir) as mirror:
        os.environ["LENET5_MIRRORS"] = mirror.url("good")
        try:
            with pytest.raises(DataError, match="not found in .* and downloads are off"):
                fetch_mnist(tmp_path, download=False)
        finally:
            del os.environ["LENET5_MIRRORS"]
        assert sum(mirror.hits.values()) == 0


def test_a_file_with_the_wrong_checksum_is_refused(mnist_dir, tmp_path):
    data_dir = copy_mnist(mnist_dir, tmp_path / "mnist")
    target = data_dir / LABELS.name
    content = bytearray(target.read_bytes())
    content[-1] ^= 0xFF
    target.write_bytes(bytes(content))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        load_mnist(data_dir, download=False)
    target.write_bytes(bytes(content[:100]))
    with pytest.raises(DataError, match="100 bytes, expected 4542"):
        load_mnist(data_dir, download=False)


def test_decoded_cache_serves_reloads_and_follows_changes(mnist_dir, tmp_path, monkeypatch):
    data_dir = copy_mnist(mnist_dir, tmp_path / "mnist")
    load_mnist(data_dir, download=False)
    with monkeypatch.context() as m:  # a reload neither hashes nor decodes: it reads the cache
        for name in ("verify_file", "read_images", "read_labels"):
            m.setattr(f"lenet5.data.dataset.{name}", lambda *a, **k: pytest.fail("the cache was not used"))
        mnist = load_mnist(data_dir, download=False)
    assert mnist.train.class_counts()[0] == 5923
    # A changed source is not hidden by the cache: it is verified again.
    target = data_dir / LABELS.name
    stat = target.stat()
    content = target.read_bytes()
    target.write_bytes(content[:-1] + bytes([content[-1] ^ 0xFF]))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edit a second later
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist(data_dir, download=False)
