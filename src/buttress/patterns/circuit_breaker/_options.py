"""The circuit breaker's options and their validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from buttress._values import STATE_URL_SCHEMES, PositiveSeconds, StateURL
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
    window_seconds: PositiveSeconds = Field(60.0, description="length of the rate window")
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

    @field_validator("state_url")
    @classmethod
    def _a_redis_url(cls, value: str | None) -> str | None:
        # Checked when settings load (not on the first call); the message never repeats the
        # value, which may be a password typed in the wrong place.
        if value is not None:
            scheme, sep, rest = value.partition("://")
            if not sep or scheme.lower() not in STATE_URL_SCHEMES or not rest:
                raise ValueError(
                    "must be a redis://, rediss:// or unix:// URL, or redis+sentinel://, "
                    "redis+cluster:// (valkey:// forms too)"
                )
        return value

    @model_validator(mode="after")
    def _slow_calls_need_both(self) -> CircuitBreakerOptions:
        if (self.slow_call_duration is None) != (self.slow_call_rate_threshold is None):
            raise ValueError("slow_call_duration and slow_call_rate_threshold must be set together")
        return self
