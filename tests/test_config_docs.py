"""docs/configuration.md agrees with the settings: every key, default, variable and preset."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from buttress import config
from buttress.patterns._base import BuildContext

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text("utf-8")


def table_after(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after ``heading``, header excluded."""
    start = PAGE.index(f"\n{heading}\n")
    rows: list[list[str]] = []
    for line in PAGE[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    assert rows, f"no table after {heading!r}"
    return rows[2:]  # header and separator


def shown(value: object) -> str:
    if value is None:
        return "unset"
    return f"`{json.dumps(value)}`"


def keyed(rows: list[list[str]]) -> dict[str, list[str]]:
    return {row[0].strip("`"): row for row in rows}


@pytest.mark.parametrize("pattern", config.PATTERNS)
def test_every_pattern_key_is_documented_with_default_and_variable(pattern):
    rows = keyed(table_after(f"### `{pattern}`"))
    # A group option (retry.budget) is documented key by key: `budget.ratio`, ...
    fields = {}
    for name, info in config.SECTIONS[pattern].model_fields.items():
        group = config.nested_fields(info.annotation)
        if group is None:
            fields[name] = info
        else:
            fields.update({f"{name}.{key}": inner for key, inner in group.items()})
    assert list(rows) == list(fields)
    for key, info in fields.items():
        _, _, default, variable, meaning = rows[key]
        assert default == shown(info.default), key
        env_key = key.upper().replace(".", "__")
        assert variable == f"`BUTTRESS_SERVICES__<NAME>__{pattern.upper()}__{env_key}`"
        assert meaning


@pytest.mark.parametrize("pattern", config.PATTERNS)
def test_code_only_options_are_listed(pattern):
    section = PAGE[PAGE.index(f"\n### `{pattern}`\n") :]
    line = next(entry for entry in section.splitlines() if entry.startswith("Code only:"))
    documented = set(re.findall(r"`(\w+)`", line.split("(")[0]))
    assert documented == set(config.options_model(pattern).code_only)


def test_every_service_key_is_documented():
    rows = keyed(table_after("## Service keys"))
    assert list(rows) == list(config.FLAGS)
    for key in config.FLAGS:
        _, _, default, variable, _ = rows[key]
        assert default == shown(config.ServiceSettings.model_fields[key].default), key
        assert variable == f"`BUTTRESS_SERVICES__<NAME>__{key.upper()}`"


def test_every_top_level_key_is_documented():
    rows = keyed(table_after("## Top-level keys"))
    assert list(rows) == list(config.Settings.model_fields)
    assert rows["enabled"][2:4] == ["`true`", "`FF_ENABLE_RESILIENCE_PATTERNS`"]
    assert rows["chaos_enabled"][2:4] == ["`false`", f"`{config.CHAOS_VARIABLE}`"]
    assert rows["defaults"][3] == "`BUTTRESS_DEFAULTS`"
    assert rows["services"][3] == "`BUTTRESS_SERVICES`"


PRESET_COLUMNS = {
    "circuit breaker": "circuit_breaker",
    "retry": "retry",
    "timeout": "timeout",
    "bulkhead": "bulkhead",
}


def test_presets_table_matches_the_presets():
    header_line = PAGE[PAGE.index("\n## Presets\n") :].split("\n| preset |")[1].split("\n")[0]
    columns = [cell.strip() for cell in header_line.strip("|").split("|")]
    rows = keyed(table_after("## Presets"))
    assert set(rows) == set(config.PRESETS)
    for name, cells in rows.items():
        documented = {
            PRESET_COLUMNS[column]: {
                key: json.loads(value) for key, value in re.findall(r"`(\w+) = ([^`]+)`", cell)
            }
            for column, cell in zip(columns, cells[1:], strict=True)
        }
        assert documented == {
            pattern: dict(values) for pattern, values in config.PRESETS[name].items()
        }


def test_every_preset_has_a_paragraph():
    for name in config.PRESETS:
        assert f"* **{name}**:" in PAGE


def test_the_defaults_table_says_what_resilient_does_with_no_configuration():
    rows = keyed(table_after('## Defaults: `@resilient("x")` with no configuration'))
    assert list(rows) == list(config.PATTERNS)
    view = config.Snapshot(0, config.load_settings({})).service("x")
    for pattern, (_, state, defaults, why) in rows.items():
        options = view.options(pattern, {}, None)
        module = importlib.import_module(f"buttress.patterns.{pattern}")
        built = module.build(BuildContext("x", options, "x#docs")) is not None
        assert state == ("on" if built else "off"), pattern
        documented = dict(re.findall(r"`(\w+) = ([^`]+)`", defaults))
        for key, value in documented.items():
            assert getattr(options, key) == json.loads(value), (pattern, key)
        for key in re.findall(r"`(\w+)` unset", defaults):
            assert getattr(options, key) is None, (pattern, key)
        assert why
