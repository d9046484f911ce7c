"""grafana/: the dashboard and alert rules against the catalog, promtool, and a real Prometheus."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from buttress.instrumentation.prometheus import CATALOG, FAMILIES

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "buttress-dashboard.json"
RULES = GRAFANA / "buttress-alerts.yml"
RULE_TESTS = GRAFANA / "buttress-alerts.test.yml"
ROWS = [
    "Overview",
    "Circuit breakers",
    "Retries",
    "Timeouts",
    "Bulkheads",
    "Rate limits",
    "Fallbacks and degradation",
    "Cache, coalescing and deferred calls",
]
ALERTS = {
    "ButtressCircuitOpen",
    "ButtressCircuitFlapping",
    "ButtressRetryExhaustionHigh",
    "ButtressTimeoutRatioHigh",
    "ButtressBulkheadRejections",
    "ButtressFallbackRatioHigh",
    "ButtressStateStoreErrors",
    "ButtressDegradationCritical",
    "ButtressPatternsDisabled",
}
METRIC = re.compile(r"\bbuttress_[a-z_]+")
SELECTOR = re.compile(r"\b(buttress_[a-z_]+)(\{[^}]*\})?")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def panel_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def family_of(name: str) -> str:
    if name in FAMILIES:
        return name
    return re.sub(r"_(bucket|count|sum)$", "", name)


def binary(name: str) -> str:
    """The path of a Prometheus binary; a missing one skips locally and fails under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- the dashboard --------------------------------------------------------------------------------


def test_the_dashboard_file_is_what_build_dashboard_writes():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == DASHBOARD.read_text(), "run: python grafana/build_dashboard.py"


def test_the_dashboard_is_import_ready():
    board = dashboard()
    (source,) = board["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == ROWS
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_job_and_service_variables_are_multi_valued_regexes():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(variables) == {"job", "service"}
    for variable in variables.values():
        assert variable["multi"] is True
        assert variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert '{job=~"$job"}' in variables["service"]["definition"]


@pytest.mark.parametrize(("title", "expr"), panel_queries())
def test_every_query_filters_by_job_and_service_with_regex_matchers(title, expr):
    selectors = SELECTOR.findall(expr)
    assert selectors, title
    for name, labels in selectors:
        assert 'job=~"$job"' in labels, (title, name)
        if "service" in FAMILIES[family_of(name)].labels:
            assert 'service=~"$service"' in labels, (title, name)


def test_every_metric_in_the_dashboard_and_the_rules_is_in_the_catalog():
    used = {name for _, expr in panel_queries() for name in METRIC.findall(expr)}
    used |= {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    unknown = sorted(name for name in used if family_of(name) not in FAMILIES)
    assert unknown == []
    for name in used:
        family = FAMILIES[family_of(name)]
        if name != family.name:  # _bucket, _count, _sum exist only for histograms
            assert family.kind == "histogram", name


def test_every_family_is_on_the_dashboard_or_deliberately_off_it():
    on_dashboard = {family_of(n) for _, expr in panel_queries() for n in METRIC.findall(expr)}
    for family in CATALOG:
        if family.off_dashboard is None:
            assert family.name in on_dashboard, f"{family.name}: no panel shows it"
        else:
            assert family.name not in on_dashboard, f"{family.name} is on the dashboard"


def test_the_alert_rules_cover_the_required_conditions():
    assert {rule["alert"] for rule in rules()} == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        assert "by (job," in rule["expr"].replace("\n", " ")


# --- promtool -------------------------------------------------------------------------------------


@pytest.mark.prometheus
def test_promtool_checks_the_rules():
    run = subprocess.run(
        [binary("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in run.stdout


@pytest.mark.prometheus
def test_promtool_unit_tests_of_the_rules_pass():
    run = subprocess.run(
        [binary("promtool"), "test", "rules", RULE_TESTS.name],
        cwd=GRAFANA,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS


# --- a real Prometheus scraping real buttress metrics ---------------------------------------------

EXPORTER = """
import importlib.util, sys, time
from pathlib import Path
from prometheus_client import start_http_server
from buttress import _clock, instrumentation
from buttress.testing import FakeClock

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

tests = Path(sys.argv[2])
Mode = load("buttress_tests_conftest", tests / "conftest.py").Mode
scenarios = load("buttress_test_scenarios", tests / "instrumentation" / "scenarios.py")
instrumentation.install_defaults()
server, _ = start_http_server(int(sys.argv[1]), addr="127.0.0.1")
clock = FakeClock()
_clock.set_clock(clock)
modes = [Mode("sync"), Mode("async")]
while True:
    for mode in modes:
        scenarios.run_all(mode, clock)
    time.sleep(0.3)
"""

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: buttress
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return (
            json.loads(response.read())
            if response.headers.get_content_type() == "application/json"
            else response.read()
        )


def concrete(expr: str) -> str:
    """A dashboard query as Grafana would send it for job "buttress" and every service."""
    return (
        expr.replace("$__rate_interval", "15s")
        .replace('"$job"', '"buttress"')
        .replace('"$service"', '".*"')
    )


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(item["value"][1])) for item in result)


@pytest.fixture
def exporter(tmp_path):
    port = free_port()
    log = (tmp_path / "exporter.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(port), str(ROOT / "tests")],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            body = get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            assert process.poll() is None, (tmp_path / "exporter.log").read_text()
            assert time.monotonic() < deadline, "the exporter did not start"
            time.sleep(0.1)
            continue
        if b"buttress_circuit_breaker_recovery_seconds_count" in body:
            break
        time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(10)
    log.close()


@pytest.fixture
def prometheus() -> str:
    return binary("prometheus")


@pytest.mark.prometheus
def test_a_real_prometheus_answers_every_panel_query(tmp_path, prometheus, exporter):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(rules=RULES, port=exporter))
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    pending = {title: concrete(expr) for title, expr in panel_queries()}
    pending["alert ButtressFallbackRatioHigh"] = 'ALERTS{alertname="ButtressFallbackRatioHigh"}'
    pending["alert ButtressStateStoreErrors"] = 'ALERTS{alertname="ButtressStateStoreErrors"}'
    answered: dict[str, list[dict[str, Any]]] = {}
    try:
        deadline = time.monotonic() + 40  # the first scrape is queryable ~5.5 s after start
        while pending and time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            for title, expr in list(pending.items()):
                try:
                    reply = get(f"{api}/query?query={urllib.parse.quote(expr)}")
                except OSError:
                    break  # not listening yet
                assert reply["status"] == "success", (title, expr, reply)
                result = reply["data"]["result"]
                if has_data(result) or (title.startswith("alert ") and result):
                    answered[title] = result
                    del pending[title]
            time.sleep(0.5)
        assert pending == {}, f"no data for: {sorted(pending)}"
        rules_loaded = get(f"{api}/rules")["data"]["groups"]
        assert {r["name"] for g in rules_loaded for r in g["rules"]} == ALERTS
        assert all(r["health"] == "ok" for g in rules_loaded for r in g["rules"])
    finally:
        process.terminate()
        process.wait(10)
        log.close()
    services = {item["metric"].get("service") for item in answered["Calls by outcome"]}
    assert {"openfga", "llm", "db", "search", "prices"} <= services
