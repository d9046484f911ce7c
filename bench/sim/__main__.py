"""``python -m bench.sim [--quick] [--json FILE]``: the three overload scenarios, side by side.

Exits non-zero when a headline falls short of its target:

* total outage, 3 attempts: amplification with the budget at most 1.2x;
* overload: the adaptive limits' goodput within 10 % of the best fixed limit's;
* heavy tail: hedging at most 5 % extra load, and a p99 at least 5x lower.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from . import scenarios
from .scenarios import Row


def _table(title: str, rows: list[Row], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    head = f"  {'client':<46}" + "".join(f"{label:>14}" for label, _, _ in columns)
    print(head)
    print("  " + "-" * (len(head) - 2))
    for row in rows:
        cells = "".join(
            f"{'-' if math.isnan(row.figures[key]) else fmt.format(row.figures[key]):>14}"
            for _, key, fmt in columns
        )
        print(f"  {row.name:<46}{cells}")


def headlines(results: dict[str, list[Row]]) -> list[tuple[str, bool]]:
    """Each target and whether this run met it."""
    outage = {row.name: row.figures for row in results["outage"]}
    budget = next(f for name, f in outage.items() if "budget on" in name)
    baseline = next(f for name, f in outage.items() if "baseline" in name)
    overload = results["overload"]
    fixed = [r for r in overload if r.name.startswith("fixed")]
    best = max(fixed, key=lambda r: r.figures["goodput_full"] + r.figures["goodput_half"])
    adaptive = [r for r in overload if r.name.startswith("adaptive")]
    tail = {row.name: row.figures for row in results["heavy_tail"]}
    plain = next(f for name, f in tail.items() if "baseline" in name)
    hedged = next(f for name, f in tail.items() if "baseline" not in name)
    checks = [
        (
            f"outage: amplification {budget['amplification']:.3f}x with the budget "
            f"(<= 1.2x), {baseline['amplification']:.2f}x with tenacity",
            # To two decimals: a sliding window may let a retry or so past the ratio at its edges.
            round(budget["amplification"], 2) <= 1.2,
        )
    ]
    for row in adaptive:
        checks.append(
            (
                f"overload: {row.name} goodput {row.figures['goodput_half']:.0f}/s after the "
                f"loss vs {best.figures['goodput_half']:.0f}/s for the best fixed limit "
                f"({best.name}); p99 {row.figures['p99_half'] * 1000:.0f} ms vs "
                f"{best.figures['p99_half'] * 1000:.0f} ms",
                row.figures["goodput_half"] >= 0.9 * best.figures["goodput_half"]
                and row.figures["goodput_full"] >= 0.9 * best.figures["goodput_full"],
            )
        )
    checks.append(
        (
            f"heavy tail: p99 {hedged['p99'] * 1000:.0f} ms with hedging vs "
            f"{plain['p99'] * 1000:.0f} ms without, at {hedged['extra_load']:.1%} extra load "
            "(<= 5%)",
            hedged["extra_load"] <= 0.05 and hedged["p99"] * 5 <= plain["p99"],
        )
    )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the shorter runs the tests use")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    started = time.perf_counter()
    results = {
        "outage": scenarios.outage(sizes["outage"]),
        "overload": scenarios.overload(sizes["overload"]),
        "heavy_tail": scenarios.heavy_tail(sizes["heavy_tail"]),
    }
    size = sizes["outage"]
    _table(
        f"1. Total outage, {scenarios.ATTEMPTS} attempts per call "
        f"({size.clients} clients x {size.rate:g} calls/s, {size.duration:g} s)",
        results["outage"],
        [
            ("calls", "calls", "{:.0f}"),
            ("attempts", "attempts", "{:.0f}"),
            ("amplification", "amplification", "{:.3f}x"),
        ],
    )
    size = sizes["overload"]
    _table(
        f"2. Overload: capacity halves at {size.duration / 2:g} s "
        f"({size.clients} clients x {size.rate:g} calls/s = {size.clients * size.rate:g}/s; "
        f"{scenarios.WORKERS} then {scenarios.WORKERS // 2} workers x "
        f"{scenarios.SERVICE_TIME * 1000:g} ms; {scenarios.DEADLINE:g} s deadline)",
        results["overload"],
        [
            ("goodput before", "goodput_full", "{:.0f}/s"),
            ("goodput after", "goodput_half", "{:.0f}/s"),
            ("p50 after", "p50_half", "{:.3f}s"),
            ("p99 after", "p99_half", "{:.3f}s"),
            ("failed after", "failed_half", "{:.0%}"),
        ],
    )
    size = sizes["heavy_tail"]
    _table(
        f"3. Heavy tail: {scenarios.SLOW_SHARE:.0%} of calls take {scenarios.SLOW:g} s or more "
        f"({size.clients} clients x {size.rate:g} calls/s, {size.duration:g} s)",
        results["heavy_tail"],
        [
            ("p50", "p50", "{:.3f}s"),
            ("p99", "p99", "{:.3f}s"),
            ("p99.9", "p999", "{:.3f}s"),
            ("extra load", "extra_load", "{:.1%}"),
        ],
    )
    print(f"\n(simulated on virtual time in {time.perf_counter() - started:.1f} s of real time)")
    failed = False
    print()
    for text, met in headlines(results):
        print(f"  [{'met' if met else 'MISSED'}] {text}")
        failed = failed or not met
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(
                {name: [vars(row) for row in rows] for name, rows in results.items()}, out, indent=2
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
