"""Settings errors name the key a user wrote, once, with its source.

pydantic reports a value refused by a union once per member, under member tags no one can write
(``hedging.delay.constrained-float``, ``fallback.defer.DeferOptions.max_items``); and its lax mode
reads a file's ``true`` as the number 1. A value that may be ``true`` or a table
(``fallback.defer``) is a table in an environment variable too, as a JSON object.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from buttress import ConfigurationError, config


def problems(tmp_path: Path, toml: str | None = None, **env: str) -> list[tuple[str, str, str]]:
    """The ``(key path, source, message)`` of every problem of these settings ([] if none)."""
    file = None
    if toml is not None:
        file = tmp_path / "buttress.toml"
        file.write_text(toml)
    try:
        config.load_settings(env=env, config_file=file)
    except ConfigurationError as exc:
        return [tuple(error) for error in exc.errors]  # type: ignore[misc]
    return []


def test_a_number_refused_by_a_union_is_one_problem_at_its_key(tmp_path: Path) -> None:
    [(path, source, message)] = problems(
        tmp_path, "[services.x.hedging]\ndelay = -1\nidempotent = true\n"
    )
    assert (path, source) == ("services.x.hedging.delay", f"file {tmp_path / 'buttress.toml'}")
    assert "greater than or equal to 0.001" in message


def test_the_same_from_a_variable(tmp_path: Path) -> None:
    variable = "BUTTRESS_SERVICES__X__HEDGING__DELAY"
    [(path, source, message)] = problems(tmp_path, **{variable: "-1"})
    assert (path, source) == ("services.x.hedging.delay", f"env {variable}")
    assert "greater than or equal to 0.001" in message


def test_a_key_of_a_value_given_as_a_table_is_named_and_alone(tmp_path: Path) -> None:
    found = problems(tmp_path, "[services.x.fallback.defer]\nmax_items = 0\nmax_age = 'x'\n")
    assert sorted(path for path, _, _ in found) == [
        "services.x.fallback.defer.max_age",
        "services.x.fallback.defer.max_items",
    ]  # not also "should be a valid boolean" for the table


def test_a_scalar_for_a_value_or_table_is_one_problem(tmp_path: Path) -> None:
    [(path, _, message)] = problems(tmp_path, "[services.x.fallback]\ndefer = 5\n")
    assert path == "services.x.fallback.defer"
    assert "boolean" in message


def test_an_unknown_key_in_such_a_table_gets_a_suggestion(tmp_path: Path) -> None:
    [(path, _, message)] = problems(tmp_path, "[services.x.fallback.defer]\nmax_item = 3\n")
    assert path == "services.x.fallback.defer.max_item"
    assert "did you mean 'max_items'?" in message


def test_a_variable_holds_a_value_or_table_as_a_json_object(tmp_path: Path) -> None:
    variable = "BUTTRESS_SERVICES__X__FALLBACK__DEFER"
    settings = config.load_settings(env={variable: '{"max_items": 3}'})
    defer = settings.services["x"].fallback.defer
    assert not isinstance(defer, bool)
    assert defer.max_items == 3
    assert settings.source_of(("services", "x", "fallback", "defer", "max_items")) == (
        f"env {variable}"
    )
    assert problems(tmp_path, **{variable: '{"max_items": 0}'}) == [
        (
            "services.x.fallback.defer.max_items",
            f"env {variable}",
            "Input should be greater than 0 (got 0)",
        )
    ]
    assert config.load_settings(env={variable: "true"}).services["x"].fallback.defer is True


def test_a_variable_for_a_key_of_the_table_is_named_as_its_source(tmp_path: Path) -> None:
    variable = "BUTTRESS_SERVICES__X__FALLBACK__DEFER__MAX_ITEMS"
    [(path, source, _)] = problems(tmp_path, **{variable: "0"})
    assert (path, source) == ("services.x.fallback.defer.max_items", f"env {variable}")


@pytest.mark.parametrize(
    ("toml", "path"),
    [
        ("[services.x.circuit_breaker]\nfail_max = true\n", "services.x.circuit_breaker.fail_max"),
        ("[services.x]\nrollout = false\n", "services.x.rollout"),
        ("[services.x]\nseed = true\n", "services.x.seed"),
        ("[defaults.rate_limit]\nrate = 5\nburst = true\n", "defaults.rate_limit.burst"),
        ("[services.x.retry.budget]\nratio = true\n", "services.x.retry.budget.ratio"),
        ("[services.x.fallback.defer]\nmax_items = true\n", "services.x.fallback.defer.max_items"),
    ],
)
def test_a_files_boolean_is_no_number(tmp_path: Path, toml: str, path: str) -> None:
    # Read as 1 it was valid: fail_max = true opened the circuit at the first failure.
    [(found, _, message)] = problems(tmp_path, toml)
    assert found == path
    assert message.startswith("expected a number, not a boolean (got ")


def test_a_json_values_boolean_is_no_number_either(tmp_path: Path) -> None:
    variable = "BUTTRESS_SERVICES__X__RETRY"
    assert problems(tmp_path, **{variable: '{"max_attempts": true}'}) == [
        (
            "services.x.retry.max_attempts",
            f"env {variable}",
            "expected a number, not a boolean (got True)",
        )
    ]


def test_booleans_stay_welcome_where_a_boolean_is_meant(tmp_path: Path) -> None:
    toml = (
        "enabled = true\n[services.x]\nenabled = false\n[services.x.circuit_breaker]\n"
        "count_throttled = true\n[services.x.fallback]\ndefer = true\n"
        "[services.x.hedging]\nidempotent = true\n"
    )
    assert problems(tmp_path, toml) == []


def yaml_problems(tmp_path: Path, text: str) -> list[tuple[str, str, str]]:
    file = tmp_path / "buttress.yaml"
    file.write_text(text)
    try:
        config.load_settings(env={}, config_file=file)
    except ConfigurationError as exc:
        return [tuple(error) for error in exc.errors]  # type: ignore[misc]
    return []


def test_a_yaml_key_given_twice_is_refused_as_toml_refuses_it(tmp_path: Path) -> None:
    # PyYAML kept the last one: the first circuit_breaker section was lost without a word.
    text = (
        "services:\n  billing:\n    circuit_breaker:\n      fail_max: 3\n"
        "    circuit_breaker:\n      timeout: 10\n"
    )
    [(path, _, message)] = yaml_problems(tmp_path, text)
    assert path == "config_file"
    assert "key 'circuit_breaker' is given twice" in message
    assert "line 5" in message


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    file = tmp_path / "buttress.yaml"
    file.write_text(
        "services:\n  b:\n    circuit_breaker: &shared\n      fail_max: 1\n      timeout: 7\n"
        "  c:\n    circuit_breaker:\n      <<: *shared\n      fail_max: 3\n"
    )
    breaker = config.load_settings(env={}, config_file=file).services["c"].circuit_breaker
    assert (breaker.fail_max, breaker.timeout) == (3, 7.0)


def test_a_yaml_unhashable_key_is_still_a_parse_error(tmp_path: Path) -> None:
    [(path, _, message)] = yaml_problems(tmp_path, "services:\n  ? [a, b]\n  : 1\n")
    assert path == "config_file"
    assert "unhashable" in message


def test_a_directory_named_as_the_file_is_said_to_be_one(tmp_path: Path) -> None:
    folder = tmp_path / "buttress.toml"
    folder.mkdir()
    with pytest.raises(ConfigurationError) as info:
        config.load_settings(env={}, config_file=folder)
    assert info.value.errors[0][2] == f"{folder}: a directory, not a file"
