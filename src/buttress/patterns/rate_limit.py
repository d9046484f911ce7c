"""Rate limit: a token bucket that paces calls to a dependency's quota."""

from __future__ import annotations

from pydantic import Field

from buttress.patterns._base import BuildContext, Options, Strategy

PATTERN = "rate_limit"


class RateLimitOptions(Options):
    """Options of ``with_rate_limit`` (and of ``services.<name>.rate_limit``).

    With ``rate`` unset the pattern is off (so ``resilient()`` only limits services that set it).
    """

    enabled: bool = True
    rate: float | None = Field(None, gt=0, description="tokens added per second")
    burst: int | None = Field(None, gt=0, description="bucket size (default: max(1, rate))")
    max_wait: float = Field(0.0, ge=0, description="seconds a call may wait for a token")


def build(ctx: BuildContext) -> Strategy | None:
    raise NotImplementedError  # being written
