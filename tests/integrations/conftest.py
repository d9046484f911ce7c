"""A scripted HTTP server on 127.0.0.1 (stdlib), for the client integrations' tests.

``upstream.then(503, {"Retry-After": "2"})`` queues an answer; requests beyond the script get
``200 ok``. ``action="reset"`` closes the connection without answering (a reset), and
``action="hang"`` answers after ``hang`` seconds. Every request is recorded (method, path,
headers, body).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    action: str | None = None
    hang: float = 0.0


class Upstream:
    def __init__(self) -> None:
        self.script: deque[Answer] = deque()
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with upstream.lock:
                    upstream.seen.append(
                        Seen(self.command, self.path, dict(self.headers.items()), body)
                    )
                    answer = upstream.script.popleft() if upstream.script else Answer()
                if answer.action == "reset":
                    # RST instead of FIN: the client sees a connection reset mid-request.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                if answer.action == "hang":
                    time.sleep(answer.hang)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except ConnectionError:
                    # The client gave up on a slow answer (its timeout): expected. Printing the
                    # traceback from this thread would race pytest's own source parsing (a
                    # CPython 3.11 ast bug), so the answer is dropped quietly.
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def then(
        self,
        status: int = 200,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        *,
        action: str | None = None,
        hang: float = 0.0,
    ) -> Upstream:
        self.script.append(Answer(status, headers or {}, body, action, hang))
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def second_upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def refused_url() -> str:
    """A loopback URL nobody listens on: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"
