"""Retry with backoff: try a failed call again, for transient errors only, without a retry storm."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from buttress.patterns._base import BuildContext, Options, Strategy

PATTERN = "retry"

RetryOn = (
    Literal["transient", "network"]
    | tuple[type[BaseException], ...]
    | Callable[[BaseException], bool]
)


class RetryOptions(Options):
    """Options of ``retry_with_backoff`` (and of ``services.<name>.retry``)."""

    enabled: bool = True
    max_attempts: int = Field(3, gt=0, description="attempts including the first call")
    initial: float = Field(0.1, ge=0, description="seconds before the first retry (before jitter)")
    exponential_base: float = Field(2.0, ge=1, description="growth factor of the delay")
    max_delay: float = Field(30.0, ge=0, description="cap on any single delay, Retry-After included")
    jitter: Literal["none", "full", "equal", "decorrelated"] = "full"
    retry_on: RetryOn = Field(
        "transient",
        description='"transient" (default), "network", exception types, or a predicate',
    )
    idempotent: bool = Field(True, description="False disables retries for the call site")
    respect_retry_after: bool = Field(True, description="a server's Retry-After sets the delay")
    retry_rejected: bool = Field(
        False, description="retry a RejectedError that carries retry_after, after that delay"
    )

    code_only: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _cap_above_initial(self) -> RetryOptions:
        if self.max_delay < self.initial:
            raise ValueError(f"max_delay ({self.max_delay}) must be >= initial ({self.initial})")
        return self


def build(ctx: BuildContext) -> Strategy | None:
    raise NotImplementedError  # being written
