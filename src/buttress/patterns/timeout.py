"""Timeout: give up on a call that takes too long (async: cancelled; sync: abandoned, counted)."""

from __future__ import annotations

from pydantic import Field

from buttress.patterns._base import BuildContext, Options, Strategy

PATTERN = "timeout"


class TimeoutOptions(Options):
    """Options of ``with_timeout`` (and of ``services.<name>.timeout``)."""

    enabled: bool = True
    seconds: float = Field(30.0, gt=0, description="time limit of one attempt")


def build(ctx: BuildContext) -> Strategy | None:
    raise NotImplementedError  # being written
