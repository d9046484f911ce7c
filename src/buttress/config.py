"""Settings and feature flags, read when a call happens.

Where a value comes from, strongest first (design section 4)::

    environment  >  config file  >  code arguments  >  preset  >  built-in default

The environment and the file are *settings*: pydantic-settings' environment source reads the
``BUTTRESS_*`` variables, the file named by ``BUTTRESS_CONFIG_FILE`` (TOML or YAML) is read as
written, and the two merge, key by key, into one :class:`Settings` document with a ``defaults``
section and one ``services.<name>`` section per service. Within settings a service's
own section deep-merges onto ``defaults``, so a service key beats a ``defaults`` key whichever of
the two sources each came from. Code arguments are the keyword arguments of the decorators; a
preset (``api``, ``ai``, ``database``, ``external``, ``critical``) is named in code or in settings.

The rest of buttress reads one immutable :class:`Snapshot`, ``config.SNAPSHOT``, on every call;
``reload_settings()`` validates new settings completely and then replaces the snapshot in one
assignment, so a call sees either the old settings or the new ones, never a mix. The first snapshot
is loaded on first use, not at import, so a bad variable cannot make ``import buttress`` (or
``python -m buttress config check``) fail. Invalid settings then fail every protected call, except
while the kill switch reads off: the settings in force are then the switch alone, and calls go
straight to their functions (an emergency switch that a typo elsewhere could block would not be
one).

pydantic-settings ignores a misspelled ``BUTTRESS_*`` variable and cannot say which source a bad
value came from, so this module checks every key against the models itself and keeps, for every
value, the variable or file that set it; each error names the key path and that source.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import os
import random
import threading
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeAlias

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from buttress import events, registry
from buttress._values import redact, shown
from buttress.exceptions import ConfigurationError
from buttress.patterns._base import Options
from buttress.patterns.bulkhead import BulkheadOptions
from buttress.patterns.chaos import KILL_SWITCH as CHAOS_VARIABLE
from buttress.patterns.chaos import ChaosOptions
from buttress.patterns.circuit_breaker import CircuitBreakerOptions
from buttress.patterns.fallback import FallbackOptions
from buttress.patterns.rate_limit import RateLimitOptions
from buttress.patterns.retry import RetryOptions
from buttress.patterns.timeout import TimeoutOptions

__all__ = [
    "ADMIN_TOKEN_VARIABLE",
    "CHAOS_VARIABLE",
    "CONFIG_FILE_VARIABLE",
    "FLAGS",
    "KILL_SWITCH_VARIABLES",
    "OTHER_VARIABLES",
    "PATTERNS",
    "PRESETS",
    "SECTIONS",
    "SNAPSHOT",
    "ServiceSettings",
    "ServiceView",
    "Settings",
    "Snapshot",
    "describe",
    "get_settings",
    "load_settings",
    "options_model",
    "redact",
    "reload_settings",
    "resolve",
]

# Canonical order, outermost first (design section 3); chaos sits innermost, around the call.
PATTERNS: Final = (
    "fallback",
    "retry",
    "circuit_breaker",
    "rate_limit",
    "timeout",
    "bulkhead",
    "chaos",
)

_OPTIONS: Final[Mapping[str, type[Options]]] = MappingProxyType(
    {
        "fallback": FallbackOptions,
        "retry": RetryOptions,
        "circuit_breaker": CircuitBreakerOptions,
        "rate_limit": RateLimitOptions,
        "timeout": TimeoutOptions,
        "bulkhead": BulkheadOptions,
        "chaos": ChaosOptions,
    }
)

ENV_PREFIX: Final = "BUTTRESS_"
CONFIG_FILE_VARIABLE: Final = "BUTTRESS_CONFIG_FILE"
ADMIN_TOKEN_VARIABLE: Final = "BUTTRESS_ADMIN_TOKEN"  # noqa: S105 - a variable's name, not a token
KILL_SWITCH_VARIABLES: Final = ("FF_ENABLE_RESILIENCE_PATTERNS", "BUTTRESS_ENABLED")
# The BUTTRESS_* variables buttress reads that name no settings key, and what reads them: the
# settings check accepts exactly these besides the keys, so a typo in any other is still caught.
# A new variable read anywhere in buttress belongs here (tests/test_flags.py checks the source).
OTHER_VARIABLES: Final[Mapping[str, str]] = MappingProxyType(
    {
        CONFIG_FILE_VARIABLE: "the config file to read",
        ADMIN_TOKEN_VARIABLE: "the health app's admin token (buttress.health_app)",
    }
)

_log = logging.getLogger("buttress.config")

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
    RetrySettings: TypeAlias = Any
    CircuitBreakerSettings: TypeAlias = Any
    RateLimitSettings: TypeAlias = Any
    TimeoutSettings: TypeAlias = Any
    BulkheadSettings: TypeAlias = Any
    ChaosSettings: TypeAlias = Any
else:
    FallbackSettings = SECTIONS["fallback"]
    RetrySettings = SECTIONS["retry"]
    CircuitBreakerSettings = SECTIONS["circuit_breaker"]
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
    retry: RetrySettings = RetrySettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    timeout: TimeoutSettings = TimeoutSettings()
    bulkhead: BulkheadSettings = BulkheadSettings()
    chaos: ChaosSettings = ChaosSettings()


FLAGS: Final = tuple(name for name in ServiceSettings.model_fields if name not in PATTERNS)


class Settings(BaseSettings):
    """The validated settings document: the environment merged over the config file.

    Build it with :func:`load_settings` (or read the current one with :func:`get_settings`): that
    function runs pydantic-settings' environment source over this class's configuration, reads the
    file, checks every key, records the source of every value, and validates the merged data here.

    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

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
        """``env NAME`` or ``file PATH`` for the value at ``path``; ``None`` when none set it."""
        return self._sources.get(path)


# --- reading the sources ---------------------------------------------------------------------


class _Problem(NamedTuple):
    path: str
    source: str
    message: str


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over an explicit mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


class _Key(NamedTuple):
    kind: Literal["value", "section", "bad"]
    depth: int = 0  # index of the offending part when bad
    message: str = ""


def _unknown(name: str, known: Iterator[str] | tuple[str, ...] | list[str]) -> str:
    choices = list(known)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(choices)}"
    return f"unknown key {name!r}{hint}"


def _classify(parts: tuple[str, ...]) -> _Key:
    """What the key path ``parts`` names in the settings document, or why it names nothing."""
    top = parts[0]
    if top in ("enabled", "chaos_enabled"):
        return _Key("value") if len(parts) == 1 else _Key("bad", 1, f"{top!r} is a value")
    if top not in ("defaults", "services"):
        return _Key("bad", 0, _unknown(top, ["enabled", "defaults", "services"]))
    offset = 1
    if top == "services":
        if len(parts) == 1:
            return _Key("section")
        if not parts[1]:
            return _Key("bad", 1, "empty service name")
        offset = 2
    rest = parts[offset:]
    if not rest:
        return _Key("section")
    head = rest[0]
    if head in FLAGS:
        return _Key("value") if len(rest) == 1 else _Key("bad", offset + 1, f"{head!r} is a value")
    if head not in PATTERNS:
        return _Key("bad", offset, _unknown(head, [*FLAGS, *PATTERNS]))
    if len(rest) == 1:
        return _Key("section")
    option = rest[1]
    if option in _OPTIONS[head].code_only:
        return _Key(
            "bad",
            offset + 1,
            f"{head}.{option} can only be given in code (exception types or callables), "
            "not in a config file or an environment variable",
        )
    fields = SECTIONS[head].model_fields
    if option not in fields:
        return _Key("bad", offset + 1, _unknown(option, list(fields)))
    if len(rest) > 2:
        return _Key("bad", offset + 2, f"{option!r} is a value")
    return _Key("value")


def _check_tree(
    tree: Mapping[str, Any],
    label_of: Callable[[tuple[str, ...]], str],
    problems: list[_Problem],
    path: tuple[str, ...] = (),
) -> None:
    """Report every key of ``tree`` (at any depth) that the settings models do not know."""
    for key, value in tree.items():
        here = (*path, str(key))
        verdict = _classify(here)
        if verdict.kind == "bad":
            problems.append(_Problem(".".join(here), label_of(here), verdict.message))
        elif verdict.kind == "section" and isinstance(value, Mapping):
            _check_tree(value, label_of, problems, here)


def _leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        here = (*path, str(key))
        if isinstance(value, Mapping) and value and _classify(here).kind == "section":
            yield from _leaves(value, here)
        else:
            yield here


def _normalise_services(raw: dict[str, Any], label: str, problems: list[_Problem]) -> None:
    """Lower-case service names in place: ``[services.OpenFGA]`` and ``..__OPENFGA__..`` meet."""
    services = raw.get("services")
    if not isinstance(services, Mapping):
        return
    normalised: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for name, section in services.items():
        key = registry.service_name(str(name))
        if key in normalised:
            problems.append(
                _Problem(
                    f"services.{key}",
                    label,
                    f"service defined twice, as {spelled[key]!r} and {name!r} "
                    "(service names are case-insensitive)",
                )
            )
            continue
        normalised[key] = section
        spelled[key] = str(name)
    raw["services"] = normalised


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def _env_parts(name: str) -> tuple[str, ...] | None:
    upper = name.upper()
    if upper in KILL_SWITCH_VARIABLES:
        return ("enabled",)
    if upper == CHAOS_VARIABLE:
        return ("chaos_enabled",)
    if upper.startswith(ENV_PREFIX) and upper not in OTHER_VARIABLES:
        return tuple(upper[len(ENV_PREFIX) :].lower().split("__"))
    return None


_CHAOS_ARMING: Final = f"only the environment variable {CHAOS_VARIABLE} arms fault injection"


def _read_env(
    environ: Mapping[str, str], problems: list[_Problem]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The ``BUTTRESS_*`` variables as a nested dict, and the variable behind each value."""
    accepted: dict[str, str] = {}
    variables: dict[tuple[str, ...], str] = {}  # key path -> the variable that set it
    for name, value in environ.items():
        parts = _env_parts(name)
        if parts is None:
            continue
        label = f"env {name}"
        if parts == ("chaos_enabled",) and name.upper() != CHAOS_VARIABLE:
            problems.append(_Problem("chaos_enabled", label, _CHAOS_ARMING))
            continue
        verdict = _classify(parts)
        if verdict.kind == "bad":
            message = _other_variable_hint(parts[0]) if verdict.depth == 0 else None
            problems.append(
                _Problem(".".join(parts[: verdict.depth + 1]), label, message or verdict.message)
            )
            continue
        if verdict.kind == "section" and not _is_json_object(value):
            # pydantic-settings parses a variable that names a whole section as JSON.
            problems.append(
                _Problem(".".join(parts), label, f"expected a JSON object{_got(value)}")
            )
            continue
        other = variables.get(parts)
        if other is not None:
            # Only the two kill switches name the same key; the FF_ variable is the one in force.
            first, second = sorted(
                (other, name), key=lambda n: KILL_SWITCH_VARIABLES.index(n.upper())
            )
            if _truth(environ[first]) != _truth(environ[second]):
                problems.append(
                    _Problem("enabled", f"env {first}, env {second}", "the kill switches disagree")
                )
            del accepted[other]
            variables[parts] = first
            accepted[first] = environ[first]
            continue
        variables[parts] = name
        accepted[name] = value

    try:
        raw = dict(_EnvSource(Settings, accepted)())
    except SettingsError as exc:  # pragma: no cover - the checks above leave nothing it rejects
        problems.append(_Problem("", "environment", str(exc)))
        return {}, {}
    for key in list(raw):
        if key.upper() in KILL_SWITCH_VARIABLES:
            raw["enabled"] = raw.pop(key)
        elif key.upper() == CHAOS_VARIABLE:
            raw["chaos_enabled"] = raw.pop(key)
    _normalise_services(raw, "environment", problems)

    def label_of(path: tuple[str, ...]) -> str:
        for end in range(len(path), 0, -1):
            if path[:end] in variables:
                return f"env {variables[path[:end]]}"
        return "environment"

    _check_tree(raw, label_of, problems)
    return raw, {leaf: label_of(leaf) for leaf in _leaves(raw)}


def _other_variable_hint(top: str) -> str | None:
    """A message for a misspelt non-settings variable (``BUTTRESS_ADMIN_TOKN``), else ``None``."""
    others = {name[len(ENV_PREFIX) :].lower(): name for name in OTHER_VARIABLES}
    close = difflib.get_close_matches(top, [*others, "enabled", "defaults", "services"], n=1)
    if close and close[0] in others:
        return f"unknown key {top!r}; did you mean the variable {others[close[0]]}?"
    return None


def _got(value: object) -> str:
    """`` (got VALUE)`` for an error message; nothing for a URL, which may hold a password."""
    if isinstance(value, str) and "://" in value:
        return " (the value is not repeated: it looks like a URL, which may hold a password)"
    return f" (got {value!r})"


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _truth(text: str) -> bool | None:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on", "y", "t"}:
        return True
    if lowered in {"0", "false", "no", "off", "n", "f"}:
        return False
    return None


def _read_file(
    path: Path, path_source: str, problems: list[_Problem]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The config file as a nested dict, and the file as the source of each of its values."""
    label = f"file {path}"
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        problems.append(
            _Problem("config_file", path_source, f"{path}: expected a .toml, .yaml or .yml file")
        )
        return {}, {}
    if not path.is_file():
        problems.append(_Problem("config_file", path_source, f"{path}: no such file"))
        return {}, {}
    raw: object
    try:
        if suffix == ".toml":
            # Read as written: pydantic-settings' TOML source renames keys to field aliases.
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raw = _read_yaml(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        problems.append(_Problem("config_file", label, f"cannot be parsed: {exc}"))
        return {}, {}
    if not isinstance(raw, dict):
        problems.append(_Problem("config_file", label, "the top level must be a mapping"))
        return {}, {}
    raw = {str(key): value for key, value in raw.items()}
    if "chaos_enabled" in raw:
        # A file that enables chaos for services must not also arm it: arming is per process.
        problems.append(_Problem("chaos_enabled", label, _CHAOS_ARMING))
        del raw["chaos_enabled"]
    _normalise_services(raw, label, problems)
    _check_tree(raw, lambda _path: label, problems)
    return raw, dict.fromkeys(_leaves(raw), label)


def _read_yaml(path: Path) -> object:
    try:
        import yaml  # noqa: PLC0415 - optional dependency, needed only for YAML files
    except ImportError:
        raise ValueError("YAML files need PyYAML: pip install 'buttress[yaml]'") from None
    try:
        # YamlConfigSettingsSource would turn an empty or non-mapping document into {} silently.
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def load_settings(
    env: Mapping[str, str] | None = None, config_file: str | os.PathLike[str] | None = None
) -> Settings:
    """Read, check and validate settings without installing them.

    Args:
        env: the environment variables to read (default ``os.environ``).
        config_file: the TOML or YAML file (default: ``BUTTRESS_CONFIG_FILE`` from ``env``; none
            when that is unset).

    Raises:
        ConfigurationError: every problem found, each with its key path and source.
    """
    environ = os.environ if env is None else env
    problems: list[_Problem] = []
    file_name, path_source = _file_name(environ, config_file)
    file_raw: dict[str, Any] = {}
    file_sources: dict[tuple[str, ...], str] = {}
    if file_name is not None:
        file_raw, file_sources = _read_file(Path(file_name), path_source, problems)
    env_raw, env_sources = _read_env(environ, problems)
    sources = {**file_sources, **env_sources}
    merged = _merge(file_raw, env_raw)

    reported = {problem.path for problem in problems}
    settings: Settings | None = None
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        for error in exc.errors():
            path = ".".join(str(part) for part in error["loc"])
            if path in reported:
                continue
            problems.append(
                _Problem(path, _source_of_loc(error["loc"], sources), _message(error, path))
            )
    if settings is not None:
        problems.extend(_check_sections(settings, sources))
    if problems:
        raise _configuration_error(problems)
    assert settings is not None  # noqa: S101 - no problems means it validated
    settings._sources = sources
    settings._config_file = file_name
    return settings


def _file_name(
    environ: Mapping[str, str], config_file: str | os.PathLike[str] | None
) -> tuple[str | None, str]:
    """The config file to read (``None``: none), and what named it."""
    if config_file is not None:
        return os.fspath(config_file), "argument config_file"
    named = next((v for k, v in environ.items() if k.upper() == CONFIG_FILE_VARIABLE and v), None)
    return named, f"env {CONFIG_FILE_VARIABLE}"


def _switched_off(
    env: Mapping[str, str] | None, config_file: str | os.PathLike[str] | None
) -> Settings | None:
    """The kill switch alone, when the sources that failed to load still turn it off clearly.

    Invalid settings must never stop ``FF_ENABLE_RESILIENCE_PATTERNS=false`` from working: the
    switch is read the way the settings would read it (a kill switch variable, the FF_ one
    first, else ``enabled`` at the top of the config file) and, when it says off, the settings in
    force are "off" and nothing else. ``None`` when the switch is on, unset or unreadable.
    """
    environ = os.environ if env is None else env
    for variable in KILL_SWITCH_VARIABLES:
        for name, value in environ.items():
            if name.upper() == variable:
                return _off(f"env {name}") if _truth(value) is False else None
    file_name, path_source = _file_name(environ, config_file)
    if file_name is not None:
        raw, _ = _read_file(Path(file_name), path_source, [])
        if raw.get("enabled") is False:
            return _off(f"file {file_name}")
    return None


def _off(source: str) -> Settings:
    settings = Settings(enabled=False)
    settings._sources = {("enabled",): source}
    return settings


def _source_of_loc(loc: tuple[int | str, ...], sources: Mapping[tuple[str, ...], str]) -> str:
    path = tuple(str(part) for part in loc)
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
    below = sorted({label for key, label in sources.items() if key[: len(path)] == path})
    return ", ".join(below) if below else "default"


def _message(error: Mapping[str, Any], path: str) -> str:
    message = str(error["msg"])
    if error.get("type") == "value_error":
        message = message.removeprefix("Value error, ")
    value = error.get("input")
    if path.endswith("state_url"):
        # A rejected state_url is not shown at all: it may be a secret in the wrong place.
        return message
    if isinstance(value, str | int | float | bool) and error.get("type") != "extra_forbidden":
        message += _got(value)
    return message


def _check_sections(settings: Settings, sources: Mapping[tuple[str, ...], str]) -> list[_Problem]:
    """Validate each section's merged values against the full options model (cross-field rules).

    Code arguments are not known here; these checks use what settings and the chosen preset give
    over the built-in defaults, so a file that sets ``initial = 60`` must also raise ``max_delay``.
    """
    problems: list[_Problem] = []
    failed_defaults: set[str] = set()
    names = [("defaults", ("defaults",)), *((n, ("services", n)) for n in settings.services)]
    for name, prefix in names:
        section = settings.defaults if name == "defaults" else settings.services[name]
        preset = (
            section.preset if "preset" in section.model_fields_set else settings.defaults.preset
        )
        for pattern in PATTERNS:
            inherited = _explicit(settings.defaults, pattern)
            own = _explicit(section, pattern)
            values = {**(PRESETS[preset].get(pattern, {}) if preset else {}), **inherited, **own}
            try:
                _OPTIONS[pattern].model_validate(values)
            except ValidationError as exc:
                if name == "defaults":
                    failed_defaults.add(pattern)
                elif not own and pattern in failed_defaults:
                    continue  # the defaults alone are wrong: reported once, there
                keys: list[tuple[str, ...]] = [("defaults", pattern, f) for f in inherited]
                keys += [(*prefix, pattern, f) for f in own]
                labels = sorted({sources[key] for key in keys if key in sources})
                source = ", ".join(labels) if labels else f"preset {preset}"
                for error in exc.errors():
                    path = ".".join((*prefix, pattern, *(str(part) for part in error["loc"])))
                    problems.append(_Problem(path, source, _message(error, path)))
    return problems


def _explicit(section: ServiceSettings, pattern: str) -> dict[str, Any]:
    """The keys of ``section.<pattern>`` that a source set (not the model's defaults)."""
    model: BaseModel = getattr(section, pattern)
    return {name: getattr(model, name) for name in model.model_fields_set}


def _configuration_error(problems: list[_Problem]) -> ConfigurationError:
    unique = list(dict.fromkeys(problems))
    noun = "problem" if len(unique) == 1 else "problems"
    lines = [f"invalid buttress settings ({len(unique)} {noun}):"]
    lines.extend(f"  {p.path or '<root>'} (from {p.source}): {p.message}" for p in unique)
    return ConfigurationError("\n".join(lines), errors=tuple(unique))


# --- the per-call view -----------------------------------------------------------------------

# A value and where it came from: "env NAME", "file PATH", "code", "preset NAME" or "default".
Sourced = tuple[Any, str]

# Resolved options kept per service view (see ServiceView.options). Options are resolved when a
# decorated function first runs after a reload, not per call, so a miss costs one validation.
CACHE_SIZE: Final = 256


class ServiceView:
    """The flags and resolved options of one service in one snapshot.

    The flags are plain attributes and ``sample`` is a precomputed callable, so reading them on
    every call costs a few attribute loads and allocates nothing.

    Attributes:
        name: the service name, lower-cased.
        enabled: ``False`` when settings switch the service off (calls go straight through).
        mode: ``"enforce"``, or ``"shadow"`` (patterns record what they would do, and do nothing).
        rollout: the fraction of calls that get the patterns.
        criticality: ``low``, ``normal``, ``high`` or ``critical``; weighs the service in health.
        sample: ``sample() -> bool``: does this call get the patterns? Deterministic per snapshot
            when a ``seed`` is configured.
    """

    __slots__ = (
        "_cache",
        "_cache_lock",
        "_flag_sources",
        "_layers",
        "criticality",
        "enabled",
        "mode",
        "name",
        "preset",
        "rollout",
        "sample",
        "seed",
    )

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        own = settings.services.get(name)
        defaults = settings.defaults
        self._flag_sources: dict[str, Sourced] = {}
        for flag in FLAGS:
            if own is not None and flag in own.model_fields_set:
                value = getattr(own, flag)
                source = settings.source_of(("services", name, flag)) or "default"
            elif flag in defaults.model_fields_set:
                value = getattr(defaults, flag)
                source = _via_defaults(settings.source_of(("defaults", flag)))
            else:
                value = ServiceSettings.model_fields[flag].default
                source = "default"
            self._flag_sources[flag] = (value, source)
        self.enabled: bool = self._flag_sources["enabled"][0]
        self.mode: Mode = self._flag_sources["mode"][0]
        self.rollout: float = self._flag_sources["rollout"][0]
        self.seed: int | None = self._flag_sources["seed"][0]
        self.criticality: Criticality = self._flag_sources["criticality"][0]
        self.preset: str | None = self._flag_sources["preset"][0]
        self.sample: Callable[[], bool] = _sampler(self.rollout, self.seed)

        # Per pattern: the keys settings set, service section over defaults.
        self._layers: dict[str, dict[str, Sourced]] = {}
        for pattern in PATTERNS:
            layer: dict[str, Sourced] = {}
            for field, value in _explicit(defaults, pattern).items():
                default_source = settings.source_of(("defaults", pattern, field))
                layer[field] = (value, _via_defaults(default_source))
            if own is not None:
                for field, value in _explicit(own, pattern).items():
                    source = settings.source_of(("services", name, pattern, field)) or "default"
                    layer[field] = (value, source)
            self._layers[pattern] = layer
        # Resolved options by (pattern, preset, code arguments): least recently used first, and
        # at most CACHE_SIZE of them, since a function decorated per request with its own
        # arguments (with_timeout(seconds=budget)) would otherwise add one per request.
        self._cache: OrderedDict[Any, Options] = OrderedDict()
        self._cache_lock = threading.Lock()

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
            key: Any = (pattern, preset, frozenset(code_args.items()))
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
                    "value": shown(getattr(resolved, field)),
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
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if chosen is not None:
            for field, value in PRESETS[chosen].get(pattern, {}).items():
                values[field] = value
                sources[field] = f"preset {chosen}"
        for field, value in code_args.items():
            values[field] = value
            sources[field] = "code"
        for field, (value, source) in self._layers[pattern].items():
            values[field] = value
            sources[field] = source
        try:
            return model.model_validate(values), sources
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                fields = [str(part) for part in error["loc"]] or sorted(sources)
                path = ".".join(["services", self.name, pattern, *map(str, error["loc"])])
                labels = sorted({sources.get(f, "default") for f in fields})
                problems.append(_Problem(path, ", ".join(labels), _message(error, path)))
            raise _configuration_error(problems) from None


def _via_defaults(source: str | None) -> str:
    return f"{source} (defaults)" if source else "default"


def _sampler(rollout: float, seed: int | None) -> Callable[[], bool]:
    if rollout >= 1.0:
        return itertools.repeat(
            object=True
        ).__next__  # a C-level call: the common case costs ~nothing
    if rollout <= 0.0:
        return itertools.repeat(object=False).__next__
    draw = random.Random(seed).random if seed is not None else random.random

    def sample() -> bool:
        return draw() < rollout

    return sample


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


# --- the current snapshot --------------------------------------------------------------------

SNAPSHOT: Snapshot  # assigned on first access (see __getattr__) and by reload_settings()
_lock = threading.Lock()
_generations = itertools.count()


def __getattr__(name: str) -> Snapshot:
    # PEP 562: reached only until SNAPSHOT exists as a module global; after that the attribute is
    # an ordinary global and this costs nothing.
    if name != "SNAPSHOT":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _current()


def _current() -> Snapshot:
    snapshot: Snapshot | None = globals().get("SNAPSHOT")
    if snapshot is not None:
        return snapshot
    with _lock:
        loaded: Snapshot | None = globals().get("SNAPSHOT")
        error: ConfigurationError | None = None
        if loaded is None:
            settings, error = _load(None, None)
            if settings is None:
                assert error is not None  # noqa: S101 - _load gives settings, an error, or both
                raise error
            loaded = Snapshot(next(_generations), settings)
            globals()["SNAPSHOT"] = loaded
    if error is not None:
        _warn_switched_off(error)  # outside the lock: a log handler may read the settings
    return loaded


def _load(
    env: Mapping[str, str] | None, config_file: str | os.PathLike[str] | None
) -> tuple[Settings | None, ConfigurationError | None]:
    """The settings to put in force, and the error that made them the kill switch alone."""
    try:
        return load_settings(env, config_file), None
    except ConfigurationError as exc:
        return _switched_off(env, config_file), exc


def _warn_switched_off(error: ConfigurationError) -> None:
    # Once per load (the first, or a reload): calls go straight through, so nothing else says it.
    _log.warning(
        "buttress.settings.invalid_while_switched_off: the kill switch is off, so every call "
        "goes straight to its function; the settings are invalid and were not applied:\n%s",
        error,
    )


def get_settings() -> Settings:
    """The settings in force (loaded from the environment and file on first use).

    Raises:
        ConfigurationError: the settings are invalid; never while the kill switch is off, when
            the settings in force are the switch alone (and a warning is logged).
    """
    return _current().settings


def reload_settings(
    *, env: Mapping[str, str] | None = None, config_file: str | os.PathLike[str] | None = None
) -> Settings:
    """Read settings again, validate them, and swap them in atomically.

    The next call through any decorator obeys the new settings; nothing is re-decorated.
    Emits :class:`buttress.events.SettingsReloaded` either way: on success with the new
    generation, on failure with the generation still in force (``-1`` if none was loaded yet).

    Args:
        env: the environment variables to read (default ``os.environ``).
        config_file: the config file (default ``BUTTRESS_CONFIG_FILE`` from ``env``).

    Raises:
        ConfigurationError: the new settings are invalid; the old ones stay in force, unless the
            new sources turn the kill switch off: the switch then takes effect on its own.
    """
    global SNAPSHOT
    with _lock:
        settings, error = _load(env, config_file)
        if settings is not None:
            SNAPSHOT = Snapshot(next(_generations), settings)
        current: Snapshot | None = globals().get("SNAPSHOT")
    generation = current.generation if current is not None else -1
    if error is not None:
        if settings is not None:
            _warn_switched_off(error)
        events.emit(events.SettingsReloaded(ok=False, generation=generation, error=str(error)))
        raise error
    assert settings is not None  # noqa: S101 - no error means it loaded
    events.emit(events.SettingsReloaded(ok=True, generation=generation, error=None))
    return settings


def resolve(
    service: str,
    pattern: str,
    code_args: Mapping[str, Any] | None = None,
    preset: str | None = None,
) -> Options:
    """The options ``pattern`` of ``service`` resolves to now, for given code arguments."""
    return _current().service(service).options(pattern, code_args or {}, preset)


def describe(settings: Settings | None = None, service: str | None = None) -> dict[str, Any]:
    """The effective settings of every configured service (or one), with the source of each value.

    Code arguments are not visible here (they live in the application's code); values they would
    override show their settings, preset or default source. Secrets in URLs are redacted.
    """
    settings = settings if settings is not None else get_settings()
    kill_switch = settings.source_of(("enabled",)) or "default"
    described: dict[str, Any] = {
        "config_file": settings.config_file,
        "enabled": {"value": settings.enabled, "source": kill_switch},
    }
    if service is None:
        # "*" is no configured service, so its view is exactly what defaults give.
        described["defaults"] = ServiceView("*", settings).explain()
        names = sorted(settings.services)
    else:
        names = [registry.service_name(service)]
    described["services"] = {name: ServiceView(name, settings).explain() for name in names}
    return described
