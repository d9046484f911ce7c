"""Cache: answer a call from a recent result for the same arguments, without calling.

Read-through: a *fresh* entry (younger than ``ttl``) answers the call and the function is not
called; a miss runs the call and keeps its result. When the call then fails with a failure the
cache serves (buttress's own errors, such as an open circuit, a full bulkhead, a rate limit or a
timeout, and transient errors) an entry up to ``stale_ttl`` seconds past its ``ttl`` answers
instead: stale, but better than nothing, and reported as such. Errors are never cached.

The key of a call: see :mod:`buttress.patterns._keys` (the arguments, or ``key(*args,
**kwargs)``). The cache belongs to its call site and survives ``reload_settings()``; it holds at
most ``max_entries`` entries, dropping the least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, cast

from pydantic import Field, PositiveInt

from buttress import _clock, _context, events
from buttress._values import PositiveSeconds, Seconds
from buttress.exceptions import ButtressError, ConfigurationError
from buttress.patterns import _transient
from buttress.patterns._base import BuildContext, Effect, Mode, Options, Return, error_type
from buttress.patterns._keys import KeyFunction, call_key

PATTERN = "cache"


class CacheOptions(Options):
    """Options of ``with_cache`` (and of ``services.<name>.cache``).

    Without a ``ttl`` the cache is off.
    """

    code_only: ClassVar[frozenset[str]] = frozenset({"key"})

    enabled: bool = True
    ttl: PositiveSeconds | None = Field(
        None, description="seconds a result answers identical calls without calling"
    )
    stale_ttl: Seconds | None = Field(
        None,
        description="seconds past ttl a result may still answer a call that failed or was "
        "rejected (none: never stale)",
    )
    max_entries: PositiveInt = Field(1024, description="results kept, least recently used dropped")
    key: Callable[..., Hashable] | None = Field(
        None, description="key(*args, **kwargs): what makes two calls the same"
    )


def serves(exc: BaseException) -> bool:
    """Whether a stale entry may answer ``exc``: buttress's own errors and transient errors.

    ``ConfigurationError`` is excluded (a broken setting must surface), and so is any other
    error: a bug in the protected code is not papered over with an old answer.
    """
    if isinstance(exc, ButtressError):
        return not isinstance(exc, ConfigurationError)
    return _transient.is_transient(exc)


class Cache:
    """The entries of one call site, shared by its strategies across reloads."""

    def __init__(self, options: CacheOptions) -> None:
        self.options = options
        self.entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self.lock = threading.Lock()

    def reconfigure(self, options: CacheOptions) -> None:
        with self.lock:
            self.options = options
            while len(self.entries) > options.max_entries:
                self.entries.popitem(last=False)


class CacheStrategy:
    """Looks the call up before it runs, keeps what it returned, answers its failure if stale."""

    pattern: ClassVar[str] = PATTERN

    def __init__(self, service: str, cache: Cache, options: CacheOptions, mode: Mode) -> None:
        self.service = service
        self.cache = cache
        self.options = options
        self.ttl: float = options.ttl or 0.0
        # How old an entry may be and still answer a failure; None: never past its ttl.
        self.stale_until: float | None = (
            None if options.stale_ttl is None else self.ttl + options.stale_ttl
        )
        self.key: KeyFunction | None = options.key
        self.shadow = mode == "shadow"
        self.returned = self.remember
        self.raised = self.recall_stale
        # Every call looks up: its event goes through the recorder (no event built for a binder).
        self._lookups = events.recorder(events.CacheLookup, service)

    def enter(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A fresh entry answers the call (a :class:`Return`); else the key, as the token."""
        key = call_key(PATTERN, self.key, args, kwargs)
        now = _clock.monotonic()
        cache = self.cache
        fresh = False
        with cache.lock:
            entry = cache.entries.get(key)
            if entry is not None:
                age = now - entry[0]
                fresh = age <= self.ttl
                if fresh:
                    cache.entries.move_to_end(key)
                elif self.stale_until is None or age > self.stale_until:
                    del cache.entries[key]  # of no use any more, fresh or stale
        record = self._lookups.record
        if record is not None:
            try:
                record("hit" if fresh else "miss")
            except Exception:  # noqa: BLE001 - a subscriber must never break the call
                events.failed(record)
        if not fresh:
            return key
        if self.shadow:
            events.emit(events.ShadowDecision(self.service, PATTERN, "cached"))
            return key
        _context.answered("cached")
        return Return(cast("tuple[float, Any]", entry)[1])

    def remember(self, key: Hashable, result: Any) -> None:
        """Keep ``result`` as the answer for ``key``."""
        entry = (_clock.monotonic(), result)
        cache = self.cache
        with cache.lock:
            entries = cache.entries
            entries[key] = entry
            entries.move_to_end(key)
            while len(entries) > cache.options.max_entries:
                entries.popitem(last=False)

    def recall_stale(self, key: Hashable, failure: Exception) -> Effect:
        """Answer ``failure`` with the entry for ``key`` if within ``stale_ttl``; else re-raise."""
        stale_until = self.stale_until
        if stale_until is None or not serves(failure):
            raise failure
        now = _clock.monotonic()
        with self.cache.lock:
            entry = self.cache.entries.get(key)
        if entry is None or now - entry[0] > stale_until:
            raise failure
        if self.shadow:
            events.emit(events.ShadowDecision(self.service, PATTERN, "stale"))
            raise failure
        events.emit(events.CacheServedStale(self.service, error_type(failure)))
        _context.answered("cached")
        return Return(entry[1])


def build(ctx: BuildContext) -> CacheStrategy | None:
    """The cache strategy of a call site, or ``None`` without a ``ttl``."""
    options: CacheOptions = ctx.options
    if not options.enabled or options.ttl is None:
        return None
    return CacheStrategy(ctx.service, ctx.shared(PATTERN, Cache), options, ctx.mode)
