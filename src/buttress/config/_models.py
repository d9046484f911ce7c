"""The settings models: the pattern list, the presets, and the shape of the settings document.

Every section model is built from its pattern's options model, so a key, its type and its bounds
are defined once, in the pattern.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, create_model
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from buttress.patterns import PATTERNS
from buttress.patterns._base import CODE_CONTEXT, Options
from buttress.patterns.adaptive_throttle import AdaptiveThrottleOptions
from buttress.patterns.bulkhead import BulkheadOptions
from buttress.patterns.cache import CacheOptions
from buttress.patterns.chaos import KILL_SWITCH as CHAOS_VARIABLE
from buttress.patterns.chaos import ChaosOptions
from buttress.patterns.circuit_breaker import CircuitBreakerOptions
from buttress.patterns.coalescing import CoalescingOptions
from buttress.patterns.fallback import FallbackOptions
from buttress.patterns.hedging import HedgingOptions
from buttress.patterns.rate_limit import RateLimitOptions
from buttress.patterns.retry import RetryOptions
from buttress.patterns.timeout import TimeoutOptions

_OPTIONS: Final[Mapping[str, type[Options]]] = MappingProxyType(
    {
        "fallback": FallbackOptions,
        "cache": CacheOptions,
        "coalescing": CoalescingOptions,
        "retry": RetryOptions,
        "hedging": HedgingOptions,
        "circuit_breaker": CircuitBreakerOptions,
        "adaptive_throttle": AdaptiveThrottleOptions,
        "rate_limit": RateLimitOptions,
        "timeout": TimeoutOptions,
        "bulkhead": BulkheadOptions,
        "chaos": ChaosOptions,
    }
)

ENV_PREFIX: Final = "BUTTRESS_"
CONFIG_FILE_VARIABLE: Final = "BUTTRESS_CONFIG_FILE"
ADMIN_TOKEN_VARIABLE: Final = "BUTTRESS_ADMIN_TOKEN"  # noqa: S105 - a variable's name, not a token
WATCH_INTERVAL_VARIABLE: Final = "BUTTRESS_CONFIG_WATCH_INTERVAL"
WATCH_INTERVAL_BOUNDS: Final = (0.1, 300.0)  # seconds between two looks at the config file
DEFAULT_WATCH_INTERVAL: Final = 5.0
KILL_SWITCH_VARIABLES: Final = ("FF_ENABLE_RESILIENCE_PATTERNS", "BUTTRESS_ENABLED")
# The BUTTRESS_* variables buttress reads that name no settings key, and what reads them: the
# settings check accepts exactly these besides the keys, so a typo in any other is still caught.
# A new variable read anywhere in buttress belongs here (tests/test_flags.py checks the source).
OTHER_VARIABLES: Final[Mapping[str, str]] = MappingProxyType(
    {
        CONFIG_FILE_VARIABLE: "the config file to read",
        ADMIN_TOKEN_VARIABLE: "the health app's admin token (buttress.health_app)",
        WATCH_INTERVAL_VARIABLE: "seconds between two looks at the config file (0: not followed)",
    }
)

Mode = Literal["enforce", "shadow"]
Criticality = Literal["low", "normal", "high", "critical"]
PresetName = Literal["api", "ai", "database", "external", "critical"]

# The presets of issue 3, mapped onto the options of each pattern. A preset names only what it
# changes; every other option keeps its built-in default. "ai" retries rely on the default
# retry_on="transient" (which includes HTTP 429) and respect_retry_after=True, and declare the
# calls idempotent: a model call is a POST that changes nothing when repeated; "critical" runs
# without a circuit breaker because a critical dependency must never be cut off by buttress.
PRESETS: Final[Mapping[str, Mapping[str, Mapping[str, Any]]]] = MappingProxyType(
    {
        "api": {
            "circuit_breaker": {"fail_max": 5, "timeout": 60.0},
            "retry": {"max_attempts": 3},
            "timeout": {"seconds": 30.0},
            "bulkhead": {"limit": 50, "max_queue": 100},
        },
        "ai": {
            "circuit_breaker": {"fail_max": 3, "timeout": 120.0},
            "retry": {
                "max_attempts": 3,
                "retry_on": "transient",
                "respect_retry_after": True,
                "idempotent": True,
            },
            "timeout": {"seconds": 120.0},
            "bulkhead": {"limit": 10, "max_queue": 50},
        },
        "database": {
            "circuit_breaker": {"fail_max": 10, "timeout": 30.0},
            "retry": {"max_attempts": 3},
            "timeout": {"seconds": 30.0},
            "bulkhead": {"limit": 100, "max_queue": 200},
        },
        "external": {
            "circuit_breaker": {"fail_max": 5, "timeout": 60.0},
            "retry": {"retry_on": "network"},
            "timeout": {"seconds": 15.0},
            "bulkhead": {"limit": 20, "max_queue": 50},
        },
        "critical": {
            "circuit_breaker": {"enabled": False},
            "retry": {"max_attempts": 5},
            "timeout": {"seconds": 60.0},
            "bulkhead": {"limit": 5, "max_queue": 10},
        },
    }
)


def options_model(pattern: str) -> type[Options]:
    """The options model of ``pattern`` (its fields are the keys of the pattern's section)."""
    try:
        return _OPTIONS[pattern]
    except KeyError:
        raise LookupError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}") from None


# --- the settings models ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Settings can only carry what a file or a variable can spell: retry_on is one of the two named
# predicates there, while code may also pass exception types or a callable.
_SETTINGS_OVERRIDES: Final[Mapping[tuple[str, str], tuple[Any, Any]]] = MappingProxyType(
    {
        ("retry", "retry_on"): (
            Literal["transient", "network"],
            Field(default="transient", description='"transient" (default) or "network"'),
        ),
    }
)


def _section_model(pattern: str) -> type[BaseModel]:
    """The settings section of ``pattern``: its options model minus the code-only fields.

    Field types and bounds are copied from the options model, so the two cannot drift. Its
    cross-field checks (``max_delay >= initial``...) run later, on the merged values, because a
    partial section (``initial`` here, ``max_delay`` in ``defaults``) is legitimately incomplete.
    """
    options = _OPTIONS[pattern]
    fields: dict[str, Any] = {}
    for name, info in options.model_fields.items():
        if name in options.code_only:
            continue
        fields[name] = _SETTINGS_OVERRIDES.get((pattern, name), (info.annotation, info))
    title = "".join(part.title() for part in pattern.split("_"))
    model: type[BaseModel] = create_model(
        f"{title}Settings",
        __base__=_Strict,
        __doc__=f"The ``{pattern}`` section of ``defaults`` and of ``services.<name>``.",
        **fields,
    )
    return model


SECTIONS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType(
    {pattern: _section_model(pattern) for pattern in PATTERNS}
)

# The section classes are built from the options models at import, which a type checker cannot
# follow; to it they are Any, to pydantic they are full models.
if TYPE_CHECKING:
    FallbackSettings: TypeAlias = Any
    CacheSettings: TypeAlias = Any
    CoalescingSettings: TypeAlias = Any
    RetrySettings: TypeAlias = Any
    HedgingSettings: TypeAlias = Any
    CircuitBreakerSettings: TypeAlias = Any
    AdaptiveThrottleSettings: TypeAlias = Any
    RateLimitSettings: TypeAlias = Any
    TimeoutSettings: TypeAlias = Any
    BulkheadSettings: TypeAlias = Any
    ChaosSettings: TypeAlias = Any
else:
    FallbackSettings = SECTIONS["fallback"]
    CacheSettings = SECTIONS["cache"]
    CoalescingSettings = SECTIONS["coalescing"]
    RetrySettings = SECTIONS["retry"]
    HedgingSettings = SECTIONS["hedging"]
    CircuitBreakerSettings = SECTIONS["circuit_breaker"]
    AdaptiveThrottleSettings = SECTIONS["adaptive_throttle"]
    RateLimitSettings = SECTIONS["rate_limit"]
    TimeoutSettings = SECTIONS["timeout"]
    BulkheadSettings = SECTIONS["bulkhead"]
    ChaosSettings = SECTIONS["chaos"]


class ServiceSettings(_Strict):
    """One service's flags and pattern sections (also the shape of ``defaults``)."""

    enabled: bool = Field(default=True, description="false: calls go straight to the function")
    mode: Mode = Field(
        default="enforce", description='"shadow": patterns only record what they would have done'
    )
    rollout: float = Field(
        default=1.0, ge=0, le=1, description="fraction of calls that get the patterns"
    )
    seed: int | None = Field(default=None, description="makes rollout sampling repeatable")
    criticality: Criticality = Field(
        default="normal", description="how much an unhealthy service degrades health()"
    )
    preset: PresetName | None = Field(default=None, description="a preset chosen by the operator")
    fallback: FallbackSettings = FallbackSettings()
    cache: CacheSettings = CacheSettings()
    coalescing: CoalescingSettings = CoalescingSettings()
    retry: RetrySettings = RetrySettings()
    hedging: HedgingSettings = HedgingSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    adaptive_throttle: AdaptiveThrottleSettings = AdaptiveThrottleSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    timeout: TimeoutSettings = TimeoutSettings()
    bulkhead: BulkheadSettings = BulkheadSettings()
    chaos: ChaosSettings = ChaosSettings()


FLAGS: Final = tuple(name for name in ServiceSettings.model_fields if name not in PATTERNS)


class Settings(BaseSettings):
    """The validated settings document: the environment merged over the config file.

    Build it with :func:`load_settings` (or read the current one with :func:`get_settings`): that
    function reads the ``BUTTRESS_*`` variables and the file, checks every key, records the source
    of every value, and validates the merged data here.
    """

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        validation_alias=AliasChoices(*KILL_SWITCH_VARIABLES, "enabled"),
        description="global kill switch: false sends every call straight to the function",
    )
    chaos_enabled: bool = Field(
        default=False,
        validation_alias=AliasChoices(CHAOS_VARIABLE, "chaos_enabled"),
        description="arms fault injection in this process; only its environment variable sets it",
    )
    defaults: ServiceSettings = ServiceSettings()
    services: dict[str, ServiceSettings] = Field(default_factory=dict)

    # Key path -> "env NAME" or "file PATH" for every value the sources gave.
    _sources: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)
    _config_file: str | None = PrivateAttr(None)
    # Seconds between two looks at _config_file, 0 for none (from BUTTRESS_CONFIG_WATCH_INTERVAL).
    _watch_interval: float = PrivateAttr(0.0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() has already read and merged the sources; validate exactly that.
        return (init_settings,)

    @property
    def config_file(self) -> str | None:
        """The config file these settings were read from, if any."""
        return self._config_file

    def source_of(self, path: tuple[str, ...]) -> str | None:
        """``env NAME`` or ``file PATH`` for the value at ``path``; ``None`` when none set it.

        For a group option (``retry.budget``), the sources of the keys set inside it.
        """
        found = self._sources.get(path)
        if found is None:
            inside = {label for key, label in self._sources.items() if key[: len(path)] == path}
            return ", ".join(sorted(inside)) or None
        return found


def nested_fields(annotation: Any) -> Mapping[str, Any] | None:
    """The fields of an option that is a group of its own (``retry.budget``), else ``None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_fields
    return None


def _set_values(model: BaseModel) -> dict[str, Any]:
    return {name: getattr(model, name) for name in model.model_fields_set}


def explicit(section: ServiceSettings, pattern: str) -> dict[str, Any]:
    """The keys of ``section.<pattern>`` that a source set (not the model's defaults).

    A group option (``retry.budget``) comes as a dict of the keys set inside it, so layers merge
    key by key.
    """
    model: BaseModel = getattr(section, pattern)
    return {
        name: _set_values(value) if isinstance(value, BaseModel) else value
        for name, value in _set_values(model).items()
    }


def merge_options(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Option values, later layers over earlier ones; a group option merges key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for name, given in layer.items():
            value = _set_values(given) if isinstance(given, BaseModel) else given
            below = merged.get(name)
            if isinstance(value, Mapping) and isinstance(below, Mapping):
                value = {**below, **value}
            merged[name] = value
    return merged


# --- code arguments ----------------------------------------------------------------------------


def _tuple_items(annotation: Any) -> tuple[Any, ...] | None:
    """The item types of the ``tuple[X, ...]`` that ``annotation`` admits (alone or in a union),
    each member of a union of items apart; ``None`` when it admits no tuple."""
    for member in typing.get_args(annotation) if _is_union(annotation) else (annotation,):
        if typing.get_origin(member) is tuple:
            item = typing.get_args(member)[0]
            return typing.get_args(item) if _is_union(item) else (item,)
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


# The shorthand forms code may give an option in, by the option's type (see code_arguments).
_Form = Literal["tuple", "exceptions", "group"]


def _code_form(annotation: Any) -> _Form | None:
    items = _tuple_items(annotation)
    if items is not None:
        return "exceptions" if any(typing.get_origin(item) is type for item in items) else "tuple"
    group = nested_fields(annotation)
    return "group" if group is not None and "enabled" in group else None


_CODE_FORMS: Final = MappingProxyType(
    {
        pattern: {
            name: form
            for name, info in _OPTIONS[pattern].model_fields.items()
            if (form := _code_form(info.annotation)) is not None
        }
        for pattern in PATTERNS
    }
)


def code_arguments(pattern: str, given: Mapping[str, Any]) -> tuple[dict[str, Any], Options]:
    """Code arguments of ``pattern`` as a spec keeps them, and the options they validate to.

    Code arguments are values of a typed Python API, validated in pydantic's strict mode: a
    number given as text, a bool for a number, or a float for an int is refused, where settings
    (text, from a variable or a file) are converted. Three shorthands are spelled out first, in
    a decorator's arguments and in the mappings of ``resilient()`` alike: a list stands for a
    tuple (``exclude=[KeyError]``), one exception class for a tuple of it
    (``retry_on=ConnectionError``), and ``False`` for a group option switched off
    (``budget=False``).

    Raises:
        pydantic.ValidationError: an argument is invalid (a ``ValueError``).
    """
    forms = _CODE_FORMS[pattern]
    args = dict(given)
    for name, value in args.items():
        form = forms.get(name)
        if form is None:
            continue
        if form == "group":
            if value is False:
                args[name] = {"enabled": False}
        elif isinstance(value, list):
            args[name] = tuple(value)
        elif form == "exceptions" and isinstance(value, type) and issubclass(value, BaseException):
            args[name] = (value,)
    options = options_model(pattern).model_validate(args, strict=True, context={CODE_CONTEXT: True})
    return args, options
