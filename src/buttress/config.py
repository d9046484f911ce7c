"""Settings and feature flags, read when a call happens.

MINIMAL INTERFACE VERSION: defaults + code arguments + the global kill switch. The full settings
(sources, presets, per-service sections, validation, reload) replace the internals and keep the
interface used by :mod:`buttress.policy`:

* ``SNAPSHOT``: the current immutable :class:`Snapshot`; replaced wholesale by ``reload_settings``.
* ``Snapshot.enabled``, ``Snapshot.generation``, ``Snapshot.service(name) -> ServiceView``.
* ``ServiceView.enabled``, ``.mode``, ``.rollout``, ``.sample()``, ``.pattern_enabled(p)``,
  ``.options(pattern, code_args, preset)``.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

from buttress.exceptions import ConfigurationError
from buttress.patterns._base import Options

__all__ = ["SNAPSHOT", "ServiceView", "Snapshot", "options_model", "reload_settings"]

PATTERNS = ("fallback", "retry", "circuit_breaker", "rate_limit", "timeout", "bulkhead")


def options_model(pattern: str) -> type[Options]:
    """The options model of ``pattern``."""
    module = importlib.import_module(f"buttress.patterns.{pattern}")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Options) and value is not Options:
            return value
    raise LookupError(pattern)  # pragma: no cover - every pattern module defines one


class ServiceView:
    """The flags and resolved options of one service in one snapshot."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = True
        self.mode: Literal["enforce", "shadow"] = "enforce"
        self.rollout = 1.0
        self._cache: dict[tuple[str, Any, str | None], Options] = {}

    def sample(self) -> bool:
        return True

    def pattern_enabled(self, pattern: str) -> bool:  # noqa: ARG002
        return True

    def options(self, pattern: str, code_args: Mapping[str, Any], preset: str | None) -> Options:
        key = (pattern, tuple(sorted(code_args.items(), key=lambda kv: kv[0])), preset)
        try:
            return self._cache[key]
        except (KeyError, TypeError):
            pass
        resolved = options_model(pattern).model_validate(dict(code_args))
        try:
            self._cache[key] = resolved
        except TypeError:
            pass
        return resolved


class Snapshot:
    """Settings at one generation; immutable from the outside."""

    def __init__(self, generation: int, *, enabled: bool) -> None:
        self.generation = generation
        self.enabled = enabled
        self._services: dict[str, ServiceView] = {}
        self._lock = threading.Lock()

    def service(self, name: str) -> ServiceView:
        view = self._services.get(name)
        if view is None:
            with self._lock:
                view = self._services.setdefault(name, ServiceView(name))
        return view


def _load(generation: int) -> Snapshot:
    raw = os.environ.get("FF_ENABLE_RESILIENCE_PATTERNS", "true").strip().lower()
    if raw not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
        raise ConfigurationError(
            f"FF_ENABLE_RESILIENCE_PATTERNS: expected a boolean, got {raw!r} "
            "(source: environment variable FF_ENABLE_RESILIENCE_PATTERNS)"
        )
    return Snapshot(generation, enabled=raw in {"1", "true", "yes", "on"})


SNAPSHOT: Snapshot = _load(0)
_reload_lock = threading.Lock()


def reload_settings() -> Snapshot:
    """Read settings again and swap them in atomically; a failure keeps the old ones."""
    global SNAPSHOT
    with _reload_lock:
        SNAPSHOT = _load(SNAPSHOT.generation + 1)
        return SNAPSHOT


def get_settings() -> Snapshot:
    """The settings in force now."""
    return SNAPSHOT
