"""Fallback: answer with something useful when the protected call fails.

The alternatives, in the order they are tried: the last good result for the same arguments (when
``cache_ttl`` is set), then ``handler``, then each ``chain`` handler, then ``value``. A handler that
raises passes the turn to the next alternative; when none is left, the caller gets the original
exception with a note naming each alternative that failed.

Only the failures ``on`` selects trigger it (default: buttress's own errors, such as an open
circuit, a full bulkhead or a timeout, and transient errors). A bug in the protected code is not
papered over, and cancellation and interpreter exits are never caught.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from pydantic import Field

from buttress import _clock, events
from buttress._values import PositiveSeconds
from buttress.exceptions import ButtressError, ConfigurationError, set_note
from buttress.patterns import _transient
from buttress.patterns._base import (
    BuildContext,
    Effect,
    Mode,
    Options,
    Return,
    TryAlternatives,
    error_type,
)

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
    cache_ttl: PositiveSeconds | None = Field(
        None, description="serve the last good result for the same arguments this long"
    )
    on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None = Field(
        None,
        description="exceptions that trigger the fallback (default: ButtressError + transient)",
    )


# Results kept per call site for ``cache_ttl``; past this the oldest stored result is dropped.
CACHE_SIZE = 1024


def default_on(exc: BaseException) -> bool:
    """The default trigger: buttress's own errors and transient errors.

    ``ConfigurationError`` is excluded: a broken setting must surface, not be answered around.
    """
    if isinstance(exc, ButtressError):
        return not isinstance(exc, ConfigurationError)
    return _transient.is_transient(exc)


def _selector(
    on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] | None,
) -> Callable[[BaseException], bool]:
    if on is None:
        return default_on
    # A lone exception class is callable too, but as a predicate every call would return a truthy
    # instance: treat it as the one type it names.
    if isinstance(on, tuple | type):
        types = on

        def is_listed(exc: BaseException) -> bool:
            return isinstance(exc, types)

        return is_listed
    return on


def _cache_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    """The arguments as a cache key, or ``None`` when they cannot be hashed."""
    key: Hashable = (args, tuple(sorted(kwargs.items()))) if kwargs else args
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _name(handler: Callable[..., Any]) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


class FallbackStrategy:
    """Fallback for one call site: it decides how a failure is answered; the driver answers.

    The cache is local to the strategy, so it starts empty again after ``reload_settings()``.
    """

    pattern: ClassVar[str] = PATTERN

    def __init__(self, service: str, options: FallbackOptions, mode: Mode = "enforce") -> None:
        self.service = service
        self.options = options
        self._shadow = mode == "shadow"
        self._selects = _selector(options.on)
        handlers = () if options.handler is None else (options.handler,)
        # Labelled with the source FallbackUsed reports; the driver calls them in this order.
        self.alternatives: tuple[tuple[Callable[..., Any], str], ...] = (
            *((handler, "callable") for handler in handlers),
            *((handler, "chain") for handler in options.chain),
        )
        self._cache: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Bound once (the driver calls it after every good call), or None without a cache.
        self.succeeded = self.remember if options.cache_ttl is not None else None

    # -- decisions --------------------------------------------------------------------------------
    def applies(self, exc: BaseException) -> bool:
        """Whether ``exc`` is answered by the fallback (in shadow mode: reported, not answered)."""
        if not isinstance(exc, Exception) or not self._selects(exc):
            return False
        if self._shadow:
            events.emit(events.ShadowDecision(self.service, PATTERN, "fallback"))
            return False
        return True

    def remember(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        """Keep ``result`` as the last good answer for these arguments."""
        key = _cache_key(args, kwargs)
        if key is None:
            return
        entry = (_clock.monotonic(), result)
        with self._cache_lock:
            cache = self._cache
            cache[key] = entry
            cache.move_to_end(key)
            if len(cache) > CACHE_SIZE:
                cache.popitem(last=False)

    def recall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The last good result for these arguments if younger than ``cache_ttl``, else MISSING."""
        ttl = self.options.cache_ttl
        if ttl is None:
            return MISSING
        key = _cache_key(args, kwargs)
        if key is None:
            return MISSING
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is None:
                return MISSING
            stored_at, result = entry
            if _clock.monotonic() - stored_at > ttl:
                del self._cache[key]
                return MISSING
        return result

    def used(self, source: str, exc: BaseException) -> None:
        events.emit(events.FallbackUsed(self.service, source, error_type(exc)))

    def failed(
        self, exc: BaseException, errors: list[tuple[Callable[..., Any], Exception]]
    ) -> None:
        """Nothing could answer: note why on the original exception, which then propagates."""
        prefix = f"buttress fallback ({self.service}): "
        if errors:
            tried = "; ".join(f"{_name(h)} raised {error_type(e)}" for h, e in errors)
            set_note(exc, prefix, f"{prefix}every alternative failed: {tried}")
        else:
            set_note(exc, prefix, f"{prefix}no cached result to fall back to")
        events.emit(events.FallbackFailed(self.service, error_type(exc)))

    def recover(self, failure: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Effect:
        """Answer ``failure`` from the cache, or have the driver try the alternatives in turn.

        Re-raises ``failure`` when the fallback does not apply to it.
        """
        if not self.applies(failure):
            raise failure
        cached = self.recall(args, kwargs)
        if cached is not MISSING:
            self.used("cache", failure)
            return Return(cached)
        return _Alternatives(self, failure)


class _Alternatives(TryAlternatives):
    """The handlers of one failed call, then the value, then the original exception."""

    __slots__ = ("failure", "strategy")

    def __init__(self, strategy: FallbackStrategy, failure: Exception) -> None:
        super().__init__(strategy.alternatives)
        self.strategy = strategy
        self.failure = failure

    def answered(self, label: str) -> None:
        self.strategy.used(label, self.failure)

    def exhausted(self, errors: list[tuple[Callable[..., Any], Exception]]) -> Any:
        strategy, failure = self.strategy, self.failure
        if strategy.options.value is not MISSING:
            strategy.used("value", failure)
            return strategy.options.value
        strategy.failed(failure, errors)
        raise failure


def build(ctx: BuildContext) -> FallbackStrategy | None:
    """The fallback strategy for ``ctx.options``, or ``None`` with nothing to fall back to."""
    options: FallbackOptions = ctx.options
    if not options.enabled:
        return None
    if (
        options.value is MISSING
        and options.handler is None
        and not options.chain
        and options.cache_ttl is None
    ):
        return None
    return FallbackStrategy(ctx.service, options, ctx.mode)
