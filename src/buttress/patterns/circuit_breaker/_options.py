"""The circuit breaker's options and their validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from buttress._values import GrowthFactor, PositiveSeconds, Seconds, StateURL
from buttress.patterns._base import Options

__all__ = ["PATTERN", "CircuitBreakerOptions", "ExcludeSpec"]

PATTERN = "circuit_breaker"

ExcludeSpec = type[BaseException] | Callable[[BaseException], bool]


class CircuitBreakerOptions(Options):
    """Options of ``circuit_breaker`` (and of ``services.<name>.circuit_breaker``)."""

    code_only: ClassVar[frozenset[str]] = frozenset({"exclude", "failure_on_result"})

    enabled: bool = True
    fail_max: int = Field(5, gt=0, description="consecutive failures that open the circuit")
    timeout: PositiveSeconds = Field(60.0, description="seconds the circuit stays open")
    open_backoff: GrowthFactor = Field(
        1.0,
        description="each trip after another without a close multiplies the open time by this",
    )
    max_timeout: PositiveSeconds | None = Field(
        None,
        description="cap on the open time (grown by open_backoff or held by a server's "
        "Retry-After); unset: 10 x timeout",
    )
    honor_retry_after: bool = Field(
        default=True,
        description="a failure that opens the circuit and carries a server's Retry-After keeps "
        "it open at least that long (capped by max_timeout)",
    )
    success_threshold: int = Field(1, gt=0, description="half-open successes that close it")
    half_open_max_calls: int = Field(1, gt=0, description="concurrent half-open trial calls")
    failure_rate_threshold: float | None = Field(
        None, gt=0, le=1, description="failure rate over the window that opens it (off if unset)"
    )
    slow_call_duration: PositiveSeconds | None = Field(
        None, description="seconds after which a call counts as slow"
    )
    slow_call_rate_threshold: float | None = Field(
        None, gt=0, le=1, description="slow-call rate over the window that opens it"
    )
    minimum_calls: int = Field(10, gt=0, description="calls in the window before rates count")
    window: Literal["time", "count"] = Field(
        "time",
        description="the rate window: the last window_seconds, or the last window_size calls",
    )
    window_seconds: PositiveSeconds = Field(60.0, description="length of the time window")
    window_size: int = Field(100, gt=0, description="calls in the count window")
    exclude: tuple[ExcludeSpec, ...] = Field(
        (), description="exceptions (types or predicates) that are neither success nor failure"
    )
    failure_on_result: Callable[[Any], object] | None = Field(
        None,
        description="a returned value for which this is true counts as a failure (and is still "
        "returned to the caller)",
    )
    count_throttled: bool = Field(
        default=False,
        description="count an HTTP 429 Too Many Requests as a failure (default: neither)",
    )
    state_url: StateURL | None = Field(
        None,
        description="redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL "
        "(valkey forms too) to share circuit state across processes",
    )

    near_cache_ttl: Seconds = Field(
        1.0,
        description="with state_url: seconds a closed (or open) state read from Redis decides "
        "this process's calls without asking Redis again (transitions arrive sooner by pub/sub); "
        "0 asks Redis on every call",
    )
    min_reporters: int = Field(
        1,
        gt=0,
        description="with state_url: processes whose own rate window must have tripped, each "
        "within the last window_seconds (with window='count': the last timeout), before a "
        "rate-based trip opens the fleet's circuit (below it, only the reporting process opens)",
    )

    @property
    def open_cap(self) -> float:
        """The longest the circuit stays open at a time (``max_timeout`` or 10 x ``timeout``)."""
        return 10 * self.timeout if self.max_timeout is None else self.max_timeout

    @model_validator(mode="after")
    def _cap_above_timeout(self) -> CircuitBreakerOptions:
        if self.max_timeout is not None and self.max_timeout < self.timeout:
            raise ValueError("max_timeout must be at least timeout")
        return self

    @model_validator(mode="after")
    def _slow_calls_need_both(self) -> CircuitBreakerOptions:
        if (self.slow_call_duration is None) != (self.slow_call_rate_threshold is None):
            raise ValueError("slow_call_duration and slow_call_rate_threshold must be set together")
        return self
