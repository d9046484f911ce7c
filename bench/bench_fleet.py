"""A fleet on one Redis: what healthy calls cost it, how soon every process rejects after a trip.

Four worker processes (``multiprocessing`` spawn: each a fresh interpreter, as pods are) call a
function decorated with ``@circuit_breaker(name=..., state_url=...)`` on one loopback
redis-server. The figures:

* **Redis commands per 1,000 healthy calls**, from ``INFO commandstats`` (which counts the
  commands scripts run too) over the healthy phase: with the near-cache a closed circuit decides
  its calls in the process, so this is about 0 (a re-read per process every ``near_cache_ttl``);
  with ``near_cache_ttl=0`` it is one ``EVALSHA`` (and the script's own commands) per call.
* **Time to reject**: another process trips the circuit (``fail_max`` failures through its own
  storage); each worker calls in a loop and notes when its first call is rejected. The figure is
  the slowest worker's delay after the tripping request returned: pub/sub carries the trip, so it
  is bounded by the delivery of one message, not by ``near_cache_ttl``.

A redis-server is started on a free loopback port unless ``--url`` names one.

Usage: ``python bench/bench_fleet.py [--workers 4] [--calls 2000] [--url redis://...]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "fleet"
FAIL_MAX = 3
SPAWN = multiprocessing.get_context("spawn")


def _commands(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info")


def worker(url: str, ttl: float, calls: int, steps: Any, results: Any) -> None:
    """One process of the fleet: warm up, ``calls`` healthy calls, then call until rejected."""
    from buttress import circuit_breaker
    from buttress.exceptions import CircuitOpenError

    @circuit_breaker(name=SERVICE, state_url=url, fail_max=FAIL_MAX, near_cache_ttl=ttl)
    def call() -> int:
        return 1

    call()  # connects, loads the script, reads the state
    steps.wait()  # everyone warm: the healthy phase starts
    for _ in range(calls):
        call()
    steps.wait()  # healthy phase over
    steps.wait()  # the trip is about to be made
    deadline = time.monotonic() + 10
    rejected_at = None
    while time.monotonic() < deadline:
        try:
            call()
        except CircuitOpenError:
            rejected_at = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            break
        time.sleep(0.0005)
    results.put(rejected_at)


def run(url: str, *, workers: int = 4, calls: int = 2000, ttl: float = 30.0) -> dict[str, float]:
    """The figures for ``workers`` processes making ``calls`` healthy calls each."""
    import redis

    from buttress.patterns.circuit_breaker.redis_storage import Limits, make_storage

    client = redis.Redis.from_url(url)
    client.delete(f"buttress:{{{SERVICE}}}:circuit", f"buttress:{{{SERVICE}}}:trials")
    steps = SPAWN.Barrier(workers + 1)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=worker, args=(url, ttl, calls, steps, results), daemon=True)
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        steps.wait(timeout=60)
        before = _commands(client)
        steps.wait(timeout=60)
        healthy = _commands(client) - before
        tripper = make_storage(url, SERVICE, socket_timeout=1.0, connect_timeout=1.0)
        limits = Limits(FAIL_MAX, 60.0, 1, 1)
        steps.wait(timeout=60)
        time.sleep(0.05)  # the workers are calling: the trip lands among their calls
        for _ in range(FAIL_MAX):
            ticket = tripper.admit(limits)
            after = tripper.record(ticket, "failure", limits)
        tripped_at = time.monotonic()
        if after is None or after.state != "open":
            raise RuntimeError(f"the circuit did not trip: {after}")
        rejections = [results.get(timeout=30) for _ in processes]
        tripper.close()
        # Redis's own CPU time per script run (the commands it runs inside included).
        script_usec = float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        client.close()
    if any(at is None for at in rejections):
        raise RuntimeError(f"a worker never rejected: {rejections}")
    return {
        "commands_per_1000_healthy_calls": 1000 * healthy / (workers * calls),
        "seconds_to_reject": max(0.0, max(rejections) - tripped_at),
        "script_usec": script_usec,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--url")
    args = parser.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.bench_redis import redis_server

    with redis_server() if args.url is None else _given(args.url) as url:
        near = run(url, workers=args.workers, calls=args.calls)
        every = run(url, workers=args.workers, calls=args.calls, ttl=0.0)
    print(f"fleet of {args.workers} processes x {args.calls} healthy calls on one redis-server")
    print(
        f"  near-cache (near_cache_ttl=30): {near['commands_per_1000_healthy_calls']:8.2f} "
        f"Redis commands per 1,000 healthy calls; every process rejects "
        f"{1000 * near['seconds_to_reject']:.1f} ms after the trip"
    )
    print(
        f"  every call asks (near_cache_ttl=0): {every['commands_per_1000_healthy_calls']:8.2f} "
        f"Redis commands per 1,000 healthy calls; every process rejects "
        f"{1000 * every['seconds_to_reject']:.1f} ms after the trip"
    )
    usec = every["script_usec"]
    print(
        f"  Redis CPU per script run: {usec:.1f} us, so one Redis core runs about "
        f"{1e6 / usec:,.0f} scripts/s (docs/distributed.md, Sizing, extrapolates from this)"
    )


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
