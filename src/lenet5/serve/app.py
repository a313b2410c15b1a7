"""The HTTP service: predictions over JSON, and the draw-a-digit page, from one checkpoint.

    POST /v1/predict   an image (multipart field `image`, or the raw body with an image/*
                       content type) or JSON {"pixels": 28x28 numbers 0-255, "prepare": true};
                       ?maps=true adds every layer's activation maps as small PNGs
    GET  /v1/model     what is being served: name, parameters, training metrics
    GET  /healthz      liveness
    GET  /docs         OpenAPI documentation;  GET /  the page

Every refusal is a 4xx with {"error": "..."}: too large a body (413), an unsupported content
type (415), a malformed request (400), an image or array that cannot be used (422), a wrong
method (405). Inference runs in worker threads; the model is read-only, so requests need no lock.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lenet5.checkpoint import load_checkpoint
from lenet5.data.transforms import to_model_input
from lenet5.explain import explain_digit
from lenet5.models import count_parameters, describe
from lenet5.preprocess import ImageError, load_grey, prepare_digit

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes: a phone photo as JPEG fits, a raw 100 MP bitmap does not
DEFAULT_MAX_PIXELS = 25_000_000


class RequestRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse({"error": f"request body over the {self.limit:,}-byte limit"}, 413)
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise RequestRefused(413, f"request body over the {self.limit:,}-byte limit")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except RequestRefused as e:  # raised while the body streamed in, before any response
            await JSONResponse({"error": e.message}, e.status)(scope, receive, send)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _diverging(values: np.ndarray) -> np.ndarray:
    """Blue (negative), white (0), red (positive) as uint8 RGB, scaled by the largest |value|."""
    scale = float(np.abs(values).max()) or 1.0
    v = np.clip(values / scale, -1, 1)[..., None]
    white, red, blue = np.array([255, 255, 255.0]), np.array([178, 24, 43.0]), np.array([33, 102, 172.0])
    rgb = np.where(v >= 0, white + (red - white) * v, white + (blue - white) * -v)
    return rgb.astype(np.uint8)


def layer_images(maps: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Each layer's maps as one PNG: channels side by side (1-px gaps), vectors as a strip
    (F6's 84 units as the 7x12 bitmap the RBF output compares them with)."""
    layers = []
    for name, value in maps.items():
        if name == "input":
            continue
        if value.ndim == 3 and value.shape[1] > 1:
            c, h, w = value.shape
            tiles = np.full((h, c * (w + 1) - 1), np.nan, dtype=np.float32)
            for k in range(c):
                tiles[:, k * (w + 1):k * (w + 1) + w] = value[k]
            rgb = _diverging(np.nan_to_num(tiles))
            rgb[np.isnan(tiles)] = 240
        else:
            vector = value.reshape(-1)
            grid = vector.reshape(12, 7) if vector.size == 84 else np.repeat(vector[None, :], 4, axis=0)
            rgb = _diverging(grid)  # a plain vector is drawn as a strip 4 pixels tall
        layers.append({"name": name, "shape": list(value.shape), "png": _png(rgb)})
    return layers


class Predictor:
    def __init__(self, checkpoint: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        loaded = load_checkpoint(checkpoint, "cpu")
        self.model, self.meta, self.path = loaded.model, loaded.meta, loaded.path
        self.max_pixels = max_pixels

    def info(self) -> dict[str, Any]:
        return {"name": self.meta["model"], "description": describe(self.meta["model"]),
                "parameters": count_parameters(self.model), "epoch": self.meta.get("epoch"),
                "metrics": self.meta.get("metrics", {}), "checkpoint": self.path.name,
                "input": "an image of one digit, any size; or 28x28 pixels 0-255, ink high"}

    def from_image(self, data: bytes, maps: bool) -> dict[str, Any]:
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except Exception:
            w = h = 0  # load_grey below names the problem
        if w * h > self.max_pixels:
            raise RequestRefused(422, f"image is {w}x{h}, over the {self.max_pixels:,}-pixel limit")
        try:
            prepared = prepare_digit(load_grey(data, "upload"), "upload")
        except ImageError as e:
            raise RequestRefused(422, str(e)) from None
        return self.answer(prepared, maps)

    def from_pixels(self, pixels: Any, prepare: bool, maps: bool) -> dict[str, Any]:
        try:
            array = np.asarray(pixels, dtype=np.float64)
        except (ValueError, TypeError):
            raise RequestRefused(422, "pixels must be a 28x28 array of numbers") from None
        if array.shape != (28, 28):
            raise RequestRefused(422, f"pixels must be 28x28, got {'x'.join(map(str, array.shape)) or 'a scalar'}")
        if not np.isfinite(array).all():
            raise RequestRefused(422, "pixels contain NaN or infinite values")
        if array.min() < 0 or array.max() > 255:
            raise RequestRefused(422, "pixels must be in 0..255")
        if prepare:
            try:
                digit = prepare_digit((array / 255).astype(np.float32), "pixels")
            except ImageError as e:
                raise RequestRefused(422, str(e)) from None
        else:
            digit = np.round(array).astype(np.uint8)
        return self.answer(digit, maps)

    def answer(self, digit: np.ndarray, maps: bool) -> dict[str, Any]:
        started = time.perf_counter()
        if maps:
            explanation = explain_digit(self.model, digit)
            probabilities = explanation.probabilities
        else:  # the fast path: no activations kept
            with torch.no_grad():
                x = to_model_input(torch.from_numpy(digit)[None])
                probabilities = torch.softmax(self.model.logits(self.model(x)), 1)[0].numpy()
        rounded = [round(float(p), 6) for p in probabilities]
        result = {"digit": int(np.argmax(probabilities)), "confidence": max(rounded), "probabilities": rounded,
                  "prepared": _png(digit), "model": self.meta["model"]}
        if maps:
            result["maps"] = layer_images(explanation.maps)
        result["inference_ms"] = round(1000 * (time.perf_counter() - started), 3)
        return result


SETTINGS_ENV = "LENET5_SERVE_SETTINGS"  # how `lenet5 serve --workers N` hands settings to each worker


def app_from_environment() -> FastAPI:
    """Factory for uvicorn's worker processes: the settings come from $LENET5_SERVE_SETTINGS."""
    import json
    import os

    settings = json.loads(os.environ[SETTINGS_ENV])
    torch.set_num_threads(settings.pop("threads", 1))
    return create_app(**settings)


def create_app(checkpoint: str | Path, *, max_body: int = DEFAULT_MAX_BODY,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> FastAPI:
    predictor = Predictor(checkpoint, max_pixels)
    predictor.model.to(memory_format=torch.channels_last)
    app = FastAPI(title="lenet5", summary="Handwritten-digit recognition with LeNet-5",
                  description=__doc__, version=__import__("lenet5").__version__)

    @app.exception_handler(RequestRefused)
    async def refused(_: Request, exc: RequestRefused):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', 'malformed')}"}, 422)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        return predictor.info()

    @app.post("/v1/predict", openapi_extra={"requestBody": {"content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": {"type": "object", "required": ["pixels"], "properties": {
            "pixels": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                       "description": "28x28 grey values 0-255, ink high"},
            "prepare": {"type": "boolean", "default": True,
                        "description": "crop, fit and centre like MNIST before predicting"}}}}}}})
    async def predict(request: Request, maps: bool = Query(False, description="add every layer's maps")):
        """Predict the digit in an image or a 28x28 array."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            try:
                payload = await request.json()
            except ValueError:
                raise RequestRefused(400, "the body is not valid JSON") from None
            if not isinstance(payload, dict) or "pixels" not in payload:
                raise RequestRefused(422, 'expected a JSON object with "pixels": a 28x28 array')
            prepare = payload.get("prepare", True)
            if not isinstance(prepare, bool):
                raise RequestRefused(422, '"prepare" must be true or false')
            return await run_in_threadpool(predictor.from_pixels, payload["pixels"], prepare, maps)
        if content_type == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4, max_part_size=max_body)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestRefused(422, 'expected a file in the multipart field "image"')
            data = await upload.read()
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            data = await request.body()
        else:
            raise RequestRefused(415, f"unsupported content type {content_type or '(none)'!r}: send an image "
                                      "(image/*), multipart/form-data with an 'image' file, or JSON pixels")
        if not data:
            raise RequestRefused(400, "empty body: send an image")
        return await run_in_threadpool(predictor.from_image, data, maps)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=max_body)
    app.state.predictor = predictor
    return app
