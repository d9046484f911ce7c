"""The contract between :class:`buttress.Policy` and the pattern modules.

A pattern has three parts:

* ``Options``: a frozen pydantic model whose field names are the decorator's keyword arguments
  and the keys of its settings section. Code arguments are validated against it at decoration
  time; settings are validated against it at load time.
* a *strategy*: built from resolved options when a policy first runs (and again after
  ``reload_settings()``), it wraps the next step of the chain. ``wrap`` serves ``def`` callers and
  ``awrap`` ``async def`` callers. Decisions (admit, record, next delay) are plain synchronous
  methods that both wrappers share; the wrappers only do the waiting, through ``_clock``.
* a ``build(ctx)`` function returning the strategy.

A step of the chain takes the positional arguments as a tuple and the keyword arguments as a dict,
so no layer re-packs them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

__all__ = [
    "AsyncCall",
    "BuildContext",
    "Call",
    "Mode",
    "Options",
    "Strategy",
    "error_type",
]

Call = Callable[[tuple[Any, ...], dict[str, Any]], Any]
AsyncCall = Callable[[tuple[Any, ...], dict[str, Any]], Awaitable[Any]]
Mode = Literal["enforce", "shadow"]


class Options(BaseModel):
    """Base of every pattern's options: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # Fields that only code can set (exception types, predicates, callables); a config file or an
    # environment variable that names one is an error.
    code_only: ClassVar[frozenset[str]] = frozenset()


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a pattern needs to build its strategy.

    Attributes:
        service: the service name (metric label, settings section, shared-state key).
        options: the resolved options (settings over code arguments over preset over defaults).
        key: the registry key of the pattern's shared instance: the service name when the call
            site named one, else a key private to the call site.
        mode: ``enforce`` acts; ``shadow`` only emits what it would have done.
    """

    service: str
    options: Any
    key: str
    mode: Mode = "enforce"


class Strategy(Protocol):
    """A built pattern: one link of a policy's chain."""

    pattern: ClassVar[str]

    def wrap(self, call: Call) -> Call:
        """Return a step that applies this pattern around ``call`` for a ``def`` caller."""

    def awrap(self, call: AsyncCall) -> AsyncCall:
        """Return a step that applies this pattern around ``call`` for an ``async def`` caller."""


def error_type(exc: BaseException) -> str:
    """The bounded label for an exception: its class name, never its message."""
    return type(exc).__name__
