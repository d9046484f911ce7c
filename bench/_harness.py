"""The measurement harness the benchmarks share.

A *runner* takes a number of iterations and returns nanoseconds per iteration. Sync cases go
through ``timeit`` with the garbage collector on (so allocation pays its real cost); async cases
run the same loop compiled into one coroutine on one event loop, so the figure is the cost of one
``await`` from a running coroutine. ``calibrate`` sizes a sample to about ``SAMPLE_MS``.
``fresh_runs`` repeats a whole measurement in fresh interpreters and collects their JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from itertools import repeat
from typing import Any

SAMPLE_MS = 8.0

Runner = Callable[[int], float]

_ASYNC_TEMPLATE = """
async def _bench(_n):
    _t0 = _pc()
    for _ in _repeat(None, _n):
{body}
    return _pc() - _t0
"""


def buttress_stacks() -> tuple[Callable[[], int], Callable[[], Any]]:
    """The two stacks whose per-call cost is the headline figure: (sync, async).

    Sync: breaker + retry + bulkhead. Async: breaker + retry + timeout + bulkhead. Every
    benchmark that reports on "the stack" measures these, so their figures compare.
    """
    from buttress import circuit_breaker, retry_with_backoff, with_bulkhead, with_timeout

    @circuit_breaker(name="bench-sync", fail_max=5, timeout=60)
    @retry_with_backoff(max_attempts=3, exponential_base=2)
    @with_bulkhead(limit=50)
    def sync_stack() -> int:
        return 1

    @circuit_breaker(name="bench-async", fail_max=5, timeout=60)
    @retry_with_backoff(max_attempts=3, exponential_base=2)
    @with_timeout(seconds=5)
    @with_bulkhead(limit=50)
    async def async_stack() -> int:
        return 1

    return sync_stack, async_stack


def runner(
    kind: str,
    stmt: str,
    g: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    before: Callable[[], None] = lambda: None,
) -> Runner:
    """A runner for ``stmt`` (``kind`` "sync" or "async"); ``before`` runs ahead of each sample.

    After ``before`` (which may switch subscribers or settings), ``stmt`` runs once untimed: what
    a switch costs once (recorders binding again, a stack compiled for new settings) is not a
    per-call cost, and would otherwise be spread over the sample's calls.
    """
    if kind == "sync":
        timer = timeit.Timer(stmt, setup="gc.enable()", globals={"gc": gc, **g})

        def run(n: int) -> float:
            before()
            timer.timeit(1)
            return timer.timeit(n) * 1e9 / n

        return run
    namespace = {**g, "_pc": time.perf_counter_ns, "_repeat": repeat}
    body = "\n".join("        " + line for line in stmt.splitlines())
    exec(_ASYNC_TEMPLATE.format(body=body), namespace)
    bench = namespace["_bench"]

    def arun(n: int) -> float:
        before()
        loop.run_until_complete(bench(1))
        return float(loop.run_until_complete(bench(n))) / n

    return arun


def calibrate(run: Runner) -> int:
    """Warm up, then the number of iterations that makes one sample last about ``SAMPLE_MS``."""
    run(50)
    n = 1
    while True:
        per = run(n)
        if per * n >= 3e6 or n >= 1 << 22:
            break
        n *= 4
    return max(1, int(SAMPLE_MS * 1e6 / max(per, 1.0)))


def fresh_runs(script: str, runs: int, rounds: int) -> list[dict[str, Any]]:
    """Run ``script --single --rounds N`` in ``runs`` fresh interpreters; their JSON results."""
    results = []
    for i in range(runs):
        out = subprocess.run(
            [sys.executable, script, "--single", "--rounds", str(rounds)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}/{runs} done", file=sys.stderr)
    return results
