"""buttress: make the calls a service makes to other services survive failure.

Stack ``circuit_breaker``, ``retry_with_backoff``, ``with_timeout``, ``with_bulkhead``,
``with_rate_limit``, ``with_fallback``, ``with_cache``, ``with_coalescing``, ``with_hedging`` and
``with_adaptive_throttle`` on ``def`` and ``async def`` functions, or build the whole stack for a
named service with ``resilient("openfga")``; tune it from settings; watch it in Prometheus,
OpenTelemetry and logs.
"""

from __future__ import annotations

from buttress._context import attempt, idempotency_key, remaining
from buttress.config import get_settings, reload_settings
from buttress.decorators import (
    circuit_breaker,
    resilient,
    retry_with_backoff,
    with_adaptive_throttle,
    with_bulkhead,
    with_cache,
    with_chaos,
    with_coalescing,
    with_fallback,
    with_hedging,
    with_rate_limit,
    with_timeout,
)
from buttress.exceptions import (
    BulkheadFullError,
    ButtressError,
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
    RejectedError,
    TimeoutExceededError,
)
from buttress.health_app import health
from buttress.instrumentation import install_defaults as _install_default_subscribers
from buttress.patterns.fallback import DeferOptions, Deferred
from buttress.policy import Policy

__all__ = [
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
    "ConfigurationError",
    "DeferOptions",
    "Deferred",
    "Policy",
    "RateLimitedError",
    "RejectedError",
    "TimeoutExceededError",
    "attempt",
    "circuit_breaker",
    "get_settings",
    "health",
    "idempotency_key",
    "reload_settings",
    "remaining",
    "resilient",
    "retry_with_backoff",
    "with_adaptive_throttle",
    "with_bulkhead",
    "with_cache",
    "with_chaos",
    "with_coalescing",
    "with_fallback",
    "with_hedging",
    "with_rate_limit",
    "with_timeout",
]

__version__ = "0.1.0"

# Prometheus (default registry), OpenTelemetry (current span) and logging are on by default;
# buttress.instrumentation.configure() turns each off or points it elsewhere.
_install_default_subscribers()
