"""Data files published inside one archive (EMNIST's gzip.zip): fetch it, verify it, take files out.

The archive is downloaded like any data file (mirrors, bounded retries, atomic, its published MD5
checked) and kept in the data directory, so the other splits published in it need no second
download. A file is taken out only after the archive's MD5 passes, bounded by MAX_DATA_BYTES,
into a temporary file renamed once complete.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Sequence

from lenet5.data.catalog import Archive
from lenet5.data.download import Progress, download_file
from lenet5.data.idx import MAX_DATA_BYTES
from lenet5.errors import DataError
from lenet5.fileio import create_temp


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(spec: Archive, root: Path, mirrors: Sequence[str], *, download: bool = True, timeout: float = 30.0,
                  retries: int = 2, progress: Progress | None = None) -> Path:
    """The verified archive in `root`, downloaded first if it is not there."""
    path = root / spec.name
    if not path.is_file():
        if not download:
            raise DataError(f"{spec.name} not found in {root} and downloads are off (offline)")
        return download_file(spec.name, None, None, root, mirrors, md5=spec.md5, max_bytes=spec.max_bytes,
                             timeout=timeout, retries=retries, progress=progress)
    if _md5(path) != spec.md5:
        raise DataError(f"{path}: checksum mismatch (md5 differs from the published archive); "
                        "delete it and run `lenet5 data` to download it again")
    return path


def extract(spec: Archive, name: str, root: Path, mirrors: Sequence[str], *, timeout: float = 30.0,
            retries: int = 2, progress: Progress | None = None) -> Path:
    """Take `name` out of the (verified, downloaded if need be) archive into `root`; returns its path."""
    source = fetch_archive(spec, root, mirrors, timeout=timeout, retries=retries, progress=progress)
    member = spec.folder + name
    final = root / name
    try:
        with zipfile.ZipFile(source) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise DataError(f"{source}: has no {member}") from None
            if info.file_size > MAX_DATA_BYTES:
                raise DataError(f"{source}: {member} declares {info.file_size:,} bytes, more than this reader accepts")
            fd, tmp = create_temp(final)
            try:
                with zf.open(info) as inside, os.fdopen(fd, "wb") as out:
                    done = 0
                    while chunk := inside.read(1 << 20):
                        done += len(chunk)
                        if done > info.file_size:
                            raise DataError(f"{source}: {member} holds more than the {info.file_size:,} bytes it declares")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DataError(f"{source}: not a readable zip archive ({e})") from None
    return final
