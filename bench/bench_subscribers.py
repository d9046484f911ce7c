"""What each default subscriber adds to a successful call (``python bench/bench_subscribers.py``).

Two measurements, both on the success path:

* **per stack**: the full sync stack (breaker + retry + bulkhead) and async stack (+ timeout)
  through the public decorators, with no subscriber, each subscriber alone, and all three. The
  added cost is the same-round difference to "no subscriber", then the median over rounds and
  over fresh interpreters (the host is shared and noisy; see bench/run.py).
* **per handler**: each handler a subscriber registers for a per-call event (CallFinished,
  CircuitCallRecorded, BulkheadAcquired/Released, TimedCallFinished, RateLimitAcquired), called
  directly with a ready event.

OpenTelemetry is measured with the API only (no SDK), as most services run it; logging with the
``buttress`` logger at its default level (WARNING), so DEBUG records are not built.

Usage: ``python bench/bench_subscribers.py [--runs N] [--rounds N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import Runner, buttress_stacks, calibrate, fresh_runs, runner

SETUPS = ("none", "no-op handler", "prometheus", "otel", "logging", "all three")
PER_CALL_EVENTS = (
    "CallFinished",
    "CircuitCallRecorded",
    "BulkheadAcquired",
    "BulkheadReleased",
    "TimedCallFinished",
    "RateLimitAcquired",
)


_NOOP: list[Callable[[], None]] = []


def configure(setup: str) -> None:
    """Install the subscribers of ``setup``.

    "no-op handler" subscribes a handler that does nothing to the per-call events the Prometheus
    subscriber consumes: what is left is the cost of building and dispatching those events, which
    the patterns pay as soon as anybody listens.
    """
    from buttress import events, instrumentation

    while _NOOP:
        _NOOP.pop()()
    instrumentation.configure(
        prometheus=setup in {"prometheus", "all three"},
        otel=setup in {"otel", "all three"},
        logging=setup in {"logging", "all three"},
    )
    if setup == "no-op handler":
        kinds = [getattr(events, name) for name in PER_CALL_EVENTS if name != "BulkheadReleased"]
        _NOOP.append(events.subscribe(lambda event: None, kinds))


def stacks() -> dict[str, tuple[str, Callable[..., Any]]]:
    sync_stack, async_stack = buttress_stacks()
    return {"sync": ("sync", sync_stack), "async": ("async", async_stack)}


def make_runner(
    kind: str, fn: Callable[..., Any], loop: asyncio.AbstractEventLoop, setup: str
) -> Runner:
    stmt = "x()" if kind == "sync" else "await x()"
    return runner(kind, stmt, {"x": fn}, loop, lambda: configure(setup))


def handler_costs() -> dict[str, dict[str, float]]:
    """ns per direct call of each subscriber's handler for each per-call event."""
    from prometheus_client import CollectorRegistry

    from buttress import events
    from buttress.instrumentation.logging import LoggingSubscriber
    from buttress.instrumentation.otel import OTelSubscriber
    from buttress.instrumentation.prometheus import PrometheusSubscriber

    samples = {
        "CallFinished": events.CallFinished("svc", "success", 0.0004, None),
        "CircuitCallRecorded": events.CircuitCallRecorded(
            "svc",
            "success",
            0.0004,
            slow=False,
            error_type=None,
            failure_rate=None,
            slow_call_rate=None,
        ),
        "BulkheadAcquired": events.BulkheadAcquired("svc", 0.0, 1, 0, 50),
        "BulkheadReleased": events.BulkheadReleased("svc", 0, 0),
        "TimedCallFinished": events.TimedCallFinished("svc", 0.0004, timed_out=False),
        "RateLimitAcquired": events.RateLimitAcquired("svc", 0.0, 9.0),
    }
    subscribers = {
        "prometheus": PrometheusSubscriber(CollectorRegistry()).handlers(),
        "otel": OTelSubscriber().handlers(),
        "logging": LoggingSubscriber().handlers(),
    }
    out: dict[str, dict[str, float]] = {}
    for name, handlers in subscribers.items():
        out[name] = {}
        for kind in PER_CALL_EVENTS:
            handler = next((h for k, h in handlers.items() if k.__name__ == kind), None)
            if handler is None:
                continue  # not subscribed: costs nothing
            event = samples[kind]
            timer = timeit.Timer("h(e)", globals={"h": handler, "e": event})
            n = 20000
            out[name][kind] = min(timer.repeat(5, n)) * 1e9 / n
    return out


def single_run(rounds: int) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    cases = [
        (stack, setup, make_runner(kind, fn, loop, setup))
        for stack, (kind, fn) in stacks().items()
        for setup in SETUPS
    ]
    sizes = [calibrate(run) for _, _, run in cases]
    samples: dict[tuple[str, str], list[float]] = {(s, c): [] for s, c, _ in cases}
    for _ in range(rounds):
        for (stack, setup, run), n in zip(cases, sizes, strict=True):
            samples[stack, setup].append(run(n))
    ns = {f"{s} / {c}": statistics.median(v) for (s, c), v in samples.items()}
    added = {}
    for stack, _ in stacks().items():
        base = samples[stack, "none"]
        for setup in SETUPS[1:]:
            diffs = [a - b for a, b in zip(samples[stack, setup], base, strict=True)]
            added[f"{stack} / {setup}"] = statistics.median(diffs)
    return {"ns": ns, "added": added, "handlers": handler_costs()}


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

    ns = {k: statistics.median(r["ns"][k] for r in runs) for k in runs[0]["ns"]}
    added = {k: statistics.median(r["added"][k] for r in runs) for k in runs[0]["added"]}
    handlers = {
        sub: {k: statistics.median(r["handlers"][sub][k] for r in runs) for k in kinds}
        for sub, kinds in runs[0]["handlers"].items()
    }
    print(f"\n{'stack / subscribers':<28} {'ns/call':>10} {'added ns':>10}")
    for key, value in ns.items():
        extra = added.get(key)
        shown = f"{extra:>10,.0f}" if extra is not None else f"{'-':>10}"
        print(f"{key:<28} {value:>10,.0f} {shown}")
    print(f"\n{'subscriber':<12} {'event':<22} {'ns/handler call':>16}")
    for sub, kinds in handlers.items():
        for kind, value in kinds.items():
            print(f"{sub:<12} {kind:<22} {value:>16,.0f}")
    if args.json:
        payload = {"ns": ns, "added": added, "handlers": handlers, "runs": len(runs)}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
