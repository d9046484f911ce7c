"""Environment variable names as the operating system hands them over: any case, any letters.

Variable names are case-insensitive (docs/configuration.md#environment-variables), and a service
named with letters outside ASCII is the service ``registry.service_name`` makes of the name in
code. Only ASCII letters fold in the names buttress reads: ``str.upper()`` turns ``ß`` into
``SS`` and the long s (U+017F) into ``S``.
"""

from __future__ import annotations

import pytest

from buttress import CircuitOpenError, ConfigurationError, circuit_breaker, config, reload_settings
from buttress.config._sources import is_variable


@pytest.fixture
def apply(monkeypatch):
    """Install settings from an explicit environment; the old ones return after the test."""
    monkeypatch.setattr(config, "SNAPSHOT", config.SNAPSHOT)
    return lambda env: reload_settings(env=env)


def failures_to_open(mode, service):
    """How many failing calls it takes to open the circuit of ``service``."""

    def fail():
        raise ConnectionError("down")

    call = circuit_breaker(name=service)(mode.define(fail, name="call"))
    for count in range(1, 20):
        if isinstance(mode.outcome(call), CircuitOpenError):
            return count - 1
    raise AssertionError("the circuit never opened")


@pytest.mark.parametrize(
    ("service", "variable_part"),
    [
        # str.upper() is no round trip for these: 'STRASSE'.lower() is another service.
        ("Straße", "STRAßE"),
        ("Straße", "straße"),
        ("ﬁle-store", "ﬁle-store"),  # a ligature: upper-cased it is 'FILE-STORE'
        ("Café", "CAFÉ"),
    ],
)
def test_a_variable_for_a_service_with_letters_outside_ascii_reaches_it(
    mode, clock, apply, service, variable_part
):
    apply({f"BUTTRESS_SERVICES__{variable_part}__CIRCUIT_BREAKER__FAIL_MAX": "2"})
    assert failures_to_open(mode, service) == 2


def test_the_service_it_made_before_is_not_made_of_the_folded_name(apply):
    settings = apply({"BUTTRESS_SERVICES__STRAßE__CIRCUIT_BREAKER__FAIL_MAX": "2"})
    assert list(settings.services) == ["straße"]


@pytest.mark.parametrize(
    "name",
    [
        # long s: upper-cased it is "S"
        "buttre\u017f\u017f_services__x__circuit_breaker__fail_max",
        "BUTTREß_SERVICES__X__CIRCUIT_BREAKER__FAIL_MAX",  # sharp s: upper-cased it is 'SS'
    ],
)
def test_a_name_that_only_folds_into_the_prefix_is_not_ours(apply, name):
    # Neither applied nor refused: it is someone else's variable.
    settings = apply({name: "2"})
    assert dict(settings.services) == {}


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("BUTTRESS_CONFIG_FILE", True),
        ("buttress_config_file", True),
        ("Buttress_Config_File", True),
        ("BUTTRE\u017f\u017f_CONFIG_FILE", False),
        ("BUTTRESS_CONFIG_FILE ", False),
    ],
)
def test_a_variable_is_ours_in_any_ascii_case_only(name, ours):
    assert is_variable(name, "BUTTRESS_CONFIG_FILE") is ours


@pytest.mark.parametrize(
    ("env", "path"),
    [
        # A POSIX environment may hold one variable in two spellings: it was a ValueError from
        # deep inside the loader (the kill switches' rule looked the name up in their list).
        (
            {"FF_ENABLE_CHAOS_INJECTION": "true", "ff_enable_chaos_injection": "false"},
            "chaos_enabled",
        ),
        (
            {"BUTTRESS_SERVICES__X__SEED": "1", "buttress_services__x__seed": "2"},
            "services.x.seed",
        ),
        (
            {"FF_ENABLE_RESILIENCE_PATTERNS": "true", "ff_enable_resilience_patterns": "no"},
            "enabled",
        ),
    ],
)
def test_one_variable_in_two_spellings_with_two_values_is_a_settings_error(env, path):
    with pytest.raises(ConfigurationError) as info:
        config.load_settings(env=env)
    [(found, source, message)] = info.value.errors
    assert found == path
    assert source == "env {}, env {}".format(*sorted(env))
    assert message == "set twice with different values (variable names are case-insensitive)"


def test_one_variable_in_two_spellings_that_agree_is_fine():
    settings = config.load_settings(
        env={
            "BUTTRESS_SERVICES__X__SEED": "7",
            "buttress_services__x__seed": "7",
            "FF_ENABLE_CHAOS_INJECTION": "true",
            "ff_enable_chaos_injection": "yes",
        }
    )
    assert settings.services["x"].seed == 7
    assert settings.chaos_enabled is True
