"""A real HTTP server on 127.0.0.1 that plays good and bad MNIST mirrors.

Paths: /good/NAME serves the published file; /truncated/ half of it; /html/ an error page with
status 200; /wrong/ the right length with one byte changed; /cut/ announces the full length and
closes the connection halfway; /flaky/ fails with 503 once per file, then serves it; /hang/
waits (a bounded while) before answering; anything else is a 404.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HANG_SECONDS = 3.0


class Mirror:
    def __init__(self, source: Path):
        self.source = source
        self.hits: Counter[str] = Counter()
        self._flaky_seen: set[str] = set()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                mirror.hits[self.path] += 1
                parts = self.path.strip("/").split("/")
                if len(parts) != 2 or not (mirror.source / parts[1]).is_file():
                    return self.send_error(404)
                mode, name = parts
                body = (mirror.source / name).read_bytes()
                length = len(body)
                if mode == "truncated":
                    body = body[: len(body) // 2]
                    length = len(body)
                elif mode == "html":
                    body = b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>"
                    length = len(body)
                    return self._send(body, length, "text/html")
                elif mode == "wrong":
                    body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
                elif mode == "cut":
                    body = body[: len(body) // 2]
                elif mode == "flaky" and name not in mirror._flaky_seen:
                    mirror._flaky_seen.add(name)
                    return self.send_error(503)
                elif mode == "hang":
                    time.sleep(HANG_SECONDS)
                elif mode == "trickle":  # the whole length announced, then 20 bytes a second (for at most 5 s)
                    self.send_response(200)
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    try:
                        for i in range(100):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(0.05)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                elif mode not in ("good", "flaky"):
                    return self.send_error(404)
                self._send(body, length, "application/octet-stream")

            def _send(self, body: bytes, length: int, content_type: str):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{mode}/"

    def __enter__(self) -> "Mirror":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
