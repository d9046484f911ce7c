"""Named per-service instances (breakers, bulkheads, rate limiters), built lazily and shared.

Every call site that names the same service shares one instance per pattern. Instances are built
the first time a call needs them, from the options resolved at that moment, and reconfigured in
place when ``reload_settings()`` changes those options, so state (an open circuit, busy slots)
survives a reload.

Conflicting code arguments: two call sites that name the same service may not give the same
pattern different code arguments (``fail_max=5`` here, ``fail_max=10`` there). Which one should win
would depend on import order, so the second decoration raises ``ConfigurationError`` naming both
sites. Call sites that give the same values, or none, share freely; operators override code
arguments for everyone through settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from buttress.exceptions import ConfigurationError

__all__ = ["Reconfigurable", "claim", "clear", "instances", "shared"]


class Reconfigurable(Protocol):
    def reconfigure(self, options: Any) -> None:
        """Adopt new options, keeping runtime state."""


T = TypeVar("T", bound=Reconfigurable)

_lock = threading.RLock()
_instances: dict[tuple[str, str], Any] = {}
_options: dict[tuple[str, str], Any] = {}
_claims: dict[tuple[str, str], tuple[Mapping[str, Any], str]] = {}


def shared(pattern: str, key: str, options: Any, factory: Callable[[Any], T]) -> T:
    """The instance of ``pattern`` for ``key``, built by ``factory(options)`` on first use.

    When it exists and ``options`` differ from those it was built or last reconfigured with, it is
    reconfigured in place.
    """
    slot = (pattern, key)
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


def instances(pattern: str) -> dict[str, Any]:
    """Every built instance of ``pattern``, by key."""
    with _lock:
        return {key: inst for (kind, key), inst in _instances.items() if kind == pattern}


def claim(pattern: str, key: str, code_args: Mapping[str, Any], site: str) -> None:
    """Record that ``site`` configures ``pattern`` of ``key`` with ``code_args``.

    Raises:
        ConfigurationError: another site already gave different code arguments for the same
            shared instance.
    """
    slot = (pattern, key)
    with _lock:
        previous = _claims.get(slot)
        if previous is None or previous[1] == site:
            _claims[slot] = (dict(code_args), site)
            return
        previous_args, previous_site = previous
        if dict(previous_args) != dict(code_args):
            raise ConfigurationError(
                f"service {key!r}: {pattern} is configured in code twice with different arguments: "
                f"{_show(previous_args)} at {previous_site} and {_show(code_args)} at {site}. "
                "Give both call sites the same arguments, move the values to settings "
                f"(services.{key}.{pattern}), or use different service names.",
                errors=((f"services.{key}.{pattern}", site, "conflicting code arguments"),),
            )


def clear() -> None:
    """Forget every instance and claim (tests; a process that re-creates its services)."""
    with _lock:
        _instances.clear()
        _options.clear()
        _claims.clear()


def _show(args: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in sorted(args.items())) + ")" if args else "()"
