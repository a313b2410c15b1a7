"""Load on `lenet5 serve`: single-image predictions from concurrent keep-alive clients.

Starts the server as its own process on 127.0.0.1, sends a fixed number of requests (PNG bodies
of real MNIST test digits) from client processes, and stops by itself. Prints and writes
requests/second, p50 and p99 latency, and the error count.

    python benchmarks/serve_load.py CHECKPOINT --data-dir ../shared/mnist --out docs/results/serve_load.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing as mp
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, bodies: list[bytes], count: int, offset: int, start_at: float, out: mp.Queue) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies, errors = [], 0
    while time.time() < start_at:
        time.sleep(0.001)
    for k in range(count):
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/predict", bodies[(offset + k) % len(bodies)], {"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            errors += response.status != 200
        except OSError:
            errors += 1
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        latencies.append(time.perf_counter() - started)
    out.put((latencies, errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from lenet5.data import load_mnist

    mnist = load_mnist(args.data_dir, download=False)
    bodies = []
    for image in mnist.test.images[:200].numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        bodies.append(buffer.getvalue())
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lenet5", "serve", str(args.checkpoint), "--port", str(port),
                               "--workers", str(args.workers)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("the server did not start")
        for body in bodies[:50]:  # warm-up
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("POST", "/v1/predict", body, {"Content-Type": "image/png"})
            c.getresponse().read()
        queue: mp.Queue = mp.Queue()
        per_client = args.requests // args.clients
        start_at = time.time() + 1.0
        workers = [mp.Process(target=client, args=(port, bodies, per_client, i * 37, start_at, queue))
                   for i in range(args.clients)]
        for w in workers:
            w.start()
        results = [queue.get(timeout=600) for _ in workers]
        wall = time.time() - start_at
        for w in workers:
            w.join(timeout=10)
    finally:
        server.terminate()
        server.wait(timeout=10)
    latencies = sorted(x for lat, _ in results for x in lat)
    errors = sum(e for _, e in results)
    summary = {
        "benchmark": "serve_load", "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": mp.cpu_count()},
        "requests": len(latencies), "clients": args.clients, "server_workers": args.workers, "errors": errors,
        "requests_per_s": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
