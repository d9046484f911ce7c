"""A closed-state call with shared circuit state on Redis, against pybreaker's CircuitRedisStorage.

Target (issue "shared state"): a function decorated with ``@circuit_breaker(state_url=...)``
costs at most 0.5x the time per call of a ``pybreaker.CircuitBreaker`` on
``pybreaker.CircuitRedisStorage``, both talking to the same loopback redis-server. pybreaker
sends two commands per success (GET state, SET fail_counter 0); buttress sends one script call.
The asyncio decorator and the storage's decision API are measured alongside, for reference.

The cases are measured interleaved in one process (each round takes one sample of every case in
turn, so a slow-down of the host hits all alike); the ratio is the median of the per-round ratios.
A redis-server is started on a free loopback port unless ``--url`` names one.

Usage: ``python bench/bench_redis.py [--rounds N] [--url redis://127.0.0.1:6379/0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

TARGET = 0.5
SAMPLE_CALLS = 300


def f() -> int:
    return 1


async def af() -> int:
    return 1


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            import redis

            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(5)


def redis_client(url: str) -> Any:
    """A redis-py client with the same short timeouts buttress uses."""
    import redis

    return redis.Redis.from_url(url, socket_timeout=0.1, socket_connect_timeout=0.1)


def pybreaker_storage(url: str) -> Any:
    import pybreaker

    return pybreaker.CircuitRedisStorage("closed", redis_client(url), namespace="bench-pybreaker")


Cases = list[tuple[str, Callable[[int], float]]]


def timed(call: Callable[[], Any]) -> Callable[[int], float]:
    """A runner: ``n`` calls of ``call``, the mean nanoseconds per call."""

    def run(n: int) -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            call()
        return (time.perf_counter_ns() - started) / n

    return run


@contextmanager
def built_cases(url: str) -> Iterator[Cases]:
    import pybreaker

    from buttress import circuit_breaker, registry
    from buttress.patterns.circuit_breaker.redis_storage import (
        Limits,
        SharedStateStorage,
        make_storage,
    )
    from buttress.policy import asettle

    cases: Cases = []

    theirs = pybreaker.CircuitBreaker(
        fail_max=5, reset_timeout=60, state_storage=pybreaker_storage(url)
    )
    cases.append(("pybreaker CircuitRedisStorage", timed(lambda: theirs.call(f))))

    protect = circuit_breaker(name="bench-redis", fail_max=5, timeout=60, state_url=url)
    decorated = protect(f)
    decorated()
    built = registry.instances("circuit_breaker")["bench-redis"]
    if not isinstance(built.storage, SharedStateStorage):
        raise SystemExit("the decorated breaker does not keep its state in Redis")
    cases.append(("buttress shared state", timed(decorated)))
    adecorated = protect(af)

    storage = make_storage(url, "bench-decisions")
    limits = Limits(fail_max=5, reset_timeout=60, success_threshold=1, half_open_max_calls=1)

    def decision_api() -> None:
        ticket = storage.admit(limits)
        f()
        storage.record(ticket, "success", limits)

    cases.append(("decision API, sync", timed(decision_api)))

    loop = asyncio.new_event_loop()

    async def adecorated_calls(n: int) -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            await adecorated()
        return (time.perf_counter_ns() - started) / n

    cases.append(("buttress shared state, asyncio", lambda n: loop.run_until_complete(
        adecorated_calls(n))))  # fmt: skip

    async def adecisions(n: int) -> float:
        started = time.perf_counter_ns()
        for _ in range(n):
            ticket = await asettle(storage.admission(limits))
            await af()
            await asettle(storage.recording(ticket, "success", limits))
        return (time.perf_counter_ns() - started) / n

    cases.append(("decision API, asyncio", lambda n: loop.run_until_complete(adecisions(n))))
    try:
        yield cases
    finally:
        loop.run_until_complete(storage.aclose())
        loop.run_until_complete(built.storage.aclose())
        loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="samples per case (default 15)")
    parser.add_argument("--url", help="an existing Redis (default: start one on a free port)")
    args = parser.parse_args()

    def measure(url: str) -> int:
        with built_cases(url) as cases:
            return compare(cases)

    def compare(cases: Cases) -> int:
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _, run in cases:
            run(50)  # connect, load scripts
        for _ in range(args.rounds):
            for name, run in cases:
                samples[name].append(run(SAMPLE_CALLS))
        print(f"\n{'case':<34} {'median us/call':>15}")
        for name, values in samples.items():
            print(f"{name:<34} {statistics.median(values) / 1000:>15.1f}")
        ratio = statistics.median(
            ours / theirs
            for ours, theirs in zip(
                samples["buttress shared state"],
                samples["pybreaker CircuitRedisStorage"],
                strict=True,
            )
        )
        verdict = "ok" if ratio <= TARGET else "OVER TARGET"
        print(f"\n@circuit_breaker(state_url=...) vs pybreaker CircuitRedisStorage: {ratio:.3f}x "
              f"(target <= {TARGET}x) {verdict}")  # fmt: skip
        return 0 if ratio <= TARGET else 1

    if args.url:
        return measure(args.url)
    with redis_server() as url:
        return measure(url)


if __name__ == "__main__":
    sys.exit(main())
