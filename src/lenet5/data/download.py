"""Fetch a file from a list of mirrors, verifying its checksum, writing it atomically.

The file passes if it has the published size (where known) and digest (SHA-256, or MD5 where only
that is published), or if an `accept` check given by the caller passes it (the same data in
another compression: see lenet5.data.catalog). Each mirror is tried in order; transient failures (timeouts, refused connections, 5xx) are
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
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

from lenet5.errors import DownloadError
from lenet5.fileio import create_temp

# progress(file_name, bytes_done, bytes_total)
Progress = Callable[[str, int, int], None]

CHUNK = 1 << 16
MIN_RATE = 1024  # bytes/s: slower than this over a --timeout window, a download counts as stalled
MAX_PAUSE_S = 30.0  # the longest pause between retries (they double from `backoff`)
USER_AGENT = "lenet5-downloader/1 (+https://pypi.org/project/lenet5/)"


class _Permanent(Exception):
    """A failure that retrying the same mirror will not fix."""


def _fetch_once(url: str, tmp: Path, name: str, size: int | None, sha256: str | None, md5: str | None,
                accept: Callable[[Path], bool] | None, limit: int, timeout: float, progress: Progress | None) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise OSError(f"HTTP {e.code} {e.reason}") from None
        raise _Permanent(f"HTTP {e.code} {e.reason}") from None
    except ValueError as e:  # a URL urllib cannot use (a port out of range, say)
        raise _Permanent(f"not a usable URL ({e})") from None
    digest, md5_digest = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    done = 0
    window_start, window_bytes = time.monotonic(), 0
    with response, open(tmp, "wb") as out:
        content_type = response.headers.get("Content-Type", "")
        if "text/html" in content_type:
            raise _Permanent("served an HTML page, not the data file")
        while chunk := response.read1(CHUNK):  # what has arrived: a trickle is seen, not waited out
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= timeout:  # the socket's timeout bounds one read; this, a slow stream
                if window_bytes < MIN_RATE * (now - window_start):
                    raise OSError(f"stalled: {window_bytes} bytes in {now - window_start:.1f} s (under "
                                  f"{MIN_RATE // 1024} KiB/s)")
                window_start, window_bytes = now, 0
            if done == 0 and chunk.lstrip()[:1] == b"<":
                raise _Permanent("served an HTML page, not the data file")
            done += len(chunk)
            if done > limit:
                raise _Permanent(f"sent more than the expected {limit} bytes")
            digest.update(chunk)
            md5_digest.update(chunk)
            out.write(chunk)
            if progress:
                progress(name, done, size or 0)
        out.flush()
        os.fsync(out.fileno())
    published = (size is None or done == size) and (sha256 or md5) and \
        (sha256 is None or digest.hexdigest() == sha256) and (md5 is None or md5_digest.hexdigest() == md5)
    if published or (accept is not None and accept(tmp)):
        return
    if size is not None and done < size:
        raise OSError(f"truncated: expected {size} bytes, got {done}" + ("; nor is its content the published one"
                                                                         if accept is not None else ""))
    kind, want, got = ("sha256", sha256, digest.hexdigest()) if sha256 else ("md5", md5, md5_digest.hexdigest())
    raise _Permanent(f"checksum mismatch: expected {kind} {str(want)[:12]}..., got {got[:12]}...")


def download_file(name: str, size: int | None, sha256: str | None, dest_dir: Path, mirrors: Sequence[str], *,
                  md5: str | None = None, accept: Callable[[Path], bool] | None = None, max_bytes: int | None = None,
                  timeout: float = 30.0, retries: int = 2, backoff: float = 1.0,
                  progress: Progress | None = None) -> Path:
    """Download `name` from the first mirror that delivers it intact; returns its final path.

    `size` (None: not published) and `sha256` or `md5` describe the published file; `accept(path)`
    may pass a file that is not byte-for-byte the published one; `max_bytes` bounds a download
    whose size is not published, or whose accepted forms may be larger."""
    if not (sha256 or md5 or accept):
        raise DownloadError(f"{name}: nothing to verify a download against")
    limit = max(size or 0, max_bytes or 0)
    if not limit:
        raise DownloadError(f"{name}: no size or bound for the download")
    if not mirrors:
        raise DownloadError(f"{name}: no mirrors to download from")
    for mirror in mirrors:
        try:
            parts = urllib.parse.urlsplit(mirror)
            problem = None if parts.scheme in ("http", "https") and parts.hostname else \
                "not an http(s) URL (for local files, use --data-dir)"
            if problem is None and parts.port == 0:
                problem = "port 0 is no port to download from"
        except ValueError as e:  # "http://[::1/", a port out of range
            problem = f"not a usable URL ({e})"
        if problem:
            raise DownloadError(f"mirror {mirror[:200]!r}: {problem}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        for attempt in range(retries + 1):
            fd, tmp = create_temp(final)  # mode 0666 less the umask, as the final file should have
            os.close(fd)
            try:
                _fetch_once(url, tmp, name, size, sha256, md5, accept, limit, timeout, progress)
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
                    time.sleep(min(backoff * 2**attempt, MAX_PAUSE_S))
            finally:
                tmp.unlink(missing_ok=True)
    raise DownloadError(f"{name}: could not be downloaded: " + "; ".join(failures))
