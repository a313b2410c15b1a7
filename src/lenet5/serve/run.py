"""Run the service under uvicorn with the bounds of `limits.py`, after checking the port is free."""

from __future__ import annotations

import errno
import socket
from typing import Any

from lenet5.errors import Lenet5Error
from lenet5.serve.limits import KEEP_ALIVE, MAX_CONCURRENT, MAX_CONNECTIONS, GuardedHttpTools


class ServeError(Lenet5Error):
    """The service cannot start: the address cannot be listened on."""


def check_port(host: str, port: int) -> None:
    """Raise ServeError unless `host:port` can be listened on now (it may still be taken before
    uvicorn binds it; then uvicorn says so)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} is in use on {host}") from None
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def backstop() -> int:
    """uvicorn's own concurrency limit (a plain-text 503 for every path): out of the way where
    GuardedHttpTools caps connections and RequestGuard counts requests; the only bound without them."""
    return MAX_CONNECTIONS + MAX_CONCURRENT if GuardedHttpTools else MAX_CONCURRENT


def run_server(app: Any, *, host: str, port: int, workers: int = 1, factory: bool = False) -> None:
    """uvicorn.run with the service's connection bounds: an app, or an import string with `factory`."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, workers=workers if workers > 1 else None, factory=factory,
                http=GuardedHttpTools or "auto", timeout_keep_alive=KEEP_ALIVE, limit_concurrency=backstop(),
                log_level="warning", access_log=False)
