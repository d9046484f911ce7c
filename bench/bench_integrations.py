"""An HTTP request through the httpx integration (the whole stack) against the bare client.

Equal work on both sides: the same ``GET /`` answered ``200 ok`` by the same stdlib HTTP/1.1
server, over a kept-alive connection on 127.0.0.1; the server runs in a process of its own, so the
CPU time measured (``time.process_time`` of this process) is the client's alone. Neither side
starts a span (no tracer provider is set). The integration runs the default stack of an
unconfigured service: retry, breaker and a 30 s per-attempt timeout (which the sync client
enforces through its own I/O timeouts, the async one with a loop timer), default subscribers on.

The cases are measured interleaved (each round takes one sample of every case in turn, so a
slow-down of the host hits all alike) and every figure is a median of same-round differences or
ratios:

- ``sync`` / ``async``: ``httpx.Client`` / ``httpx.AsyncClient`` on loopback, bare and through
  ``ResilientTransport`` / ``AsyncResilientTransport``.
- ``in-process``: the same sync clients over an ``httpx.MockTransport`` that answers at once,
  which takes the network's noise out; ``stack alone`` runs the same compiled policy around the
  bare transport's call with none of the integration's code, so ``buttress - stack alone`` is the
  integration's own cost (the Exchange, the deadline header, the timeouts, the answer's
  classification) and ``stack alone - bare`` the policy stack's. Beside them, for scale, the same
  request through what a careful programmer writes by hand at the same place (``hand-written
  floor``: breaker + retry + bulkhead, no metrics, no library: bench/run.py's floor) and
  through the assembly a user makes of the peers today (``pybreaker + tenacity``: tenacity's
  retry over ``pybreaker.CircuitBreaker.call``, a pre-bound Prometheus counter and histogram).

Each overhead is also given as a share of a bare sync request's client CPU on loopback, measured
in the same round. Last, the calls each in-process case makes per request (Python functions and
C functions, counted by ``sys.setprofile``): a figure no noise moves, which shows how much of
httpx's own work 1 % leaves room for. The verdict is the whole integration's (stack and the
integration's own code, in-process) against issue 15's goal: at most 1 % of a request.

Usage: ``python bench/bench_integrations.py [--rounds N] [--requests N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from run import hand_written

from buttress import _context
from buttress.decorators import CANONICAL_ORDER
from buttress.integrations._core import _NOT_AT_THE_EDGE
from buttress.integrations.httpx import AsyncResilientTransport, ResilientTransport
from buttress.policy import Policy, Spec

GOAL = 0.01


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        # One write: headers and body in separate segments would meet the client's delayed ACK
        # (Nagle), and every request would take 40 ms.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def log_message(self, *args: object) -> None:
        pass


def serve() -> None:
    """The server process: print the port, serve until this process is ended."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


class StackAlone(httpx.BaseTransport):
    """The integration's compiled policy around the inner transport's call, and nothing else.

    Built as the integration builds its own (every pattern but those it leaves out, the attempt
    marked as bounding its own I/O so the timeout runs it inline), so the difference to
    ``ResilientTransport`` is the integration's code alone.
    """

    def __init__(self, service: str, transport: httpx.BaseTransport) -> None:
        policy = Policy(
            *(
                Spec(pattern, service)
                for pattern in CANONICAL_ORDER
                if pattern not in _NOT_AT_THE_EDGE
            )
        )
        self.run = policy(transport.handle_request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        token = _context.bounds_own_io.set(True)
        try:
            return self.run(request)  # type: ignore[no-any-return]
        finally:
            _context.bounds_own_io.reset(token)


class Wrapped(httpx.BaseTransport):
    """The inner transport's call through ``wrap`` (a decorator): the comparison cases."""

    def __init__(self, wrap: Callable[..., Any], transport: httpx.BaseTransport) -> None:
        self.run = wrap(transport.handle_request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.run(request)  # type: ignore[no-any-return]


def peers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The assembly a user makes today: tenacity over pybreaker, a counter and a histogram."""
    import prometheus_client as prom
    import pybreaker
    import tenacity

    registry = prom.CollectorRegistry()
    calls = prom.Counter("edge_calls", "calls", ["service", "outcome"], registry=registry)
    latency = prom.Histogram("edge_latency_seconds", "latency", ["service"], registry=registry)
    ok, failed = calls.labels("edge", "success"), calls.labels("edge", "failure")
    seconds = latency.labels("edge")
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)

    @tenacity.retry(
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_exponential(multiplier=0.1, max=2),
        retry=tenacity.retry_if_exception_type(httpx.TransportError),
        reraise=True,
    )
    def attempt(request: httpx.Request) -> httpx.Response:
        return breaker.call(fn, request)  # type: ignore[no-any-return]

    def observed(request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = attempt(request)
        except Exception:
            failed.inc()
            raise
        ok.inc()
        seconds.observe(time.perf_counter() - started)
        return response

    return observed


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


async def async_round(url: str, n: int) -> tuple[float, float]:
    async with (
        httpx.AsyncClient() as bare,
        httpx.AsyncClient(transport=AsyncResilientTransport("bench-edge-async")) as protected,
    ):
        await per_request_async(bare, url, 20)  # connect and warm up
        await per_request_async(protected, url, 20)
        return await per_request_async(bare, url, n), await per_request_async(protected, url, n)


def calls_per_request(client: httpx.Client, n: int = 200) -> tuple[float, float]:
    """Python and C function calls per request (warmed up first), as ``sys.setprofile`` sees."""
    for _ in range(50):
        client.get("http://127.0.0.1:1/")
    counts = {"call": 0, "c_call": 0}

    def count(frame: object, event: str, arg: object) -> None:
        if event in counts:
            counts[event] += 1

    sys.setprofile(count)
    try:
        for _ in range(n):
            client.get("http://127.0.0.1:1/")
    finally:
        sys.setprofile(None)
    return counts["call"] / n, counts["c_call"] / n


def median_of(samples: dict[str, list[float]], f: Callable[..., float], *cases: str) -> float:
    return statistics.median(
        f(*values) for values in zip(*(samples[c] for c in cases), strict=True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    samples: dict[str, list[float]] = {}

    def sample(case: str, value: float) -> None:
        samples.setdefault(case, []).append(value)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ok")

    try:
        assert process.stdout is not None
        url = f"http://127.0.0.1:{process.stdout.readline().strip()}/"
        loopback = {
            "bare sync": httpx.Client(),
            "buttress sync": httpx.Client(transport=ResilientTransport("bench-edge")),
        }
        in_process = {
            "bare in-process": httpx.Client(transport=httpx.MockTransport(answer)),
            "stack alone in-process": httpx.Client(
                transport=StackAlone("bench-edge-stack", httpx.MockTransport(answer))
            ),
            "buttress in-process": httpx.Client(
                transport=ResilientTransport("bench-edge-mock", httpx.MockTransport(answer))
            ),
            "hand-written floor in-process": httpx.Client(
                transport=Wrapped(hand_written, httpx.MockTransport(answer))
            ),
            "pybreaker + tenacity in-process": httpx.Client(
                transport=Wrapped(peers, httpx.MockTransport(answer))
            ),
        }
        clients: dict[str, Any] = {**loopback, **in_process}
        for client in clients.values():
            per_request_sync(client, url, 100)
        for _ in range(args.rounds):
            for case, client in loopback.items():
                sample(case, per_request_sync(client, url, args.requests))
            for case, client in in_process.items():
                sample(case, per_request_sync(client, url, args.requests * 4))
            bare, protected = asyncio.run(async_round(url, args.requests))
            sample("bare async", bare)
            sample("buttress async", protected)
        calls = {case: calls_per_request(client) for case, client in in_process.items()}
        for client in clients.values():
            client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)

    us = 1e6
    request = statistics.median(samples["bare sync"])
    print(f"client CPU per bare httpx.Client request on loopback: {request * us:.1f} us\n")
    print(f"{'case':27} {'bare':>9} {'through':>9} {'overhead':>9} {'ratio':>6} {'/request':>9}")
    rows = (
        ("sync, loopback", "bare sync", "buttress sync"),
        ("async, loopback", "bare async", "buttress async"),
        ("in-process, whole", "bare in-process", "buttress in-process"),
        ("in-process, stack alone", "bare in-process", "stack alone in-process"),
        ("in-process, integration", "stack alone in-process", "buttress in-process"),
        ("in-process, hand-written", "bare in-process", "hand-written floor in-process"),
        ("in-process, pybreaker+ten.", "bare in-process", "pybreaker + tenacity in-process"),
    )
    for label, base, case in rows:
        overhead = median_of(samples, lambda f, p: f - p, case, base)
        ratio = median_of(samples, lambda f, p: f / p, case, base)
        # Same round: this overhead against that round's bare loopback request.
        share = median_of(samples, lambda f, p, r: (f - p) / r, case, base, "bare sync")
        print(
            f"{label:27} {statistics.median(samples[base]) * us:7.1f}us "
            f"{statistics.median(samples[case]) * us:7.1f}us {overhead * us:7.1f}us "
            f"{ratio:5.2f}x {share:9.2%}"
        )

    # The goal is what a request pays for going through the integration at all: the stack and
    # the integration's own code together, against a bare request (in-process, so the network's
    # noise is out of it; the loopback rows above show the same with it).
    def share(case: str, base: str) -> float:
        return median_of(samples, lambda f, p, r: (f - p) / r, case, base, "bare sync")

    whole = share("buttress in-process", "bare in-process")
    own = share("buttress in-process", "stack alone in-process")
    verdict = "ok" if whole <= GOAL else "OVER GOAL"
    print(
        f"\nthrough the integration / request: {whole:.2%} (goal {GOAL:.0%}: {verdict}); "
        f"the integration's own code {own:.2%}, the stack {whole - own:.2%}"
    )
    print("\ncalls per request, in-process (Python functions, C functions):")
    bare_py, bare_c = calls["bare in-process"]
    for case, (py, c) in calls.items():
        print(f"  {case:27} {py:6.1f} {c:6.1f}   (+{py - bare_py:.1f}, +{c - bare_c:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
