"""Named per-service instances (breakers, bulkheads, rate limiters), built lazily and shared.

Every call site that names the same service (case-insensitive, see :func:`service_name`) shares
one instance per pattern in :data:`SHARED_PATTERNS`, reconfigured in place on a reload; two call
sites may not give one argument different values. The rules and why: ``docs/internals.md``
(Shared instances).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Mapping
from types import CodeType, MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from buttress.exceptions import ConfigurationError

if TYPE_CHECKING:
    from buttress.patterns.circuit_breaker import CircuitBreaker

__all__ = [
    "CALL_SITE_PATTERNS",
    "SHARED_PATTERNS",
    "Dependent",
    "Reconfigurable",
    "Site",
    "breaker",
    "claim",
    "clear",
    "clear_claims",
    "code_args",
    "describe",
    "forget",
    "forget_gone",
    "given_name",
    "instances",
    "service_name",
    "shared",
]

SHARED_PATTERNS = frozenset({"circuit_breaker", "adaptive_throttle", "bulkhead", "rate_limit"})
# Patterns that keep an instance here for every call site, under the site's private key whatever
# the service (a cache's entries, coalescing's flights belong to one function).
CALL_SITE_PATTERNS = frozenset({"cache", "coalescing"})


def service_name(name: str) -> str:
    """The canonical spelling of a service name (names are case-insensitive)."""
    lowered = name.lower()
    # The same string object when it is lower case already: a name is stored in several tables.
    return name if lowered == name else lowered


def given_name(name: object) -> str:
    """The canonical spelling of a name a caller gave (a decorator's, ``breaker()``'s).

    Raises:
        TypeError: ``name`` is not a non-empty string (an empty one would be a service no call
            site can reach).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    return service_name(name)


class Reconfigurable(Protocol):
    def reconfigure(self, options: Any) -> None:
        """Adopt new options, keeping runtime state."""


class Dependent(Protocol):
    def invalidate(self) -> None:
        """What was built from the registry is stale: build it again before the next call."""


T = TypeVar("T", bound=Reconfigurable)

_lock = threading.RLock()
# Every table is by pattern, then by key: instances(pattern) and a lookup by service never walk
# other patterns, and no (pattern, key) tuple is kept per service.
# pattern -> key -> the instance, and the options it was built or last reconfigured with where
# they differ from the pattern's usual ones: the options its first instance was built with
# (pattern -> options). Most instances of a pattern have equal options (settings say nothing
# about their service and its code gives the same arguments), and keep no entry of their own.
_instances: dict[str, dict[str, Any]] = {}
_options: dict[str, dict[str, Any]] = {}
_usual: dict[str, Any] = {}
# key -> the claims that gave an argument first, of every pattern, flat: (pattern, Site,
# code_args, pattern, site, code_args, ...) in the order they came (one entry and one tuple per
# service, not one per pattern). An argument's value is that of the first claim of its pattern
# that gives it; a claim that adds no argument is not kept. code_args is the caller's mapping (a
# spec's, immutable), not a copy.
_claims: dict[str, tuple[Any, ...]] = {}
# key -> the compiled stacks that use a shared instance of it, of any pattern (weakly): a claim
# that adds an argument makes those rebuild, never a stack of another service (one entry per
# service rather than one per pattern: a stack of the service that uses another of its patterns
# only compiles once more, at the next call). One reference, or a list of them once there are
# two; dead references are dropped when the list is walked, and at each power of two it grows to
# (see claim()).
_Refs = weakref.ref[Any] | list[weakref.ref[Any]]
_dependents: dict[str, _Refs] = {}
_PRUNE_FROM = 16  # a list of references is pruned of dead ones from this length on
# Every dependent, for clear()/clear_claims(), which make every stack rebuild (test isolation):
# plain references (the same object as its references in _dependents: a weakref.ref without a
# callback is shared), pruned like the dependents.
_everyone: list[weakref.ref[Any]] = []
# The services whose breaker was built before a claim added a code argument to it: breaker()
# applies them (a call site's stack does at its first call).
_unapplied: set[str] = set()


def shared(pattern: str, key: str, options: Any, factory: Callable[[Any], T]) -> T:
    """The instance of ``pattern`` for ``key``, built by ``factory(options)`` on first use.

    When it exists and ``options`` differ from those it was built or last reconfigured with, it is
    reconfigured in place.
    """
    key = service_name(key)
    instance = _instances.get(pattern, {}).get(key)
    if instance is not None and _options[pattern].get(key, _usual[pattern]) == options:
        return instance  # type: ignore[no-any-return]
    with _lock:
        by_key = _instances.setdefault(pattern, {})
        built = _options.setdefault(pattern, {})
        usual = _usual.setdefault(pattern, options)
        instance = by_key.get(key)
        if instance is None:
            instance = factory(options)
            by_key[key] = instance
        elif built.get(key, usual) != options:
            instance.reconfigure(options)
        if options is usual or options == usual:
            built.pop(key, None)
        else:
            built[key] = options
        return instance


def breaker(service: str) -> CircuitBreaker:
    """The shared breaker of ``service``; built from its current settings if no call built it yet.

    Manual control and health checks use it: ``breaker("openfga").force_open()``.

    Raises:
        TypeError: ``service`` is not a non-empty string.
    """
    # Imported here: config imports this module, and the breaker's build() uses shared().
    from buttress import config  # noqa: PLC0415
    from buttress.patterns.circuit_breaker import PATTERN, CircuitBreaker  # noqa: PLC0415

    service = given_name(service)  # checked at run time for untyped callers
    existing = _instances.get(PATTERN, {}).get(service)
    if isinstance(existing, CircuitBreaker) and service not in _unapplied:
        return existing
    # Built before a call site claimed code arguments for it (breaker() asked first): they
    # apply now, not at that call site's first call.
    _unapplied.discard(service)
    # The same options the service's call sites would resolve: settings over their code arguments.
    options = config.SNAPSHOT.service(service).options(PATTERN, code_args(PATTERN, service))
    return shared(PATTERN, service, options, functools.partial(CircuitBreaker, service))


class _ByService(dict[str, Any]):
    """Instances by key, looked up by any spelling of the service name."""

    def __missing__(self, key: str) -> Any:
        canonical = service_name(key)
        if canonical == key:
            raise KeyError(key)
        return self[canonical]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, service_name(key))

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, service_name(key), default)


def instances(pattern: str) -> dict[str, Any]:
    """Every built instance of ``pattern``, by key (looked up by any spelling of the name)."""
    with _lock:
        return _ByService(_instances.get(pattern, {}))


def depend(dependent: Dependent) -> None:
    """Have ``dependent`` (held weakly) invalidated by :func:`clear` and :func:`clear_claims`."""
    with _lock:
        _append(_everyone, weakref.ref(dependent))


def _append(refs: list[weakref.ref[Any]], ref: weakref.ref[Any]) -> None:
    """Append ``ref``; at each power of two from _PRUNE_FROM, drop the dead references (locked).

    A function decorated per request adds one on every call: the list stays within twice the
    live ones, at an amortised O(1) per reference.
    """
    refs.append(ref)
    count = len(refs)
    if count >= _PRUNE_FROM and count & (count - 1) == 0:
        refs[:] = [ref for ref in refs if ref() is not None]


# What identifies a call site in a claim: a function's code (every decoration of one ``def``
# is one site), or a name for a callable without one. A string is made of it only for a message.
Site = CodeType | str


def describe(site: Site) -> str:
    """``site`` as a conflict names it: ``qualified.name (file:line)``, or the name given."""
    if isinstance(site, str):
        return site
    return f"{site.co_qualname} ({site.co_filename}:{site.co_firstlineno})"


def _given(claims: tuple[Any, ...], pattern: str, name: str) -> tuple[Any, Site] | None:
    """``(value, site)`` of the first claim of ``pattern`` in ``claims`` that gives ``name``, or
    None."""
    for at in range(0, len(claims), 3):
        if claims[at] == pattern:
            args = claims[at + 2]
            if name in args:
                return args[name], claims[at + 1]
    return None


def claim(
    pattern: str,
    key: str,
    code_args: Mapping[str, Any],
    site: Site,
    dependent: Dependent | None = None,
) -> None:
    """Record that ``site`` configures ``pattern`` of ``key`` with ``code_args``.

    ``dependent`` (held weakly) is invalidated whenever a later claim adds an argument to a
    shared instance of ``key`` (this one or another pattern's), so it rebuilds with the merged
    arguments; no stack of another key is touched.

    Raises:
        ConfigurationError: another site already gave different code arguments for the same
            shared instance.
    """
    key = service_name(key)
    with _lock:
        claims = _claims.get(key, ())
        if claims and _redecorated(claims, pattern, code_args, site) and _gone(key):
            # This site gives another value while every stack that uses the service's shared
            # instances is gone (a helper decorating for one test, then for the next): nothing
            # runs with the old value any more, so the new one is taken, not ignored. (Another
            # site's value still conflicts, whether or not its stacks exist: see forget_gone.)
            claims = _without(claims, pattern)
            _claims[key] = claims
        added = False
        for name, value in code_args.items():
            previous = _given(claims, pattern, name)
            if previous is None:
                added = True
            elif previous[0] != value:
                # Two sites are one when they read the same: the same code (or code reloaded).
                there, here = describe(previous[1]), describe(site)
                if there != here:
                    raise ConfigurationError(
                        f"service {key!r}: {pattern} argument {name} is given two values in "
                        # A state_url arrives as a RedisURL (see policy.Spec): its repr masks
                        # the password.
                        f"code: {name}={previous[0]!r} at {there} and {name}={value!r} at "
                        f"{here}. Give both call sites the same value (or give it at one only), "
                        f"move it to settings (services.{key}.{pattern}.{name}), or use "
                        "different service names.",
                        errors=((f"services.{key}.{pattern}.{name}", here, "conflicting values"),),
                    )
        if added:
            if type(code_args) is not MappingProxyType:
                code_args = MappingProxyType(dict(code_args))  # kept: nobody may change it
            _claims[key] = (*claims, pattern, site, code_args)
            if pattern == "circuit_breaker" and key in _instances.get(pattern, {}):
                _unapplied.add(key)
        dependents = _dependents.get(key)
        if added and dependents is not None:
            if isinstance(dependents, list):
                refs = dependents = _dependents[key] = [r for r in dependents if r() is not None]
            elif dependents() is None:  # its one stack is gone
                del _dependents[key]
                refs, dependents = [], None
            else:
                refs = [dependents]
            for ref in refs:
                stale = ref()
                # (The dependent itself, at its claim of another pattern, compiles anyway.)
                if stale is not None and stale is not dependent:
                    stale.invalidate()
        if dependent is not None:
            ref = weakref.ref(dependent)  # (the same object at each claim of one stack)
            if dependents is None:
                _dependents[key] = ref  # the common case: one stack per service
            elif isinstance(dependents, list):
                if not dependents or dependents[-1] is not ref:  # (its claim of a 2nd pattern)
                    _append(dependents, ref)
            elif dependents is not ref:
                _dependents[key] = [dependents, ref]


def _gone(key: str) -> bool:
    """Whether stacks used a shared instance of ``key`` (of any pattern: one entry per service)
    and none of them exists any more (a claim made without a dependent, as a test of the
    registry makes, never goes)."""
    refs = _dependents.get(key)
    if refs is None:
        return False
    if isinstance(refs, list):
        return all(ref() is None for ref in refs)
    return refs() is None


def _redecorated(
    claims: tuple[Any, ...], pattern: str, code_args: Mapping[str, Any], site: Site
) -> bool:
    """Whether ``site`` gives an argument of ``pattern`` another value than it gave before.

    Only a value of data (a number, a text, classes) counts: a function made anew at each
    decoration (a ``lambda`` predicate of a function decorated per request) is not another
    value, or each request would reconfigure the shared instance.
    """
    for name, value in code_args.items():
        previous = _given(claims, pattern, name)
        # (Described only on a new value: a site decorated per request gives the same one.)
        if previous is not None and previous[0] != value:
            return _data(previous[0]) and _data(value) and describe(previous[1]) == describe(site)
    return False


def _data(value: object) -> bool:
    """Whether ``value`` is data (compared by what it holds), not a function or an object."""
    if isinstance(value, tuple):
        return all(_data(each) for each in value)
    return value is None or isinstance(value, (int, float, str, type))


def _without(claims: tuple[Any, ...], pattern: str) -> tuple[Any, ...]:
    """``claims`` without those of ``pattern``."""
    return tuple(
        part
        for at in range(0, len(claims), 3)
        if claims[at] != pattern
        for part in claims[at : at + 3]
    )


def code_args(pattern: str, key: str) -> dict[str, Any]:
    """The code arguments every call site gave ``pattern`` of ``key``, merged."""
    with _lock:
        claims = _claims.get(service_name(key), ())
        merged: dict[str, Any] = {}
        for at in range(0, len(claims), 3):
            if claims[at] == pattern:
                for name, value in claims[at + 2].items():
                    merged.setdefault(name, value)  # the first claim that gives it
        return merged


def forget(key: str) -> None:
    """Drop every instance built for ``key`` (a call site's private key, when it is gone)."""
    key = service_name(key)
    with _lock:
        # One lookup per pattern (a handful), never a walk over the instances.
        for pattern, by_key in _instances.items():
            if by_key.pop(key, None) is not None:
                _options[pattern].pop(key, None)


def clear() -> None:
    """Forget every built instance; the next call of each policy builds fresh ones.

    The code arguments claimed at decoration time are kept: they belong to functions that still
    exist. (Test suites that re-decorate the same service with other arguments call
    :func:`clear_claims` too.)
    """
    with _lock:
        _instances.clear()
        _options.clear()
        _usual.clear()
        _unapplied.clear()
        _invalidate_everyone()


def forget_gone() -> None:
    """Forget the code arguments of every instance whose claiming stacks are all gone.

    Between tests (``buttress.testing.reset``): a test's own decorated functions are gone once it
    ends, and the next test may give the same service other values at another site. The claims
    of functions that still exist (the code under test, decorated at import) stay.
    """
    with _lock:
        for key in [key for key in _claims if _gone(key)]:
            del _claims[key]


def clear_claims() -> None:
    """Forget the code arguments claimed by call sites (test isolation)."""
    with _lock:
        _claims.clear()
        _invalidate_everyone()


def _invalidate_everyone() -> None:
    alive = [ref for ref in _everyone if ref() is not None]
    _everyone[:] = alive
    for ref in alive:
        dependent = ref()
        if dependent is not None:
            dependent.invalidate()
