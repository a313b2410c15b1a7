"""The HTTP service: predictions over JSON, and the draw-a-digit page, from one checkpoint.

    POST /v1/predict   an image (multipart field `image`, or the raw body with an image/*
                       content type) or JSON {"pixels": 28x28 numbers 0-255, "prepare": true};
                       ?maps=true adds every layer's activation maps as small PNGs
    GET  /v1/model     what is being served: name, parameters, training metrics
    GET  /healthz      liveness (also HEAD), answered on the event loop
    GET  /docs         OpenAPI documentation;  GET /  the page

Every refusal is a 4xx with {"error": "..."}: too large a body (413: 64 KB for JSON, 4 MB
otherwise), a body or request head that does not arrive in time (408), an unsupported content
type (415), a malformed request (400), an image or array that cannot be used (422), a wrong
method (405); an unexpected failure is a 500 with {"error": ...} too. JSON is parsed and
images decoded in worker threads, at most a few images at once (`limits.py` has the bounds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lenet5.serve.limits import JSON_LIMIT, RequestGuard, media_type
from lenet5.serve.predictor import Predictor, RequestRefused

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes: a phone photo as JPEG fits, a raw 100 MP bitmap does not
# Image decodes at once: each takes up to ~100 MB at the pixel limit, so this bounds the memory.
DEFAULT_DECODES = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
SETTINGS_ENV = "LENET5_SERVE_SETTINGS"  # how `lenet5 serve --workers N` hands settings to each worker


def app_from_environment() -> FastAPI:
    """Factory for uvicorn's worker processes: the settings come from $LENET5_SERVE_SETTINGS."""
    import json

    settings = json.loads(os.environ[SETTINGS_ENV])
    torch.set_num_threads(settings.pop("threads", 1))
    return create_app(**settings)


def create_app(checkpoint: str | Path, *, max_body: int = DEFAULT_MAX_BODY, max_json: int = JSON_LIMIT,
               decodes: int = DEFAULT_DECODES) -> FastAPI:
    """The service for one checkpoint. At most `decodes` images are decoded at once; the
    others wait without holding a thread, so JSON requests and /healthz are not queued behind them."""
    predictor = Predictor(checkpoint)
    predictor.model.to(memory_format=torch.channels_last)
    decode_slots = anyio.CapacityLimiter(decodes)
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

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        """Liveness, answered on the event loop: it never waits behind inference."""
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
        content_type = media_type(request.headers.get("content-type", ""))
        if content_type == "application/json":
            body = await request.body()  # at most max_json bytes: RequestGuard
            return await run_in_threadpool(predictor.from_json, body, maps)  # parsing too: off the event loop
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
        return await anyio.to_thread.run_sync(predictor.from_image, data, maps, limiter=decode_slots)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(RequestGuard, max_body=max_body, max_json=max_json)
    app.state.predictor = predictor
    return app
