"""The service's bounds, against real `lenet5 serve` processes on 127.0.0.1: memory under many
large images, clients that send slowly or leave, /healthz under load, a busy port."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from lenet5.serve.app import DEFAULT_DECODES
from lenet5.serve.limits import BODY_IDLE_TIMEOUT, HEAD_TIMEOUT, MAX_CONCURRENT
from serving import Server

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
# The ceiling README.md documents: above the idle server, ~150 MB per image decoded at once
# (a 25 MP RGBA PNG is 100 MB decoded) and 100 MB for bodies, buffers and threads.
CEILING_ABOVE_IDLE_MB = 100 + 150 * DEFAULT_DECODES


def large_images() -> list[bytes]:
    """Small uploads that decode big: a 5000x5000 1-bit PNG (~9 KB), a 25 MP RGBA PNG, a 24 MP JPEG."""
    out = []
    for mode, size, fmt, ink in [("1", (5000, 5000), "PNG", 0), ("RGBA", (5000, 5000), "PNG", (0, 0, 0, 255)),
                                 ("RGB", (6000, 4000), "JPEG", (20, 20, 30))]:
        image = Image.new(mode, size, {"1": 1, "RGBA": (255, 255, 255, 0), "RGB": (250, 250, 245)}[mode])
        ImageDraw.Draw(image).line([(size[0] // 2, 800), (size[0] // 2, 3200)], fill=ink, width=300)
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"optimize": True} if fmt == "PNG" else {"quality": 80}))
        out.append(buffer.getvalue())
    return out


def post_all(server: Server, bodies: list[bytes]) -> tuple[list[threading.Thread], list[int]]:
    """POST every body at once, each from its own thread; returns the running threads and the statuses."""
    statuses: list[int] = []

    def post(body: bytes) -> None:
        statuses.append(server.request("POST", "/v1/predict", body, {"Content-Type": "image/png"}, timeout=120)[0])

    threads = [threading.Thread(target=post, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    return threads, statuses


def test_memory_stays_under_the_ceiling_with_many_large_images(served_run):
    """12 large images at once: the server's peak RSS stays under the documented ceiling."""
    with Server(served_run) as server:
        time.sleep(0.5)
        idle = server.memory_mb("VmRSS")
        server.reset_peak_memory()
        started = time.perf_counter()
        threads, statuses = post_all(server, large_images() * 4)
        for thread in threads:
            thread.join(timeout=120)
        peak = server.memory_mb("VmHWM")
        print(f"\n12 large images at once: {time.perf_counter() - started:.1f} s, idle {idle:.0f} MB, "
              f"peak {peak:.0f} MB (+{peak - idle:.0f} MB; ceiling +{CEILING_ABOVE_IDLE_MB} MB)")
        assert statuses == [200] * 12
        assert peak - idle < CEILING_ABOVE_IDLE_MB


def test_healthz_answers_at_once_while_16_inferences_are_in_flight(served_run):
    with Server(served_run) as server:
        rgba = large_images()[1]
        threads, statuses = post_all(server, [rgba] * 16)
        time.sleep(0.5)
        waits = []
        for _ in range(8):
            started = time.perf_counter()
            assert server.request("HEAD", "/healthz", timeout=5)[0] == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.1)
        in_flight = sum(t.is_alive() for t in threads)
        for thread in threads:
            thread.join(timeout=120)
        print(f"\n/healthz with {in_flight} inferences still in flight: max {1000 * max(waits):.0f} ms")
        assert in_flight >= 4 and max(waits) < 0.5 and statuses == [200] * 16


def answer_of(connection: socket.socket, limit: float) -> tuple[float, bytes]:
    """What the server sends until it closes the connection, and after how long."""
    connection.settimeout(limit)
    started, data = time.monotonic(), b""
    try:
        while chunk := connection.recv(4096):
            data += chunk
    except socket.timeout:
        data += b"(still open)"
    return time.monotonic() - started, data


def test_slow_and_vanishing_clients_are_cut_off_quietly(served_run):
    with Server(served_run) as server:
        head = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        clients = {name: socket.create_connection(("127.0.0.1", server.port)) for name in ("head", "body", "idle")}
        clients["head"].sendall(head)  # and never the blank line
        clients["body"].sendall(head + b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 100)
        for _ in range(3):  # clients that leave halfway through their body
            with socket.create_connection(("127.0.0.1", server.port)) as gone:
                gone.sendall(head + b"Content-Length: 100000\r\n\r\n" + bytes(5000))
        answers: dict[str, tuple[float, bytes]] = {}
        threads = [threading.Thread(target=lambda n=n, c=c: answers.__setitem__(n, answer_of(c, 20)))
                   for n, c in clients.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        for name, (waited, data) in answers.items():
            limit = BODY_IDLE_TIMEOUT if name == "body" else HEAD_TIMEOUT
            assert data.startswith(b"HTTP/1.1 408 ") and data.endswith(b"}"), (name, data)
            assert b'{"error":"' in data and waited < limit + 2, (name, waited)
            clients[name].close()
        assert server.request("GET", "/healthz")[0] == 200
        assert "Traceback" not in server.output and "Error" not in server.output, server.output


def test_over_64_requests_in_flight_get_a_json_503_and_healthz_still_answers(served_run):
    """64 uploads whose bodies stall hold every slot; the 65th request is refused in JSON with
    Retry-After (uvicorn's own limit answered in plain text, and /healthz too). Invalid HTTP is a
    JSON 400 (uvicorn's was plain text)."""
    with Server(served_run) as server:
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n\x89PNG")
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONCURRENT)]
        try:
            for client in stalled:
                client.sendall(head)
            deadline = time.monotonic() + 20  # until every stalled upload is a request in flight
            while (answer := server.request("POST", "/v1/predict", b"\x89PNG", {"Content-Type": "image/png"}))[0] != 503 \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            status, body = answer
            assert status == 503 and json.loads(body)["error"].startswith("busy: 64 requests in flight"), body
            assert server.request("GET", "/healthz")[0] == 200  # alive, though busy
        finally:
            for client in stalled:
                client.close()
        deadline = time.monotonic() + 10
        while (status := server.request("POST", "/v1/predict", b"x", {"Content-Type": "image/png"})[0]) == 503 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 422  # the slots came back: an undecodable image is judged again

        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
            _, data = answer_of(client, 5)
        assert data.startswith(b"HTTP/1.1 400 ") and b"application/json" in data, data
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"].startswith("not a valid HTTP request")
        assert "Traceback" not in server.output, server.output


def test_a_busy_port_is_one_line_and_exit_status_1(served_run):
    with Server(served_run) as server:
        busy = subprocess.run([sys.executable, "-m", "lenet5", "serve", str(served_run), "--port", str(server.port)],
                              capture_output=True, text=True, timeout=120)
    assert busy.returncode == 1 and busy.stdout == ""
    assert busy.stderr == f"lenet5 serve: error: port {server.port} is in use on 127.0.0.1\n"


@pytest.mark.parametrize("mb", ["nan", "inf", "0", "1e-9", "5000"])
def test_impossible_body_limits_are_one_line(served_run, capsys, mb):
    """nan and inf were tracebacks converting to bytes; 1e-9 silently became a limit of 0 bytes."""
    from lenet5.cli import main

    assert main(["serve", str(served_run), "--max-body-mb", mb]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"lenet5 serve: error: --max-body-mb must be from 0.001 to 1024 (megabytes), got {float(mb)}"
