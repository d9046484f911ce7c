"""``python -m buttress``: config show and config check, their output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "buttress.toml"


def run(*args, env=None):
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith(("BUTTRESS_", "FF_ENABLE_"))
    }
    clean["PYTHONPATH"] = str(ROOT / "src")
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "buttress", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_accepts_the_example_file():
    done = run("config", "check", env={"BUTTRESS_CONFIG_FILE": str(EXAMPLE)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"settings ok (file {EXAMPLE}); patterns on; "
        "services: database, keycloak, llm, openfga, prometheus, redis\n"
    )
    assert done.stderr == ""


def test_check_without_any_settings_is_ok():
    done = run("config", "check")
    assert (done.returncode, done.stdout) == (
        0,
        "settings ok (no config file); patterns on; services: none\n",
    )


def test_check_reports_every_error_with_path_and_source_and_exits_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[services.llm.timeout]\nseconds = -1\n[services.llm.bulkhed]\nlimit = 3\n")
    done = run(
        "config",
        "check",
        "--config",
        str(bad),
        env={"BUTTRESS_SERVICES__REDIS__RETRY__MAX_ATEMPTS": "2"},
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "invalid buttress settings (3 problems):"
    assert sorted(lines[1:]) == [
        f"  services.llm.bulkhed (from file {bad}): "
        "unknown key 'bulkhed'; did you mean 'bulkhead'?",
        f"  services.llm.timeout.seconds (from file {bad}): "
        "Input should be greater than or equal to 0.001 (got -1)",
        "  services.redis.retry.max_atempts "
        "(from env BUTTRESS_SERVICES__REDIS__RETRY__MAX_ATEMPTS): "
        "unknown key 'max_atempts'; did you mean 'max_attempts'?",
    ]


def test_check_reports_the_kill_switch_state():
    done = run("config", "check", env={"FF_ENABLE_RESILIENCE_PATTERNS": "false"})
    assert done.returncode == 0
    assert "patterns OFF (kill switch)" in done.stdout


def test_show_prints_values_with_their_sources():
    done = run(
        "config",
        "show",
        "--service",
        "OpenFGA",
        env={
            "BUTTRESS_CONFIG_FILE": str(EXAMPLE),
            "BUTTRESS_SERVICES__OPENFGA__TIMEOUT__SECONDS": "3",
        },
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "[services.openfga.timeout]" in lines
    assert "[defaults]" not in lines  # one service asked for: only that one

    def line(key_value):
        [found] = [entry for entry in lines if entry.startswith(key_value + " ")]
        return found.split("  # ")[1]

    assert line("seconds = 3.0") == "env BUTTRESS_SERVICES__OPENFGA__TIMEOUT__SECONDS"
    assert line("limit = 50") == f"file {EXAMPLE}"
    assert line('jitter = "full"') == f"file {EXAMPLE} (defaults)"
    assert line("success_threshold = 1") == "default"
    assert line('criticality = "critical"') == f"file {EXAMPLE}"


def test_show_json_is_machine_readable():
    done = run("config", "show", "--format", "json", env={"BUTTRESS_CONFIG_FILE": str(EXAMPLE)})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["config_file"] == str(EXAMPLE)
    assert shown["enabled"] == {"value": True, "source": f"file {EXAMPLE}"}
    llm = shown["services"]["llm"]
    assert llm["circuit_breaker"]["fail_max"] == {"value": 3, "source": "preset ai"}
    assert llm["timeout"]["seconds"] == {"value": 60.0, "source": f"file {EXAMPLE}"}
    assert llm["preset"] == {"value": "ai", "source": f"file {EXAMPLE}"}
    assert shown["defaults"]["bulkhead"]["limit"] == {"value": None, "source": "default"}


def test_show_an_unconfigured_service_gives_the_defaults():
    done = run(
        "config",
        "show",
        "--service",
        "billing",
        "--format",
        "json",
        env={"BUTTRESS_DEFAULTS__BULKHEAD__LIMIT": "12"},
    )
    shown = json.loads(done.stdout)
    assert list(shown["services"]) == ["billing"]
    assert shown["services"]["billing"]["bulkhead"]["limit"] == {
        "value": 12,
        "source": "env BUTTRESS_DEFAULTS__BULKHEAD__LIMIT (defaults)",
    }


def test_show_redacts_passwords_in_state_url():
    secret = {
        "BUTTRESS_SERVICES__DB__CIRCUIT_BREAKER__STATE_URL": "redis://app:s3cret@redis:6379/0"
    }
    for fmt in ("text", "json"):
        done = run("config", "show", "--format", fmt, env=secret)
        assert done.returncode == 0, done.stderr
        assert "s3cret" not in done.stdout
        assert "redis://app:***@redis:6379/0" in done.stdout


def test_show_with_invalid_settings_exits_1():
    done = run("config", "show", env={"BUTTRESS_DEFAULTS__MODE": "loud"})
    assert done.returncode == 1
    assert done.stdout == ""
    assert "defaults.mode (from env BUTTRESS_DEFAULTS__MODE)" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("config",),
        ("config", "show", "--format", "xml"),
        ("config", "check", "--bogus"),
        ("nope",),
    ],
)
def test_usage_errors_exit_2(args):
    done = run(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_the_demo_command_says_where_the_demo_went():
    # The demo left the package for the repository's demo/ directory; the old command points there
    # (whatever arguments it is given) and runs nothing.
    done = run("demo", "--duration", "5")
    assert done.returncode == 2
    assert "make demo" in done.stderr
    assert "python -m demo" in done.stderr
    assert done.stdout == ""


# --- which file, and the code arguments of call sites ------------------------------------


def test_show_says_which_config_file_it_read_or_that_it_read_none():
    done = run("config", "show", "--service", "llm")
    assert done.returncode == 0, done.stderr
    header = done.stdout.splitlines()[:3]
    assert header[1] == (
        "# config file: none (BUTTRESS_CONFIG_FILE is not set; "
        "buttress never reads a file it was not pointed at)"
    )
    assert header[2].startswith("# code arguments are not shown")
    named = run("config", "show", "--service", "llm", env={"BUTTRESS_CONFIG_FILE": str(EXAMPLE)})
    assert named.stdout.splitlines()[1] == f"# config file: {EXAMPLE}"


APP = """
from buttress import circuit_breaker, resilient, retry_with_backoff, with_timeout

@resilient("LLM", preset="ai", timeout={"seconds": 7})
async def complete(prompt): ...

class Client:
    @with_timeout(seconds=3)
    def fetch(self): ...

@circuit_breaker("llm", fail_max=2, state_url="redis://app:s3cret@127.0.0.1:6379/0")
def other(): ...

@retry_with_backoff("pay", max_delay=10)
def charge(): ...
"""


@pytest.fixture
def app_module(tmp_path):
    (tmp_path / "app_under_test.py").write_text(APP)
    return {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{tmp_path}"}


def test_show_with_a_module_shows_the_code_arguments_of_its_call_sites(app_module):
    done = run("config", "show", "--format", "json", "--module", "app_under_test", env=app_module)
    assert done.returncode == 0, done.stderr
    sites = json.loads(done.stdout)["call_sites"]
    assert sorted(sites) == [
        "app_under_test.Client.fetch",
        "app_under_test.charge",
        "app_under_test.complete",
        "app_under_test.other",
    ]
    complete = sites["app_under_test.complete"]
    assert complete["service"] == {"value": "llm", "source": "code"}
    assert complete["timeout"]["seconds"] == {"value": 7.0, "source": "code"}
    assert complete["retry"]["max_attempts"] == {"value": 3, "source": "preset ai"}
    # The shared breaker of "llm" takes the code arguments of both of its call sites.
    assert complete["circuit_breaker"]["fail_max"] == {"value": 2, "source": "code"}
    assert complete["circuit_breaker"]["timeout"] == {"value": 120.0, "source": "preset ai"}
    fetch = sites["app_under_test.Client.fetch"]
    assert fetch["service"]["value"] == "app_under_test.client.fetch"
    assert fetch["timeout"]["seconds"] == {"value": 3.0, "source": "code"}
    assert "s3cret" not in done.stdout
    text = run("config", "show", "--module", "app_under_test", env=app_module).stdout
    assert '[call_sites."app_under_test.other".circuit_breaker]' in text
    assert "s3cret" not in text


def test_settings_still_beat_code_arguments_in_the_call_site_view(app_module):
    env = {**app_module, "BUTTRESS_SERVICES__LLM__TIMEOUT__SECONDS": "4"}
    done = run("config", "show", "--format", "json", "--module", "app_under_test", env=env)
    seconds = json.loads(done.stdout)["call_sites"]["app_under_test.complete"]["timeout"]
    assert seconds["seconds"] == {
        "value": 4.0,
        "source": "env BUTTRESS_SERVICES__LLM__TIMEOUT__SECONDS",
    }


def test_check_with_a_module_checks_its_call_sites_against_the_settings(app_module):
    done = run("config", "check", "--module", "app_under_test", env=app_module)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.endswith("; call sites: 4\n")
    # Valid settings that make a call site's own arguments invalid: found before any call.
    env = {**app_module, "BUTTRESS_SERVICES__PAY__RETRY__INITIAL": "20"}
    assert run("config", "check", env=env).returncode == 0
    done = run("config", "check", "--module", "app_under_test", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("call site app_under_test.charge: ")
    assert (
        "services.pay.retry (from code, env BUTTRESS_SERVICES__PAY__RETRY__INITIAL): "
        "max_delay (10.0) must be >= initial (20.0)"
    ) in done.stderr


def test_a_module_that_cannot_be_imported_is_a_usage_error(app_module):
    done = run("config", "show", "--module", "no_such_module_here", env=app_module)
    assert done.returncode == 2
    assert "module no_such_module_here cannot be imported" in done.stderr


@pytest.mark.parametrize("command", ["show", "check"])
def test_a_module_that_raises_at_import_is_a_usage_error_too(tmp_path, command):
    # It was the module's traceback and exit 1, which a deploy check reads as invalid settings.
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('no database at import')\n")
    env = {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{tmp_path}"}
    done = run("config", command, "--module", "broken_app", env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "module broken_app cannot be imported: it raised RuntimeError: no database at import"
    )


def test_config_show_prints_the_retry_budget_as_an_inline_table():
    done = run(
        "config",
        "show",
        "--service",
        "llm",
        env={"BUTTRESS_SERVICES__LLM__RETRY__BUDGET__RATIO": "0.1"},
    )
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("budget = ")]
    assert line.startswith(
        "budget = { enabled = true, ratio = 0.1, min_per_second = 10.0, window_seconds = 10.0 }"
    )
    assert line.endswith("# env BUTTRESS_SERVICES__LLM__RETRY__BUDGET__RATIO")
