"""Per-call cost of buttress against what a user assembles by hand today (``make bench``).

These machines are noisy, so every figure is a *ratio* between cases measured in the same
process, interleaved: each round takes one sample of every case in turn, so a slow-down of the
host hits all cases alike. Each run is a fresh interpreter; the reported ratio is the median over
runs of each run's median ratio.

Targets (issue "Core"; see docs/performance.md):

* success path, default instrumentation on: buttress breaker+retry+bulkhead (sync) and
  breaker+retry+timeout+bulkhead (async) cost at most 0.30x the obvious assembly;
* ``FF_ENABLE_RESILIENCE_PATTERNS=false``: at most 2x a ``functools.wraps`` pass-through;
* a call rejected by an open breaker: at most 0.5x pybreaker's own rejection. pybreaker records
  nothing, so the like-for-like case runs buttress with its subscribers off; the same rejection
  with the default subscribers on is measured and reported beside it.

Usage: ``python bench/run.py [--runs N] [--rounds N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import Runner, buttress_stacks, calibrate, fresh_runs, runner

# (name, numerator case, denominator case, target ratio)
RATIOS = [
    ("sync stack vs obvious assembly", "buttress sync stack", "obvious sync stack", 0.30),
    ("async stack vs obvious assembly", "buttress async stack", "obvious async stack", 0.30),
    ("sync disabled vs wraps pass-through", "buttress sync disabled", "sync pass-through", 2.0),
    ("async disabled vs wraps pass-through", "buttress async disabled", "async pass-through", 2.0),
    ("open-breaker rejection vs pybreaker", "buttress rejection", "pybreaker rejection", 0.5),
]
# Reported, without a target: what the default subscribers add to a rejection.
INFO_RATIOS = [
    (
        "rejection with default subscribers vs pybreaker",
        "buttress rejection, instrumented",
        "pybreaker rejection",
    ),
]


def f() -> int:
    return 1


async def af() -> int:
    return 1


def _prepare(*, enabled: bool, instrumented: bool) -> None:
    """Put the process in the state a case is measured in (cheap when it already is)."""
    from buttress import config, instrumentation

    wanted = "true" if enabled else "false"
    if os.environ.get("FF_ENABLE_RESILIENCE_PATTERNS") != wanted:
        os.environ["FF_ENABLE_RESILIENCE_PATTERNS"] = wanted
        config.reload_settings()
    instrumentation.configure(prometheus=instrumented, otel=instrumented, logging=instrumented)


def build_cases() -> list[dict[str, Any]]:
    import prometheus_client as prom
    import pybreaker
    import tenacity
    from opentelemetry import trace

    import buttress
    from buttress import (
        CircuitOpenError,
        circuit_breaker,
    )

    cases: list[dict[str, Any]] = []

    def add(
        name: str,
        stmt: str,
        g: dict[str, Any],
        *,
        kind: str = "sync",
        enabled: bool = True,
        instrumented: bool = True,
    ) -> None:
        cases.append(
            {
                "name": name,
                "stmt": stmt,
                "g": g,
                "kind": kind,
                "enabled": enabled,
                "instrumented": instrumented,
            }
        )

    # --- the obvious assembly a user writes today ---------------------------------------------
    reg = prom.CollectorRegistry()
    calls = prom.Counter("naive_calls", "calls", ["service", "outcome"], registry=reg)
    latency = prom.Histogram("naive_latency_seconds", "latency", ["service"], registry=reg)
    ok_child = calls.labels("svc", "success")
    latency_child = latency.labels("svc")
    tracer = trace.get_tracer("naive")

    def observed(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            with tracer.start_as_current_span("call"):
                t0 = time.perf_counter()
                try:
                    result = fn(*a, **k)
                except Exception:
                    calls.labels("svc", "failure").inc()
                    raise
                ok_child.inc()
                latency_child.observe(time.perf_counter() - t0)
                return result

        return wrapper

    def aobserved(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*a: Any, **k: Any) -> Any:
            with tracer.start_as_current_span("call"):
                t0 = time.perf_counter()
                try:
                    result = await fn(*a, **k)
                except Exception:
                    calls.labels("svc", "failure").inc()
                    raise
                ok_child.inc()
                latency_child.observe(time.perf_counter() - t0)
                return result

        return wrapper

    retry_args = {
        "stop": tenacity.stop_after_attempt(3),
        "wait": tenacity.wait_exponential(multiplier=0.1, max=2),
        "retry": tenacity.retry_if_exception_type(ConnectionError),
        "reraise": True,
    }

    naive_breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    semaphore = threading.BoundedSemaphore(50)

    def sem_call(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            if not semaphore.acquire(blocking=False):
                raise RuntimeError("bulkhead full")
            try:
                return fn(*a, **k)
            finally:
                semaphore.release()

        return wrapper

    bounded = sem_call(f)

    @tenacity.retry(**retry_args)
    def naive_sync() -> int:
        return naive_breaker.call(bounded)  # type: ignore[no-any-return]

    add("obvious sync stack", "x()", {"x": observed(naive_sync)})

    async_breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    async_semaphore = asyncio.Semaphore(50)

    @tenacity.retry(**retry_args)
    async def naive_async() -> int:
        with async_breaker.calling():
            async with async_semaphore:
                async with asyncio.timeout(5):
                    return await af()

    add("obvious async stack", "await x()", {"x": aobserved(naive_async)}, kind="async")

    # --- buttress, default instrumentation (Prometheus, OpenTelemetry API, logging) ---------------
    buttress_sync, buttress_async = buttress_stacks()

    add("buttress sync stack", "x()", {"x": buttress_sync})
    add("buttress async stack", "await x()", {"x": buttress_async}, kind="async")

    # --- switched off ----------------------------------------------------------------------------
    def passthrough(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            return fn(*a, **k)

        return wrapper

    def apassthrough(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*a: Any, **k: Any) -> Any:
            return await fn(*a, **k)

        return wrapper

    add("sync pass-through", "x()", {"x": passthrough(f)})
    add("buttress sync disabled", "x()", {"x": buttress_sync}, enabled=False)
    add("async pass-through", "await x()", {"x": apassthrough(af)}, kind="async")
    add("buttress async disabled", "await x()", {"x": buttress_async}, kind="async", enabled=False)

    # --- rejection by an open breaker ------------------------------------------------------------
    open_pybreaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    open_pybreaker.open()
    add(
        "pybreaker rejection",
        "try:\n    b.call(f)\nexcept E:\n    pass",
        {"b": open_pybreaker, "f": f, "E": pybreaker.CircuitBreakerError},
    )

    @circuit_breaker(name="bench-open", fail_max=1, timeout=3600)
    def guarded() -> int:
        return 1

    guarded()  # builds the breaker
    breaker = buttress.registry.instances("circuit_breaker")["bench-open"]
    breaker.force_open()
    rejection = "try:\n    x()\nexcept E:\n    pass"
    add("buttress rejection", rejection, {"x": guarded, "E": CircuitOpenError}, instrumented=False)
    add("buttress rejection, instrumented", rejection, {"x": guarded, "E": CircuitOpenError})
    return cases


def make_runner(case: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Runner:
    state = {"enabled": case["enabled"], "instrumented": case["instrumented"]}
    return runner(case["kind"], case["stmt"], case["g"], loop, lambda: _prepare(**state))


def single_run(rounds: int) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cases = build_cases()
    runners = [make_runner(case, loop) for case in cases]
    sizes = [calibrate(run) for run in runners]
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, run in enumerate(runners):
            samples[i].append(run(sizes[i]))
    _prepare(enabled=True, instrumented=True)
    medians = {case["name"]: statistics.median(s) for case, s in zip(cases, samples, strict=True)}
    # Same-round ratios, then their median: robust to a slow-down that spans several rounds.
    ratios = {}
    index = {case["name"]: i for i, case in enumerate(cases)}
    for label, num, den, _ in RATIOS:
        per_round = [a / b for a, b in zip(samples[index[num]], samples[index[den]], strict=True)]
        ratios[label] = statistics.median(per_round)
    for label, num, den in INFO_RATIOS:
        per_round = [a / b for a, b in zip(samples[index[num]], samples[index[den]], strict=True)]
        ratios[label] = statistics.median(per_round)
    return {"ns": medians, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters (default 3)")
    parser.add_argument("--rounds", type=int, default=9, help="samples per case per run")
    parser.add_argument("--json", type=Path, help="write the aggregated figures here")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(single_run(args.rounds)))
        return 0

    runs = fresh_runs(__file__, args.runs, args.rounds)

    names = list(runs[0]["ns"])
    print(f"\n{'case':<32} {'median ns/call':>15}")
    ns = {name: statistics.median(r["ns"][name] for r in runs) for name in names}
    for name in names:
        print(f"{name:<32} {ns[name]:>15,.0f}")
    print(f"\n{'ratio':<48} {'median':>8} {'target':>8}  verdict")
    ratios = {}
    failed = False
    for label, _, _, target in RATIOS:
        value = statistics.median(r["ratios"][label] for r in runs)
        ratios[label] = value
        verdict = "ok" if value <= target else "OVER TARGET"
        failed |= value > target
        print(f"{label:<48} {value:>8.3f} {target:>8.2f}  {verdict}")
    for label, _, _ in INFO_RATIOS:
        value = statistics.median(r["ratios"][label] for r in runs)
        ratios[label] = value
        print(f"{label:<48} {value:>8.3f} {'-':>8}  (reported)")
    if args.json:
        args.json.write_text(json.dumps({"ns": ns, "ratios": ratios, "runs": len(runs)}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
