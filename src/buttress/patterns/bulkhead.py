"""Bulkhead: cap the concurrent calls to a dependency so one slow service cannot take them all."""

from __future__ import annotations

from pydantic import Field

from buttress.patterns._base import BuildContext, Options, Strategy

PATTERN = "bulkhead"


class BulkheadOptions(Options):
    """Options of ``with_bulkhead`` (and of ``services.<name>.bulkhead``)."""

    enabled: bool = True
    limit: int = Field(10, gt=0, description="concurrent calls")
    max_queue: int = Field(0, ge=0, description="calls that may wait for a slot")
    queue_timeout: float | None = Field(
        None, ge=0, description="seconds a queued call waits (unset: until a slot frees)"
    )


def build(ctx: BuildContext) -> Strategy | None:
    raise NotImplementedError  # being written
