"""Fuzzing POST /v1/predict of a real `lenet5 serve` process with Hypothesis: JSON near and far
from the 28x28 shape, images of every accepted format mutated or cut short, and stray bytes.
Whatever comes, the answer is a 200 or a 4xx with {"error": ...}, and nothing is a traceback."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving import Server

# No subnormals: fit() in the shared training fixture turns on flushing them for the whole process.
FLOATS = st.floats(allow_subnormal=False)
SCALARS = (st.none() | st.booleans() | st.integers() | FLOATS | st.text(max_size=4)
           | st.integers(min_value=10 ** 300, max_value=10 ** 400))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=4), max_leaves=20)
ODD = [True, False, None, "7", "", [], {}, [7], 10 ** 400, -10 ** 400, float("inf"), float("nan"), -1, 256, 255.5]
PIXEL = st.sampled_from(ODD) | st.integers(-5, 300) | FLOATS | JSON


def usable(value) -> bool:
    return type(value) in (int, float) and 0 <= value <= 255  # NaN fails the comparison


@st.composite
def json_requests(draw) -> tuple[bytes, str, bool]:
    """A 28x28 digit with a few cells, rows or keys changed, and whether it must be refused;
    or any JSON without "pixels"; or arrays nested up to 40,000 deep (Python's parser stops near 1,000)."""
    kind = draw(st.sampled_from(["digit", "any", "deep"]))
    if kind == "any":
        return json.dumps(draw(JSON)).encode(), "application/json", True  # never a "pixels" key: refused
    if kind == "deep":
        depth = draw(st.integers(100, 40_000))
        return b"[" * depth + b"]" * depth, "application/json", True
    rows = np.zeros((28, 28), int)
    rows[6:22, 12:16] = 255
    grid = rows.tolist()
    for r, c, value in draw(st.lists(st.tuples(st.integers(0, 27), st.integers(0, 27), PIXEL), max_size=4)):
        grid[r][c] = value
    cut = draw(st.sampled_from([None, None, "row", "cell", "extra"]))
    if cut == "row":
        grid.pop()
    elif cut == "cell":
        grid[3].pop()
    elif cut == "extra":
        grid.append([0] * 28)
    payload = {"pixels": grid}
    if draw(st.booleans()):
        payload["prepare"] = draw(st.booleans() | SCALARS)
    prepare_ok = type(payload.get("prepare", True)) is bool
    refuse = cut is not None or not prepare_ok or not all(usable(v) for row in grid for v in row)
    return json.dumps(payload).encode(), "application/json", refuse


def seeds() -> list[tuple[bytes, str]]:
    digit = np.zeros((40, 32), np.uint8)
    digit[8:32, 14:19] = 255
    out = []
    for fmt, array, mode in [("PNG", digit, None), ("PNG", digit.astype(np.uint16) * 257, None),
                             ("PNG", np.dstack([digit] * 4), "RGBA"), ("JPEG", digit, None), ("BMP", digit, None),
                             ("GIF", digit, None), ("WEBP", digit, None), ("TIFF", digit.astype(np.float32), None)]:
        buffer = io.BytesIO()
        Image.fromarray(array, mode).save(buffer, fmt)
        out.append((buffer.getvalue(), f"image/{fmt.lower()}"))
    return out


SEEDS = seeds()


@st.composite
def image_requests(draw) -> tuple[bytes, str, bool]:
    """An image in one of the accepted formats with a few bytes changed, cut short, or both."""
    data, content_type = draw(st.sampled_from(SEEDS))
    data = bytearray(data)
    for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=4)):
        data[position] = value
    end = draw(st.none() | st.integers(0, len(data)))
    return bytes(data[:end]), content_type, False


RAW = st.tuples(st.binary(max_size=64), st.sampled_from(["application/json", "image/png", "application/octet-stream",
                                                          "multipart/form-data; boundary=x", "text/plain", ""]),
                st.just(False))
QUERY = st.sampled_from(["", "?maps=true", "?maps=false", "?maps=maybe"])


@pytest.fixture(scope="module")
def server(served_run):
    with Server(served_run) as running:
        yield running


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=json_requests() | image_requests() | RAW, query=QUERY)
def test_any_request_gets_a_200_or_a_4xx_with_an_error(server, request, query):
    body, content_type, refuse = request
    status, answer = server.request("POST", "/v1/predict" + query, body,
                                    {"Content-Type": content_type} if content_type else {})
    assert (400 <= status < 500) if refuse else (status == 200 or 400 <= status < 500), (status, answer[:300])
    parsed = json.loads(answer)
    assert ("digit" in parsed) if status == 200 else isinstance(parsed.get("error"), str), parsed
    assert b"Traceback" not in answer


def test_the_fuzzed_server_printed_no_traceback(server):
    test_any_request_gets_a_200_or_a_4xx_with_an_error(server)
    assert "Traceback" not in server.output and "internal error" not in server.output, server.output[-2000:]
