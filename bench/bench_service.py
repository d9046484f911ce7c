"""The stack in a real service, and the httpx integration in its client: CPU per request.

A Starlette app under uvicorn, on loopback, in its own process, serves two routes that differ only
in the stack: ``/plain`` awaits a coroutine, ``/stack`` awaits the same coroutine through the
async stack of every benchmark (breaker + retry + timeout + bulkhead). An httpx client in this
process sends the requests. Three cases, alternating round by round so a slow-down of the host
hits all alike, each one sample per round:

- ``plain``: a bare ``httpx.Client`` asks ``/plain``;
- ``stack``: the same client asks ``/stack`` (the server does the stack's work on top);
- ``integration``: a client over ``ResilientTransport`` (the default stack of an unconfigured
  service: retry, breaker, a 30 s timeout) asks ``/plain``, so the server's work is the plain
  case's and only the client does more.

The server's CPU time per request (``time.process_time()`` read through a third route) is what
each route costs; this process's CPU time per request is the client's. Equal work on both sides
of each comparison: the same route and the same client (stack), or the same route and the same
server (integration). Default subscribers on in both processes (``--no-subscribers``: off in
both); no span anywhere (no tracer provider). Every figure is the median of same-round values.

Goal (issue 15): what the stack adds to the server, and what the integration adds to the
client, each at most 1 % of a bare httpx request's client CPU.

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
from collections.abc import Callable, Iterator

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

    from buttress.integrations.httpx import ResilientTransport

    if args.no_subscribers:
        from buttress import instrumentation

        instrumentation.configure(prometheus=False, otel=False, logging=False)
    server_cpu: dict[str, list[float]] = {"plain": [], "stack": [], "integration": []}
    client_cpu: dict[str, list[float]] = {"plain": [], "stack": [], "integration": []}
    with (
        server(subscribers=not args.no_subscribers) as base,
        httpx.Client(base_url=base) as bare,
        httpx.Client(base_url=base, transport=ResilientTransport("bench-service")) as protected,
    ):
        cases = {
            "plain": (bare, "/plain"),
            "stack": (bare, "/stack"),
            "integration": (protected, "/plain"),
        }
        for client, route in cases.values():  # warm up the routes and the connections
            for _ in range(50):
                client.get(route)
        for _ in range(args.rounds):
            for case, (client, route) in cases.items():
                before = float(bare.get("/cpu").text)
                mine = time.process_time()
                for _ in range(args.requests):
                    client.get(route)
                client_cpu[case].append((time.process_time() - mine) / args.requests)
                server_cpu[case].append((float(bare.get("/cpu").text) - before) / args.requests)

    def median(f: Callable[[int], float]) -> float:
        return statistics.median(f(i) for i in range(args.rounds))

    def show(label: str, value: str) -> None:
        print(f"{label:50}{value:>10}")

    def cpu(samples: list[float]) -> str:
        return f"{statistics.median(samples) * 1e6:.1f} us"

    show("client CPU per bare httpx request", cpu(client_cpu["plain"]))
    show("server CPU per request, plain route", cpu(server_cpu["plain"]))
    show("server CPU per request, through the stack", cpu(server_cpu["stack"]))
    show("client CPU per request, through the integration", cpu(client_cpu["integration"]))
    # The stack is on the server side, the integration on the client side; each addition is
    # also put against that round's bare request (its client CPU).
    for what, side, case in (
        ("stack", server_cpu, "stack"),
        ("integration", client_cpu, "integration"),
    ):
        more, plain, bare_request = side[case], side["plain"], client_cpu["plain"]
        added = median(lambda i: more[i] - plain[i])  # noqa: B023 - used within the iteration
        ratio = median(lambda i: more[i] / plain[i])  # noqa: B023
        share = median(lambda i: (more[i] - plain[i]) / bare_request[i])  # noqa: B023
        verdict = "ok" if share <= GOAL else "OVER GOAL"
        show(f"added by the {what}", f"{added * 1e6:.1f} us")
        show(f"  with / without the {what}", f"{ratio:.2f}x")
        show(f"  / bare httpx request CPU (goal {GOAL:.0%}: {verdict})", f"{share:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
