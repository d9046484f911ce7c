"""One module per pattern, each the same shape: its options, its strategy, and the events it emits.

Pattern modules import nothing from Prometheus, OpenTelemetry or logging: they emit events
(:mod:`buttress.events`) and subscribers turn those into metrics, spans and logs.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PATTERNS"]

# Canonical order, outermost first (design sections 3 and 10); chaos sits innermost, around the
# call. A policy's specs are sorted by it, settings sections are named by it, and each name is the
# module under this package that holds the pattern. Hedging sits inside retry (each attempt may be
# hedged; both draw on one budget) and outside the breaker (every copy is a call it counts); the
# adaptive throttle sits inside the breaker, which sees its refusals as rejections, not failures.
PATTERNS: Final = (
    "fallback",
    "cache",
    "coalescing",
    "retry",
    "hedging",
    "circuit_breaker",
    "adaptive_throttle",
    "rate_limit",
    "timeout",
    "bulkhead",
    "chaos",
)
