"""Bounds on what one client can take from the service: bytes, time, connections, and errors
that stay one line. Two layers, outermost first:

- `GuardedHttpTools`, the HTTP protocol: a request's head (request line and headers) must
  arrive within HEAD_TIMEOUT seconds and HEAD_BYTES bytes, or the connection gets a 408/431
  and is closed; this also closes connections that never send anything. Over MAX_CONNECTIONS
  open connections, a new one is closed at once, before it can use up file descriptors.
- `RequestGuard`, ASGI middleware: at most MAX_CONCURRENT requests in flight (more get a JSON
  503 with Retry-After; `/healthz` is neither counted nor refused, so a busy server still says
  it is alive); the body limit (JSON_LIMIT for JSON, the image limit for
  the rest), by Content-Length and while streaming (413, after reading up to DRAIN_BYTES more
  so that the client, still sending, can read it); a body must keep coming
  (BODY_IDLE_TIMEOUT without a byte, or BODY_TIMEOUT in all, is a 408); and any exception the
  app did not answer becomes a JSON 500 and one log line, while a client that went away is
  dropped without a word.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

JSON_LIMIT = 64 * 1024  # 28x28 pixels take under 20 KB even written as "255.0, "
HEAD_TIMEOUT, HEAD_BYTES = 10.0, 64 * 1024
BODY_IDLE_TIMEOUT, BODY_TIMEOUT = 10.0, 60.0  # 60 s: 4 MB at 0.5 Mbit/s
KEEP_ALIVE = 5  # seconds an idle keep-alive connection is kept (uvicorn's default, stated)
MAX_CONCURRENT = 64  # requests in flight at once in one worker process (/healthz aside); more get a 503
MAX_CONNECTIONS = 256  # open sockets at once; more are closed as they come
RETRY_AFTER = 1  # seconds a client refused for load is asked to wait
HEALTH_PATH = "/healthz"
DRAIN_BYTES, DRAIN_TIMEOUT = 16 * 1024 * 1024, 5.0  # read of a refused body, so its client sees the 413

log = logging.getLogger("lenet5.serve")


class BodyRefused(Exception):
    """Raised while the body streams in; answered by RequestGuard, which closes the connection."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers={"Connection": "close"} if close else None)


class BoundedBody:
    """An ASGI `receive` that counts the body's bytes and times its arrival, until it is complete."""

    def __init__(self, receive, limit: int, what: str):
        self.receive, self.limit, self.what = receive, limit, what
        self.seen, self.complete = 0, False
        self.deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT

    async def __call__(self):
        if self.complete:  # afterwards only http.disconnect can come, whenever it likes
            return await self.receive()
        wait = min(BODY_IDLE_TIMEOUT, self.deadline - asyncio.get_running_loop().time())
        try:
            message = await asyncio.wait_for(self.receive(), max(wait, 0))
        except asyncio.TimeoutError:
            raise BodyRefused(408, f"the request body did not arrive in time ({BODY_IDLE_TIMEOUT:g} s without "
                                   f"data or {BODY_TIMEOUT:g} s in all)") from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise BodyRefused(413, f"{self.what} over the {self.limit:,}-byte limit")
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message


async def drain(receive) -> None:
    """Read and drop the rest of a refused body, within DRAIN_BYTES and DRAIN_TIMEOUT: a client
    still sending when the connection closes gets a reset instead of the 413 (nginx lingers too)."""
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + DRAIN_TIMEOUT, 0
    while dropped <= DRAIN_BYTES and (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        dropped += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def media_type(content_type: str) -> str:
    """'application/json' of 'Application/JSON; charset=utf-8': the one reading of a Content-Type
    that the body limits and the routes share (they once read it differently, and a JSON body got
    the image limit)."""
    return content_type.split(";")[0].strip().lower()


class RequestGuard:
    """ASGI middleware: body limits and timeouts, and a one-line JSON answer for every failure."""

    def __init__(self, app, max_body: int, max_json: int = JSON_LIMIT, max_in_flight: int = MAX_CONCURRENT):
        self.app, self.max_body, self.max_json = app, max_body, max_json
        self.max_in_flight, self.in_flight = max_in_flight, 0  # one event loop per process: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path") == HEALTH_PATH:  # guarded, never counted nor refused for load
            return await self._guarded(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            # uvicorn's own limit answered this in plain text, /healthz included. The connection stays
            # open: uvicorn then drops the unread body, where closing it would reset a client still sending.
            response = JSONResponse({"error": f"busy: {self.max_in_flight} requests in flight; retry shortly"}, 503,
                                    headers={"Retry-After": str(RETRY_AFTER)})
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope, receive, send):
        headers = dict(scope["headers"])
        types = [value for name, value in scope["headers"] if name == b"content-type"]
        is_json = media_type(types[0].decode("latin-1")) == "application/json" if types else False
        limit, what = (self.max_json, "JSON body") if is_json else (self.max_body, "request body")
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if len(types) > 1:  # the route reads the first, dict() kept the last: a JSON body passed as an image's
                raise BodyRefused(400, "more than one Content-Type header")
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise BodyRefused(413, f"{what} over the {limit:,}-byte limit")
            await self.app(scope, BoundedBody(receive, limit, what), tracked_send)
        except BodyRefused as e:
            if e.status == 413:
                await drain(receive)
            if not started:
                await error_response(e.status, e.message, close=True)(scope, receive, send)
        except ClientDisconnect:
            pass  # the client went away mid-request: nobody to answer, nothing wrong here
        except Exception as e:  # noqa: BLE001 - the one place that turns a bug into a 500
            first_line = (str(e).splitlines() or [""])[0][:200]
            log.error("%s %s: internal error: %s: %s", scope.get("method"), scope.get("path"),
                      type(e).__name__, first_line)
            log.debug("traceback", exc_info=True)
            if not started:
                await error_response(500, "internal server error", close=True)(scope, receive, send)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without its [standard] extras: uvicorn's own protocol, without these bounds
    GuardedHttpTools = None
else:
    class GuardedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol with a deadline and a size limit for each request head,
        a cap on open connections, and a JSON 400 for a request that is not valid HTTP. Uses the
        parser callbacks httptools names."""

        head_timer: asyncio.TimerHandle | None = None
        head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                transport.close()
                return
            self._start_head()

        def connection_lost(self, exc) -> None:
            self._stop_head()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            waiting = self.head_timer is not None
            super().data_received(data)
            if waiting and self.head_timer is not None:  # the head is still incomplete after this data
                self.head_bytes += len(data)
                if self.head_bytes > HEAD_BYTES:
                    self._refuse(431, f"request head over {HEAD_BYTES:,} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._start_head()

        def on_headers_complete(self) -> None:
            self._stop_head()
            super().on_headers_complete()

        def _start_head(self) -> None:
            if self.head_timer is None:
                self.head_bytes = 0
                self.head_timer = self.loop.call_later(
                    HEAD_TIMEOUT, self._refuse, 408, f"request head not received within {HEAD_TIMEOUT:g} s")

        def _stop_head(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def send_400_response(self, msg: str) -> None:  # uvicorn's is plain text
            self._refuse(400, f"not a valid HTTP request: {msg}")

        def _refuse(self, status: int, message: str) -> None:
            self._stop_head()
            if self.transport.is_closing():
                return
            reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = json.dumps({"error": message}, separators=(",", ":")).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
            self.transport.close()
