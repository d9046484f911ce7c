"""The stack in a real service: CPU per request with and without it (``make bench``).

A Starlette app under uvicorn, on loopback, in its own process, serves two routes that differ only
in the stack: ``/plain`` awaits a coroutine, ``/stack`` awaits the same coroutine through the
async stack of every benchmark (breaker + retry + timeout + bulkhead, default subscribers on). An
httpx client in this process sends the requests, alternating the routes round by round; the
server's CPU time per request (``time.process_time()`` read through a third route) is what each
route costs, and the client's CPU per request is what an httpx request costs on loopback.

Goal: what the stack adds to a request is at most 1 % of an httpx request's CPU.

Usage: ``python bench/bench_service.py [--requests N] [--rounds N] [--no-subscribers]``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

GOAL = 0.01


def serve(port: int, *, subscribers: bool) -> None:
    import uvicorn
    from _harness import buttress_stacks
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    _, stack = buttress_stacks()
    if not subscribers:
        from buttress import instrumentation

        instrumentation.configure(prometheus=False, otel=False, logging=False)

    async def work() -> int:
        return 1

    async def plain(_request: object) -> PlainTextResponse:
        return PlainTextResponse(str(await work()))

    async def protected(_request: object) -> PlainTextResponse:
        return PlainTextResponse(str(await stack()))

    async def cpu(_request: object) -> PlainTextResponse:
        return PlainTextResponse(repr(time.process_time()))

    app = Starlette(routes=[Route("/plain", plain), Route("/stack", protected), Route("/cpu", cpu)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def server(*, subscribers: bool) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, __file__, "--serve", str(port)]
    process = subprocess.Popen(command + ([] if subscribers else ["--no-subscribers"]))
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/cpu", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the benchmark server did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per sample")
    parser.add_argument("--rounds", type=int, default=9, help="samples per route")
    parser.add_argument(
        "--no-subscribers", action="store_true", help="the server runs with every subscriber off"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, subscribers=not args.no_subscribers)
        return 0

    import httpx

    per_route: dict[str, list[float]] = {"plain": [], "stack": []}
    client_cpu: list[float] = []
    with server(subscribers=not args.no_subscribers) as base, httpx.Client(base_url=base) as client:
        for _ in range(50):  # warm up both routes and the connection
            client.get("/plain")
            client.get("/stack")
        for _ in range(args.rounds):
            for route, samples in per_route.items():
                before = float(client.get("/cpu").text)
                mine = time.process_time()
                for _ in range(args.requests):
                    client.get(f"/{route}")
                client_cpu.append((time.process_time() - mine) / args.requests)
                samples.append((float(client.get("/cpu").text) - before) / args.requests)
    added = [s - p for s, p in zip(per_route["stack"], per_route["plain"], strict=True)]
    # Same-round: the stack's added CPU against the client's CPU for one httpx request.
    shares = [a / c for a, c in zip(added, client_cpu[1::2], strict=True)]
    us = 1e6
    plain, stacked = (statistics.median(per_route[r]) * us for r in ("plain", "stack"))
    print(f"server CPU per request, plain route        {plain:8.1f} us")
    print(f"server CPU per request, through the stack {stacked:8.1f} us")
    print(f"added by the stack                        {statistics.median(added) * us:8.1f} us")
    print(f"client CPU per httpx request              {statistics.median(client_cpu) * us:8.1f} us")
    share = statistics.median(shares)
    verdict = "ok" if share <= GOAL else "OVER GOAL"
    print(f"added / httpx request CPU                 {share:8.2%}  (goal {GOAL:.0%}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
