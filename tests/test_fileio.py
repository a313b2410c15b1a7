"""Atomic writes: the modes a user's umask asks for, and failures named in one line."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from lenet5.errors import FileWriteError, Lenet5Error
from lenet5.fileio import atomic_write_bytes, atomic_write_json


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    path = atomic_write_json(tmp_path / "sub" / "metrics.json", {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == mode
    atomic_write_bytes(path, b"again")  # a replaced file too
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_bytes() == b"again"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_write_failures_are_named_one_line_errors(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(FileWriteError, match=rf"^{folder}: cannot write: is a folder, not a file$"):
        atomic_write_bytes(folder, b"x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileWriteError, match=rf"^{blocker / 'inside.json'}: cannot write: Not a directory$"):
        atomic_write_json(blocker / "inside.json", {})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FileWriteError) as err:
        atomic_write_bytes(tmp_path / "big.bin", b"x" * 1000)
    assert str(err.value) == f"{tmp_path / 'big.bin'}: cannot write: No space left on device"
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, (OSError, Lenet5Error))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"], "no temporary file is left"


def test_a_device_or_pipe_is_never_replaced_and_a_link_is_written_through(tmp_path):
    """Renaming a temporary file over `--out /dev/null` once made /dev/null a regular file (as
    root); a pipe stands for the device here, so that a regression cannot harm the machine."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(FileWriteError, match=rf"^{pipe}: cannot write: not a regular file"):
        atomic_write_bytes(pipe, b"x")
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    target, link = tmp_path / "model.onnx", tmp_path / "latest.onnx"
    target.write_bytes(b"old")
    link.symlink_to(target.name)
    assert atomic_write_bytes(link, b"new") == link
    assert link.is_symlink() and target.read_bytes() == b"new"
    dangling = tmp_path / "dangling"
    dangling.symlink_to("made.bin")
    atomic_write_bytes(dangling, b"made")
    assert dangling.is_symlink() and (tmp_path / "made.bin").read_bytes() == b"made"
    loop_a, loop_b = tmp_path / "loop-a", tmp_path / "loop-b"
    loop_a.symlink_to(loop_b.name)
    loop_b.symlink_to(loop_a.name)
    with pytest.raises(FileWriteError, match=rf"^{loop_a}: cannot write: Too many levels of symbolic links$"):
        atomic_write_bytes(loop_a, b"x")
    into_nothing = tmp_path / "into-nothing"
    into_nothing.symlink_to("missing-folder/file.bin")
    with pytest.raises(FileWriteError, match="No such file or directory"):
        atomic_write_bytes(into_nothing, b"x")
    assert not (tmp_path / "missing-folder").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
