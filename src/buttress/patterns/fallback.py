"""Fallback: answer with something useful when the protected call fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field

from buttress.patterns._base import BuildContext, Options, Strategy

PATTERN = "fallback"


class _Missing:
    """The marker for "no fallback value given" (``None`` is a legitimate fallback value)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FallbackOptions(Options):
    """Options of ``with_fallback`` (and of ``services.<name>.fallback``).

    With nothing to fall back to (no value, handler, chain or cache) the pattern is off.
    """

    code_only: ClassVar[frozenset[str]] = frozenset({"value", "handler", "chain", "on"})

    enabled: bool = True
    value: Any = Field(MISSING, description="a value returned instead of the failure")
    handler: Callable[..., Any] | None = Field(
        None, description="called as handler(exc, *args, **kwargs); its result is returned"
    )
    chain: tuple[Callable[..., Any], ...] = Field(
        (), description="alternatives handler(exc, *args, **kwargs) tried in order"
    )
    cache_ttl: float | None = Field(
        None, gt=0, description="serve the last good result for the same arguments this long"
    )
    on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None = Field(
        None, description="exceptions that trigger the fallback (default: ButtressError + transient)"
    )


def build(ctx: BuildContext) -> Strategy | None:
    raise NotImplementedError  # being written
