"""Cost of reading the feature flags on a call (issue 3: at most 150 ns).

A decorated function reads, on every call, the current settings snapshot and checks it is the one
its chain was built for (the kill switch, service and pattern flags and the mode are all folded
into that chain); with a rollout below 1.0 it also draws whether this call gets the patterns. Those
two paths are the per-call flag read, held to the budget. For reference, the cost of looking up
every flag of a service by name is printed too (what a caller that does not compile pays).

Each case runs in a tight loop; the empty loop is subtracted; the minimum over repeats is
reported (the least disturbed run on a shared machine).

Usage: ``python bench/bench_flags.py [--loops N] [--repeats N] [--check]``; ``--check`` exits 1
when a per-call read costs more than the budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

BUDGET_NS = 150.0


def empty(n: int) -> None:
    for _ in range(n):
        pass


def per_call(env: dict[str, str]) -> Callable[[int], None]:
    """What a decorated function reads per call, as ``buttress.policy`` does."""
    from buttress import config

    config.reload_settings(env=env)
    built_for = config.SNAPSHOT
    sample = built_for.service("openfga").sample
    rolled_out = built_for.service("openfga").rollout < 1.0

    def read(n: int) -> None:
        for _ in range(n):
            if config.SNAPSHOT is not built_for:
                raise RuntimeError("settings changed during the benchmark")
            if rolled_out:
                sample()

    return read


def every_flag_by_name() -> Callable[[int], None]:
    from buttress import config

    config.reload_settings(env={})

    def read(n: int) -> None:
        for _ in range(n):
            snapshot = config.SNAPSHOT
            if snapshot.enabled:
                view = snapshot.service("openfga")
                if view.enabled and view.mode == "enforce" and view.pattern_enabled("retry"):
                    view.sample()

    return read


def per_read_ns(case: Callable[[int], None], loops: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        empty(loops)
        baseline = time.perf_counter_ns() - started
        started = time.perf_counter_ns()
        case(loops)
        elapsed = time.perf_counter_ns() - started
        samples.append(max(0.0, (elapsed - baseline) / loops))
    return min(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loops", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--check", action="store_true", help=f"exit 1 above {BUDGET_NS:.0f} ns")
    args = parser.parse_args()

    rollout = {
        "BUTTRESS_SERVICES__OPENFGA__ROLLOUT": "0.5",
        "BUTTRESS_SERVICES__OPENFGA__SEED": "1",
    }
    budgeted = {
        "per call: settings check": {},
        "per call: settings check + rollout draw (seeded)": rollout,
    }
    # Each case installs its own settings, so build each one just before it runs.
    results = {
        name: per_read_ns(per_call(env), args.loops, args.repeats) for name, env in budgeted.items()
    }
    reference = per_read_ns(every_flag_by_name(), args.loops, args.repeats)
    width = max(map(len, [*results, "reference: every flag of a service by name"]))
    for name, ns in results.items():
        verdict = "ok" if ns <= BUDGET_NS else "OVER BUDGET"
        print(f"{name:<{width}}  {ns:7.1f} ns  ({verdict}, budget {BUDGET_NS:.0f} ns)")
    print(f"{'reference: every flag of a service by name':<{width}}  {reference:7.1f} ns")
    over = any(ns > BUDGET_NS for ns in results.values())
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
