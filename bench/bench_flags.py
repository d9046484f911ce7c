"""Cost of reading the feature flags on one call (issue 3: at most 150 ns).

What a protected call reads: the current snapshot, the kill switch, the service's view, its
``enabled`` flag, its ``mode``, and the rollout draw. Each case runs the reads in a tight loop;
the cost of the empty loop is subtracted, and the median of several repeats is reported.

Usage: ``python bench/bench_flags.py [--loops N] [--repeats N] [--check]``; ``--check`` exits 1
when the full flag read costs more than the budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

BUDGET_NS = 150.0


def empty(n: int) -> None:
    for _ in range(n):
        pass


def make_cases() -> dict[str, Callable[[int], None]]:
    from buttress import config

    config.reload_settings(env={})

    def kill_switch(n: int) -> None:
        for _ in range(n):
            config.SNAPSHOT.enabled  # noqa: B018 - the read is what is measured

    def service_view(n: int) -> None:
        for _ in range(n):
            config.SNAPSHOT.service("openfga")

    def full_read(n: int) -> None:
        for _ in range(n):
            snapshot = config.SNAPSHOT
            if snapshot.enabled:
                view = snapshot.service("openfga")
                if view.enabled and view.mode == "enforce":
                    view.sample()

    return {
        "kill switch (SNAPSHOT.enabled)": kill_switch,
        "service view (SNAPSHOT.service(name))": service_view,
        "full flag read, rollout 1.0": full_read,
    }


def seeded_rollout_case() -> Callable[[int], None]:
    from buttress import config

    config.reload_settings(
        env={"BUTTRESS_SERVICES__OPENFGA__ROLLOUT": "0.5", "BUTTRESS_SERVICES__OPENFGA__SEED": "1"}
    )

    def full_read(n: int) -> None:
        for _ in range(n):
            snapshot = config.SNAPSHOT
            if snapshot.enabled:
                view = snapshot.service("openfga")
                if view.enabled and view.mode == "enforce":
                    view.sample()

    return full_read


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
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loops", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--check", action="store_true", help=f"exit 1 above {BUDGET_NS:.0f} ns")
    args = parser.parse_args()

    results = {
        name: per_read_ns(case, args.loops, args.repeats) for name, case in make_cases().items()
    }
    full = results["full flag read, rollout 1.0"]
    results["full flag read, rollout 0.5 seeded"] = per_read_ns(
        seeded_rollout_case(), args.loops, args.repeats
    )
    width = max(map(len, results))
    for name, ns in results.items():
        print(f"{name:<{width}}  {ns:7.1f} ns per read")
    verdict = "ok" if full <= BUDGET_NS else "OVER BUDGET"
    print(f"budget {BUDGET_NS:.0f} ns for the full flag read (rollout 1.0): {verdict}")
    return 1 if args.check and full > BUDGET_NS else 0


if __name__ == "__main__":
    sys.exit(main())
