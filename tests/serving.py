"""Start `lenet5 serve` as a real process on 127.0.0.1 for the serving tests, and stop it."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, *extra: str):
        self.port = free_port()
        self.command = [sys.executable, "-m", "lenet5", "serve", str(checkpoint), "--port", str(self.port), *extra]
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []  # everything the server printed, read as it comes (a full pipe would block it)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 10) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def processes(self) -> list[int]:
        """The server's process id and its workers' (uvicorn --workers forks children)."""
        pids, k = [self.process.pid], 0
        while k < len(pids):
            for children in Path(f"/proc/{pids[k]}/task").glob("*/children"):
                pids += [int(p) for p in children.read_text().split()]
            k += 1
        return pids

    def memory_mb(self, field: str = "VmRSS") -> float:
        """A /proc/PID/status figure (VmRSS now, VmHWM the peak) summed over the server's processes."""
        total = 0
        for pid in self.processes():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        return total / 1024

    def reset_peak_memory(self) -> None:
        for pid in self.processes():
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)

    def __enter__(self) -> "Server":
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read_output, daemon=True).start()
        deadline = time.monotonic() + 60  # bounded: a server that never comes up fails the test
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process.wait()
                time.sleep(0.2)  # let the reader thread take the last lines
                raise RuntimeError(f"lenet5 serve exited: {self.output}")
            try:
                if self.request("GET", "/healthz", timeout=1)[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("lenet5 serve did not answer /healthz within 60 s")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
