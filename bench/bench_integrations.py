"""An HTTP request through the httpx integration (the whole stack) against the bare transport.

Both clients send ``GET /`` to the same stdlib HTTP/1.1 server on 127.0.0.1 over a kept-alive
connection; the cases are measured interleaved (each round takes one sample of every case in
turn, so a slow-down of the host hits all alike). Reported: the time per request of each case,
the median per-round overhead in microseconds, and the ratio. The integration runs the default
stack of an unconfigured service: retry, breaker and a 30 s per-attempt timeout (a worker-thread
hand-off for the sync client, a loop timer for the async one).

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

from buttress.integrations.httpx import AsyncResilientTransport, ResilientTransport


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

        per_request_sync(bare, url, 50)
        per_request_sync(protected, url, 50)
        for _ in range(args.rounds):
            samples.setdefault("bare sync", []).append(per_request_sync(bare, url, args.requests))
            samples.setdefault("buttress sync", []).append(
                per_request_sync(protected, url, args.requests)
            )
            a_bare, a_prot = asyncio.run(async_round(args.requests))
            samples.setdefault("bare async", []).append(a_bare)
            samples.setdefault("buttress async", []).append(a_prot)
        bare.close()
        protected.close()
    finally:
        server.shutdown()
        server.server_close()
    for kind in ("sync", "async"):
        plain, full = samples[f"bare {kind}"], samples[f"buttress {kind}"]
        overhead = statistics.median(f - p for f, p in zip(full, plain, strict=True))
        ratio = statistics.median(f / p for f, p in zip(full, plain, strict=True))
        print(
            f"{kind:5}: bare {statistics.median(plain) * 1e6:7.1f} us, "
            f"through buttress {statistics.median(full) * 1e6:7.1f} us, "
            f"overhead {overhead * 1e6:6.1f} us ({ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
