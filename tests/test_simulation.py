"""The overload simulation (``bench/sim``), small and fast: its headlines hold, run after run.

The same discrete-event simulation ``make bench`` prints, at its ``--quick`` size: the real
patterns on virtual time, every draw seeded, so these figures are exact, not samples of noise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from buttress import _clock, instrumentation

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sim import scenarios  # noqa: E402 - the repository root is on the path only now
from bench.sim.__main__ import headlines  # noqa: E402


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, list[scenarios.Row]]]:
    """The three scenarios at the quick size, run once for the module."""
    before = instrumentation.installed()
    clock = _clock.get_clock()
    try:
        yield {
            "outage": scenarios.outage(scenarios.QUICK["outage"]),
            "overload": scenarios.overload(scenarios.QUICK["overload"]),
            "heavy_tail": scenarios.heavy_tail(scenarios.QUICK["heavy_tail"]),
        }
    finally:
        assert _clock.get_clock() is clock  # the virtual clock went with its loop
        instrumentation.configure(
            prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
            otel=before.get("otel", False),  # type: ignore[arg-type]
            logging=before.get("logging", False),  # type: ignore[arg-type]
        )


def by_name(rows: list[scenarios.Row]) -> dict[str, dict[str, float]]:
    return {row.name: row.figures for row in rows}


def test_an_outage_is_amplified_3x_by_tenacity_and_at_most_1_2x_with_the_budget(results) -> None:
    rows = by_name(results["outage"])
    tenacity_style = rows["tenacity, 3 attempts (baseline)"]
    unbudgeted = rows["buttress retry, 3 attempts, budget off"]
    budgeted = rows["buttress retry, 3 attempts, budget on (default)"]
    assert tenacity_style["amplification"] == pytest.approx(3.0)
    assert unbudgeted["amplification"] == pytest.approx(3.0)
    # The window slides, so over a whole run the ratio holds to within a retry or so at its edges.
    assert round(budgeted["amplification"], 2) <= 1.2
    assert budgeted["attempts"] - budgeted["calls"] <= 0.2 * budgeted["calls"] + 2
    assert budgeted["amplification"] >= 1.15  # the budget still lets its share of retries through
    assert budgeted["calls"] == tenacity_style["calls"]  # the same traffic, seeded


def test_an_adaptive_limit_keeps_the_goodput_of_the_best_fixed_limit_after_a_capacity_loss(
    results,
) -> None:
    rows = by_name(results["overload"])
    assert rows["no limit, timeout only (baseline)"]["goodput_half"] < 10  # congestion collapse
    fixed = {name: f for name, f in rows.items() if name.startswith("fixed")}
    best = max(fixed.values(), key=lambda f: f["goodput_full"] + f["goodput_half"])
    for name in ("adaptive aimd", "adaptive gradient2"):
        adaptive = rows[name]
        assert adaptive["goodput_half"] >= 0.95 * best["goodput_half"], name
        assert adaptive["goodput_full"] >= 0.95 * best["goodput_full"], name
    # Gradient2 holds latency near its baseline: a lower p99 than the best fixed limit's.
    assert rows["adaptive gradient2"]["p99_half"] < best["p99_half"]


def test_hedging_cuts_the_p99_of_a_heavy_tail_at_at_most_5_percent_extra_load(results) -> None:
    rows = by_name(results["heavy_tail"])
    plain = rows["no hedging (baseline)"]
    hedged = rows[f"hedging at {scenarios.HEDGE_AT}"]
    assert plain["extra_load"] == 0.0
    assert 0.0 < hedged["extra_load"] <= 0.05
    assert hedged["p99"] * 5 <= plain["p99"]
    assert hedged["p50"] == pytest.approx(plain["p50"], rel=0.1)


def test_every_printed_headline_is_met(results) -> None:
    checks = headlines(results)
    assert [text for text, met in checks if not met] == []
    assert len(checks) == 4  # the outage, each adaptive limit, the heavy tail


def test_the_same_seed_gives_the_same_figures(results) -> None:
    again = scenarios.outage(scenarios.QUICK["outage"])
    assert [row.figures for row in again] == [row.figures for row in results["outage"]]
