"""One run of the demo: settings, the upstream, the endpoints, the traffic, the report.

:func:`run` is what ``python -m demo`` calls after parsing its arguments; tests call it
directly, with a short duration, and read the records the report was computed from.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, Final, TextIO, cast

from prometheus_client import REGISTRY, CollectorRegistry

from buttress import _clock, config, instrumentation, registry
from buttress.exceptions import ConfigurationError
from buttress.patterns import circuit_breaker
from buttress.patterns.chaos import KILL_SWITCH
from demo.degraded import DegradedFigures, DegradedTraffic
from demo.endpoints import Endpoints
from demo.report import Report, build_report
from demo.schedule import Schedule, build_schedule
from demo.timeline import write_timeline
from demo.traffic import (
    PROTECTED,
    SERVICE,
    UNPROTECTED,
    CallRecord,
    EventLog,
    Observed,
    Traffic,
    describe_chaos,
)
from demo.upstream import DESCRIPTIONS, FlakyUpstream, Hit

__all__ = ["DemoOptions", "DemoResult", "default_config", "run"]

# The circuit must be able to close within the recovery phase: it stays open at most this share
# of it (a short run shortens the configured open time, and says so).
_OPEN_SHARE_OF_RECOVERY: Final = 1 / 3
_WORKER_READY_TIMEOUT: Final = 60.0

_CIRCUIT_TIMEOUT_VARIABLE: Final = f"BUTTRESS_SERVICES__{SERVICE.upper()}__CIRCUIT_BREAKER__TIMEOUT"
_STATE_URL_VARIABLE: Final = f"BUTTRESS_SERVICES__{SERVICE.upper()}__CIRCUIT_BREAKER__STATE_URL"


def default_config() -> Path:
    # The demo's settings live beside its code.
    return Path(__file__).resolve().parent / "buttress.toml"


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``python -m demo`` was asked to do (see ``--help`` for each option)."""

    duration: float = 60.0
    seed: int = 1
    workers: int = 1
    redis: str | None = None
    chaos: bool = True
    config_file: Path = field(default_factory=default_config)
    output: Path = Path("buttress-demo.png")
    json: Path | None = None
    port: int = 0


@dataclass(frozen=True, slots=True)
class DemoResult:
    """A finished run: its report, the picture, and the records every figure was computed from."""

    report: Report
    timeline: Path
    records: list[CallRecord]
    observed: list[Observed]
    hits: list[Hit]
    notes: list[str]
    degraded: DegradedFigures  # the assistant's cache and the deferred notifications


# --- settings ------------------------------------------------------------------------------------


def _environment(options: DemoOptions, overrides: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env[KILL_SWITCH] = "true" if options.chaos else "false"
    if options.redis is not None:
        env[_STATE_URL_VARIABLE] = options.redis
    env.update(overrides)
    return env


def _load_settings(options: DemoOptions, schedule: Schedule) -> tuple[dict[str, str], list[str]]:
    """Install the demo's settings; return the environment they came from and what was adjusted.

    The settings come from the demo's config file and the environment, exactly as an
    application's would; the demo only arms chaos and, for a short run, shortens how long the
    circuit stays open so that it can close within the recovery phase.
    """
    if not options.config_file.is_file():
        raise FileNotFoundError(f"no settings file at {options.config_file} (see --config)")
    notes: list[str] = []
    env = _environment(options, {})
    config.reload_settings(env=env, config_file=options.config_file)
    breaker_options = cast(
        "circuit_breaker.CircuitBreakerOptions", config.resolve(SERVICE, "circuit_breaker")
    )
    open_seconds = breaker_options.timeout
    longest = round(schedule.get("recovery").seconds * _OPEN_SHARE_OF_RECOVERY, 2)
    if open_seconds > longest and _CIRCUIT_TIMEOUT_VARIABLE not in os.environ:
        env = _environment(options, {_CIRCUIT_TIMEOUT_VARIABLE: str(longest)})
        config.reload_settings(env=env, config_file=options.config_file)
        notes.append(
            f"short run: the circuit stays open {longest:g} s instead of {open_seconds:g} s, so "
            "that it can close within the recovery phase"
        )
    return env, notes


# --- worker processes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WorkerSpec:
    index: int
    url: str
    duration: float
    seed: int
    env: dict[str, str]
    config_file: str


def _worker(
    spec: _WorkerSpec,
    ready: multiprocessing.Queue[int],
    results: multiprocessing.Queue[tuple[int, list[CallRecord], list[Observed]]],
    go: EventType,
    start_at: Any,
) -> None:
    config.reload_settings(env=spec.env, config_file=spec.config_file)
    ready.put(spec.index)
    go.wait(_WORKER_READY_TIMEOUT)
    started = float(start_at.value)
    traffic = Traffic(
        spec.url, started=started, duration=spec.duration, seed=spec.seed, worker=spec.index
    )
    with EventLog(started, spec.index) as log:
        traffic.start()
        traffic.join()
    results.put((spec.index, traffic.records, log.observed))


class _Fleet:
    """The extra worker processes of ``--workers N`` (the demo's own process is worker 0)."""

    def __init__(self, options: DemoOptions, url: str, env: dict[str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready: multiprocessing.Queue[int] = context.Queue()
        self._results: multiprocessing.Queue[tuple[int, list[CallRecord], list[Observed]]] = (
            context.Queue()
        )
        self._go = context.Event()
        self._start_at = context.Value("d", 0.0)
        self._processes = [
            context.Process(
                target=_worker,
                args=(
                    _WorkerSpec(
                        index,
                        url,
                        options.duration,
                        options.seed,
                        env,
                        str(options.config_file),
                    ),
                    self._ready,
                    self._results,
                    self._go,
                    self._start_at,
                ),
                name=f"buttress-demo-worker-{index}",
                daemon=True,
            )
            for index in range(1, options.workers)
        ]

    def start(self) -> None:
        for process in self._processes:
            process.start()
        for _ in self._processes:
            try:
                self._ready.get(timeout=_WORKER_READY_TIMEOUT)
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"the demo's worker processes did not start within "
                    f"{_WORKER_READY_TIMEOUT:g} s (see their errors above)"
                ) from None

    def stop(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=5)

    def go(self, started: float) -> None:
        self._start_at.value = started
        self._go.set()

    def collect(self) -> tuple[list[CallRecord], list[Observed], list[str]]:
        """Every worker's records, and a note for each worker that did not report."""
        records: list[CallRecord] = []
        observed: list[Observed] = []
        reported: set[int] = set()
        for _ in self._processes:
            try:
                index, worker_records, worker_observed = self._results.get(
                    timeout=_WORKER_READY_TIMEOUT
                )
            except queue.Empty:
                break
            reported.add(index)
            records += worker_records
            observed += worker_observed
        self.stop()
        notes = [
            f"worker {index} did not report (exit code {process.exitcode}); "
            "the figures leave it out"
            for index, process in enumerate(self._processes, start=1)
            if index not in reported
        ]
        return records, observed, notes


# --- the run -------------------------------------------------------------------------------------


class _Progress:
    """One refreshed status line on a terminal; one line per phase change otherwise."""

    def __init__(self, out: TextIO, schedule: Schedule) -> None:
        self.out = out
        self.schedule = schedule
        self.interactive = out.isatty()
        self._phase: str | None = None

    def update(self, elapsed: float, records: Sequence[CallRecord]) -> None:
        phase = self.schedule.at(elapsed).name
        if not self.interactive:
            if phase != self._phase:
                print(f"  {elapsed:5.1f} s  {phase}: {DESCRIPTIONS[phase]}", file=self.out)
                self._phase = phase
            return
        recent = [r for r in records[-400:] if r.started >= elapsed - 3]
        parts = []
        for client in (PROTECTED, UNPROTECTED):
            mine = [r for r in recent if r.client == client]
            answered = sum(1 for r in mine if r.outcome != "error")
            rate = f"{answered / len(mine) * 100:5.1f}%" if mine else "    -"
            parts.append(f"{client} {rate} answered")
        state = registry.breaker(SERVICE).state_label
        line = (
            f"\r  {elapsed:5.1f}/{self.schedule.duration:g} s  {phase:<12}  "
            f"{parts[0]}  circuit {state:<9} | {parts[1]}"
        )
        self.out.write(line)
        self.out.flush()

    def finish(self) -> None:
        if self.interactive:
            self.out.write("\n")


def run(options: DemoOptions, *, out: TextIO) -> DemoResult:
    """Run the demo, print its progress and report to ``out``, and return what it measured.

    Raises:
        ConfigurationError: the demo's settings are invalid.
        FileNotFoundError: the settings file does not exist.
    """
    schedule = build_schedule(options.duration, options.seed)
    env, notes = _load_settings(options, schedule)
    chaos = describe_chaos()
    # A process that ran the demo before (a test session) must not start with its open circuit.
    registry.breaker(SERVICE).reset()
    upstream = FlakyUpstream(schedule, options.seed, started=_clock.monotonic())
    metrics_before = instrumentation.installed().get("prometheus")
    if not isinstance(metrics_before, CollectorRegistry):
        instrumentation.configure(prometheus=True)
    endpoints = Endpoints(options.port, _metrics_registry())
    fleet = _Fleet(options, upstream.url, env) if options.workers > 1 else None
    try:
        upstream.start()
        endpoints.start()
        _introduce(
            options,
            schedule=schedule,
            upstream=upstream.url,
            endpoints=endpoints.base,
            chaos=chaos,
            notes=notes,
            out=out,
        )
        if fleet is not None:
            fleet.start()
        started = _clock.monotonic()
        upstream.started = started
        if fleet is not None:
            fleet.go(started)
        traffic = Traffic(
            upstream.url, started=started, duration=options.duration, seed=options.seed
        )
        degraded = DegradedTraffic(
            upstream.url, started=started, duration=options.duration, seed=options.seed
        )
        progress = _Progress(out, schedule)
        with EventLog(started, 0) as log:
            degraded.start()
            traffic.start()
            while traffic.running():
                progress.update(min(traffic.elapsed(), options.duration), traffic.records)
                _clock.sleep(0.25)
            traffic.join()
            degraded.join()  # and waits for the deferred notifications to be sent
        progress.finish()
        records, observed = list(traffic.records), list(log.observed)
        missing: list[str] = []
        if fleet is not None:
            more_records, more_observed, missing = fleet.collect()
            records += more_records
            observed += more_observed
            notes += missing
    finally:
        if fleet is not None:
            fleet.stop()
        endpoints.stop()
        upstream.stop()
        if not isinstance(metrics_before, CollectorRegistry):
            instrumentation.configure(prometheus=False)
        _restore_settings(out)
    hits = upstream.hits()
    report = build_report(
        seed=options.seed,
        schedule=schedule,
        workers=options.workers,
        records=records,
        observed=observed,
        hits=hits,
        chaos=chaos,
    )
    outage = schedule.get("outage")
    figures = degraded.figures(hits, (outage.start, outage.end))
    timeline = write_timeline(report, records, hits, options.output)
    print("", file=out)
    print(report.render(), file=out)
    print("", file=out)
    print(figures.render(), file=out)
    for note in missing:
        print(f"note: {note}", file=out)
    print(f"\ntimeline: {timeline}", file=out)
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        document = {**report.to_json(), "degraded": figures.to_json()}
        options.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"figures:  {options.json}", file=out)
    return DemoResult(report, timeline, records, observed, hits, notes, figures)


def _introduce(
    options: DemoOptions,
    *,
    schedule: Schedule,
    upstream: str,
    endpoints: str,
    chaos: str,
    notes: list[str],
    out: TextIO,
) -> None:
    print(f"buttress demo: {options.duration:g} s, seed {options.seed}", file=out)
    print(f"  upstream  {upstream}/items/<id>", file=out)
    print(f"  metrics   {endpoints}/metrics", file=out)
    print(f"  health    {endpoints}/health", file=out)
    print(f"  settings  {options.config_file}", file=out)
    print(f"  chaos     {chaos}", file=out)
    if options.workers > 1:
        shared = f"circuit shared in {options.redis}" if options.redis else "each its own circuit"
        print(f"  workers   {options.workers} processes, {shared}", file=out)
    for note in notes:
        print(f"  note      {note}", file=out)
    print(
        "  phases    " + ", ".join(f"{p.name} {p.seconds:.1f} s" for p in schedule.phases), file=out
    )
    print("", file=out)


def _metrics_registry() -> CollectorRegistry:
    registry = instrumentation.installed().get("prometheus")
    return registry if isinstance(registry, CollectorRegistry) else REGISTRY


def _restore_settings(out: TextIO) -> None:
    # The demo may run inside another program (a test session): leave its settings as they were.
    try:
        config.reload_settings()
    except ConfigurationError as exc:
        print(f"note: the settings of this process could not be reloaded: {exc}", file=out)
