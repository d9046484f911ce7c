"""Fallback: answer with something useful when the protected call fails.

The alternatives, in the order they are tried: the last good result for the same arguments (when
``cache_ttl`` is set), then ``handler``, then each ``chain`` handler, then ``value``. A handler that
raises passes the turn to the next alternative; when none is left, the caller gets the original
exception with a note naming each alternative that failed.

Only the failures ``on`` selects trigger it (default: buttress's own errors, such as an open
circuit, a full bulkhead or a timeout, and transient errors). A bug in the protected code is not
papered over, and cancellation and interpreter exits are never caught.

With ``defer``, a call that was *rejected* (circuit open, rate limited, bulkhead full: nothing
ran) is queued before any alternative is tried, and answered with a :class:`Deferred` handle;
the queue (:mod:`buttress._deferral`, which does the replaying) runs it again later through the
patterns inside the fallback, with the idempotency key it had. Every call of a deferring
fallback has a key (``buttress.idempotency_key()``), so its first attempts send the same one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from pydantic import Field, PositiveInt

from buttress import _clock, _context, _deferral, events
from buttress._deferral import Deferred
from buttress._values import PositiveSeconds, StateURL
from buttress.exceptions import ButtressError, ConfigurationError, RejectedError, set_note
from buttress.patterns import _topology, _transient
from buttress.patterns._base import (
    BuildContext,
    Effect,
    Mode,
    Options,
    Return,
    TryAlternatives,
    error_type,
)

__all__ = ["DeferOptions", "Deferred", "FallbackOptions", "FallbackStrategy", "build"]

PATTERN = "fallback"


class _Missing:
    """The marker for "no fallback value given" (``None`` is a legitimate fallback value)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class DeferOptions(Options):
    """How a deferring fallback queues rejected calls (``with_fallback(defer=DeferOptions())``)."""

    max_items: PositiveInt = Field(
        default=1000, description="calls queued at most; a rejected call past it is not deferred"
    )
    max_age: PositiveSeconds = Field(
        default=3600.0,
        description="seconds a queued call may wait; older ones are dropped unreplayed",
    )
    retry_interval: PositiveSeconds = Field(
        default=5.0,
        description="seconds before trying the first queued call again when its rejection "
        "gave no retry_after",
    )
    state_url: StateURL | None = Field(
        default=None,
        description="redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL "
        "(valkey forms too) of a stream that keeps the queue across restarts",
    )


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
    defer: bool | DeferOptions = Field(
        default=False, description="queue rejected calls and replay them later (true, or a table)"
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
        _context.answered("fallback")
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


class DeferringFallback(FallbackStrategy):
    """A fallback that queues rejected calls first (see the module docstring).

    Its scope is the logical call's idempotency key: the driver sets a fresh one around each
    call, and the retries inside take it.
    """

    scope = _context.call_scope
    new_scope = _context.RetryScope

    def __init__(
        self,
        service: str,
        options: FallbackOptions,
        queue: _deferral.DeferralQueue,
        mode: Mode = "enforce",
    ) -> None:
        super().__init__(service, options, mode)
        self.queue = queue
        # The driver's step inside this fallback (what a replay of its calls runs), once linked.
        self.step: Callable[..., Any] | None = None
        self.is_async = False

    def replay_through(self, step: Callable[..., Any], *, is_async: bool) -> None:
        """The driver's step inside this fallback: what a replay runs."""
        self.step, self.is_async = step, is_async
        self.queue.link(step, is_async=is_async)

    def recover(self, failure: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Effect:
        """Queue a rejected call (a :class:`Deferred` answers it); else fall back as usual."""
        if isinstance(failure, RejectedError):
            if self._shadow:
                events.emit(events.ShadowDecision(self.service, PATTERN, "deferred"))
                raise failure
            handle = self.queue.put(args, kwargs, failure, self.step, is_async=self.is_async)
            if handle is not None:
                _context.answered("deferred")
                return Return(handle)
        if not self.alternatives and self.options.value is MISSING and self.succeeded is None:
            raise failure  # deferring only: nothing else answers
        return super().recover(failure, args, kwargs)


def build(ctx: BuildContext) -> FallbackStrategy | None:
    """The fallback strategy for ``ctx.options``, or ``None`` with nothing to fall back to."""
    options: FallbackOptions = ctx.options
    if not options.enabled:
        return None
    defer = DeferOptions() if options.defer is True else options.defer or None
    if defer is not None:
        queue = _deferral.queue_for(ctx.service, ctx.site or ctx.key, defer, _topology.client)
        return DeferringFallback(ctx.service, options, queue, ctx.mode)
    if (
        options.value is MISSING
        and options.handler is None
        and not options.chain
        and options.cache_ttl is None
    ):
        return None
    return FallbackStrategy(ctx.service, options, ctx.mode)
