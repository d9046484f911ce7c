"""Reading the sources: the ``BUTTRESS_*`` variables and the config file, checked and merged.

pydantic-settings ignores a misspelled ``BUTTRESS_*`` variable and cannot say which source a bad
value came from, so this module reads both sources itself, checks every key against the models,
and keeps, for every value, the variable or file that set it; each error names the key path and
that source. A variable naming a whole section holds a JSON object; any other holds its value as
text, which the models convert (the same on every supported pydantic-settings version).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import tomllib
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

from pydantic import BaseModel, ValidationError

from buttress import registry
from buttress.config._models import (
    CONFIG_FILE_VARIABLE,
    DEFAULT_WATCH_INTERVAL,
    ENV_PREFIX,
    FLAGS,
    KILL_SWITCH_VARIABLES,
    OTHER_VARIABLES,
    PRESETS,
    SECTIONS,
    WATCH_INTERVAL_BOUNDS,
    WATCH_INTERVAL_VARIABLE,
    ServiceSettings,
    Settings,
    explicit,
    merge_options,
    options_model,
)
from buttress.exceptions import ConfigurationError
from buttress.patterns import PATTERNS
from buttress.patterns.chaos import KILL_SWITCH as CHAOS_VARIABLE


class Problem(NamedTuple):
    """One thing wrong with the settings: where, which source gave it, and what."""

    path: str
    source: str
    message: str


class _Key(NamedTuple):
    kind: Literal["value", "section", "bad"]
    depth: int = 0  # index of the offending part when bad
    message: str = ""
    table: type[BaseModel] | None = None  # a value that may also be this model's table
    annotation: Any = None  # a value's type


def _unknown(name: str, known: Iterator[str] | tuple[str, ...] | list[str]) -> str:
    choices = list(known)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(choices)}"
    return f"unknown key {name!r}{hint}"


def _classify(parts: tuple[str, ...]) -> _Key:
    """What the key path ``parts`` names in the settings document, or why it names nothing."""
    top = parts[0]
    if top in ("enabled", "chaos_enabled"):
        return (
            _Key("value", annotation=bool)
            if len(parts) == 1
            else _Key("bad", 1, f"{top!r} is a value")
        )
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
        if len(rest) > 1:
            return _Key("bad", offset + 1, f"{head!r} is a value")
        return _Key("value", annotation=ServiceSettings.model_fields[head].annotation)
    if head not in PATTERNS:
        return _Key("bad", offset, _unknown(head, [*FLAGS, *PATTERNS]))
    if len(rest) == 1:
        return _Key("section")
    option = rest[1]
    if option in options_model(head).code_only:
        return _Key(
            "bad",
            offset + 1,
            f"{head}.{option} can only be given in code (exception types or callables), "
            "not in a config file or an environment variable",
        )
    fields = SECTIONS[head].model_fields
    if option not in fields:
        return _Key("bad", offset + 1, _unknown(option, list(fields)))
    # An option may be a table of its own: a group (``retry.budget``), always a table, or a value
    # that may also be given as a table (``fallback.defer``: true, or its options).
    annotation = fields[option].annotation
    nested = _nested_model(annotation)
    if nested is None:
        if len(rest) > 2:
            return _Key("bad", offset + 2, f"{option!r} is a value")
        return _Key("value", annotation=annotation)
    if len(rest) == 2:
        if nested is annotation:
            return _Key("section")
        return _Key("value", table=nested, annotation=annotation)
    if rest[2] not in nested.model_fields:
        return _Key("bad", offset + 2, _unknown(rest[2], list(nested.model_fields)))
    if len(rest) > 3:
        return _Key("bad", offset + 3, f"{rest[2]!r} is a value")
    return _Key("value", annotation=nested.model_fields[rest[2]].annotation)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model ``annotation`` is, or the one among its types (``bool | DeferOptions``), if any."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a value of one of ``kinds`` is among the types ``annotation`` names."""
    if annotation in kinds:
        return True
    return any(_admits(arg, kinds) for arg in typing.get_args(annotation))


def _check_tree(
    tree: Mapping[str, Any],
    label_of: Callable[[tuple[str, ...]], str],
    problems: list[Problem],
    path: tuple[str, ...] = (),
) -> None:
    """Report every key of ``tree`` (at any depth) that the settings models do not know, and
    a boolean given for a number."""
    for key, value in tree.items():
        here = (*path, str(key))
        verdict = _classify(here)
        if verdict.kind == "bad":
            problems.append(Problem(".".join(here), label_of(here), verdict.message))
        elif (
            isinstance(value, bool)
            and _admits(verdict.annotation, (int, float))
            and not _admits(verdict.annotation, (bool,))
        ):
            # pydantic's lax mode reads true as 1: `fail_max = true` in a file (or a JSON
            # value) opened the circuit at the first failure. Text stays text ("true" is no
            # number), so only a file's or a JSON value's own booleans get here.
            problems.append(
                Problem(
                    ".".join(here), label_of(here), f"expected a number, not a boolean{_got(value)}"
                )
            )
        elif (verdict.kind == "section" or verdict.table) and isinstance(value, Mapping):
            _check_tree(value, label_of, problems, here)


def _leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        here = (*path, str(key))
        verdict = _classify(here)
        # A value given as a table (fallback.defer) has leaves too: its keys' own sources.
        if isinstance(value, Mapping) and value and (verdict.kind == "section" or verdict.table):
            yield from _leaves(value, here)
        else:
            yield here


def _normalise_services(raw: dict[str, Any], label: str, problems: list[Problem]) -> None:
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
                Problem(
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


def is_variable(name: str, variable: str) -> bool:
    """Whether the environment variable ``name`` is ``variable`` (an ASCII name), in any case.

    Only ASCII letters fold: ``str.upper()`` also turns ``ß`` into ``SS`` and the long s
    (U+017F) into ``S``, so a name no one meant as ours would be taken for it.
    """
    return name.isascii() and name.upper() == variable


def find_variable(environ: Mapping[str, str], variable: str) -> tuple[str, str] | None:
    """``(name, value)`` of ``variable`` in ``environ``, whatever case its name is spelled in."""
    return next(((k, v) for k, v in environ.items() if is_variable(k, variable)), None)


def variable_value(environ: Mapping[str, str], variable: str) -> str | None:
    """The value of ``variable`` in ``environ``, whatever case its name is spelled in."""
    found = find_variable(environ, variable)
    return None if found is None else found[1]


def _env_parts(name: str) -> tuple[str, ...] | None:
    if name.isascii():
        upper = name.upper()
        if upper in KILL_SWITCH_VARIABLES:
            return ("enabled",)
        if upper == CHAOS_VARIABLE:
            return ("chaos_enabled",)
        if upper in OTHER_VARIABLES:
            return None
    if is_variable(name[: len(ENV_PREFIX)], ENV_PREFIX):
        # The name as given, lower-cased as registry.service_name lowers a name in code:
        # upper-casing it first made BUTTRESS_SERVICES__STRAßE__... the service 'strasse',
        # which no call site of @resilient("Straße") (service 'straße') is.
        return tuple(name[len(ENV_PREFIX) :].lower().split("__"))
    return None


_CHAOS_ARMING: Final = f"only the environment variable {CHAOS_VARIABLE} arms fault injection"


def _read_env(
    environ: Mapping[str, str], problems: list[Problem]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The ``BUTTRESS_*`` variables as a nested dict, and the variable behind each value."""
    variables: dict[tuple[str, ...], str] = {}  # key path -> the variable that set it
    values: dict[tuple[str, ...], Any] = {}  # key path -> its value, a section's JSON decoded
    for name, value in environ.items():
        parts = _env_parts(name)
        if parts is None:
            continue
        label = f"env {name}"
        if parts == ("chaos_enabled",) and not is_variable(name, CHAOS_VARIABLE):
            problems.append(Problem("chaos_enabled", label, _CHAOS_ARMING))
            continue
        verdict = _classify(parts)
        if verdict.kind == "bad":
            message = _other_variable_hint(parts[0]) if verdict.depth == 0 else None
            problems.append(
                Problem(".".join(parts[: verdict.depth + 1]), label, message or verdict.message)
            )
            continue
        parsed: Any = value  # a value stays the string it is; the models convert it
        if verdict.kind == "section" or (verdict.table and value.lstrip().startswith("{")):
            # A variable that names a whole section holds it as a JSON object, and so may one
            # for a value that is true/false or a table (fallback.defer).
            parsed = _json_object(value)
            if parsed is None:
                problems.append(
                    Problem(".".join(parts), label, f"expected a JSON object{_got(value)}")
                )
                continue
        other = variables.get(parts)
        if other is not None:
            # Two variables for one key: the two kill switches, or one variable spelled in two
            # cases (the environment of a POSIX process may hold both). One is in force, the
            # FF_ kill switch first; they must not say different things.
            first, second = sorted((other, name), key=_precedence)
            if _disagree(parts, environ[first], environ[second]):
                message = (
                    "the kill switches disagree"
                    if first.upper() != second.upper()
                    else "set twice with different values (variable names are case-insensitive)"
                )
                problems.append(Problem(".".join(parts), f"env {first}, env {second}", message))
            if first == name:
                variables[parts] = name
                values[parts] = parsed
            continue
        variables[parts] = name
        values[parts] = parsed

    # Shallower paths go in first, so a variable for a key inside a section beats that key in
    # the section's JSON object whatever order the environment lists them in.
    raw: dict[str, Any] = {}
    for parts in sorted(values, key=len):
        nested = values[parts]
        for part in reversed(parts):
            nested = {part: nested}
        raw = _merge(raw, nested)
    _normalise_services(raw, "environment", problems)

    def label_of(path: tuple[str, ...]) -> str:
        for end in range(len(path), 0, -1):
            if path[:end] in variables:
                return f"env {variables[path[:end]]}"
        return "environment"

    _check_tree(raw, label_of, problems)
    return raw, {leaf: label_of(leaf) for leaf in _leaves(raw)}


def _precedence(name: str) -> tuple[int, str]:
    """Which of two variables for one key is in force: the FF_ kill switch, then by name."""
    upper = name.upper()
    rank = KILL_SWITCH_VARIABLES.index(upper) if upper in KILL_SWITCH_VARIABLES else 0
    return rank, name


def _disagree(parts: tuple[str, ...], one: str, other: str) -> bool:
    """Whether two values for the key ``parts`` differ (switches by their truth)."""
    if parts in (("enabled",), ("chaos_enabled",)):
        return truth(one) != truth(other)
    return one != other


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


def _json_object(text: str) -> dict[str, Any] | None:
    """``text`` decoded, when it is a JSON object; else ``None``."""
    try:
        decoded = json.loads(text)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def truth(text: str) -> bool | None:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on", "y", "t"}:
        return True
    if lowered in {"0", "false", "no", "off", "n", "f"}:
        return False
    return None


def read_file(
    path: Path, path_source: str, problems: list[Problem]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The config file as a nested dict, and the file as the source of each of its values."""
    label = f"file {path}"
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        problems.append(
            Problem("config_file", path_source, f"{path}: expected a .toml, .yaml or .yml file")
        )
        return {}, {}
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        problems.append(Problem("config_file", path_source, f"{path}: {what}"))
        return {}, {}
    raw: object
    try:
        if suffix == ".toml":
            # Read as written: pydantic-settings' TOML source renames keys to field aliases.
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raw = _read_yaml(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        problems.append(Problem("config_file", label, f"cannot be parsed: {exc}"))
        return {}, {}
    if not isinstance(raw, dict):
        problems.append(Problem("config_file", label, "the top level must be a mapping"))
        return {}, {}
    raw = {str(key): value for key, value in raw.items()}
    if "chaos_enabled" in raw:
        # A file that enables chaos for services must not also arm it: arming is per process.
        problems.append(Problem("chaos_enabled", label, _CHAOS_ARMING))
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
        loader = _unique_keys_loader()  # a SafeLoader: no tag builds an object
        return yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}  # noqa: S506
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


@functools.cache  # one class, made at the first YAML file read (PyYAML is optional)
def _unique_keys_loader() -> Any:
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    PyYAML keeps the last one silently: a service's ``circuit_breaker:`` written twice lost the
    first section, where TOML refuses the file.
    """
    import yaml  # noqa: PLC0415 - optional, and _read_yaml imported it already

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: the keys written after it override it, rightly
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    break  # refused below as PyYAML refuses it ("found unhashable key")
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


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
    problems: list[Problem] = []
    file_name, path_source = locate_file(environ, config_file)
    file_raw: dict[str, Any] = {}
    file_sources: dict[tuple[str, ...], str] = {}
    if file_name is not None:
        file_raw, file_sources = read_file(Path(file_name), path_source, problems)
    env_raw, env_sources = _read_env(environ, problems)
    watch_interval = _watch_interval(environ, problems)
    sources = {**file_sources, **env_sources}
    merged = _merge(file_raw, env_raw)

    reported = {problem.path for problem in problems}
    settings: Settings | None = None
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        for error in exc.errors():
            loc = _key_of(error)
            if loc is None:
                continue
            path = ".".join(loc)
            if path in reported:
                continue
            # One problem per key: a value refused by each type of a union (hedging.delay, a
            # number or a percentile) is reported by the first, the one its own type tried.
            reported.add(path)
            problems.append(Problem(path, _source_of_loc(loc, sources), error_message(error, path)))
    if settings is not None:
        problems.extend(_check_sections(settings, sources))
    if problems:
        raise configuration_error(problems)
    assert settings is not None  # noqa: S101 - no problems means it validated
    settings._sources = sources
    settings._config_file = file_name
    settings._watch_interval = watch_interval if file_name is not None else 0.0
    return settings


def _watch_interval(environ: Mapping[str, str], problems: list[Problem]) -> float:
    """Seconds between two looks at the config file: ``BUTTRESS_CONFIG_WATCH_INTERVAL``, 0 = off."""
    raw = variable_value(environ, WATCH_INTERVAL_VARIABLE)
    if raw is None or not raw.strip():
        return DEFAULT_WATCH_INTERVAL
    low, high = WATCH_INTERVAL_BOUNDS
    try:
        interval = float(raw)
    except ValueError:
        interval = -1.0
    if interval == 0 or low <= interval <= high:
        return interval
    problems.append(
        Problem(
            WATCH_INTERVAL_VARIABLE,
            f"env {WATCH_INTERVAL_VARIABLE}",
            f"must be 0 (do not follow the config file) or between {low:g} and {high:g} "
            f"seconds{_got(raw)}",
        )
    )
    return 0.0


def locate_file(
    environ: Mapping[str, str], config_file: str | os.PathLike[str] | None
) -> tuple[str | None, str]:
    """The config file to read (``None``: none), and what named it."""
    if config_file is not None:
        return os.fspath(config_file), "argument config_file"
    named = next(
        (v for k, v in environ.items() if is_variable(k, CONFIG_FILE_VARIABLE) and v), None
    )
    return named, f"env {CONFIG_FILE_VARIABLE}"


def _key_of(error: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The key path of a validation error, or ``None`` for an error no one needs to read.

    pydantic puts the member of a union that refused a value after the value's key
    (``hedging.delay.constrained-float``, ``fallback.defer.DeferOptions.max_items``): no key a
    user could write, so it is dropped. A value that may be a table (``fallback.defer``: true,
    or its options) is refused by each member: only the refusals of the kind given are kept
    (a table's keys; else the scalar's), not "should be a valid boolean" for a table.
    """
    parts = tuple(str(part) for part in error["loc"])
    for end in range(1, len(parts) + 1):
        verdict = _classify(parts[:end])
        if verdict.kind != "value":
            continue
        key, member = parts[:end], parts[end : end + 1]
        if verdict.table is None or not member:
            return key
        given_table = isinstance(error.get("input"), Mapping)
        if member[0] == verdict.table.__name__:
            inner = parts[end + 1 : end + 2]
            if not inner:  # the value itself refused as a table
                return key if given_table else None
            return (*key, *inner)
        return None if given_table else key
    return parts


def _source_of_loc(loc: tuple[int | str, ...], sources: Mapping[tuple[str, ...], str]) -> str:
    path = tuple(str(part) for part in loc)
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
    below = sorted({label for key, label in sources.items() if key[: len(path)] == path})
    return ", ".join(below) if below else "default"


def error_message(error: Mapping[str, Any], path: str) -> str:
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


def _check_sections(settings: Settings, sources: Mapping[tuple[str, ...], str]) -> list[Problem]:
    """Validate each section's merged values against the full options model (cross-field rules).

    Code arguments are not known here; these checks use what settings and the chosen preset give
    over the built-in defaults, so a file that sets ``initial = 60`` must also raise ``max_delay``.
    """
    problems: list[Problem] = []
    failed_defaults: set[str] = set()
    names = [("defaults", ("defaults",)), *((n, ("services", n)) for n in settings.services)]
    for name, prefix in names:
        section = settings.defaults if name == "defaults" else settings.services[name]
        preset = (
            section.preset if "preset" in section.model_fields_set else settings.defaults.preset
        )
        for pattern in PATTERNS:
            inherited = explicit(settings.defaults, pattern)
            own = explicit(section, pattern)
            values = merge_options(
                PRESETS[preset].get(pattern, {}) if preset else {}, inherited, own
            )
            try:
                options_model(pattern).model_validate(values)
            except ValidationError as exc:
                if name == "defaults":
                    failed_defaults.add(pattern)
                elif not own and pattern in failed_defaults:
                    continue  # the defaults alone are wrong: reported once, there
                keys: list[tuple[str, ...]] = [("defaults", pattern, f) for f in inherited]
                keys += [(*prefix, pattern, f) for f in own]
                labels = sorted({sources[key] for key in keys if key in sources})
                source = ", ".join(labels) if labels else f"preset {preset}"
                seen: set[str] = set()
                for error in exc.errors():
                    loc = _key_of({**error, "loc": (*prefix, pattern, *error["loc"])})
                    if loc is None or ".".join(loc) in seen:
                        continue  # one problem per key, as in load_settings
                    path = ".".join(loc)
                    seen.add(path)
                    problems.append(Problem(path, source, error_message(error, path)))
    return problems


def configuration_error(problems: list[Problem]) -> ConfigurationError:
    unique = list(dict.fromkeys(problems))
    noun = "problem" if len(unique) == 1 else "problems"
    lines = [f"invalid buttress settings ({len(unique)} {noun}):"]
    lines.extend(f"  {p.path or '<root>'} (from {p.source}): {p.message}" for p in unique)
    return ConfigurationError("\n".join(lines), errors=tuple(unique))
