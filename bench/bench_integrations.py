"""An HTTP request through the httpx integration (the whole stack) against the bare transport.

Both clients send ``GET /`` to the same stdlib HTTP/1.1 server on 127.0.0.1 over a kept-alive
connection; the cases are measured interleaved (each round takes one sample of every case in
turn, so a slow-down of the host hits all alike). Reported: the CPU time of the process per
request (``time.process_time``: client and server threads, every worker thread included; the
server's share is the same in every case), the median per-round overhead in microseconds, and
the ratio. The integration runs the default stack of an unconfigured service: retry, breaker and
a 30 s per-attempt timeout, which the sync client enforces through its own I/O timeouts (inline)
and the async one with a loop timer. "worker" is the sync transport as it was before: each
attempt handed to a timeout worker thread.

Usage: ``python bench/bench_integrations.py [--rounds N] [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from buttress.integrations.httpx import (
    AsyncResilientTransport,
    ResilientTransport,
    _exchange,
    _send,
)
from buttress.patterns import PATTERNS
from buttress.policy import Policy, Spec


class WorkerTransport(ResilientTransport):
    """The sync transport as it was: ``Policy.call`` per request, each attempt on a worker."""

    def __init__(self, service: str, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(service, transport)
        self.policy = Policy(*(Spec(pattern, service) for pattern in PATTERNS))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with _exchange(self.edge, request) as ex:
            ex.answer = self.policy.call(_send, self.transport, ex, request)
        return ex.answer  # type: ignore[no-any-return]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        # One write: headers and body in separate segments would meet the client's delayed ACK
        # (Nagle), and every request would take 40 ms.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def log_message(self, *args: object) -> None:
        pass


def per_request_sync(client: httpx.Client, url: str, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        client.get(url)
    return (time.process_time() - started) / n


async def per_request_async(client: httpx.AsyncClient, url: str, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        await client.get(url)
    return (time.process_time() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    samples: dict[str, list[float]] = {}
    try:
        bare = httpx.Client()
        protected = httpx.Client(transport=ResilientTransport("bench-edge"))
        worker = httpx.Client(transport=WorkerTransport("bench-edge-worker"))

        async def async_round(n: int) -> tuple[float, float]:
            async with (
                httpx.AsyncClient() as abare,
                httpx.AsyncClient(transport=AsyncResilientTransport("bench-edge-async")) as aprot,
            ):
                await per_request_async(abare, url, 20)  # connect and warm up
                await per_request_async(aprot, url, 20)
                return (
                    await per_request_async(abare, url, n),
                    await per_request_async(aprot, url, n),
                )

        # The integration's own cost without the network: the same clients over an in-process
        # transport that answers at once (the bare request's CPU is then httpx's alone).
        def answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=b"ok")

        mock = {
            "bare in-process": httpx.Client(transport=httpx.MockTransport(answer)),
            "buttress in-process": httpx.Client(
                transport=ResilientTransport("bench-edge-mock", httpx.MockTransport(answer))
            ),
            "buttress in-process-worker": httpx.Client(
                transport=WorkerTransport("bench-edge-mock-worker", httpx.MockTransport(answer))
            ),
        }
        for client in (bare, protected, worker, *mock.values()):
            per_request_sync(client, url, 50)
        for _ in range(args.rounds):
            samples.setdefault("bare sync", []).append(per_request_sync(bare, url, args.requests))
            samples.setdefault("buttress sync", []).append(
                per_request_sync(protected, url, args.requests)
            )
            samples.setdefault("buttress worker", []).append(
                per_request_sync(worker, url, args.requests)
            )
            for case, client in mock.items():
                samples.setdefault(case, []).append(
                    per_request_sync(client, url, args.requests * 4)
                )
            a_bare, a_prot = asyncio.run(async_round(args.requests))
            samples.setdefault("bare async", []).append(a_bare)
            samples.setdefault("buttress async", []).append(a_prot)
        bare.close()
        protected.close()
        worker.close()
    finally:
        server.shutdown()
        server.server_close()
    for kind, base in (
        ("sync", "sync"),
        ("worker", "sync"),
        ("async", "async"),
        ("in-process", "in-process"),
        ("in-process-worker", "in-process"),
    ):
        plain, full = samples[f"bare {base}"], samples[f"buttress {kind}"]
        overhead = statistics.median(f - p for f, p in zip(full, plain, strict=True))
        ratio = statistics.median(f / p for f, p in zip(full, plain, strict=True))
        print(
            f"{kind:17}: bare {statistics.median(plain) * 1e6:7.1f} us, "
            f"through buttress {statistics.median(full) * 1e6:7.1f} us, "
            f"overhead {overhead * 1e6:6.1f} us ({ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
