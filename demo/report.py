"""The side-by-side report: every figure is computed from what the run recorded.

Three independent records feed it: the calls as each caller saw them (latency, outcome), the
buttress events tagged with the client that caused them (retries, circuit trips, fallbacks, faults
injected), and the requests the upstream itself received (what reached it, in which phase).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from buttress import events
from demo.schedule import Schedule
from demo.traffic import CLIENTS, PROTECTED, SERVICE, CallRecord, Observed
from demo.upstream import Hit

__all__ = ["ClientFigures", "PhaseFigures", "Report", "build_report", "percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by nearest rank; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class ClientFigures:
    """One client over the whole run. ``None`` marks what does not apply to the client."""

    client: str
    requests: int
    answered_by_upstream: int
    answered_by_fallback: int
    failed: int
    success_rate: float  # answered (upstream or fallback) / requests
    p50: float | None  # seconds
    p95: float | None
    p99: float | None
    upstream_calls: int  # requests that reached the upstream
    upstream_calls_during_outage: int
    retries: int | None
    circuit_trips: int | None  # closed -> open
    failed_trials: int | None  # half-open -> open: a trial call failed, the circuit re-opened
    fallbacks_served: int | None
    faults_injected: int  # by chaos, under this client (both clients have the same rates)
    faults_by_kind: dict[str, int]  # exception (failed connection), latency (delay)
    # From the start of the recovery phase to the first answer from the upstream to a request
    # sent after it (see the report's note on it).
    time_to_recover: float | None
    errors: dict[str, int]


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    """One client in one phase."""

    phase: str
    client: str
    requests: int
    success_rate: float | None
    p95: float | None
    upstream_calls: int


@dataclass(frozen=True, slots=True)
class Transition:
    at: float
    worker: int
    old_state: str
    new_state: str
    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the demo prints at the end, and what the timeline draws."""

    seed: int
    duration: float
    workers: int
    schedule: Schedule
    clients: tuple[ClientFigures, ...]
    phases: tuple[PhaseFigures, ...]
    transitions: tuple[Transition, ...]
    # When the circuit (of worker 0) closed for the last time, if it ended the run closed.
    circuit_closed_at: float | None
    # The state of that circuit when the recovery phase began.
    circuit_at_recovery: str
    # What chaos injected, and where (traffic.describe_chaos).
    chaos: str

    def client(self, name: str) -> ClientFigures:
        return next(c for c in self.clients if c.client == name)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schedule"] = [asdict(p) for p in self.schedule.phases]
        return data

    def render(self) -> str:
        """The report as text: totals side by side, then phase by phase."""
        protected, unprotected = self.client(PROTECTED), self.client("unprotected")
        rows: list[tuple[str, str, str]] = [
            ("requests", _count(protected.requests), _count(unprotected.requests)),
            (
                "answered by the upstream",
                _count(protected.answered_by_upstream),
                _count(unprotected.answered_by_upstream),
            ),
            (
                "answered by a fallback",
                _count(protected.answered_by_fallback),
                _count(unprotected.answered_by_fallback),
            ),
            ("failed", _count(protected.failed), _count(unprotected.failed)),
            ("success rate", _rate(protected.success_rate), _rate(unprotected.success_rate)),
            ("latency p50", _ms(protected.p50), _ms(unprotected.p50)),
            ("latency p95", _ms(protected.p95), _ms(unprotected.p95)),
            ("latency p99", _ms(protected.p99), _ms(unprotected.p99)),
            (
                "calls that reached the upstream",
                _count(protected.upstream_calls),
                _count(unprotected.upstream_calls),
            ),
            (
                "  of which during the outage",
                _count(protected.upstream_calls_during_outage),
                _count(unprotected.upstream_calls_during_outage),
            ),
            ("retries", _count(protected.retries), _count(unprotected.retries)),
            ("circuit trips", _count(protected.circuit_trips), _count(unprotected.circuit_trips)),
            (
                "  re-opened by a failed trial",
                _count(protected.failed_trials),
                _count(unprotected.failed_trials),
            ),
            (
                "fallbacks served",
                _count(protected.fallbacks_served),
                _count(unprotected.fallbacks_served),
            ),
            (
                "faults injected (chaos)",
                _count(protected.faults_injected),
                _count(unprotected.faults_injected),
            ),
            (
                "  failed connections",
                _count(protected.faults_by_kind.get("exception", 0)),
                _count(unprotected.faults_by_kind.get("exception", 0)),
            ),
            (
                "  delays",
                _count(protected.faults_by_kind.get("latency", 0)),
                _count(unprotected.faults_by_kind.get("latency", 0)),
            ),
            (
                "time to recover (*)",
                _seconds(protected.time_to_recover),
                _seconds(unprotected.time_to_recover),
            ),
        ]
        width = max(len(label) for label, _, _ in rows)
        lines = [
            f"buttress demo: {self.duration:g} s, seed {self.seed}, {self.workers} worker"
            + ("s" if self.workers != 1 else ""),
            f"chaos: {self.chaos}",
            "",
            f"{'':<{width}}  {'protected':>14}  {'unprotected':>14}",
        ]
        lines += [f"{label:<{width}}  {p:>14}  {u:>14}" for label, p, u in rows]
        lines += ["", self._phase_table(), ""]
        lines += self._notes()
        return "\n".join(lines)

    def _phase_table(self) -> str:
        columns = f"{'calls':>6} {'answered':>8} {'p95':>8} {'upstream':>8}"
        lines = [
            f"{'':<21}   {' protected ':-^33}   {' unprotected ':-^33}",
            f"{'phase':<13} {'seconds':>7}   {columns}   {columns}",
        ]
        by_phase = {(f.phase, f.client): f for f in self.phases}
        for phase in self.schedule.phases:
            cells = []
            for client in CLIENTS:
                f = by_phase[phase.name, client]
                cells.append(
                    f"{f.requests:>6} {_rate(f.success_rate):>8} {_ms(f.p95):>8} "
                    f"{f.upstream_calls:>8}"
                )
            lines.append(f"{phase.name:<13} {phase.seconds:>7.1f}   {cells[0]}   {cells[1]}")
        return "\n".join(lines)

    def _notes(self) -> list[str]:
        notes = []
        protected, unprotected = self.client(PROTECTED), self.client("unprotected")
        outage = self.schedule.get("outage")
        ours, theirs = (
            protected.upstream_calls_during_outage,
            unprotected.upstream_calls_during_outage,
        )
        notes.append(
            f"During the {outage.seconds:.1f} s outage the upstream received {ours} requests from "
            f"the protected client and {theirs} from the unprotected one."
        )
        if protected.circuit_trips:
            closed = self.circuit_closed_at
            after = (
                f"closed for good at {closed:.1f} s, in the {self.schedule.at(closed).name} phase"
                if closed is not None
                else "was not closed at the end of the run"
            )
            notes.append(
                f"The circuit tripped {protected.circuit_trips} time"
                f"{'s' if protected.circuit_trips != 1 else ''}, failed "
                f"{protected.failed_trials} trial call{'s' if protected.failed_trials != 1 else ''}"
                f" while the upstream was still unwell, and {after}."
            )
        learned = sum(1 for t in self.transitions if t.reason == "shared_state")
        if learned:
            notes.append(
                f"{learned} circuit state change{'s' if learned != 1 else ''} reached a worker "
                "from the circuit shared in Redis, decided by another worker."
            )
        notes.append(
            f"Success rate: {_rate(protected.success_rate)} protected "
            f"({_rate(_share(protected.answered_by_fallback, protected.requests))} of calls "
            f"answered by a fallback), {_rate(unprotected.success_rate)} unprotected."
        )
        notes.append(self._recovery_note())
        return notes

    def _recovery_note(self) -> str:
        recovery = self.schedule.get("recovery")
        note = (
            f"(*) Time to recover: from the start of the recovery phase ({recovery.start:.1f} s), "
            "when the upstream answers normally again, to the first answer a client got from the "
            "upstream itself for a request sent after that (a fallback does not count). The "
            "unprotected client sends every request to the upstream, so its next request sees "
            "the recovery."
        )
        state = self.circuit_at_recovery
        if state in ("open", "forced_open"):
            note += (
                f" The protected client's circuit was {state} then: it answered from fallbacks "
                "and sent nothing until the circuit's open time (circuit_breaker.timeout) had "
                "passed and a trial call succeeded. That wait is on purpose: a dependency that "
                "just came back is probed, not hit by every caller at once."
            )
        elif state == "half_open":
            note += (
                " The protected client's circuit was half-open then: its first requests were "
                "the trial calls that closed it."
            )
        else:
            note += (
                f" The protected client's circuit was {state} then, so its next request went "
                "to the upstream as well; a difference comes from what that request met (a "
                "fault injected by chaos, a retry, a wait in the bulkhead)."
            )
        return note


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    ms = value * 1000
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def build_report(
    *,
    seed: int,
    schedule: Schedule,
    workers: int,
    records: Iterable[CallRecord],
    observed: Iterable[Observed],
    hits: Iterable[Hit],
    chaos: str,
) -> Report:
    """Compute every figure of the report from the three records of the run.

    ``chaos`` says what chaos injected, and where (``traffic.describe_chaos()``).
    """
    records = list(records)
    observed = list(observed)
    hits = list(hits)
    transitions = tuple(
        Transition(o.at, o.worker, o.event.old_state, o.event.new_state, o.event.reason)
        for o in observed
        if type(o.event) is events.CircuitStateChanged and o.event.service == SERVICE
    )
    own = [t for t in transitions if t.worker == 0]
    closed_at = own[-1].at if own and own[-1].new_state == "closed" else None
    recovery = schedule.get("recovery").start
    before = [t for t in own if t.at <= recovery]
    at_recovery = before[-1].new_state if before else "closed"

    clients = tuple(
        _client_figures(
            client,
            records=records,
            observed=observed,
            hits=hits,
            schedule=schedule,
            transitions=transitions,
        )
        for client in CLIENTS
    )
    phases = tuple(
        _phase_figures(phase.name, client, records, hits, schedule)
        for phase in schedule.phases
        for client in CLIENTS
    )
    return Report(
        seed=seed,
        duration=schedule.duration,
        workers=workers,
        schedule=schedule,
        clients=clients,
        phases=phases,
        transitions=transitions,
        circuit_closed_at=closed_at,
        circuit_at_recovery=at_recovery,
        chaos=chaos,
    )


def _client_figures(
    client: str,
    *,
    records: list[CallRecord],
    observed: list[Observed],
    hits: list[Hit],
    schedule: Schedule,
    transitions: tuple[Transition, ...],
) -> ClientFigures:
    mine = [r for r in records if r.client == client]
    outcomes = Counter(r.outcome for r in mine)
    latencies = [r.latency for r in mine]
    kinds = Counter(type(o.event) for o in observed if o.client == client)
    protected = client == PROTECTED
    recovery = schedule.get("recovery")
    first_answer = min(
        (r.started + r.latency for r in mine if r.outcome == "ok" and r.started >= recovery.start),
        default=None,
    )
    answered = outcomes["ok"] + outcomes["fallback"]
    return ClientFigures(
        client=client,
        requests=len(mine),
        answered_by_upstream=outcomes["ok"],
        answered_by_fallback=outcomes["fallback"],
        failed=outcomes["error"],
        success_rate=answered / len(mine) if mine else 0.0,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        p99=percentile(latencies, 99),
        upstream_calls=sum(1 for h in hits if h.client == client),
        upstream_calls_during_outage=sum(
            1 for h in hits if h.client == client and h.phase == "outage"
        ),
        retries=kinds[events.RetryScheduled] if protected else None,
        circuit_trips=_opened(transitions, "closed") if protected else None,
        failed_trials=_opened(transitions, "half_open") if protected else None,
        fallbacks_served=kinds[events.FallbackUsed] if protected else None,
        faults_injected=kinds[events.ChaosInjected],
        faults_by_kind=dict(
            Counter(
                o.event.kind
                for o in observed
                if o.client == client and type(o.event) is events.ChaosInjected
            )
        ),
        time_to_recover=None if first_answer is None else first_answer - recovery.start,
        errors=dict(Counter(r.error_type for r in mine if r.error_type is not None)),
    )


def _opened(transitions: tuple[Transition, ...], old_state: str) -> int:
    # A worker that learns of an open circuit from shared state (Redis) did not decide to trip.
    return sum(
        1
        for t in transitions
        if t.old_state == old_state and t.new_state == "open" and t.reason != "shared_state"
    )


def _phase_figures(
    phase: str, client: str, records: list[CallRecord], hits: list[Hit], schedule: Schedule
) -> PhaseFigures:
    mine = [r for r in records if r.client == client and schedule.at(r.started).name == phase]
    answered = sum(1 for r in mine if r.outcome != "error")
    return PhaseFigures(
        phase=phase,
        client=client,
        requests=len(mine),
        success_rate=answered / len(mine) if mine else None,
        p95=percentile([r.latency for r in mine], 95),
        upstream_calls=sum(1 for h in hits if h.client == client and h.phase == phase),
    )
