"""The HTTP service against a real `lenet5 serve` process on 127.0.0.1: answers, refusals, load."""

from __future__ import annotations

import io
import json
import statistics
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from serving import Server


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def user_png(digit: np.ndarray) -> bytes:
    """A test digit as a drawing: dark on white, 10x larger, off-centre."""
    canvas = np.full((320, 300), 255, np.uint8)
    canvas[20:300, 5:285] = 255 - np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BICUBIC))
    return png(canvas)


@pytest.fixture(scope="module")
def server(served_run):
    with Server(served_run) as running:
        yield running


def test_predictions_model_info_and_docs(server, mnist):
    assert server.request("GET", "/healthz") == (200, b'{"status":"ok"}')
    status, body = server.request("GET", "/v1/model")
    info = json.loads(body)
    assert status == 200 and info["name"] == "lenet5" and info["parameters"] == 61_706
    assert info["calibration"]["fitted"] is False and "default rule" in info["calibration"]["rule"]
    digit, label = mnist.test.images[0].numpy(), int(mnist.test.labels[0])

    status, body = server.request("POST", "/v1/predict", user_png(digit), {"Content-Type": "image/png"})
    answer = json.loads(body)
    assert status == 200 and answer["digit"] == label and len(answer["probabilities"]) == 10
    assert answer["unsure"] == (answer["confidence"] < 0.9) and answer["calibrated"] is False
    assert abs(sum(answer["probabilities"]) - 1) < 1e-4 and answer["prepared"].startswith("data:image/png;base64,")
    assert "maps" not in answer

    boundary = "lenet5boundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"d.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + user_png(digit) + f"\r\n--{boundary}--\r\n".encode()
    status, body = server.request("POST", "/v1/predict?maps=true", multipart,
                                  {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = json.loads(body)
    assert status == 200 and answer["digit"] == label
    assert [m["name"] for m in answer["maps"]] == ["C1", "S2", "C3", "S4", "C5", "F6", "output"]
    assert answer["maps"][0]["shape"] == [6, 28, 28]

    pixels = {"pixels": digit.tolist(), "prepare": False}
    status, body = server.request("POST", "/v1/predict", json.dumps(pixels).encode(),
                                  {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["digit"] == label
    status, body = server.request("GET", "/openapi.json")
    assert status == 200 and "/v1/predict" in json.loads(body)["paths"]
    assert server.request("GET", "/docs")[0] == 200
    status, page = server.request("GET", "/")
    assert status == 200 and b"<canvas" in page


def bomb_png(side: int = 12_000) -> bytes:
    raw = zlib.compress(b"".join(b"\x00" + bytes(side) for _ in range(side)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_healthy(server, mnist):
    good = user_png(mnist.test.images[0].numpy())
    image, js = {"Content-Type": "image/png"}, {"Content-Type": "application/json"}
    nan_pixels = json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode()  # Python writes NaN tokens
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n4 4 moveto 24 24 lineto stroke showpage\n"

    def pixels(value, rows: int = 28) -> bytes:
        return json.dumps({"pixels": [[0] * 27 + [value]] * rows}).encode()
    corpus = [
        ("POST", "/v1/predict", good[: len(good) // 2], image, 422, "damaged or truncated"),
        ("POST", "/v1/predict", b"this is not an image at all", image, 422, "not an image file"),
        ("POST", "/v1/predict", bomb_png(), image, 422, "144 MP, more than the 25 MP accepted"),
        ("POST", "/v1/predict", eps, image, 422, "not an image file this tool can read"),
        ("POST", "/v1/predict", b"", image, 400, "empty body"),
        ("POST", "/v1/predict", png(np.full((64, 64), 255, np.uint8)), image, 422, "no ink found"),
        ("POST", "/v1/predict", bytes(5 * 1024 * 1024), image, 413, "over the 4,194,304-byte limit"),
        ("POST", "/v1/predict", good, {"Content-Type": "text/plain"}, 415, "unsupported content type"),
        ("POST", "/v1/predict", good, {}, 415, "unsupported content type"),
        ("POST", "/v1/predict", b"{not json", js, 400, "not valid JSON"),
        ("POST", "/v1/predict", b"[1, 2, 3]", js, 422, '"pixels"'),
        ("POST", "/v1/predict", json.dumps({"pixels": [[0] * 28] * 27}).encode(), js, 422, "28x28, got 27x28"),
        ("POST", "/v1/predict", json.dumps({"pixels": [["a"] * 28] * 28}).encode(), js, 422, "array of numbers"),
        ("POST", "/v1/predict", nan_pixels, js, 422, "NaN"),
        ("POST", "/v1/predict", json.dumps({"pixels": [[300] * 28] * 28}).encode(), js, 422, "0..255"),
        ("POST", "/v1/predict", pixels(True), js, 422, "numbers, got a boolean"),
        ("POST", "/v1/predict", pixels("7"), js, 422, "numbers, got a string"),
        ("POST", "/v1/predict", pixels(None), js, 422, "numbers, got null"),
        ("POST", "/v1/predict", pixels(10 ** 400), js, 422, "0..255"),  # numpy would overflow
        ("POST", "/v1/predict", pixels(0).replace(b"0]", b"1e400]", 1), js, 422, "infinite"),
        ("POST", "/v1/predict", b"[" * 20_000 + b"]" * 20_000, js, 400, "nested too deeply"),
        ("POST", "/v1/predict", pixels(0) + b" " * 65_536, js, 413, "JSON body over the 65,536-byte limit"),
        ("POST", "/v1/predict", json.dumps({"pixels": [[0] * 28] * 28, "prepare": "yes"}).encode(), js, 422,
         '"prepare"'),
        ("POST", "/v1/predict?maps=perhaps", good, image, 422, "maps"),
        ("GET", "/v1/predict", None, {}, 405, "Method Not Allowed"),
        ("DELETE", "/v1/model", None, {}, 405, "Method Not Allowed"),
        ("GET", "/v2/nothing", None, {}, 404, "Not Found"),
    ]
    for method, path, body, headers, status, message in corpus:
        got, answer = server.request(method, path, body, headers)
        assert got == status, (path, message, got, answer[:200])
        assert message in json.loads(answer)["error"], (message, answer[:200])
    assert server.request("HEAD", "/healthz") == (200, b"")
    status, body = server.request("POST", "/v1/predict", good, image)
    assert status == 200 and json.loads(body)["digit"] == int(mnist.test.labels[0])
    assert "Traceback" not in server.output and "internal error" not in server.output


def test_json_gets_the_json_limit_however_its_content_type_is_written(server):
    """The body limit read the last Content-Type and stripped ASCII space only; the route read the
    first and stripped Unicode space: a 4 MB JSON body then got the image limit and was parsed."""
    import http.client

    big = json.dumps({"pixels": [[0] * 28] * 28, "pad": [0] * 50_000}).encode()  # 150 KB of valid JSON

    def send(*content_types: str) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.putrequest("POST", "/v1/predict")
            for value in content_types:
                connection.putheader("Content-Type", value)
            connection.putheader("Content-Length", str(len(big)))
            connection.endheaders(big)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    assert send("application/json", "image/png") == (400, {"error": "more than one Content-Type header"})
    assert send("application/json\xa0") == (413, {"error": "JSON body over the 65,536-byte limit"})
    assert send("Application/JSON; charset=utf-8") == (413, {"error": "JSON body over the 65,536-byte limit"})
    assert server.request("GET", "/healthz")[0] == 200


def test_bounded_load_has_no_errors(server, mnist):
    """600 single-image predictions from 6 concurrent keep-alive clients; stops by itself."""
    import http.client

    bodies = [(png(mnist.test.images[i].numpy()), int(mnist.test.labels[i])) for i in range(50)]
    requests_per_client, clients = 100, 6
    latencies: list[float] = []
    failures: list[str] = []
    correct = 0
    lock = threading.Lock()

    def client(offset: int) -> None:
        nonlocal correct
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for k in range(requests_per_client):
            body, label = bodies[(offset + k) % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/v1/predict", body, {"Content-Type": "image/png"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                ok = response.status == 200
            except Exception as e:  # noqa: BLE001 - any failure is counted and reported
                ok, answer = False, {"error": repr(e)}
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if not ok:
                    failures.append(str(answer)[:200])
                elif answer["digit"] == label:
                    correct += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i * 7,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - started
    assert not failures, failures[:3]
    assert len(latencies) == requests_per_client * clients
    assert correct >= 0.9 * len(latencies)
    latencies.sort()
    print(f"\nload: {len(latencies)} requests, {len(latencies) / wall:.0f} req/s, "
          f"p50 {1000 * statistics.median(latencies):.1f} ms, p99 {1000 * latencies[int(0.99 * len(latencies))]:.1f} ms")
