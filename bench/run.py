"""Per-call cost of buttress against what a user assembles by hand today (``make bench``).

These machines are noisy, so every figure is a *ratio* between cases measured in the same
process, interleaved: each round takes one sample of every case in turn, so a slow-down of the
host hits all cases alike. Each run is a fresh interpreter; the reported ratio is the median over
runs of each run's median ratio.

Targets (see docs/performance.md):

* success path, default subscribers on: buttress breaker+retry+bulkhead (sync) and
  breaker+retry+timeout+bulkhead (async) against the obvious assembly doing the same work. buttress
  starts no span (it annotates the caller's), so the like-for-like assembly starts none either:
  tenacity + pybreaker + a semaphore + a Prometheus counter and histogram. The assembly with an
  OpenTelemetry span per call (API only, no SDK) is measured beside it and reported;
* ``FF_ENABLE_RESILIENCE_PATTERNS=false``: at most 1.5x a ``functools.wraps`` pass-through;
* a call rejected by an open breaker: at most 0.5x pybreaker's own rejection with buttress's
  subscribers off (pybreaker records nothing), at most 0.6x with the default subscribers on;
* the floor: with subscribers off, within 2x a hand-written breaker + retry + bulkhead (no
  metrics, no library);
* what the default subscribers add to a successful call (same-round difference): at most 1 us.

Every figure is printed with its verdict; ``--check`` exits 1 when one is over its target.

Usage: ``python bench/run.py [--runs N] [--rounds N] [--json FILE] [--check]``.
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
    ("sync stack vs like-for-like assembly", "buttress sync stack", "obvious sync stack", 0.15),
    ("async stack vs like-for-like assembly", "buttress async stack", "obvious async stack", 0.24),
    ("sync disabled vs wraps pass-through", "buttress sync disabled", "sync pass-through", 1.5),
    ("async disabled vs wraps pass-through", "buttress async disabled", "async pass-through", 1.5),
    ("open-breaker rejection vs pybreaker", "buttress rejection", "pybreaker rejection", 0.5),
    (
        "rejection, default subscribers, vs pybreaker",
        "buttress rejection, instrumented",
        "pybreaker rejection",
        0.6,
    ),
    (
        "sync stack, subscribers off, vs floor",
        "buttress sync stack, bare",
        "hand-written floor",
        2.0,
    ),
]
# Reported, without a target.
INFO_RATIOS = [
    (
        "sync stack vs assembly with a span",
        "buttress sync stack",
        "obvious sync stack + span",
    ),
    (
        "async stack vs assembly with a span",
        "buttress async stack",
        "obvious async stack + span",
    ),
]
# Same-round differences in ns: (label, with, without, budget).
ADDED = [
    ("default subscribers, sync success", "buttress sync stack", "buttress sync stack, bare", 1000),
    (
        "default subscribers, async success",
        "buttress async stack",
        "buttress async stack, bare",
        1000,
    ),
]


def f() -> int:
    return 1


async def af() -> int:
    return 1


def hand_written(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The floor: what a careful programmer writes by hand for breaker + retry + bulkhead.

    A failure count and an open-until time, up to 3 attempts on ConnectionError with exponential
    backoff, a Lock-guarded in-flight count; no metrics, no settings, no events.
    """
    lock = threading.Lock()
    state = {"failures": 0, "open_until": 0.0, "in_flight": 0}

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        if state["open_until"] and time.monotonic() < state["open_until"]:
            raise RuntimeError("circuit open")
        with lock:
            if state["in_flight"] >= 50:
                raise RuntimeError("bulkhead full")
            state["in_flight"] += 1
        try:
            for attempt in range(3):
                try:
                    result = fn(*a, **k)
                except ConnectionError:
                    state["failures"] += 1
                    if state["failures"] >= 5:
                        state["open_until"] = time.monotonic() + 60
                    if attempt == 2:
                        raise
                    time.sleep(min(0.1 * 2**attempt, 2))
                    continue
                if state["failures"]:
                    state["failures"] = 0
                return result
            raise AssertionError("unreachable")
        finally:
            with lock:
                state["in_flight"] -= 1

    return wrapper


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

    def observed(fn: Callable[..., Any], *, span: bool) -> Callable[..., Any]:
        def record(fn_: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn_)
            def wrapper(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    result = fn_(*a, **k)
                except Exception:
                    calls.labels("svc", "failure").inc()
                    raise
                ok_child.inc()
                latency_child.observe(time.perf_counter() - t0)
                return result

            return wrapper

        recorded = record(fn)
        if not span:
            return recorded

        @functools.wraps(fn)
        def spanned(*a: Any, **k: Any) -> Any:
            with tracer.start_as_current_span("call"):
                return recorded(*a, **k)

        return spanned

    def aobserved(fn: Callable[..., Any], *, span: bool) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def recorded(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                result = await fn(*a, **k)
            except Exception:
                calls.labels("svc", "failure").inc()
                raise
            ok_child.inc()
            latency_child.observe(time.perf_counter() - t0)
            return result

        if not span:
            return recorded

        @functools.wraps(fn)
        async def spanned(*a: Any, **k: Any) -> Any:
            with tracer.start_as_current_span("call"):
                return await recorded(*a, **k)

        return spanned

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

    add("obvious sync stack", "x()", {"x": observed(naive_sync, span=False)})
    add("obvious sync stack + span", "x()", {"x": observed(naive_sync, span=True)})

    async_breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    async_semaphore = asyncio.Semaphore(50)

    @tenacity.retry(**retry_args)
    async def naive_async() -> int:
        with async_breaker.calling():
            async with async_semaphore:
                async with asyncio.timeout(5):
                    return await af()

    add("obvious async stack", "await x()", {"x": aobserved(naive_async, span=False)}, kind="async")
    add(
        "obvious async stack + span",
        "await x()",
        {"x": aobserved(naive_async, span=True)},
        kind="async",
    )

    # --- the floor: a hand-written breaker + retry + bulkhead, no metrics, no library ------------
    add("hand-written floor", "x()", {"x": hand_written(f)})

    # --- buttress, default instrumentation (Prometheus, OpenTelemetry API, logging) ---------------
    buttress_sync, buttress_async = buttress_stacks()

    add("buttress sync stack", "x()", {"x": buttress_sync})
    add("buttress async stack", "await x()", {"x": buttress_async}, kind="async")
    add("buttress sync stack, bare", "x()", {"x": buttress_sync}, instrumented=False)
    add(
        "buttress async stack, bare",
        "await x()",
        {"x": buttress_async},
        kind="async",
        instrumented=False,
    )

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
    added = {}
    for label, num, den, _ in ADDED:
        per_round = [a - b for a, b in zip(samples[index[num]], samples[index[den]], strict=True)]
        added[label] = statistics.median(per_round)
    return {"ns": medians, "ratios": ratios, "added": added}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh interpreters (default 3)")
    parser.add_argument("--rounds", type=int, default=9, help="samples per case per run")
    parser.add_argument("--json", type=Path, help="write the aggregated figures here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a figure is over target")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(single_run(args.rounds)))
        return 0

    runs = fresh_runs(__file__, args.runs, args.rounds)

    names = list(runs[0]["ns"])
    print(f"\n{'case':<36} {'median ns/call':>15}")
    ns = {name: statistics.median(r["ns"][name] for r in runs) for name in names}
    for name in names:
        print(f"{name:<36} {ns[name]:>15,.0f}")
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
    print(f"\n{'added by the default subscribers':<48} {'ns':>8} {'budget':>8}  verdict")
    added = {}
    for label, _, _, budget in ADDED:
        value = statistics.median(r["added"][label] for r in runs)
        added[label] = value
        verdict = "ok" if value <= budget else "OVER BUDGET"
        failed |= value > budget
        print(f"{label:<48} {value:>8,.0f} {budget:>8}  {verdict}")
    if args.json:
        payload = {"ns": ns, "ratios": ratios, "added": added, "runs": len(runs)}
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
