"""Atomic writes: a reader sees the old file or the new one, never half of one.

A failed write (a full disk, a read-only or forbidden folder, a path through a file) raises
`FileWriteError` naming the file; it is an OSError too, for callers that catch those. Files get
the mode the user's umask gives a new file (0644 under umask 022), as `open()` would.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lenet5.errors import FileWriteError

TMP_SUFFIX = ".tmp"


def temp_path_for(path: Path) -> Path:
    """A fresh hidden name beside `path` for its temporary copy: `.NAME.RANDOM.tmp`."""
    short = path.name.encode()[:200].decode(errors="ignore")  # a legal 250-byte name stays legal with the extras
    return path.with_name(f".{short}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def create_temp(path: Path) -> tuple[int, Path]:
    """Create a new temporary file beside `path` (mode 0666 less the umask, as open() gives);
    returns its descriptor and name."""
    while True:
        tmp = temp_path_for(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it."""
    path = shown = Path(path)
    tmp: Path | None = None
    try:
        linked = path.is_symlink()
        if linked:  # write the file the link names, as open() would: the link stays a link
            try:
                path = path.resolve()
            except RuntimeError:  # Python 3.11's word for a loop of links
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file")
        if path.exists() and not path.is_file():  # renaming over it would replace a device or a pipe
            raise OSError(errno.EINVAL, "not a regular file (a device, a pipe or a socket)")
        if linked and not path.parent.is_dir():  # as open(): a link into a missing folder does not make it
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # the parent is a file
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        fd, tmp = create_temp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path.parent)
    except OSError as e:
        raise FileWriteError(e.errno, f"{shown}: cannot write: {e.strerror or e}", str(shown)) from None
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return shown


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cached_arrays(path: str | os.PathLike, make: Callable[[], dict[str, Any]],
                  on_make: Callable[[Path], None] | None = None,
                  valid: Callable[[dict[str, Any]], bool] = lambda arrays: True) -> dict[str, Any]:
    """The named numpy arrays of the .npz cache file `path`, or, when it is missing, damaged or not
    `valid`, `make()`'s, written there atomically (compressed) first; `on_make(path)` is called
    before making."""
    import io

    import numpy as np

    path = Path(path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            if valid(arrays):
                return arrays
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is made again below
    if on_make is not None:
        on_make(path)
    arrays = make()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())  # a FileWriteError names the file and the problem
    return arrays
