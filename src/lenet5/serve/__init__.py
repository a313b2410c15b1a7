"""HTTP serving: `create_app(checkpoint)` builds the ASGI app that `lenet5 serve` runs."""

from lenet5.serve.app import create_app

__all__ = ["create_app"]
