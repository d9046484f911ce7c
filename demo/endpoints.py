"""``/metrics`` and ``/health`` on a loopback port while the demo runs.

The same two apps an application mounts: prometheus_client's exposition of the registry buttress's
Prometheus subscriber writes to, and :func:`buttress.health_app.wsgi_app`.
"""

from __future__ import annotations

from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from buttress.health_app import wsgi_app
from demo._serving import Serving

__all__ = ["Endpoints"]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a scrape every few seconds would interleave with the progress line."""


class Endpoints:
    """A small WSGI server routing ``/metrics`` and ``/health`` (and below it) on 127.0.0.1."""

    def __init__(self, port: int = 0, registry: CollectorRegistry = REGISTRY) -> None:
        metrics = make_wsgi_app(registry)
        health = wsgi_app()

        def route(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/health" or path.startswith("/health/"):
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/health"
                environ["PATH_INFO"] = path.removeprefix("/health")
                return health(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /metrics or /health\n"]

        server: WSGIServer = make_server("127.0.0.1", port, route, handler_class=_QuietHandler)
        self._serving = Serving(server, "demo-endpoints")

    @property
    def base(self) -> str:
        return self._serving.url

    def start(self) -> None:
        self._serving.start()

    def stop(self) -> None:
        self._serving.stop()
