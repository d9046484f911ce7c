"""The flaky upstream: a real HTTP server on a free loopback port that misbehaves on schedule.

``GET /items/<id>`` answers ``{"item": id, "stock": n}``, unless the current phase says otherwise
(see :data:`DESCRIPTIONS`). Every request that reaches it is recorded with
the client that sent it (header ``X-Demo-Client``), so "calls that reached the upstream" is counted
where it happens, not inferred by the clients.
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Final

from buttress import _clock
from demo._serving import Serving
from demo.schedule import Schedule

__all__ = ["CLIENT_HEADER", "DESCRIPTIONS", "FlakyUpstream", "Hit"]

CLIENT_HEADER: Final = "X-Demo-Client"
_ITEM = re.compile(r"^/items/(\d+)$")

# Seconds an answer takes while healthy, and while slow.
HEALTHY_LATENCY: Final = (0.005, 0.03)
SLOW_LATENCY: Final = (1.0, 2.0)
# Per client, during the rate-limited phase: a token bucket of this rate and burst.
RATE_LIMIT_PER_SECOND: Final = 10.0
RATE_LIMIT_BURST: Final = 5.0
RETRY_AFTER_SECONDS: Final = 1

DESCRIPTIONS: Final = {
    "healthy": f"answers in {HEALTHY_LATENCY[0] * 1000:g}-{HEALTHY_LATENCY[1] * 1000:g} ms",
    "outage": "hard outage: every request fails with 503",
    "slow": f"answers, but after {SLOW_LATENCY[0]:g}-{SLOW_LATENCY[1]:g} s",
    "rate_limited": f"over {RATE_LIMIT_PER_SECOND:g} requests/s per client: 429 with "
    f"Retry-After: {RETRY_AFTER_SECONDS}",
    "recovery": "healthy again",
}


@dataclass(frozen=True, slots=True)
class Hit:
    """One request that reached the upstream."""

    at: float  # seconds from the start of the run
    client: str
    phase: str
    status: int


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = RATE_LIMIT_BURST
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(
            RATE_LIMIT_BURST, self.tokens + (now - self.stamp) * RATE_LIMIT_PER_SECOND
        )
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class FlakyUpstream:
    """The server, its schedule, and the record of every request that reached it.

    Args:
        schedule: the phases, timed from ``started`` (a ``_clock.monotonic()`` reading).
        seed: seeds the latencies and stock levels it answers with.
    """

    def __init__(self, schedule: Schedule, seed: int, started: float) -> None:
        self.schedule = schedule
        self.started = started
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._buckets: dict[str, _Bucket] = {}
        self._serving = Serving(_Server(("127.0.0.1", 0), _handler_for(self)), "demo-upstream")

    @property
    def url(self) -> str:
        return self._serving.url

    def start(self) -> None:
        self._serving.start()

    def stop(self) -> None:
        self._serving.stop()

    def hits(self) -> list[Hit]:
        """Every request that reached the server so far, in arrival order."""
        with self._lock:
            return list(self._hits)

    def respond(self, client: str, item: int) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Decide the answer to one request: status, headers, body; waits as the phase says."""
        elapsed = _clock.monotonic() - self.started
        phase = self.schedule.at(elapsed).name
        with self._lock:
            latency = self._random.uniform(*HEALTHY_LATENCY)
            slow = self._random.uniform(*SLOW_LATENCY)
            stock = self._random.randint(0, 40)
        status, headers = 200, {}
        body: dict[str, Any] = {"item": item, "stock": stock}
        if phase == "outage":
            status, body = 503, {"error": "service unavailable"}
        elif phase == "slow":
            latency = slow
        elif phase == "rate_limited":
            with self._lock:
                bucket = self._buckets.setdefault(client, _Bucket(elapsed))
                admitted = bucket.take(elapsed)
            if not admitted:
                status, body = 429, {"error": "too many requests"}
                headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        with self._lock:
            self._hits.append(Hit(round(elapsed, 4), client, phase, status))
        if status == 200:
            _clock.sleep(latency)
        return status, headers, body


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout, the end of the run) closes its connection while the
        # answer is on its way: that is the clients' story, reported by them, not a server fault.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(upstream: FlakyUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real client pool expects
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
        # client's delayed ACK would add ~40 ms to every answer.
        disable_nagle_algorithm = True
        server_version = "flaky-upstream/1"
        sys_version = ""
        owner: ClassVar[FlakyUpstream] = upstream

        def do_GET(self) -> None:
            match = _ITEM.match(self.path)
            if match is None:
                self._send(404, {}, {"error": "not found"})
                return
            client = self.headers.get(CLIENT_HEADER, "anonymous")
            self._send(*self.owner.respond(client, int(match.group(1))))

        def _send(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: the demo reports what happened; an access log would drown it."""

    return Handler
