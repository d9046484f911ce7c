"""Circuit breaker: stop calling a dependency that keeps failing, probe it, close when it recovers.

:class:`CircuitBreaker` is a ``pybreaker.CircuitBreaker`` whose calls never run under a lock
(admit, run, record against the generation the call was admitted in), with memory, Redis or any
pybreaker storage behind it. How admission, recording and each kind of storage work, and what
each module of this package holds: ``docs/internals.md`` (The circuit breaker).
"""

from __future__ import annotations

from buttress.patterns.circuit_breaker._breaker import (
    CircuitBreaker,
    CircuitBreakerStrategy,
    CircuitSnapshot,
    FailedResult,
    build,
)
from buttress.patterns.circuit_breaker._options import PATTERN, CircuitBreakerOptions, ExcludeSpec

__all__ = [
    "PATTERN",
    "CircuitBreaker",
    "CircuitBreakerOptions",
    "CircuitBreakerStrategy",
    "CircuitSnapshot",
    "ExcludeSpec",
    "FailedResult",
    "build",
]
