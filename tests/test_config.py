"""Settings: sources and their precedence, deep merge, presets, validation errors, reload."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import math
import os
import subprocess
import sys
import threading
import types
import typing
from pathlib import Path

import httpx
import pytest
import redis

from buttress import (
    CircuitOpenError,
    ConfigurationError,
    Policy,
    RejectedError,
    TimeoutExceededError,
    circuit_breaker,
    config,
    decorators,
    events,
    get_settings,
    registry,
    reload_settings,
    resilient,
    retry_with_backoff,
    with_adaptive_throttle,
    with_bulkhead,
    with_cache,
    with_chaos,
    with_coalescing,
    with_fallback,
    with_hedging,
    with_rate_limit,
    with_timeout,
)
from buttress import _values as bounds
from buttress.health_app import wsgi_app
from buttress.patterns._base import BuildContext
from buttress.patterns.fallback import DeferOptions
from buttress.policy import Spec
from buttress.registry import breaker
from buttress.testing import capture_events

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def apply(monkeypatch):
    """Install settings from an explicit environment (and file); the old ones return after."""
    monkeypatch.setattr(config, "SNAPSHOT", config.SNAPSHOT)

    def install(env=None, config_file=None):
        return reload_settings(env=env or {}, config_file=config_file)

    return install


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "buttress.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def view(env=None, config_file=None, service="svc"):
    return config.Snapshot(0, config.load_settings(env or {}, config_file)).service(service)


def problems(env=None, config_file=None):
    with pytest.raises(ConfigurationError) as caught:
        config.load_settings(env or {}, config_file)
    return caught.value


def failing(*exc_args):
    calls = []

    def body(*_a, **_kw):
        calls.append(1)
        raise ConnectionError(*exc_args)

    return body, calls


# --- precedence ------------------------------------------------------------------------------

SOURCES = ("env", "file", "code", "preset")
FAIL_MAX = {"env": 11, "file": 12, "code": 13, "preset": 10, "builtin": 5}  # preset: database
ENV_VAR = "BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__FAIL_MAX"
COMBINATIONS = [c for n in range(len(SOURCES) + 1) for c in itertools.combinations(SOURCES, n)]


@pytest.mark.parametrize("present", COMBINATIONS, ids=lambda c: "+".join(c) or "builtin")
def test_precedence_matrix_environment_file_code_preset_builtin(present, write):
    env = {ENV_VAR: "11"} if "env" in present else {}
    path = write("[services.svc.circuit_breaker]\nfail_max = 12\n") if "file" in present else None
    code = {"fail_max": 13} if "code" in present else {}
    preset = "database" if "preset" in present else None

    service = view(env, path)
    winner = next((source for source in SOURCES if source in present), "builtin")
    assert service.options("circuit_breaker", code, preset).fail_max == FAIL_MAX[winner]
    label = {
        "env": f"env {ENV_VAR}",
        "file": f"file {path}",
        "code": "code",
        "preset": "preset database",
        "builtin": "default",
    }[winner]
    explained = service.explain({"circuit_breaker": code}, preset)
    assert explained["circuit_breaker"]["fail_max"] == {"value": FAIL_MAX[winner], "source": label}


def test_environment_beats_code_arguments_at_the_call(mode, clock, apply):
    apply({ENV_VAR: "2"})
    body, calls = failing()
    protected = circuit_breaker(name="svc", fail_max=4)(mode.define(body))
    outcomes = [type(mode.outcome(protected)).__name__ for _ in range(3)]
    assert outcomes == ["ConnectionError", "ConnectionError", "CircuitOpenError"]
    assert len(calls) == 2
    assert breaker("svc").options.fail_max == 2


def test_code_arguments_beat_the_preset_at_the_call(mode, clock, apply):
    apply()
    protected = resilient("svc", preset="database", circuit_breaker={"fail_max": 3})(mode.define())
    assert mode.run(protected) == "ok"
    assert breaker("svc").options.fail_max == 3
    assert breaker("svc").options.timeout == 30.0  # the database preset's


def test_kill_switch_from_the_environment_beats_the_file(write):
    path = write("enabled = false\n")
    assert config.load_settings({}, path).enabled is False
    settings = config.load_settings({"FF_ENABLE_RESILIENCE_PATTERNS": "true"}, path)
    assert settings.enabled is True
    assert settings.source_of(("enabled",)) == "env FF_ENABLE_RESILIENCE_PATTERNS"


def test_buttress_enabled_is_an_alias_and_must_agree_with_the_ff_variable():
    assert config.load_settings({"BUTTRESS_ENABLED": "0"}).enabled is False
    agreed = {"BUTTRESS_ENABLED": "off", "FF_ENABLE_RESILIENCE_PATTERNS": "false"}
    assert config.load_settings(agreed).enabled is False
    error = problems({"BUTTRESS_ENABLED": "1", "FF_ENABLE_RESILIENCE_PATTERNS": "false"})
    assert error.errors == (
        (
            "enabled",
            "env FF_ENABLE_RESILIENCE_PATTERNS, env BUTTRESS_ENABLED",
            "the kill switches disagree",
        ),
    )


def test_config_file_comes_from_buttress_config_file(write):
    path = write("[services.svc.timeout]\nseconds = 4\n")
    settings = config.load_settings({"BUTTRESS_CONFIG_FILE": str(path)})
    assert settings.config_file == str(path)
    assert settings.services["svc"].timeout.seconds == 4
    # An explicit file wins over the variable.
    other = write("[services.other]\n", "other.toml")
    assert set(config.load_settings({"BUTTRESS_CONFIG_FILE": str(path)}, other).services) == {
        "other"
    }


# --- defaults and deep merge -----------------------------------------------------------------


def test_partial_service_section_deep_merges_onto_defaults(write):
    path = write(
        """
        [defaults]
        mode = "shadow"
        [defaults.bulkhead]
        limit = 30
        max_queue = 5
        queue_timeout = 1.5
        [services.svc]
        rollout = 0.5
        [services.svc.bulkhead]
        limit = 7
        """.replace("        ", "")
    )
    env = {"BUTTRESS_SERVICES__SVC__BULKHEAD__MAX_QUEUE": "9"}
    svc = view(env, path)
    bulkhead = svc.options("bulkhead", {}, None)
    assert (bulkhead.limit, bulkhead.max_queue, bulkhead.queue_timeout) == (7, 9, 1.5)
    assert (svc.mode, svc.rollout) == ("shadow", 0.5)
    sources = svc.explain()["bulkhead"]
    assert sources["limit"]["source"] == f"file {path}"
    assert sources["max_queue"]["source"] == "env BUTTRESS_SERVICES__SVC__BULKHEAD__MAX_QUEUE"
    assert sources["queue_timeout"]["source"] == f"file {path} (defaults)"
    # A service with no section of its own gets exactly the defaults.
    other = view(env, path, "other").options("bulkhead", {}, None)
    assert (other.limit, other.max_queue, other.queue_timeout) == (30, 5, 1.5)


def test_environment_merges_key_by_key_into_a_file_section(write):
    path = write("[services.svc.retry]\nmax_attempts = 4\ninitial = 0.5\n")
    retry = view({"BUTTRESS_SERVICES__SVC__RETRY__MAX_ATTEMPTS": "6"}, path).options(
        "retry", {}, None
    )
    assert (retry.max_attempts, retry.initial) == (6, 0.5)


def test_a_service_key_beats_a_defaults_key_whatever_their_sources(write):
    # Settings merge first (environment over file), then the service section over defaults.
    path = write("[services.svc.timeout]\nseconds = 3\n")
    env = {"BUTTRESS_DEFAULTS__TIMEOUT__SECONDS": "7"}
    assert view(env, path).options("timeout", {}, None).seconds == 3
    # defaults are settings, so they also beat code arguments.
    assert view(env, path, "other").options("timeout", {"seconds": 9}, None).seconds == 7


def test_a_whole_section_as_json_in_one_variable():
    env = {"BUTTRESS_SERVICES": '{"Svc": {"retry": {"max_attempts": 2}, "mode": "shadow"}}'}
    svc = view(env)
    assert svc.options("retry", {}, None).max_attempts == 2
    assert svc.mode == "shadow"
    assert svc.explain()["retry"]["max_attempts"]["source"] == "env BUTTRESS_SERVICES"


@pytest.mark.parametrize("key_first", [True, False], ids=["key first", "section first"])
def test_a_key_variable_beats_its_section_json_whatever_the_order(key_first):
    key = ("BUTTRESS_SERVICES__SVC__RETRY__MAX_ATTEMPTS", "5")
    section = ("BUTTRESS_SERVICES__SVC__RETRY", '{"max_attempts": 2, "initial": 0.5}')
    env = dict([key, section] if key_first else [section, key])
    retry = view(env).options("retry", {}, None)
    assert (retry.max_attempts, retry.initial) == (5, 0.5)
    sources = view(env).explain()["retry"]
    assert sources["max_attempts"]["source"] == "env BUTTRESS_SERVICES__SVC__RETRY__MAX_ATTEMPTS"
    assert sources["initial"]["source"] == "env BUTTRESS_SERVICES__SVC__RETRY"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BUTTRESS_SERVICES__SVC__SEED", "null"), ("BUTTRESS_DEFAULTS__SEED", "null")],
)
def test_a_value_variable_is_read_as_text_in_defaults_and_services_alike(variable, value):
    # Only a variable naming a whole section is JSON; "null" is no integer wherever it is set.
    assert "unable to parse string as an integer (got 'null')" in str(problems({variable: value}))


# --- service names ---------------------------------------------------------------------------


def test_service_names_are_case_insensitive_across_sources(write):
    path = write("[services.OpenFGA.timeout]\nseconds = 5\n")
    env = {"BUTTRESS_SERVICES__OPENFGA__BULKHEAD__LIMIT": "50"}
    settings = config.load_settings(env, path)
    assert list(settings.services) == ["openfga"]
    snapshot = config.Snapshot(0, settings)
    assert snapshot.service("OpenFGA") is snapshot.service("openfga")
    assert snapshot.service("OpenFGA").options("timeout", {}, None).seconds == 5
    assert snapshot.service("OpenFGA").options("bulkhead", {}, None).limit == 50


def test_one_service_spelled_twice_in_one_file_is_an_error(write):
    path = write(
        "[services.OpenFGA.timeout]\nseconds = 5\n[services.openfga.timeout]\nseconds = 6\n"
    )
    error = problems(config_file=path)
    assert error.errors == (
        (
            "services.openfga",
            f"file {path}",
            "service defined twice, as 'OpenFGA' and 'openfga' "
            "(service names are case-insensitive)",
        ),
    )


# --- validation: every error names its key path and its source ----------------------------


@pytest.mark.parametrize(
    ("env", "path", "message"),
    [
        ({"BUTTRESS_SERVCES__X__ENABLED": "1"}, "servces", "did you mean 'services'?"),
        ({"BUTTRESS_TYPO": "1"}, "typo", "unknown key 'typo'"),
        ({"BUTTRESS_DEFAULT__RETRY__MAX_ATTEMPTS": "2"}, "default", "did you mean 'defaults'?"),
        ({"BUTTRESS_SERVICES__X__RETRYY__MAX_ATTEMPTS": "2"}, "services.x.retryy", "'retry'?"),
        ({"BUTTRESS_SERVICES__X__ROLLOUTT": "0.5"}, "services.x.rolloutt", "'rollout'?"),
        (
            {"BUTTRESS_SERVICES__X__CIRCUIT_BREAKER__FAIL_MAXX": "5"},
            "services.x.circuit_breaker.fail_maxx",
            "did you mean 'fail_max'?",
        ),
        (
            {"BUTTRESS_DEFAULTS__RETRY__MAX_ATTEMPTS__MORE": "5"},
            "defaults.retry.max_attempts.more",
            "'max_attempts' is a value",
        ),
        ({"BUTTRESS_SERVICES____RETRY": "{}"}, "services.", "empty service name"),
        ({"BUTTRESS_SERVICES__X__RETRY": "3"}, "services.x.retry", "expected a JSON object"),
        (
            {"BUTTRESS_SERVICES__X__CIRCUIT_BREAKER__EXCLUDE": "ValueError"},
            "services.x.circuit_breaker.exclude",
            "can only be given in code",
        ),
        (
            {"BUTTRESS_SERVICES": '{"x": {"retry": {"max_atempts": 2}}}'},
            "services.x.retry.max_atempts",
            "did you mean 'max_attempts'?",
        ),
    ],
)
def test_misspelled_variables_are_errors_naming_path_and_variable(env, path, message):
    error = problems(env)
    [(key_path, source, text)] = error.errors
    (variable,) = env
    assert (key_path, source) == (path, f"env {variable}")
    assert message in text
    assert path in str(error)
    assert variable in str(error)


@pytest.mark.parametrize(
    ("variable", "value", "path", "message"),
    [
        ("SERVICES__X__CIRCUIT_BREAKER__FAIL_MAX", "abc", None, "valid integer"),
        ("SERVICES__X__CIRCUIT_BREAKER__FAIL_MAX", "0", None, "greater than 0"),
        ("SERVICES__X__CIRCUIT_BREAKER__TIMEOUT", "-1", None, "greater than or equal to 0.001"),
        ("SERVICES__X__CIRCUIT_BREAKER__SUCCESS_THRESHOLD", "0", None, "greater than 0"),
        ("SERVICES__X__CIRCUIT_BREAKER__FAILURE_RATE_THRESHOLD", "1.5", None, "less than or equal"),
        ("SERVICES__X__TIMEOUT__SECONDS", "0", None, "greater than or equal to 0.001"),
        ("SERVICES__X__BULKHEAD__LIMIT", "-3", None, "greater than 0"),
        ("SERVICES__X__BULKHEAD__MAX_QUEUE", "-1", None, "greater than or equal to 0"),
        ("SERVICES__X__RATE_LIMIT__RATE", "0", None, "greater than or equal to 0.000001"),
        ("SERVICES__X__RETRY__MAX_ATTEMPTS", "0", None, "greater than 0"),
        ("SERVICES__X__RETRY__EXPONENTIAL_BASE", "0.5", None, "greater than or equal to 1"),
        ("SERVICES__X__RETRY__JITTER", "some", None, "'none', 'full', 'equal' or 'decorrelated'"),
        ("SERVICES__X__RETRY__RETRY_ON", "ValueError", None, "'transient' or 'network'"),
        ("SERVICES__X__RETRY__INITIAL", "60", "services.x.retry", "max_delay (30.0) must be >="),
        ("SERVICES__X__ROLLOUT", "1.5", None, "less than or equal to 1"),
        ("SERVICES__X__ROLLOUT", "-0.1", None, "greater than or equal to 0"),
        ("SERVICES__X__MODE", "loud", None, "'enforce' or 'shadow'"),
        ("SERVICES__X__PRESET", "fast", None, "'api', 'ai', 'database', 'external' or 'critical'"),
        ("SERVICES__X__CRITICALITY", "urgent", None, "'low', 'normal', 'high' or 'critical'"),
        ("SERVICES__X__SEED", "lucky", None, "valid integer"),
        ("SERVICES__X__ENABLED", "maybe", None, "valid boolean"),
        ("DEFAULTS__TIMEOUT__SECONDS", "-5", None, "greater than or equal to 0.001"),
        (
            "SERVICES__X__CIRCUIT_BREAKER__SLOW_CALL_DURATION",
            "2",
            "services.x.circuit_breaker",
            "must be set together",
        ),
    ],
)
def test_bad_values_from_the_environment_name_path_and_variable(variable, value, path, message):
    name = f"BUTTRESS_{variable}"
    error = problems({name: value})
    [(key_path, source, text)] = error.errors
    assert key_path == (path or variable.lower().replace("__", "."))
    assert source == f"env {name}"
    assert message in text
    assert f"{key_path} (from env {name})" in str(error)


def test_kill_switch_with_a_bad_value_names_its_variable():
    error = problems({"FF_ENABLE_RESILIENCE_PATTERNS": "maybe"})
    assert error.errors == (
        (
            "enabled",
            "env FF_ENABLE_RESILIENCE_PATTERNS",
            "Input should be a valid boolean, unable to interpret input (got 'maybe')",
        ),
    )


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("typo = 1\n", "typo", "unknown key 'typo'"),
        ("[defaults]\nrolout = 0.5\n", "defaults.rolout", "did you mean 'rollout'?"),
        (
            "[services.x.circuitbreaker]\nfail_max = 3\n",
            "services.x.circuitbreaker",
            "'circuit_breaker'",
        ),
        (
            "[services.x.bulkhead]\nlimits = 3\n",
            "services.x.bulkhead.limits",
            "did you mean 'limit'?",
        ),
        (
            "[services.x.fallback]\nvalue = 3\n",
            "services.x.fallback.value",
            "only be given in code",
        ),
        (
            "[services.x.retry]\nmax_attempts = 'three'\n",
            "services.x.retry.max_attempts",
            "integer",
        ),
        ("[services.x.retry]\ninitial = 5\nmax_delay = 1\n", "services.x.retry", "max_delay (1.0)"),
        ("[services.x]\nrollout = 2\n", "services.x.rollout", "less than or equal to 1"),
        ("chaos_enabled = true\n", "chaos_enabled", "only the environment variable"),
    ],
)
def test_file_errors_at_any_depth_name_path_and_file(text, path, message, write):
    file = write(text)
    error = problems(config_file=file)
    [(key_path, source, found)] = error.errors
    assert (key_path, source) == (path, f"file {file}")
    assert message in found


def test_yaml_files_are_checked_the_same_way(write):
    file = write("services:\n  x:\n    timeout:\n      second: 5\n", "buttress.yaml")
    [(key_path, source, found)] = problems(config_file=file).errors
    assert (key_path, source) == ("services.x.timeout.second", f"file {file}")
    assert "did you mean 'seconds'?" in found


def test_every_problem_is_reported_at_once(write):
    file = write("[services.x.timeout]\nseconds = 0\n[services.x.bulkhead]\nlimitt = 1\n")
    env = {"BUTTRESS_TYPO": "1", "BUTTRESS_SERVICES__Y__RETRY__MAX_ATTEMPTS": "x"}
    error = problems(env, file)
    assert sorted(path for path, _, _ in error.errors) == [
        "services.x.bulkhead.limitt",
        "services.x.timeout.seconds",
        "services.y.retry.max_attempts",
        "typo",
    ]
    assert str(error).startswith("invalid buttress settings (4 problems):")


def test_cross_field_checks_use_the_merged_section(write):
    # initial in the service, max_delay in defaults: valid together, and neither alone decides.
    file = write("[defaults.retry]\nmax_delay = 120\n[services.x.retry]\ninitial = 60\n")
    assert view(config_file=file, service="x").options("retry", {}, None).initial == 60
    # A defaults section that is invalid on its own is reported once, not once per service.
    bad = write("[defaults.retry]\ninitial = 60\n[services.a]\n[services.b]\n", "bad.toml")
    assert [path for path, _, _ in problems(config_file=bad).errors] == ["defaults.retry"]


def test_retry_on_accepts_the_two_named_predicates_from_settings():
    assert (
        view({"BUTTRESS_SERVICES__SVC__RETRY__RETRY_ON": "network"})
        .options("retry", {}, None)
        .retry_on
        == "network"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[services\n", "cannot be parsed"),
        ("- just\n- a list\n", "the top level must be a mapping"),
    ],
)
def test_unreadable_files_are_errors(text, message, write):
    file = write(text, "buttress.yaml" if text.startswith("-") else "buttress.toml")
    [(key_path, source, found)] = problems(config_file=file).errors
    assert (key_path, source) == ("config_file", f"file {file}")
    assert message in found


def test_missing_or_unsupported_config_file_names_the_variable(tmp_path):
    missing = tmp_path / "nope.toml"
    [(path, source, message)] = problems({"BUTTRESS_CONFIG_FILE": str(missing)}).errors
    assert (path, source, message) == (
        "config_file",
        "env BUTTRESS_CONFIG_FILE",
        f"{missing}: no such file",
    )
    [(_, source, message)] = problems(config_file=tmp_path / "buttress.ini").errors
    assert source == "argument config_file"
    assert "expected a .toml, .yaml or .yml file" in message


def test_invalid_combination_with_code_arguments_names_every_source(write):
    file = write("[services.svc.retry]\ninitial = 20\n")
    svc = view(config_file=file)
    with pytest.raises(ConfigurationError) as caught:
        svc.options("retry", {"max_delay": 10.0}, None)
    [(path, source, message)] = caught.value.errors
    assert path == "services.svc.retry"
    assert source == f"code, file {file}"
    assert "max_delay (10.0) must be >= initial (20.0)" in message


def test_unknown_preset_named_in_code():
    with pytest.raises(ConfigurationError, match="unknown preset 'fast'"):
        view().options("retry", {}, "fast")


# --- presets ---------------------------------------------------------------------------------

# (fail_max, open seconds, attempts, timeout seconds, bulkhead limit, queue) from issue 3.
PRESET_TABLE = {
    "api": (5, 60.0, 3, 30.0, 50, 100),
    "ai": (3, 120.0, 3, 120.0, 10, 50),
    "database": (10, 30.0, 3, 30.0, 100, 200),
    "external": (5, 60.0, 3, 15.0, 20, 50),
    "critical": (None, None, 5, 60.0, 5, 10),
}


@pytest.mark.parametrize("preset", sorted(PRESET_TABLE))
def test_presets_have_the_documented_values(preset):
    svc = view()
    breaker_opts = svc.options("circuit_breaker", {}, preset)
    retry = svc.options("retry", {}, preset)
    fail_max, open_for, attempts, seconds, limit, queue = PRESET_TABLE[preset]
    if fail_max is None:
        assert breaker_opts.enabled is False
        assert svc.pattern_enabled("circuit_breaker") is True  # named in code, not settings
    else:
        assert (breaker_opts.enabled, breaker_opts.fail_max, breaker_opts.timeout) == (
            True,
            fail_max,
            open_for,
        )
    assert retry.max_attempts == attempts
    assert svc.options("timeout", {}, preset).seconds == seconds
    bulkhead = svc.options("bulkhead", {}, preset)
    assert (bulkhead.limit, bulkhead.max_queue) == (limit, queue)
    assert retry.retry_on == ("network" if preset == "external" else "transient")
    assert retry.respect_retry_after is True


def test_presets_are_exactly_the_five_of_the_issue():
    assert set(config.PRESETS) == set(PRESET_TABLE)
    for values in config.PRESETS.values():
        assert set(values) == {"circuit_breaker", "retry", "timeout", "bulkhead"}


def test_ai_preset_retries_a_429_after_its_retry_after(mode, clock, apply):
    apply()
    request = httpx.Request("POST", "http://127.0.0.1/v1/completions")
    limited = httpx.HTTPStatusError(
        "HTTP 429",
        request=request,
        response=httpx.Response(429, headers={"Retry-After": "4"}, request=request),
    )
    outcomes = [limited, "answer"]
    protected = resilient("llm", preset="ai")(mode.define(lambda: _next(outcomes)))
    assert mode.run(protected) == "answer"
    assert clock.sleeps == [4.0]


def test_external_preset_retries_network_errors_only(mode, clock, apply):
    apply()
    request = httpx.Request("GET", "http://127.0.0.1/")
    unavailable = httpx.HTTPStatusError(
        "HTTP 503", request=request, response=httpx.Response(503, request=request)
    )
    outcomes = [unavailable, "late"]
    protected = resilient("ext", preset="external")(mode.define(lambda: _next(outcomes)))
    assert mode.outcome(protected) is unavailable
    outcomes[:] = [ConnectionResetError("reset"), "ok"]
    assert mode.run(protected) == "ok"


def test_critical_preset_never_opens_a_circuit(mode, clock, apply):
    apply()
    body, calls = failing()
    protected = resilient("core", preset="critical")(mode.define(body))
    for _ in range(20):
        assert isinstance(mode.outcome(protected), ConnectionError)
    assert len(calls) == 20 * 5  # five attempts each, and no rejection ever


def test_a_preset_chosen_in_settings_replaces_the_one_in_code(mode, clock, apply):
    apply({"BUTTRESS_SERVICES__CORE__PRESET": "critical"})
    assert config.SNAPSHOT.service("core").pattern_enabled("circuit_breaker") is False
    body, calls = failing()
    protected = resilient("core", preset="api")(mode.define(body))
    for _ in range(8):
        assert not isinstance(mode.outcome(protected), CircuitOpenError)
    assert len(calls) == 8 * 5


def _next(outcomes):
    outcome = outcomes.pop(0)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


# --- flags resolved per service ------------------------------------------------------------


def test_flags_default_and_come_from_settings():
    svc = view()
    assert (svc.enabled, svc.mode, svc.rollout, svc.criticality, svc.preset) == (
        True,
        "enforce",
        1.0,
        "normal",
        None,
    )
    env = {
        "BUTTRESS_SERVICES__SVC__CRITICALITY": "critical",
        "BUTTRESS_DEFAULTS__MODE": "shadow",
        "BUTTRESS_SERVICES__SVC__RETRY__ENABLED": "false",
    }
    svc = view(env)
    assert (svc.criticality, svc.mode) == ("critical", "shadow")
    assert svc.pattern_enabled("retry") is False
    assert svc.pattern_enabled("timeout") is True
    assert svc.options("retry", {}, None).enabled is False


def test_options_are_cached_per_arguments_and_preset():
    svc = view()
    first = svc.options("retry", {"max_attempts": 4}, None)
    assert svc.options("retry", {"max_attempts": 4}, None) is first
    assert svc.options("retry", {"max_attempts": 4}, "api") is not first
    # Unhashable code arguments still resolve.
    assert svc.options("circuit_breaker", {"exclude": [ValueError]}, None).exclude == (ValueError,)


# --- reload ----------------------------------------------------------------------------------


def test_reload_swaps_settings_and_emits_an_event(apply):
    apply()
    before = config.SNAPSHOT
    with capture_events([events.SettingsReloaded]) as captured:
        settings = reload_settings(env={"BUTTRESS_SERVICES__SVC__TIMEOUT__SECONDS": "3"})
    assert get_settings() is settings
    assert config.SNAPSHOT is not before
    assert config.SNAPSHOT.generation > before.generation
    assert config.SNAPSHOT.service("svc").options("timeout", {}, None).seconds == 3
    assert captured == [events.SettingsReloaded(True, config.SNAPSHOT.generation, None)]


def test_failed_reload_keeps_the_old_settings_and_says_why(apply):
    apply({"BUTTRESS_SERVICES__SVC__TIMEOUT__SECONDS": "3"})
    before = config.SNAPSHOT
    with capture_events([events.SettingsReloaded]) as captured:
        with pytest.raises(ConfigurationError) as caught:
            reload_settings(env={"BUTTRESS_SERVICES__SVC__TIMEOUT__SECONDS": "-1"})
    assert config.SNAPSHOT is before
    assert config.SNAPSHOT.service("svc").options("timeout", {}, None).seconds == 3
    [event] = captured
    assert (event.ok, event.generation) == (False, before.generation)
    assert "services.svc.timeout.seconds" in event.error
    assert "BUTTRESS_SERVICES__SVC__TIMEOUT__SECONDS" in event.error
    assert caught.value.errors[0][0] == "services.svc.timeout.seconds"


def test_reload_applies_to_existing_call_sites_without_redecorating(mode, apply):
    apply()
    protected = with_timeout(name="svc", seconds=10)(mode.define())
    assert mode.run(protected) == "ok"
    built = config.SNAPSHOT.service("svc").options("timeout", {"seconds": 10}, None)
    assert built.seconds == 10
    apply({"BUTTRESS_SERVICES__SVC__TIMEOUT__SECONDS": "2"})
    assert mode.run(protected) == "ok"
    assert config.SNAPSHOT.service("svc").options("timeout", {"seconds": 10}, None).seconds == 2


def test_readers_never_see_half_of_a_reload(apply):
    # Each generation has limit == max_queue; a reader mixing two generations would see them differ.
    apply(
        {
            "BUTTRESS_SERVICES__SVC__BULKHEAD__LIMIT": "99",
            "BUTTRESS_SERVICES__SVC__BULKHEAD__MAX_QUEUE": "99",
        }
    )
    stop = threading.Event()
    mixed = []

    def read():
        while not stop.is_set():
            options = config.SNAPSHOT.service("svc").options("bulkhead", {}, None)
            if options.limit != options.max_queue:
                mixed.append(options)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for n in range(1, 60):
            reload_settings(
                env={
                    "BUTTRESS_SERVICES__SVC__BULKHEAD__LIMIT": str(n),
                    "BUTTRESS_SERVICES__SVC__BULKHEAD__MAX_QUEUE": str(n),
                }
            )
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert mixed == []
    assert config.SNAPSHOT.service("svc").options("bulkhead", {}, None).limit == 59


def test_bad_environment_does_not_break_import_and_fails_at_first_use():
    env = {**os.environ, "FF_ENABLE_RESILIENCE_PATTERNS": "maybe", "PYTHONPATH": str(ROOT / "src")}
    env.pop("BUTTRESS_CONFIG_FILE", None)
    script = (
        "import buttress\n"
        "try:\n"
        "    buttress.get_settings()\n"
        "except buttress.ConfigurationError as exc:\n"
        "    print(exc.errors[0][:2])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "('enabled', 'env FF_ENABLE_RESILIENCE_PATTERNS')"


# --- describe, secrets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://app:s3cret@redis.internal:6380/1", "rediss://app:***@redis.internal:6380/1"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://redis:6379/0?password=s3cret&db=2", "redis://redis:6379/0?password=***&db=2"),
    ],
)
def test_redact_hides_passwords(url, shown):
    assert config.redact(url) == shown


def test_describe_lists_services_with_sources_and_redacts_state_url(write):
    file = write(
        '[services.db.circuit_breaker]\nstate_url = "redis://:s3cret@redis:6379/0"\n'
        '[services.llm]\npreset = "ai"\n'
    )
    described = config.describe(config.load_settings({}, file))
    assert list(described["services"]) == ["db", "llm"]
    assert described["services"]["db"]["circuit_breaker"]["state_url"] == {
        "value": "redis://:***@redis:6379/0",
        "source": f"file {file}",
    }
    assert described["services"]["llm"]["timeout"]["seconds"] == {
        "value": 120.0,
        "source": "preset ai",
    }
    assert described["defaults"]["timeout"]["seconds"] == {"value": 30.0, "source": "default"}
    assert "s3cret" not in repr(described)


# --- the shipped examples --------------------------------------------------------------------


def test_example_toml_is_valid_and_protects_the_seed_services():
    example = ROOT / "config" / "buttress.toml"
    snapshot = config.Snapshot(0, config.load_settings({}, example))
    assert set(snapshot.settings.services) == {
        "llm",
        "openfga",
        "redis",
        "keycloak",
        "prometheus",
        "database",
    }

    def seconds(name):
        return snapshot.service(name).options("timeout", {}, None).seconds

    def limit(name):
        return snapshot.service(name).options("bulkhead", {}, None).limit

    assert (seconds("llm"), limit("llm")) == (60, 10)
    assert (seconds("openfga"), limit("openfga")) == (5, 50)
    assert limit("redis") == 100
    assert seconds("keycloak") == 5
    assert (seconds("database"), limit("database")) == (10, 20)
    assert snapshot.service("prometheus").options("rate_limit", {}, None).rate == 5


def test_example_yaml_says_the_same_as_the_toml():
    from_toml = config.describe(config.load_settings({}, ROOT / "config" / "buttress.toml"))
    from_yaml = config.describe(config.load_settings({}, ROOT / "config" / "buttress.yaml"))
    assert _values(from_yaml) == _values(from_toml)


def _values(described):
    if isinstance(described, dict):
        if set(described) == {"value", "source"}:
            return described["value"]
        return {key: _values(value) for key, value in described.items() if key != "config_file"}
    return described


# --- shared instances: code arguments of several call sites --------------------------------


def test_call_sites_of_one_service_merge_their_code_arguments(mode, clock, apply):
    apply()
    first = circuit_breaker(name="svc", fail_max=3)(mode.define(name="first"))
    second = circuit_breaker(name="svc", timeout=30)(mode.define(name="second"))
    assert (mode.run(first), mode.run(second)) == ("ok", "ok")
    options = breaker("svc").options
    assert (options.fail_max, options.timeout) == (3, 30.0)


def test_settings_override_the_code_arguments_of_every_call_site(mode, clock, apply):
    apply({"BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__FAIL_MAX": "7"})
    first = circuit_breaker(name="svc", fail_max=3)(mode.define(name="first"))
    second = circuit_breaker(name="svc", fail_max=3)(mode.define(name="second"))
    assert (mode.run(first), mode.run(second)) == ("ok", "ok")
    assert breaker("svc").options.fail_max == 7


def test_two_values_for_one_shared_argument_fail_naming_both_sites_and_the_setting():
    def first():
        return "ok"

    def second():
        return "ok"

    circuit_breaker(name="svc", fail_max=5)(first)
    with pytest.raises(ConfigurationError) as caught:
        circuit_breaker(name="svc", fail_max=10)(second)
    [(path, site, _)] = caught.value.errors
    assert path == "services.svc.circuit_breaker.fail_max"
    assert "second" in site
    message = str(caught.value)
    assert "fail_max=5" in message
    assert "fail_max=10" in message
    assert "first" in message


def test_per_call_site_patterns_may_differ_for_one_service(mode, clock, apply):
    apply()
    body, calls = failing()
    twice = retry_with_backoff(name="svc", max_attempts=2)(mode.define(body, name="twice"))
    once = retry_with_backoff(name="svc", max_attempts=1)(mode.define(body, name="once"))
    mode.outcome(twice)
    mode.outcome(once)
    assert len(calls) == 3


def test_a_state_url_that_is_not_a_redis_url_fails_at_load_without_being_echoed():
    from buttress import config

    secret = "hunter2-typed-in-the-wrong-place"
    with pytest.raises(ConfigurationError) as info:
        config.load_settings(env={"BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__STATE_URL": secret})
    message = str(info.value)
    assert "services.pay.circuit_breaker.state_url" in message
    assert "BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__STATE_URL" in message
    assert "must be a redis://, rediss:// or unix:// URL" in message
    assert secret not in message


# --- durations and rates: refused at the door, or they work --------------------------------

EXTREMES = [
    math.inf,
    -math.inf,
    math.nan,
    1e19,
    5e-324,
    -1.0,
    0.0,
    1.0,
    bounds.MIN_SECONDS,
    bounds.MAX_SECONDS,
    bounds.MIN_RATE,
    bounds.MAX_RATE,
    bounds.MAX_FACTOR,
]

# What a field needs beside it so that its own value decides (a breaker that opens on one
# failure, a rate window that counts, a slow-call rule with both halves...).
COMPANIONS = {
    ("circuit_breaker", "timeout"): {"fail_max": 1},
    ("circuit_breaker", "open_backoff"): {"fail_max": 1},
    ("circuit_breaker", "near_cache_ttl"): {"fail_max": 1},
    ("circuit_breaker", "max_timeout"): {"fail_max": 1, "timeout": bounds.MIN_SECONDS},
    ("circuit_breaker", "failure_rate_threshold"): {"minimum_calls": 2, "fail_max": 100},
    ("circuit_breaker", "window_seconds"): {
        "failure_rate_threshold": 0.5,
        "minimum_calls": 2,
        "fail_max": 100,
    },
    ("circuit_breaker", "slow_call_duration"): {
        "slow_call_rate_threshold": 0.5,
        "minimum_calls": 1,
    },
    ("circuit_breaker", "slow_call_rate_threshold"): {
        "slow_call_duration": 1.0,
        "minimum_calls": 1,
    },
    ("adaptive_throttle", "k"): {"enabled": True},
    ("adaptive_throttle", "window_seconds"): {"enabled": True},
    ("retry", "initial"): {"max_delay": bounds.MAX_SECONDS},
    ("retry", "exponential_base"): {},
    ("retry", "max_delay"): {"initial": 0.0},
    ("timeout", "seconds"): {},
    ("bulkhead", "queue_timeout"): {"limit": 1, "max_queue": 1},
    ("rate_limit", "rate"): {},  # the default burst, max(1, rate), is derived from it
    ("rate_limit", "max_wait"): {"rate": 1.0, "burst": 1},
    ("fallback", "cache_ttl"): {},
    ("cache", "ttl"): {},
    ("cache", "stale_ttl"): {"ttl": 1.0},
    ("chaos", "exception_rate"): {"enabled": True},
    ("chaos", "latency_rate"): {"enabled": True},
    ("chaos", "latency_seconds"): {"enabled": True, "latency_rate": 1.0},
    ("chaos", "result_rate"): {"enabled": True},
    ("flags", "rollout"): {},
}


def is_float(annotation):
    """``float``, ``float | None``, or the same with pydantic metadata (``Seconds | None``)."""
    if annotation is float:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return is_float(typing.get_args(annotation)[0])
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return len(args) == 1 and is_float(args[0])


def float_fields():
    """Every float option of every pattern (and the float flag), found in the models."""
    for pattern in config.PATTERNS:
        for name, info in config.options_model(pattern).model_fields.items():
            if is_float(info.annotation):
                yield pattern, name
    for name, info in config.ServiceSettings.model_fields.items():
        if is_float(info.annotation):
            yield "flags", name


FLOAT_FIELDS = sorted(COMPANIONS)


def test_every_float_field_is_covered_by_the_extremes_tests():
    assert sorted(float_fields()) == FLOAT_FIELDS


def env_name(pattern, field):
    middle = "" if pattern == "flags" else f"{pattern.upper()}__"
    return f"BUTTRESS_SERVICES__SVC__{middle}{field.upper()}"


def settings_verdict(pattern, field, value):
    """``None`` when settings accept ``value``; else the error's (path, source) pairs."""
    env = {env_name(pattern, key): str(v) for key, v in COMPANIONS[pattern, field].items()}
    env[env_name(pattern, field)] = str(value)
    try:
        config.load_settings(env)
    except ConfigurationError as exc:
        return {(path, source) for path, source, _ in exc.errors}
    return None


def code_verdict(pattern, field, value):
    """``None`` when a decorator accepts ``value``; else the ConfigurationError."""
    try:
        Spec(pattern, "svc", {**COMPANIONS[pattern, field], field: value})
    except ConfigurationError as exc:
        return exc
    return None


@pytest.mark.parametrize(("pattern", "field"), FLOAT_FIELDS)
def test_settings_and_code_refuse_the_same_extremes_naming_the_key(pattern, field):
    for value in EXTREMES:
        verdict = settings_verdict(pattern, field, value)
        path = "services.svc." + (field if pattern == "flags" else f"{pattern}.{field}")
        if verdict is not None:
            assert (path, f"env {env_name(pattern, field)}") in verdict, (value, verdict)
        if pattern == "flags":
            continue
        error = code_verdict(pattern, field, value)
        assert (error is None) == (verdict is None), (value, error, verdict)
        if error is not None:
            assert isinstance(error, ValueError)
            assert f"invalid argument for {pattern}: {field}:" in str(error), value
    for value in (math.inf, math.nan, 1e19, -1.0):
        assert settings_verdict(pattern, field, value) is not None, value


def accepted_extremes():
    for pattern, field in FLOAT_FIELDS:
        for value in EXTREMES:
            if settings_verdict(pattern, field, value) is None:
                yield pytest.param(pattern, field, value, id=f"{pattern}.{field}={value!r}")


# What a call may answer: its result, chaos's injected result (None), or an error it is allowed.
ANSWERS = (str, type(None), ConnectionError, RejectedError, TimeoutExceededError)


def drive(mode, pattern, field, value, clock=None):
    """Calls through ``pattern`` configured with ``field=value``: successes, failures, slow calls,
    concurrent calls, and time passing by the value. Returns every outcome."""
    args = {**COMPANIONS[pattern, field], field: value}
    if pattern == "flags":
        reload_settings(env={env_name(pattern, field): str(value)})
        policy = retry_with_backoff("svc", max_attempts=2)
    else:
        if pattern == "chaos":
            reload_settings(env={"FF_ENABLE_CHAOS_INJECTION": "true"})
        elif pattern == "fallback":
            args["value"] = "default"
        policy = Policy(Spec(pattern, "svc", args))
    failing = {"now": False}

    def body():
        if failing["now"]:
            raise ConnectionError("down")
        return "ok"

    duration = min(value, bounds.MAX_SECONDS) if value > 0 else 0.0
    fn = policy(mode.define(body, name="fn"))
    slow = policy(mode.define(latency=min(2 * duration, 0.02 if clock is None else 1e6)))
    outcomes = [mode.outcome(fn), mode.outcome(slow)]
    failing["now"] = True
    outcomes += [mode.outcome(fn) for _ in range(3)]
    if clock is not None:
        clock.advance(duration or 1.0)
    failing["now"] = False
    outcomes += [mode.outcome(fn), *mode.gather(slow, 3), mode.outcome(fn)]
    return outcomes


@pytest.mark.parametrize(("pattern", "field", "value"), list(accepted_extremes()))
def test_every_accepted_extreme_works_in_real_calls(mode, clock, apply, pattern, field, value):
    apply()
    for outcome in drive(mode, pattern, field, value, clock):
        assert isinstance(outcome, ANSWERS), repr(outcome)


@pytest.mark.realtime
@pytest.mark.parametrize(
    ("pattern", "field"), [("timeout", "seconds"), ("bulkhead", "queue_timeout")]
)
def test_accepted_extremes_of_real_waits_work_on_the_real_clock(mode, apply, pattern, field):
    # Thread and event-loop waits take these values as they are (the fake clock does not).
    apply()
    for value in EXTREMES:
        registry.clear_claims()  # each value is a new set of call sites for the service
        if settings_verdict(pattern, field, value) is None:
            for outcome in drive(mode, pattern, field, value):
                assert isinstance(outcome, ANSWERS), (value, repr(outcome))


# --- state_url passwords are never shown ---------------------------------------------------

SECRET = "s3cret-pw"
URL = f"redis://app:{SECRET}@127.0.0.1:6379/0"
OTHER_URL = f"redis://app:{SECRET}@127.0.0.1:6380/0"


def test_state_url_is_redacted_in_policies_and_resolved_options():
    policies = [
        circuit_breaker("svc", state_url=URL),
        resilient("svc", circuit_breaker={"state_url": URL}),
    ]
    for policy in policies:
        assert SECRET not in repr(policy)
        assert "redis://app:***@127.0.0.1:6379/0" in repr(policy)
    options = view().options("circuit_breaker", {"state_url": URL}, None)
    assert SECRET not in repr(options)
    assert SECRET not in str(options)
    assert SECRET not in options.model_dump_json()
    assert SECRET not in repr(options.model_dump())


def test_a_redacted_state_url_still_connects_with_its_password():
    options = view().options("circuit_breaker", {"state_url": URL}, None)
    assert options.state_url == URL
    assert str(options.state_url) == URL
    pool = redis.ConnectionPool.from_url(options.state_url)
    assert pool.connection_kwargs["password"] == SECRET


def test_state_url_is_redacted_in_the_settings_in_force(apply, write):
    env = {"BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__STATE_URL": URL}
    apply(env, write(f'[defaults.circuit_breaker]\nstate_url = "{OTHER_URL}"\n'))
    settings = get_settings()
    assert settings.services["svc"].circuit_breaker.state_url == URL
    for shown in (
        repr(settings),
        str(settings),
        repr(settings.model_dump()),
        settings.model_dump_json(),
        repr(config.SNAPSHOT.service("svc").options("circuit_breaker", {}, None)),
    ):
        assert SECRET not in shown


def test_two_call_sites_with_different_state_urls_conflict_without_showing_them():
    def first():
        return "ok"

    def second():
        return "ok"

    circuit_breaker("svc", state_url=URL)(first)
    with pytest.raises(ConfigurationError) as caught:
        circuit_breaker("svc", state_url=OTHER_URL)(second)
    message = str(caught.value)
    assert "state_url is given two values in code" in message
    assert "redis://app:***@127.0.0.1:6379/0" in message
    assert SECRET not in message
    assert SECRET not in repr(caught.value.errors)


@pytest.mark.parametrize(
    "env",
    [
        {"BUTTRESS_SERVICES__X__CIRCUIT_BREAKER": URL},
        {"BUTTRESS_SERVICES__X__CIRCUIT_BREAKER__FAIL_MAX": URL},
        {"BUTTRESS_SERVICES__X": f'{{"circuit_breaker": "{URL}"}}'},
        {"BUTTRESS_DEFAULTS__TIMEOUT__SECONDS": URL},
    ],
    ids=["section", "another key", "section in JSON", "defaults key"],
)
def test_a_url_typed_into_the_wrong_variable_is_not_echoed(env):
    error = problems(env)
    [(path, source, _)] = error.errors
    (variable,) = env
    assert source == f"env {variable}"
    assert path in str(error)
    assert SECRET not in str(error)
    assert SECRET not in repr(error.errors)


# --- service names are case-insensitive everywhere -----------------------------------------


def test_two_spellings_of_a_service_share_one_breaker_one_label_one_section(mode, clock, apply):
    apply({"BUTTRESS_SERVICES__OPENFGA__CIRCUIT_BREAKER__FAIL_MAX": "2"})
    body, calls = failing()
    upper = circuit_breaker("OpenFGA")(mode.define(body, name="upper"))
    lower = resilient("openfga", retry={"enabled": False})(mode.define(body, name="lower"))
    with capture_events([events.CircuitStateChanged, events.CallFinished]) as seen:
        assert isinstance(mode.outcome(upper), ConnectionError)
        assert isinstance(mode.outcome(lower), ConnectionError)
        # Two failures through the two spellings opened the one circuit, which both now see.
        assert isinstance(mode.outcome(upper), CircuitOpenError)
        assert isinstance(mode.outcome(lower), CircuitOpenError)
    assert len(calls) == 2
    assert list(registry.instances("circuit_breaker")) == ["openfga"]
    assert {event.service for event in seen} == {"openfga"}
    assert (
        breaker("OpenFGA") is breaker("openfga") is registry.instances("circuit_breaker")["openfga"]
    )
    assert breaker("OPENFGA").options.fail_max == 2


def test_a_breaker_looked_up_before_any_call_has_the_canonical_name(mode, clock, apply):
    apply()
    early = breaker("Billing")
    assert early.service == "billing"
    protected = circuit_breaker("BILLING")(mode.define())
    assert mode.run(protected) == "ok"
    assert breaker("billing") is early
    assert list(registry.instances("circuit_breaker")) == ["billing"]


def test_the_admin_route_finds_a_circuit_by_any_spelling(mode, clock, apply):
    apply()
    protected = circuit_breaker("OpenFGA")(mode.define())
    assert mode.run(protected) == "ok"
    token = "t" * 24
    app = wsgi_app(admin_token=token)
    statuses = []
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/circuits/OPENFGA/force_open",
        "HTTP_AUTHORIZATION": f"Bearer {token}",
    }
    app(environ, lambda status, _headers: statuses.append(status))
    assert statuses == ["200 OK"]
    assert isinstance(mode.outcome(protected), CircuitOpenError)


# --- the options cache stays bounded -------------------------------------------------------


def test_ten_thousand_per_request_decorations_leave_the_options_cache_bounded(apply):
    apply()
    for request in range(10_000):
        # A per-request budget, as a handler computes it from the request's own deadline.
        budget = with_timeout("svc", seconds=1 + request / 10_000)(lambda: "ok")
        assert budget() == "ok"
    cache = config.SNAPSHOT.service("svc")._cache
    assert 0 < len(cache) <= config.CACHE_SIZE


def test_the_options_cache_keeps_the_entries_in_use():
    svc = view()
    hot = svc.options("timeout", {"seconds": 5.0}, None)
    for n in range(config.CACHE_SIZE * 2):
        svc.options("timeout", {"seconds": 10.0 + n}, None)
        assert svc.options("timeout", {"seconds": 5.0}, None) is hot


# --- the defaults of @resilient("x") with no configuration ---------------------------------

CONCURRENT = 40


def concurrent_calls(mode, protected_factory):
    """``CONCURRENT`` calls that are all in flight at once before any returns."""
    if mode.is_async:
        inside = 0
        everyone = asyncio.Event()

        async def op():
            nonlocal inside
            inside += 1
            if inside == CONCURRENT:
                everyone.set()
            await asyncio.wait_for(everyone.wait(), 2)
            return "ok"

    else:
        barrier = threading.Barrier(CONCURRENT, timeout=2)

        def op():  # type: ignore[misc]
            barrier.wait()
            return "ok"

    return mode.gather(protected_factory(op), CONCURRENT)


def test_resilient_with_no_configuration_caps_no_concurrency(mode, apply):
    apply()
    outcomes = concurrent_calls(mode, resilient("x"))
    assert outcomes == ["ok"] * CONCURRENT
    assert registry.instances("bulkhead") == {}


def test_resilient_with_no_configuration_gets_the_documented_defaults():
    svc = view(service="x")
    built = {
        pattern: importlib.import_module(f"buttress.patterns.{pattern}").build(
            BuildContext("x", svc.options(pattern, {}, None), "x#defaults")
        )
        is not None
        for pattern in config.PATTERNS
    }
    assert built == {
        "fallback": False,
        "cache": False,
        "coalescing": False,
        "retry": True,
        "hedging": False,
        "circuit_breaker": True,
        "adaptive_throttle": False,
        "rate_limit": False,
        "timeout": True,
        "bulkhead": False,
        "chaos": False,
    }
    assert svc.options("bulkhead", {}, None).limit is None
    assert svc.options("timeout", {}, None).seconds == 30.0
    cb = svc.options("circuit_breaker", {}, None)
    assert (cb.fail_max, cb.timeout) == (5, 60.0)
    # A limit from code, settings or a preset turns the bulkhead on.
    assert svc.options("bulkhead", {}, "api").limit == 50
    assert (
        view({"BUTTRESS_DEFAULTS__BULKHEAD__LIMIT": "8"}).options("bulkhead", {}, None).limit == 8
    )


# --- code arguments are strict, settings lax ----------------------------------------------------


def _handler(exc, *args, **kwargs):
    return "handled"


# Every public decorator, the pattern it configures, and what it needs besides the argument
# under test (hedging must be declared idempotent; a fallback needs something to fall back to).
DECORATORS = {
    circuit_breaker: ("circuit_breaker", {}),
    retry_with_backoff: ("retry", {}),
    with_timeout: ("timeout", {}),
    with_bulkhead: ("bulkhead", {}),
    with_hedging: ("hedging", {"idempotent": True}),
    with_adaptive_throttle: ("adaptive_throttle", {}),
    with_rate_limit: ("rate_limit", {}),
    with_fallback: ("fallback", {"handler": _handler}),
    with_cache: ("cache", {"ttl": 1.0}),
    with_coalescing: ("coalescing", {}),
    with_chaos: ("chaos", {}),
}
ALIASES = {"reset_timeout": "timeout"}  # a decorator argument that is another option's alias
ANY_VALUE = {"name", "result"}  # the service name (checked apart), chaos's wrong answer (any)
# What an argument needs besides it to be valid (a cap above its floor, both slow-call halves).
NEEDS = {
    "max_timeout": {"timeout": 1},
    "slow_call_duration": {"slow_call_rate_threshold": 0.5},
    "slow_call_rate_threshold": {"slow_call_duration": 1.0},
}

# Per scalar type of an option: values of a typed API's other types, which pydantic's lax mode
# would convert, and a right value inside every bound.
WRONG = {
    int: ["5", True, 5.0, 2.5, b"5"],
    float: ["1", "1.5", True, False, b"1"],
    bool: [1, 0, "true", "false", 1.0],
    str: [5, b"redis://127.0.0.1:6379/0", 1.0],
}
RIGHT = {int: 2, float: 1, bool: True, str: "redis://127.0.0.1:6379/0"}

# The arguments that are not a scalar: wrong values, right values.
OTHER_ARGUMENTS = {
    (circuit_breaker, "window"): (["COUNT", 1, True], ["count", "time"]),
    (circuit_breaker, "exclude"): (
        [KeyError("x"), "KeyError", 5],
        [[KeyError], (KeyError,), KeyError, (lambda exc: False,), [KeyError, callable]],
    ),
    (circuit_breaker, "failure_on_result"): (["x", 5], [bool, lambda value: value is None]),
    (retry_with_backoff, "jitter"): (["FULL", 1, True], ["none", "full", "equal", "decorrelated"]),
    (retry_with_backoff, "retry_on"): (
        [5, "ConnectionError", True],
        ["network", "transient", ConnectionError, [ConnectionError], (OSError,), callable],
    ),
    (retry_with_backoff, "budget"): (
        [{"ratio": "0.2"}, {"enabled": 1}, {"min_per_second": True}, {"window_seconds": "10"}],
        [{"ratio": 0.2}, {"enabled": False}, {"min_per_second": 1, "window_seconds": 10}, False],
    ),
    (retry_with_backoff, "retry_on_result"): (["x", 5], [callable]),
    (with_hedging, "delay"): (["0.05", "1", True, b"p95", [0.1]], ["p95", "p99.9", 1, 0.05]),
    (with_bulkhead, "adaptive"): (["AIMD", 1, True], ["aimd", "gradient2"]),
    (with_fallback, "handler"): (["x", 5], [_handler]),
    (with_fallback, "chain"): (["x", 5, _handler], [[_handler], (_handler, _handler)]),
    (with_fallback, "on"): ([5, "KeyError"], [KeyError, [KeyError], (KeyError,), callable]),
    (with_fallback, "defer"): (
        [1, "true", {"max_items": "3"}],
        [True, False, DeferOptions(max_items=3), {"max_items": 3, "max_age": 60}],
    ),
    (with_cache, "key"): (["x", 5], [lambda *args, **kwargs: args]),
    (with_coalescing, "key"): (["x", 5], [lambda *args, **kwargs: args]),
    (with_chaos, "exception"): ([5, "KeyError", KeyError("x")], [KeyError, lambda: KeyError("x")]),
}


def scalar_type(annotation):
    """``int``, ``float``, ``bool`` or ``str`` when an option holds that (or ``None``), else
    ``None``: a literal, a union of two types, a tuple, a callable, a group..."""
    if typing.get_origin(annotation) is typing.Annotated:
        return scalar_type(typing.get_args(annotation)[0])
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return scalar_type(members[0]) if len(members) == 1 else None
    return annotation if annotation in RIGHT else None


def keyword_arguments(decorator):
    return [
        name
        for name, parameter in inspect.signature(decorator).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ANY_VALUE
    ]


def scalar_arguments():
    for decorator, (pattern, _) in DECORATORS.items():
        fields = config.options_model(pattern).model_fields
        for name in keyword_arguments(decorator):
            kind = scalar_type(fields[ALIASES.get(name, name)].annotation)
            if kind is not None:
                yield decorator, name, kind


SCALAR_ARGUMENTS = list(scalar_arguments())


def arguments_table():
    """(decorator, argument, wrong values, right values) for every argument of every decorator."""
    for decorator, name, kind in SCALAR_ARGUMENTS:
        yield decorator, name, WRONG[kind], [RIGHT[kind]]
    for (decorator, name), (wrong, right) in OTHER_ARGUMENTS.items():
        yield decorator, name, wrong, right


TABLE = [
    pytest.param(decorator, name, wrong, right, id=f"{decorator.__name__}.{name}")
    for decorator, name, wrong, right in arguments_table()
]


def test_the_table_covers_every_argument_of_every_decorator():
    public = {getattr(decorators, name) for name in decorators.__all__} - {resilient}
    assert set(DECORATORS) == public
    covered = {(decorator, name) for decorator, name, _, _ in arguments_table()}
    every = {(d, name) for d in DECORATORS for name in keyword_arguments(d)}
    assert covered == every, every - covered
    # The scalar rows are found in the options models; these must be among them.
    assert {(circuit_breaker, "fail_max", int), (circuit_breaker, "timeout", float)} <= set(
        SCALAR_ARGUMENTS
    )
    assert (with_rate_limit, "state_url", str) in SCALAR_ARGUMENTS


def _decorate(decorator, name, value):
    _, base = DECORATORS[decorator]
    return decorator(**{**base, **NEEDS.get(name, {}), name: value})


def _resilient(decorator, name, value):
    pattern, base = DECORATORS[decorator]
    return resilient("svc", **{pattern: {**base, **NEEDS.get(name, {}), name: value}})


@pytest.mark.parametrize(("decorator", "name", "wrong", "right"), TABLE)
def test_a_wrong_typed_code_argument_fails_at_decoration_naming_it(decorator, name, wrong, right):
    pattern, _ = DECORATORS[decorator]
    option = ALIASES.get(name, name)
    # The alias exists only as a decorator argument; every other goes through resilient() too.
    entry_points = [_decorate] if name in ALIASES else [_decorate, _resilient]
    for value in wrong:
        for entry_point in entry_points:
            with pytest.raises(ConfigurationError) as info:
                entry_point(decorator, name, value)
            message = str(info.value)
            assert message.startswith(f"invalid argument for {pattern}: {option}"), (value, message)
            assert {(path.split(".")[0], source) for path, source, _ in info.value.errors} == {
                (option, "code")
            }, (value, info.value.errors)


@pytest.mark.parametrize(("decorator", "name", "wrong", "right"), TABLE)
def test_a_right_typed_code_argument_is_accepted(decorator, name, wrong, right):
    for value in right:
        assert isinstance(_decorate(decorator, name, value), Policy), value
        if name not in ALIASES:
            assert isinstance(_resilient(decorator, name, value), Policy), value


def test_a_wrong_type_is_named_and_the_value_is_not():
    with pytest.raises(ConfigurationError) as info:
        circuit_breaker("svc", fail_max="5")
    assert str(info.value) == (
        "invalid argument for circuit_breaker: fail_max: Input should be a valid integer (got str)"
    )
    with pytest.raises(ConfigurationError) as info:
        circuit_breaker("svc", fail_max=True)
    assert str(info.value).endswith("(got bool)")
    with pytest.raises(ConfigurationError) as info:
        circuit_breaker("svc", state_url=b"redis://app:s3cret@host")
    assert "s3cret" not in str(info.value)
    assert str(info.value).endswith("state_url: Input should be a valid string (got bytes)")


def test_code_arguments_are_strict_and_the_same_values_in_settings_are_converted(apply):
    # Settings are text (a variable) or a file's own types: "5" and "true" are what they can say.
    env = {
        "BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__FAIL_MAX": "5",
        "BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__TIMEOUT": "60",
        "BUTTRESS_SERVICES__SVC__CIRCUIT_BREAKER__COUNT_THROTTLED": "true",
        "BUTTRESS_SERVICES__SVC__HEDGING__DELAY": "0.05",
        "BUTTRESS_SERVICES__SVC__HEDGING__IDEMPOTENT": "yes",
    }
    options = view(env).options("circuit_breaker", {}, None)
    assert (options.fail_max, options.timeout, options.count_throttled) == (5, 60.0, True)
    assert view(env).options("hedging", {}, None).delay == 0.05
    for make in (
        lambda: circuit_breaker("svc", fail_max="5"),  # type: ignore[arg-type]
        lambda: circuit_breaker("svc", timeout="60"),  # type: ignore[arg-type]
        lambda: circuit_breaker("svc", count_throttled="true"),  # type: ignore[arg-type]
        lambda: with_hedging("svc", delay="0.05", idempotent=True),
    ):
        with pytest.raises(ConfigurationError, match="invalid argument"):
            make()


def test_every_preset_holds_values_code_could_give():
    # A preset is written in code: it obeys the rule for code arguments, not the one for text.
    for name, sections in config.PRESETS.items():
        for pattern, values in sections.items():
            given, _ = config.code_arguments(pattern, values)
            assert given == dict(values), (name, pattern)


def test_an_unknown_preset_fails_at_decoration():
    with pytest.raises(ConfigurationError, match="unknown preset 'fast'; known: api, ai"):
        resilient("svc", preset="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown preset"):
        Policy(Spec("retry", "svc", {}, preset="API"))


def test_one_exception_class_or_a_list_in_resilient_is_a_tuple_of_them(mode, clock, apply):
    # One class given alone is a tuple of it, not a predicate called with the failure (a class
    # is callable: KeyError(exc) is always true, so every failure would have been retried).
    apply()
    calls = []

    def body(kind):
        calls.append(kind)
        raise kind("down")

    policy = resilient(
        "svc",
        retry={"retry_on": KeyError, "max_attempts": 2, "initial": 0},
        fallback={"on": [LookupError], "value": "fallback"},
        circuit_breaker={"exclude": [KeyError, ValueError]},
    )
    fn = policy(mode.define(body))
    assert mode.run(fn, KeyError) == "fallback"
    assert calls == [KeyError, KeyError]
    calls.clear()
    assert isinstance(mode.outcome(fn, ValueError), ValueError)
    assert calls == [ValueError]
    assert dict(policy.specs[3].code_args)["retry_on"] == (KeyError,)
    assert dict(policy.specs[5].code_args)["exclude"] == (KeyError, ValueError)
