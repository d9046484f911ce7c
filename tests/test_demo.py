"""The demo: a short real run whose report must agree with what independently observed it.

One run (8 s, fixed seed) is shared by the module: the test session captures every buttress event
itself, and the upstream counts the requests that reached it; each figure of the report is checked
against those records, not against constants. The pieces (phases, the upstream's behaviour per
phase, the report arithmetic, the endpoints) are also tested on their own, without real time where
none is needed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from buttress import config, events, instrumentation, with_fallback
from buttress.patterns.chaos import InjectedConnectionError
from buttress.testing import capture_events, fake_clock

# The demo is not in the package: it runs from the repository root (`make demo` runs
# `python -m demo` there), so the tests import it from there too, however pytest was started.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import main  # noqa: E402
from demo.endpoints import Endpoints  # noqa: E402
from demo.report import build_report, percentile  # noqa: E402
from demo.runner import DemoOptions, _Progress, default_config, run  # noqa: E402
from demo.schedule import PHASES, build_schedule  # noqa: E402
from demo.traffic import (  # noqa: E402
    NETWORK,
    PROTECTED,
    SERVICE,
    UNPROTECTED,
    CallRecord,
    Observed,
    describe_chaos,
    sync_clients,
)
from demo.upstream import (  # noqa: E402
    HEALTHY_LATENCY,
    RETRY_AFTER_SECONDS,
    SLOW_LATENCY,
    FlakyUpstream,
    Hit,
)

DURATION = 8.0
SEED = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One short demo run, watched from outside: (result, events captured here, output, paths)."""
    out = tmp_path_factory.mktemp("demo")
    options = DemoOptions(
        duration=DURATION, seed=SEED, output=out / "timeline.png", json=out / "report.json"
    )
    printed = io.StringIO()
    with capture_events() as seen:
        result = run(options, out=printed)
    return result, seen, printed.getvalue(), options


def of(seen, kind, service=SERVICE):
    return [e for e in seen.of(kind) if e.service == service]


# --- the report agrees with what observed the run ---------------------------------------------


@pytest.mark.realtime
def test_protected_client_spares_the_upstream_during_the_outage(demo):
    result, _, _, _ = demo
    report = result.report
    outage_hits = Counter(h.client for h in result.hits if h.phase == "outage")
    protected, unprotected = report.client(PROTECTED), report.client(UNPROTECTED)
    assert protected.upstream_calls_during_outage == outage_hits[PROTECTED]
    assert unprotected.upstream_calls_during_outage == outage_hits[UNPROTECTED]
    assert protected.upstream_calls_during_outage * 3 < unprotected.upstream_calls_during_outage
    every_hit = Counter(h.client for h in result.hits)
    assert (protected.upstream_calls, unprotected.upstream_calls) == (
        every_hit[PROTECTED],
        every_hit[UNPROTECTED],
    )


@pytest.mark.realtime
def test_the_circuit_opened_and_closed_as_the_events_say(demo):
    result, seen, _, _ = demo
    changes = of(seen, events.CircuitStateChanged)
    trips = [c for c in changes if (c.old_state, c.new_state) == ("closed", "open")]
    reopened = [c for c in changes if (c.old_state, c.new_state) == ("half_open", "open")]
    protected = result.report.client(PROTECTED)
    assert protected.circuit_trips == len(trips) >= 1
    assert protected.failed_trials == len(reopened)
    assert changes[-1].new_state == "closed"
    assert result.report.circuit_closed_at is not None
    assert [t.new_state for t in result.report.transitions] == [c.new_state for c in changes]


@pytest.mark.realtime
def test_retries_fallbacks_and_faults_match_the_events(demo):
    result, seen, _, _ = demo
    protected, unprotected = result.report.client(PROTECTED), result.report.client(UNPROTECTED)
    assert protected.retries == len(of(seen, events.RetryScheduled)) > 0
    fallbacks = of(seen, events.FallbackUsed)
    assert protected.fallbacks_served == len(fallbacks) > 0
    assert protected.answered_by_fallback == len(fallbacks)
    injected = of(seen, events.ChaosInjected, NETWORK)
    assert protected.faults_injected + unprotected.faults_injected == len(injected)
    assert unprotected.retries is None
    assert unprotected.circuit_trips is None


@pytest.mark.realtime
def test_call_counts_and_latencies_come_from_the_calls(demo):
    result, seen, _, _ = demo
    report = result.report
    for client in (PROTECTED, UNPROTECTED):
        mine = [r for r in result.records if r.client == client]
        figures = report.client(client)
        assert figures.requests == len(mine)
        outcomes = Counter(r.outcome for r in mine)
        assert figures.answered_by_upstream == outcomes["ok"]
        assert figures.failed == outcomes["error"]
        assert figures.p95 == percentile([r.latency for r in mine], 95)
        assert {r.site for r in mine} == {"sync", "async"}
    # Each protected call finished exactly once, as the policy reported it.
    assert report.client(PROTECTED).requests == len(of(seen, events.CallFinished))
    assert report.client(PROTECTED).success_rate > report.client(UNPROTECTED).success_rate


@pytest.mark.realtime
def test_phases_follow_the_seed_and_every_phase_saw_traffic(demo):
    result, _, _, _ = demo
    assert result.report.schedule == build_schedule(DURATION, SEED)
    assert tuple(p.name for p in result.report.schedule.phases) == PHASES
    for phase in PHASES:
        calls = [f for f in result.report.phases if f.phase == phase]
        assert all(f.requests > 0 for f in calls), phase
    assert {h.phase for h in result.hits} == set(PHASES)
    assert {h.status for h in result.hits} >= {200, 429, 503}


@pytest.mark.realtime
def test_output_timeline_and_json(demo):
    result, _, printed, options = demo
    png = options.output.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000
    assert result.timeline == options.output
    figures = json.loads(options.json.read_text())
    protected = next(c for c in figures["clients"] if c["client"] == PROTECTED)
    assert protected["upstream_calls_during_outage"] == (
        result.report.client(PROTECTED).upstream_calls_during_outage
    )
    assert "/metrics" in printed
    assert "/health" in printed
    assert f"{result.report.client(PROTECTED).requests:,}" in printed
    assert "calls that reached the upstream" in printed
    assert "chaos: 2% of requests fail to connect, 3% are delayed 0.2 s" in printed
    assert "(*) Time to recover: " in printed


@pytest.mark.realtime
def test_the_process_settings_are_restored_afterwards(demo):
    _, _, _, options = demo
    assert config.get_settings().chaos_enabled is False
    assert config.get_settings().config_file != str(options.config_file)


# --- the pieces, without the whole run ---------------------------------------------------------


def test_same_seed_same_phases_other_seed_other_phases():
    first = build_schedule(60, 11)
    assert first == build_schedule(60, 11)
    assert first != build_schedule(60, 12)
    assert first.phases[0].start == 0
    assert first.phases[-1].end == 60
    for before, after in zip(first.phases, first.phases[1:], strict=False):
        assert before.end == after.start
    assert first.at(first.get("slow").start + 0.01).name == "slow"


def test_upstream_behaviour_per_phase():
    schedule = build_schedule(50, 3)
    with fake_clock() as clock:
        upstream = FlakyUpstream(schedule, seed=3, started=clock.monotonic())

        def at(phase, offset=0.1):
            clock.advance(upstream.started + schedule.get(phase).start + offset - clock.monotonic())

        status, _, body = upstream.respond("a", 4)
        assert (status, body["item"]) == (200, 4)
        assert HEALTHY_LATENCY[0] <= clock.sleeps[-1] <= HEALTHY_LATENCY[1]
        at("outage")
        assert upstream.respond("a", 4)[0] == 503
        at("slow")
        assert upstream.respond("a", 4)[0] == 200
        assert SLOW_LATENCY[0] <= clock.sleeps[-1] <= SLOW_LATENCY[1]
        at("rate_limited")
        answers = [upstream.respond("a", 1) for _ in range(8)]
        assert [a[0] for a in answers].count(200) == 5  # the burst, then 429
        assert answers[-1][1] == {"Retry-After": str(RETRY_AFTER_SECONDS)}
        assert upstream.respond("b", 1)[0] == 200  # each client has its own budget
        at("recovery")
        assert upstream.respond("a", 1)[0] == 200
        phases = [h.phase for h in upstream.hits()]
        assert phases[:3] == ["healthy", "outage", "slow"]
        assert phases[-1] == "recovery"
        upstream.stop()


def test_report_arithmetic_on_known_records():
    schedule = build_schedule(10, 1)
    outage = schedule.get("outage")
    records = [
        CallRecord(PROTECTED, "sync", 0, 0.1, 0.010, "ok", None),
        CallRecord(PROTECTED, "async", 0, outage.start + 0.1, 0.001, "fallback", None),
        CallRecord(UNPROTECTED, "sync", 0, outage.start + 0.1, 0.020, "error", "HTTPStatusError"),
        CallRecord(UNPROTECTED, "async", 0, schedule.get("recovery").start + 0.1, 0.5, "ok", None),
    ]
    hits = [
        Hit(outage.start + 0.1, UNPROTECTED, "outage", 503),
        Hit(0.1, PROTECTED, "healthy", 200),
    ]
    observed = [
        Observed(
            outage.start,
            PROTECTED,
            0,
            events.CircuitStateChanged(SERVICE, "closed", "open", "fail_max", 1.0),
        ),
        Observed(
            outage.start, PROTECTED, 0, events.FallbackUsed(SERVICE, "value", "CircuitOpenError")
        ),
    ]
    report = build_report(
        seed=1,
        schedule=schedule,
        workers=1,
        records=records,
        observed=observed,
        hits=hits,
        chaos="off (--no-chaos): no fault injected",
    )
    protected, unprotected = report.client(PROTECTED), report.client(UNPROTECTED)
    assert (protected.requests, protected.answered_by_fallback, protected.success_rate) == (
        2,
        1,
        1.0,
    )
    assert (unprotected.failed, unprotected.success_rate) == (1, 0.5)
    assert (protected.circuit_trips, protected.fallbacks_served) == (1, 1)
    assert (protected.upstream_calls_during_outage, unprotected.upstream_calls_during_outage) == (
        0,
        1,
    )
    assert unprotected.time_to_recover == pytest.approx(0.6)
    assert protected.time_to_recover is None
    assert report.circuit_closed_at is None
    assert "was not closed at the end of the run" in report.render()
    assert unprotected.errors == {"HTTPStatusError": 1}


def test_the_report_explains_time_to_recover_and_says_what_chaos_injected_where():
    schedule = build_schedule(10, 1)
    recovery = schedule.get("recovery")
    records = [
        CallRecord(PROTECTED, "sync", 0, recovery.start + 0.1, 0.0, "fallback", None),
        CallRecord(PROTECTED, "sync", 0, recovery.start + 0.7, 0.02, "ok", None),
        CallRecord(UNPROTECTED, "sync", 0, recovery.start + 0.1, 0.02, "ok", None),
    ]
    opened = events.CircuitStateChanged(SERVICE, "closed", "open", "fail_max", 1.0)
    observed = [
        Observed(recovery.start - 0.2, PROTECTED, 0, opened),
        Observed(1.0, PROTECTED, 0, events.ChaosInjected(NETWORK, "exception")),
        Observed(2.0, UNPROTECTED, 0, events.ChaosInjected(NETWORK, "exception")),
        Observed(2.5, UNPROTECTED, 0, events.ChaosInjected(NETWORK, "latency")),
    ]
    chaos = "2% of requests fail to connect, under both clients alike"
    report = build_report(
        seed=1,
        schedule=schedule,
        workers=1,
        records=records,
        observed=observed,
        hits=[],
        chaos=chaos,
    )
    assert report.client(PROTECTED).time_to_recover == pytest.approx(0.72)
    assert report.client(UNPROTECTED).time_to_recover == pytest.approx(0.12)
    assert report.circuit_at_recovery == "open"
    assert report.client(PROTECTED).faults_by_kind == {"exception": 1}
    assert report.client(UNPROTECTED).faults_by_kind == {"exception": 1, "latency": 1}
    text = report.render()
    assert f"chaos: {chaos}" in text
    rows = {line[:36].strip(): line[36:].split() for line in text.splitlines()}
    assert rows["faults injected (chaos)"] == ["1", "2"]
    assert rows["failed connections"] == ["1", "1"]
    assert rows["delays"] == ["0", "1"]
    assert rows["time to recover (*)"] == ["0.72", "s", "0.12", "s"]
    assert "(*) Time to recover: from the start of the recovery phase" in text
    assert "circuit was open then: it answered from fallbacks" in text
    assert report.to_json()["chaos"] == chaos


def test_each_client_meets_the_faults_of_its_own_chaos_stream(clock):
    # Same rates under both clients, but one client's traffic must not decide which faults the
    # other one gets: the unprotected client's faults are the same with or without the other's.
    config.reload_settings(
        env={
            "FF_ENABLE_CHAOS_INJECTION": "true",
            "BUTTRESS_SERVICES__NETWORK__CHAOS__ENABLED": "true",
            "BUTTRESS_SERVICES__NETWORK__CHAOS__EXCEPTION_RATE": "0.5",
        }
    )
    try:
        assert describe_chaos().startswith("50% of requests fail to connect, under both clients")

        def faults(*, with_protected_traffic: bool) -> list[bool]:
            upstream = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
            with httpx.Client(transport=upstream, base_url="http://upstream") as http:
                fetch = sync_clients(http, seed=7)
                seen = []
                for _ in range(30):
                    if with_protected_traffic:
                        fetch[PROTECTED](1)
                    try:
                        fetch[UNPROTECTED](1)
                    except InjectedConnectionError:
                        seen.append(True)
                    else:
                        seen.append(False)
                return seen

        alone = faults(with_protected_traffic=False)
        assert 0 < sum(alone) < 30
        assert faults(with_protected_traffic=True) == alone
    finally:
        config.reload_settings()
    assert describe_chaos() == "off (--no-chaos): no fault injected"


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)


@pytest.mark.realtime
def test_endpoints_serve_metrics_and_health():
    registry = CollectorRegistry()
    previous = instrumentation.installed().get("prometheus")
    instrumentation.configure(prometheus=registry)
    endpoints = Endpoints(registry=registry)
    endpoints.start()
    try:

        def probe():
            return "live"

        assert with_fallback("cached", name="probe")(probe)() == "live"
        with urllib.request.urlopen(endpoints.base + "/metrics", timeout=2) as response:
            exposition = response.read().decode()
        assert 'buttress_calls_total{outcome="success",service="probe"} 1.0' in exposition
        with urllib.request.urlopen(endpoints.base + "/health", timeout=2) as response:
            assert json.loads(response.read())["status"] in {"healthy", "degraded"}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(endpoints.base + "/nothing", timeout=2)
        assert missing.value.code == 404
        missing.value.close()
    finally:
        endpoints.stop()
        instrumentation.configure(prometheus=previous if previous is not None else False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "2"], "--duration must be at least 5"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--redis", "localhost:6379"], "redis:// or rediss://"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_settings_file_is_reported(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "absent.toml")]) == 2
    assert "no settings file" in capsys.readouterr().err


def test_invalid_demo_settings_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[services.inventory.retry]\nmax_attempts = 0\n")
    assert main(["--config", str(bad)]) == 1
    assert "max_attempts" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_refreshed_line_on_a_terminal_and_phase_lines_otherwise():
    schedule = build_schedule(20, 2)
    records = [
        CallRecord(PROTECTED, "sync", 0, 4.0, 0.01, "fallback", None),
        CallRecord(UNPROTECTED, "sync", 0, 4.0, 0.01, "error", "HTTPStatusError"),
        CallRecord(UNPROTECTED, "async", 0, 4.5, 0.01, "ok", None),
    ]
    terminal = _Terminal()
    progress = _Progress(terminal, schedule)
    progress.update(5.0, records)
    progress.finish()
    line = terminal.getvalue()
    assert line.startswith("\r")
    assert line.endswith("\n")
    assert schedule.at(5.0).name in line
    assert "protected 100.0% answered" in line
    assert "unprotected  50.0% answered" in line
    assert "circuit closed" in line

    log = io.StringIO()
    progress = _Progress(log, schedule)
    for second in range(20):
        progress.update(float(second), records)
    lines = log.getvalue().splitlines()
    assert [line.split()[2].rstrip(":") for line in lines] == list(PHASES)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--duration", "--seed", "--workers", "--redis", "--no-chaos", "--output"):
        assert option in usage


# --- where the demo lives ------------------------------------------------------------------------


def test_the_demo_is_not_in_the_package():
    assert importlib.util.find_spec("buttress.demo") is None


def test_make_demo_runs_it_from_the_repository_root_with_its_settings_beside_it():
    # What `make demo` runs, with buttress importable but nothing of the clone on the path.
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m demo")
    assert default_config() == ROOT / "demo" / "buttress.toml"
    assert default_config().is_file()


# --- several processes, one circuit in Redis ---------------------------------------------------


@pytest.fixture
def redis_url(tmp_path):
    """A fresh redis-server on a free loopback port (skipped without the binary, failed in CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (Debian package redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the shared-state demo")
        pytest.skip(message)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_pong(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(5)


def _wait_for_pong(port: int) -> None:
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        threading.Event().wait(0.05)
    raise RuntimeError("redis-server did not answer within 10 s")


@pytest.mark.realtime
@pytest.mark.redis
def test_workers_share_one_circuit_through_redis(redis_url, tmp_path):
    options = DemoOptions(
        duration=6.0, seed=SEED, workers=2, redis=redis_url, output=tmp_path / "fleet.png"
    )
    printed = io.StringIO()
    result = run(options, out=printed)
    assert {r.worker for r in result.records} == {0, 1}
    assert result.report.workers == 2
    assert "2 processes, circuit shared in redis://" in printed.getvalue()
    changes = [o for o in result.observed if type(o.event) is events.CircuitStateChanged]
    assert {o.worker for o in changes} == {0, 1}
    # A worker adopted a state the other one wrote: the circuit lived in Redis, not in a process.
    assert any(o.event.reason == "shared_state" for o in changes)
    assert "from the circuit shared in Redis" in printed.getvalue()


# --- degraded service: the assistant's cache and the deferred notifications -------------------


@pytest.mark.realtime
def test_the_assistant_answers_from_its_cache_through_the_outage(demo):
    result, seen, printed, options = demo
    figures = result.degraded
    assert figures.assistant_calls_during_outage > 0
    assert figures.assistant_answered_during_outage == figures.assistant_calls_during_outage
    assert figures.assistant_stale_from_cache == len(of(seen, events.CacheServedStale, "assistant"))
    assert figures.assistant_stale_from_cache > 0
    assert figures.assistant_fresh_from_cache > 0
    assert figures.assistant_upstream_requests < figures.assistant_calls / 2
    assert figures.assistant_upstream_requests == sum(
        1 for h in result.hits if h.client == "assistant"
    )
    cached = [e for e in of(seen, events.CallFinished, "assistant") if e.outcome == "cached"]
    assert len(cached) == figures.assistant_fresh_from_cache + figures.assistant_stale_from_cache
    assert "Degraded service" in printed
    assert json.loads(options.json.read_text())["degraded"] == figures.to_json()


@pytest.mark.realtime
def test_notifications_are_deferred_during_the_outage_and_sent_in_order(demo):
    result, seen, _, _ = demo
    figures = result.degraded
    assert figures.notifications_deferred == len(of(seen, events.DeferralQueued, "notifications"))
    assert figures.notifications_deferred > 0
    assert figures.notifications_replayed == len(
        [e for e in of(seen, events.DeferralReplayed, "notifications") if e.outcome == "success"]
    )
    assert figures.notifications_pending == 0
    assert figures.notifications_replayed == figures.notifications_deferred
    assert figures.replayed_in_order
    assert figures.delivered_once
    deferred = [
        e for e in of(seen, events.CallFinished, "notifications") if e.outcome == "deferred"
    ]
    assert len(deferred) == figures.notifications_deferred
