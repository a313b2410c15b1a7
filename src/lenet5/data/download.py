"""Fetch a file from a list of mirrors, verifying its SHA-256, writing it atomically.

Each mirror is tried in order; transient failures (timeouts, refused connections, 5xx) are
retried a bounded number of times with a growing pause, permanent ones (404, wrong checksum,
an HTML page instead of data) move straight on to the next mirror. The file is streamed into a
temporary file beside its destination and renamed only once its size and checksum match, so a
half-written or wrong file never sits under the final name.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from lenet5.errors import DownloadError
from lenet5.fileio import create_temp

# progress(file_name, bytes_done, bytes_total)
Progress = Callable[[str, int, int], None]

CHUNK = 1 << 16
USER_AGENT = "lenet5-downloader/1 (+https://pypi.org/project/lenet5/)"


class _Permanent(Exception):
    """A failure that retrying the same mirror will not fix."""


def _fetch_once(url: str, tmp: Path, name: str, size: int, sha256: str, timeout: float,
                progress: Progress | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise OSError(f"HTTP {e.code} {e.reason}") from None
        raise _Permanent(f"HTTP {e.code} {e.reason}") from None
    digest = hashlib.sha256()
    done = 0
    with response, open(tmp, "wb") as out:
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type:
            raise _Permanent("served an HTML page, not the data file")
        while chunk := response.read(CHUNK):
            if done == 0 and chunk.lstrip()[:1] == b"<":
                raise _Permanent("served an HTML page, not the data file")
            done += len(chunk)
            if done > size:
                raise _Permanent(f"sent more than the expected {size} bytes")
            digest.update(chunk)
            out.write(chunk)
            if progress:
                progress(name, done, size)
        out.flush()
        os.fsync(out.fileno())
    if done < size:
        raise OSError(f"truncated: expected {size} bytes, got {done}")
    if digest.hexdigest() != sha256:
        raise _Permanent(f"checksum mismatch: expected sha256 {sha256[:12]}..., got {digest.hexdigest()[:12]}...")


def download_file(name: str, size: int, sha256: str, dest_dir: Path, mirrors: Sequence[str], *,
                  timeout: float = 30.0, retries: int = 2, backoff: float = 1.0,
                  progress: Progress | None = None) -> Path:
    """Download `name` from the first mirror that delivers it intact; returns its final path."""
    if not mirrors:
        raise DownloadError(f"{name}: no mirrors to download from")
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        for attempt in range(retries + 1):
            fd, tmp = create_temp(final)  # mode 0666 less the umask, as the final file should have
            os.close(fd)
            try:
                _fetch_once(url, tmp, name, size, sha256, timeout, progress)
                os.replace(tmp, final)
                return final
            except _Permanent as e:
                failures.append(f"{url}: {e}")
                break
            except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
                reason = getattr(e, "reason", None) or e
                if isinstance(e, http.client.IncompleteRead):
                    reason = "the connection closed before the end of the file"
                if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
                    reason = f"timed out after {timeout:g} s"
                if attempt == retries:
                    failures.append(f"{url}: {reason}")
                else:
                    time.sleep(backoff * 2**attempt)
            finally:
                tmp.unlink(missing_ok=True)
    raise DownloadError(f"{name}: could not be downloaded: " + "; ".join(failures))
