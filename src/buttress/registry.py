"""Named per-service instances (breakers, bulkheads, rate limiters), built lazily and shared.

Every call site that names the same service (case-insensitive, see :func:`service_name`) shares
one instance per pattern in :data:`SHARED_PATTERNS`, reconfigured in place on a reload; two call
sites may not give one argument different values. The rules and why: ``docs/internals.md``
(Shared instances).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from buttress.exceptions import ConfigurationError

if TYPE_CHECKING:
    from buttress.patterns.circuit_breaker import CircuitBreaker

__all__ = [
    "EPOCH",
    "SHARED_PATTERNS",
    "Reconfigurable",
    "breaker",
    "claim",
    "clear",
    "clear_claims",
    "code_args",
    "forget",
    "instances",
    "service_name",
    "shared",
]

SHARED_PATTERNS = frozenset({"circuit_breaker", "adaptive_throttle", "bulkhead", "rate_limit"})


def service_name(name: str) -> str:
    """The canonical spelling of a service name (names are case-insensitive)."""
    return name.lower()


class Reconfigurable(Protocol):
    def reconfigure(self, options: Any) -> None:
        """Adopt new options, keeping runtime state."""


T = TypeVar("T", bound=Reconfigurable)

_lock = threading.RLock()
_instances: dict[tuple[str, str], Any] = {}
_options: dict[tuple[str, str], Any] = {}
# (pattern, key) -> argument name -> (value, the call site that gave it)
_claims: dict[tuple[str, str], dict[str, tuple[Any, str]]] = {}


class _Epoch:
    """A token: replaced whenever a claim adds an argument, so policies built before it rebuild."""


# Read on every call by the policy wrappers (an identity check); replaced, never mutated.
EPOCH = _Epoch()


def shared(pattern: str, key: str, options: Any, factory: Callable[[Any], T]) -> T:
    """The instance of ``pattern`` for ``key``, built by ``factory(options)`` on first use.

    When it exists and ``options`` differ from those it was built or last reconfigured with, it is
    reconfigured in place.
    """
    slot = (pattern, service_name(key))
    instance = _instances.get(slot)
    if instance is not None and _options[slot] == options:
        return instance  # type: ignore[no-any-return]
    with _lock:
        instance = _instances.get(slot)
        if instance is None:
            instance = factory(options)
            _instances[slot] = instance
        elif _options[slot] != options:
            instance.reconfigure(options)
        _options[slot] = options
        return instance


def breaker(service: str) -> CircuitBreaker:
    """The shared breaker of ``service``; built from its current settings if no call built it yet.

    Manual control and health checks use it: ``breaker("openfga").force_open()``.
    """
    # Imported here: config imports this module, and the breaker's build() uses shared().
    from buttress import config  # noqa: PLC0415
    from buttress.patterns.circuit_breaker import PATTERN, CircuitBreaker  # noqa: PLC0415

    service = service_name(service)
    existing = instances(PATTERN).get(service)
    if isinstance(existing, CircuitBreaker):
        return existing
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
        return _ByService(
            {key: inst for (kind, key), inst in _instances.items() if kind == pattern}
        )


def claim(pattern: str, key: str, code_args: Mapping[str, Any], site: str) -> None:
    """Record that ``site`` configures ``pattern`` of ``key`` with ``code_args``.

    Raises:
        ConfigurationError: another site already gave different code arguments for the same
            shared instance.
    """
    global EPOCH
    key = service_name(key)
    slot = (pattern, key)
    with _lock:
        given = _claims.setdefault(slot, {})
        for name, value in code_args.items():
            previous = given.get(name)
            if previous is not None and previous[1] != site and previous[0] != value:
                raise ConfigurationError(
                    f"service {key!r}: {pattern} argument {name} is given two values in code: "
                    # A state_url arrives as a RedisURL (see policy.Spec): its repr masks the
                    # password.
                    f"{name}={previous[0]!r} at {previous[1]} and {name}={value!r} at {site}. "
                    "Give both call sites the same value (or give it at one only), move it to "
                    f"settings (services.{key}.{pattern}.{name}), or use different service names.",
                    errors=((f"services.{key}.{pattern}.{name}", site, "conflicting values"),),
                )
        added = code_args.keys() - given.keys()
        for name in added:
            given[name] = (code_args[name], site)
        if added:
            EPOCH = _Epoch()


def code_args(pattern: str, key: str) -> dict[str, Any]:
    """The code arguments every call site gave ``pattern`` of ``key``, merged."""
    with _lock:
        claims = _claims.get((pattern, service_name(key)), {})
        return {name: value for name, (value, _) in claims.items()}


def forget(key: str) -> None:
    """Drop every instance built for ``key`` (a call site's private key, when it is gone)."""
    key = service_name(key)
    with _lock:
        for slot in [slot for slot in _instances if slot[1] == key]:
            del _instances[slot]
            del _options[slot]


def clear() -> None:
    """Forget every built instance; the next call of each policy builds fresh ones.

    The code arguments claimed at decoration time are kept: they belong to functions that still
    exist. (Test suites that re-decorate the same service with other arguments call
    :func:`clear_claims` too.)
    """
    global EPOCH
    with _lock:
        _instances.clear()
        _options.clear()
        EPOCH = _Epoch()


def clear_claims() -> None:
    """Forget the code arguments claimed by call sites (test isolation)."""
    global EPOCH
    with _lock:
        _claims.clear()
        EPOCH = _Epoch()
