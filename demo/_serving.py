"""A loopback HTTP server answering from a daemon thread: the upstream and the endpoints."""

from __future__ import annotations

import threading
from socketserver import TCPServer

__all__ = ["Serving"]


class Serving:
    """Runs ``server`` (already bound, to 127.0.0.1) on a daemon thread between start and stop."""

    def __init__(self, server: TCPServer, name: str) -> None:
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()
