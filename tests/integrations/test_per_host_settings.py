"""A per-host instance (``service[host]``) follows its service's settings unless it has its own."""

from __future__ import annotations

from pathlib import Path

import pytest

import buttress
from buttress import config


@pytest.fixture
def settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "buttress.toml"
    path.write_text(
        "[services.partners.circuit_breaker]\n"
        "fail_max = 7\n"
        "[services.partners]\n"
        'mode = "shadow"\n'
        '[services."partners[slow.example:8443]".circuit_breaker]\n'
        "fail_max = 2\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("BUTTRESS_CONFIG_FILE", str(path))
    buttress.reload_settings()
    yield
    monkeypatch.delenv("BUTTRESS_CONFIG_FILE")
    buttress.reload_settings()


def test_a_host_follows_its_service(settings_file: None) -> None:
    view = config.SNAPSHOT.service("partners[api.example]")
    assert view.options("circuit_breaker", {}).fail_max == 7
    assert view.mode == "shadow"
    explained = view.explain()
    assert explained["circuit_breaker"]["fail_max"]["source"].startswith("file ")


def test_a_host_with_a_section_of_its_own_uses_it(settings_file: None) -> None:
    view = config.SNAPSHOT.service("partners[slow.example:8443]")
    assert view.options("circuit_breaker", {}).fail_max == 2


def test_a_name_that_only_looks_per_host_is_not_confused(settings_file: None) -> None:
    assert (
        config.SNAPSHOT.service("other[api.example]").options("circuit_breaker", {}).fail_max == 5
    )
    assert config.SNAPSHOT.service("partners").options("circuit_breaker", {}).fail_max == 7
