"""The per-call view: one immutable :class:`Snapshot` of the settings and its service views.

A decorated function reads ``config.SNAPSHOT`` and, through it, a :class:`ServiceView` on every
call, so both keep their per-call reads to attribute loads and C-level calls.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

from pydantic import BaseModel, ValidationError

from buttress import registry
from buttress._values import shown
from buttress.config._models import (
    FLAGS,
    PRESETS,
    SECTIONS,
    Criticality,
    Mode,
    ServiceSettings,
    Settings,
    explicit,
    merge_options,
    options_model,
)
from buttress.config._sources import Problem, configuration_error, error_message
from buttress.exceptions import ConfigurationError
from buttress.patterns import PATTERNS
from buttress.patterns._base import Options

# A value and where it came from: "env NAME", "file PATH", "code", "preset NAME" or "default".
Sourced = tuple[Any, str]

# Resolved options kept per service view (see ServiceView.options). Options are resolved when a
# decorated function first runs after a reload, not per call, so a miss costs one validation.
CACHE_SIZE: Final = 256

# What the many services that settings say nothing about share, so a service costs little at rest
# (docs/performance.md): the flag sources of a service on the built-in defaults, an empty layer,
# and the options cache of a view with no layer and no preset from settings. Such a view resolves
# from the code arguments alone, so one resolved object serves every service that gives the same
# ones (bounded like a view's own: CACHE_SIZE). None of these is ever mutated but the cache,
# under its lock.
_EMPTY_LAYER: Final[dict[str, Sourced]] = {}
_NO_LAYERS: Final[dict[str, dict[str, Sourced]]] = dict.fromkeys(PATTERNS, _EMPTY_LAYER)
_DEFAULT_FLAGS: Final[dict[str, Sourced]] = {
    flag: (ServiceSettings.model_fields[flag].default, "default") for flag in FLAGS
}
_shared_cache: OrderedDict[Any, Options] = OrderedDict()
_shared_cache_lock = threading.Lock()


# A C-level call: the common case costs ~nothing. One of each for every service (an endless
# ``repeat`` keeps no state that a call changes, so threads share it safely): ≈ 96 bytes less
# per service than a pair of its own.
_ALWAYS: Callable[[], bool] = itertools.repeat(object=True).__next__
_NEVER: Callable[[], bool] = itertools.repeat(object=False).__next__


def _sampler(rollout: float, seed: int | None) -> Callable[[], bool]:
    if rollout >= 1.0:
        return _ALWAYS
    if rollout <= 0.0:
        return _NEVER
    draw = random.Random(seed).random if seed is not None else random.random

    def sample() -> bool:
        return draw() < rollout

    return sample


class ServiceView:
    """The flags and resolved options of one service in one snapshot.

    The flags are plain attributes and ``sample`` is a precomputed callable, so reading them on
    every call costs a few attribute loads and allocates nothing.

    A service that settings say nothing about (no section of its own, and defaults that set no
    flag and no option: most services) keeps its name only; every other attribute is this
    class's own (the built-in flags, the shared empty layers and options cache), about 90 bytes
    less per service. A service that settings configure is a :class:`_ConfiguredView`, which
    keeps each attribute itself. ``ServiceView(name, settings)`` makes the one that fits.

    Attributes:
        name: the service name, lower-cased.
        enabled: ``False`` when settings switch the service off (calls go straight through).
        mode: ``"enforce"``, or ``"shadow"`` (patterns record what they would do, and do nothing).
        rollout: the fraction of calls that get the patterns.
        criticality: ``low``, ``normal``, ``high`` or ``critical``; weighs the service in health.
        sample: ``sample() -> bool``: does this call get the patterns? Deterministic per snapshot
            when a ``seed`` is configured.
    """

    __slots__ = ("name",)

    name: str
    # A view of a service that settings say nothing about reads these.
    enabled: bool = _DEFAULT_FLAGS["enabled"][0]
    mode: Mode = _DEFAULT_FLAGS["mode"][0]
    rollout: float = _DEFAULT_FLAGS["rollout"][0]
    seed: int | None = _DEFAULT_FLAGS["seed"][0]
    criticality: Criticality = _DEFAULT_FLAGS["criticality"][0]
    preset: str | None = _DEFAULT_FLAGS["preset"][0]
    sample: Callable[[], bool] = _sampler(rollout, seed)
    _flag_sources: dict[str, Sourced] = _DEFAULT_FLAGS
    # Per pattern: the keys settings set, service section over defaults.
    _layers: dict[str, dict[str, Sourced]] = _NO_LAYERS
    # Resolved options by (pattern, preset, code arguments): least recently used first, and
    # at most CACHE_SIZE of them, since a function decorated per request with its own
    # arguments (with_timeout(seconds=budget)) would otherwise add one per request.
    _cache: OrderedDict[Any, Options] = _shared_cache
    _cache_lock: threading.Lock = _shared_cache_lock

    def __new__(cls, name: str, settings: Settings) -> ServiceView:
        # A per-host instance of a service (``billing[api.example.com]``, made by the
        # integrations' ``per_host=True``) follows its service's section unless it has its own.
        section = name
        if name not in settings.services and name.endswith("]") and "[" in name:
            section = name[: name.index("[")]
        own = settings.services.get(section)
        defaults = settings.defaults
        flag_sources: dict[str, Sourced] = {}
        for flag in FLAGS:
            if own is not None and flag in own.model_fields_set:
                value = getattr(own, flag)
                source = settings.source_of(("services", section, flag)) or "default"
            elif flag in defaults.model_fields_set:
                value = getattr(defaults, flag)
                source = _via_defaults(settings.source_of(("defaults", flag)))
            else:
                value = ServiceSettings.model_fields[flag].default
                source = "default"
            flag_sources[flag] = (value, source)
        layers: dict[str, dict[str, Sourced]] = {}
        for pattern in PATTERNS:
            layer: dict[str, Sourced] = {}
            for field, value in explicit(defaults, pattern).items():
                default_source = settings.source_of(("defaults", pattern, field))
                layer[field] = (value, _via_defaults(default_source))
            if own is not None:
                for field, value in explicit(own, pattern).items():
                    source = settings.source_of(("services", section, pattern, field)) or "default"
                    below = layer.get(field)
                    # A group option (retry.budget): the service's keys over the defaults'.
                    merged = (
                        merge_options({field: below[0]}, {field: value})[field]
                        if below is not None and isinstance(value, dict)
                        else value
                    )
                    layer[field] = (merged, source)
            layers[pattern] = layer or _EMPTY_LAYER
        if flag_sources == _DEFAULT_FLAGS and not any(layers.values()):
            view = object.__new__(ServiceView)
        else:
            view = _ConfiguredView.configured(flag_sources, layers)
        view.name = name
        return view

    def __repr__(self) -> str:
        return (
            f"ServiceView({self.name!r}, enabled={self.enabled}, mode={self.mode!r}, "
            f"rollout={self.rollout})"
        )

    def pattern_enabled(self, pattern: str) -> bool:
        """Whether settings leave ``pattern`` on for this service.

        This sees settings and a preset chosen in settings; a pattern switched off in code
        (``enabled=False``, or a preset named in code) shows in ``options(...).enabled``.
        """
        layer = self._layers[pattern]
        if "enabled" in layer:
            return bool(layer["enabled"][0])
        if self.preset is not None:
            return bool(PRESETS[self.preset].get(pattern, {}).get("enabled", True))
        return True

    def options(
        self, pattern: str, code_args: Mapping[str, Any], preset: str | None = None
    ) -> Options:
        """The resolved options of ``pattern``: settings > ``code_args`` > preset > built-in.

        ``preset`` is the preset named in code; a preset chosen in settings replaces it.

        Raises:
            ConfigurationError: the merged values are invalid (named with their sources), or
                ``preset`` is unknown.
        """
        try:
            # Each value with its type: 0, 0.0 and False are equal and hash alike, but a fallback
            # value of False must not come back as 0 (views share this cache across services).
            key: Any = (
                pattern,
                preset,
                frozenset((name, type(value), value) for name, value in code_args.items()),
            )
            hash(key)
        except TypeError:  # an unhashable code argument: resolve without caching
            return self._resolve(pattern, code_args, preset)[0]
        cache = self._cache
        with self._cache_lock:
            cached = cache.get(key)
            if cached is not None:
                cache.move_to_end(key)
                return cached
        resolved, _ = self._resolve(pattern, code_args, preset)
        with self._cache_lock:
            cache[key] = resolved
            if len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return resolved

    def explain(
        self,
        code_args: Mapping[str, Mapping[str, Any]] | None = None,
        preset: str | None = None,
    ) -> dict[str, Any]:
        """Every flag and settings key of this service, as ``{"value": .., "source": ..}``.

        Args:
            code_args: code arguments per pattern, as a call site would give them.
            preset: the preset named in code.
        """
        described: dict[str, Any] = {
            flag: {"value": value, "source": source}
            for flag, (value, source) in self._flag_sources.items()
        }
        for pattern in PATTERNS:
            args = (code_args or {}).get(pattern, {})
            resolved, sources = self._resolve(pattern, args, preset)
            section = SECTIONS[pattern].model_fields
            described[pattern] = {
                field: {
                    "value": _plain(getattr(resolved, field)),
                    "source": sources.get(field, "default"),
                }
                for field in type(resolved).model_fields
                if field in section or field in args
            }
        return described

    def _resolve(
        self, pattern: str, code_args: Mapping[str, Any], preset: str | None
    ) -> tuple[Options, dict[str, str]]:
        model = options_model(pattern)
        chosen = self.preset if self.preset is not None else preset
        if chosen is not None and chosen not in PRESETS:
            raise ConfigurationError(
                f"service {self.name!r}: unknown preset {chosen!r}; known: {', '.join(PRESETS)}",
                errors=((f"services.{self.name}.preset", "code", f"unknown preset {chosen!r}"),),
            )
        sources: dict[str, str] = {}
        preset_values = PRESETS[chosen].get(pattern, {}) if chosen is not None else {}
        sources.update(dict.fromkeys(preset_values, f"preset {chosen}"))
        sources.update(dict.fromkeys(code_args, "code"))
        layer = self._layers[pattern]
        sources.update({field: source for field, (_, source) in layer.items()})
        values = merge_options(
            preset_values, code_args, {field: value for field, (value, _) in layer.items()}
        )
        try:
            return model.model_validate(values), sources
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                fields = [str(part) for part in error["loc"]] or sorted(sources)
                path = ".".join(["services", self.name, pattern, *map(str, error["loc"])])
                labels = sorted({sources.get(f, "default") for f in fields})
                problems.append(Problem(path, ", ".join(labels), error_message(error, path)))
            raise configuration_error(problems) from None


class _ConfiguredView(ServiceView):
    """The view of a service that settings configure: each attribute its own (see ServiceView)."""

    __slots__ = (
        "_cache",
        "_cache_lock",
        "_flag_sources",
        "_layers",
        "criticality",
        "enabled",
        "mode",
        "preset",
        "rollout",
        "sample",
        "seed",
    )

    @classmethod
    def configured(
        cls, flag_sources: dict[str, Sourced], layers: dict[str, dict[str, Sourced]]
    ) -> _ConfiguredView:
        """A view with these flags and layers (its ``name`` is the caller's to set)."""
        view = object.__new__(cls)
        view._flag_sources = _DEFAULT_FLAGS if flag_sources == _DEFAULT_FLAGS else flag_sources
        view.enabled = flag_sources["enabled"][0]
        view.mode = flag_sources["mode"][0]
        view.rollout = flag_sources["rollout"][0]
        view.seed = flag_sources["seed"][0]
        view.criticality = flag_sources["criticality"][0]
        view.preset = flag_sources["preset"][0]
        view.sample = _sampler(view.rollout, view.seed)
        view._layers = layers
        # A view with no layer and no preset from settings resolves from the code arguments
        # alone: it shares the options cache of the views of this class's base.
        if view.preset is None and not any(layers.values()):
            view._layers = _NO_LAYERS
            view._cache, view._cache_lock = _shared_cache, _shared_cache_lock
        else:
            view._cache, view._cache_lock = OrderedDict(), threading.Lock()
        return view


def _plain(value: object) -> object:
    """A value as ``config show`` prints it: a group option as a dict, secrets redacted."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    return shown(value)


def _via_defaults(source: str | None) -> str:
    return f"{source} (defaults)" if source else "default"


class _Views(dict[str, ServiceView]):
    """Service views of one snapshot, built on first lookup."""

    __slots__ = ("_settings",)

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings

    def __missing__(self, name: str) -> ServiceView:
        canonical = registry.service_name(name)
        view = self.get(canonical)
        if view is None:
            # Two threads may build a view at once; setdefault keeps one for everybody.
            view = self.setdefault(canonical, ServiceView(canonical, self._settings))
        return self.setdefault(name, view)


class Snapshot:
    """Settings at one generation, immutable: replaced wholesale by ``reload_settings()``.

    Attributes:
        generation: increases with every successful reload.
        enabled: the global kill switch (``FF_ENABLE_RESILIENCE_PATTERNS``).
        settings: the validated :class:`Settings` document.
        service: ``service(name) -> ServiceView``, built once per name and cached.
    """

    __slots__ = ("enabled", "generation", "service", "settings")

    def __init__(self, generation: int, settings: Settings) -> None:
        self.generation = generation
        self.settings = settings
        self.enabled = settings.enabled
        # A bound dict.__getitem__: the per-call lookup of a known service runs in C.
        self.service: Callable[[str], ServiceView] = _Views(settings).__getitem__

    def __repr__(self) -> str:
        return f"Snapshot(generation={self.generation}, enabled={self.enabled})"
