"""The timeline picture: circuit state, latency, errors and upstream load, phase by phase.

Drawn with matplotlib's object API on the Agg canvas: no pyplot, no global backend switch, no
display needed, nothing left behind in the process that called it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from demo.report import Report
from demo.traffic import CLIENTS, PROTECTED, CallRecord
from demo.upstream import Hit

__all__ = ["write_timeline"]

COLORS: Final = {PROTECTED: "#1b7837", "unprotected": "#b2182b"}
PHASE_SHADES: Final = {
    "healthy": "#f7f7f7",
    "outage": "#fddbc7",
    "slow": "#fee8a8",
    "rate_limited": "#d1e5f0",
    "recovery": "#e6f5d0",
}
STATE_LEVEL: Final = {"closed": 0, "forced_closed": 0, "disabled": 0, "half_open": 1}
OPEN_LEVEL: Final = 2


def _per_second(times: Iterable[float], duration: float) -> tuple[list[float], list[int]]:
    buckets = [0] * (int(duration) + 1)
    for at in times:
        index = int(at)
        if 0 <= index < len(buckets):
            buckets[index] += 1
    return [i + 0.5 for i in range(len(buckets))], buckets


def _circuit_steps(report: Report) -> tuple[list[float], list[int]]:
    # One line for the whole fleet: with several workers, the state of worker 0 (the process that
    # serves /metrics and /health).
    xs, ys = [0.0], [0]
    for transition in report.transitions:
        if transition.worker != 0:
            continue
        xs.append(transition.at)
        ys.append(STATE_LEVEL.get(transition.new_state, OPEN_LEVEL))
    xs.append(report.duration)
    ys.append(ys[-1])
    return xs, ys


def write_timeline(
    report: Report, records: Sequence[CallRecord], hits: Sequence[Hit], path: Path
) -> Path:
    """Draw the run into a PNG at ``path`` and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional extra
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(12, 10), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    state_ax, latency_ax, error_ax, load_ax = figure.subplots(
        4, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2, 1.5, 1.5]}
    )
    duration = report.duration
    figure.suptitle(
        f"buttress demo: seed {report.seed}, {duration:g} s, {report.workers} worker(s)",
        fontsize=13,
    )

    xs, ys = _circuit_steps(report)
    state_ax.step(xs, ys, where="post", color=COLORS[PROTECTED], linewidth=2)
    state_ax.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    state_ax.set_ylim(-0.4, 2.4)
    state_ax.set_ylabel("circuit")

    for client in CLIENTS:
        mine = [r for r in records if r.client == client]
        latency_ax.scatter(
            [r.started + r.latency for r in mine],
            [max(r.latency, 1e-4) * 1000 for r in mine],
            s=4,
            alpha=0.35,
            color=COLORS[client],
            label=client,
            linewidths=0,
        )
    latency_ax.set_yscale("log")
    latency_ax.set_ylabel("latency (ms)")
    latency_ax.set_title("latency of each call, as its caller saw it", loc="left", fontsize=10)
    latency_ax.legend(loc="upper left", markerscale=4, fontsize=9)

    for client in CLIENTS:
        failed = [
            r.started + r.latency for r in records if r.client == client and r.outcome == "error"
        ]
        centres, counts = _per_second(failed, duration)
        error_ax.plot(centres, counts, color=COLORS[client], label=f"{client}: failed calls")
    fallbacks = [
        r.started + r.latency for r in records if r.client == PROTECTED and r.outcome == "fallback"
    ]
    centres, counts = _per_second(fallbacks, duration)
    error_ax.plot(
        centres, counts, color=COLORS[PROTECTED], linestyle="--", label="protected: fallbacks"
    )
    error_ax.set_ylabel("per second")
    error_ax.set_title("errors the callers saw, and fallbacks served", loc="left", fontsize=10)
    error_ax.legend(loc="upper left", fontsize=9)

    for client in CLIENTS:
        centres, counts = _per_second((h.at for h in hits if h.client == client), duration)
        load_ax.plot(centres, counts, color=COLORS[client], label=client)
    load_ax.set_ylabel("per second")
    load_ax.set_xlabel("seconds since start")
    load_ax.set_title("requests that reached the upstream", loc="left", fontsize=10)
    load_ax.legend(loc="upper left", fontsize=9)

    axes: list[Any] = [state_ax, latency_ax, error_ax, load_ax]
    for ax in axes:
        ax.set_xlim(0, duration)
        ax.grid(visible=True, axis="y", alpha=0.3)
        for phase in report.schedule.phases:
            ax.axvspan(phase.start, phase.end, color=PHASE_SHADES[phase.name], zorder=0)
    for phase in report.schedule.phases:
        # x in data units, y in axes units: the phase names sit just above the top panel.
        state_ax.text(
            (phase.start + phase.end) / 2,
            1.04,
            phase.name.replace("_", " "),
            transform=state_ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=10,
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
