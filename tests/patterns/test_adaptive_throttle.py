"""Adaptive throttle (Google SRE): refuse with max(0, (requests - k*accepts) / (requests + 1))."""

from __future__ import annotations

import random

import pytest

import buttress
from buttress import config, events, registry
from buttress.exceptions import ConfigurationError, RejectedError
from buttress.patterns import adaptive_throttle
from buttress.patterns.adaptive_throttle import (
    AdaptiveThrottle,
    AdaptiveThrottleOptions,
    accepted,
)
from buttress.testing import FakeClock, capture_events


def throttle(**options: object) -> AdaptiveThrottle:
    return AdaptiveThrottle("svc", AdaptiveThrottleOptions(enabled=True, **options))  # type: ignore[arg-type]


class Draws:
    """A stand-in for the random draw: always ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def sent(shed: AdaptiveThrottle, answered: int, refused: int) -> None:
    """``answered`` calls the dependency accepted and ``refused`` it did not (503s)."""
    for _ in range(answered):
        shed.finish(None, None)
    for _ in range(refused):
        shed.finish(None, ConnectionError("503"))


def test_the_probability_is_the_sre_formula(clock: FakeClock) -> None:
    shed = throttle(k=2.0)
    sent(shed, answered=3, refused=7)
    snap = shed.snapshot()
    assert (snap["requests"], snap["accepts"]) == (10, 3)
    assert snap["probability"] == pytest.approx((10 - 2 * 3) / 11)
    sent(shed, answered=4, refused=0)
    assert shed.snapshot()["probability"] == 0.0  # 14 requests, 7 accepts: k=2 lets all through


def test_a_draw_below_the_probability_refuses_and_counts(clock: FakeClock) -> None:
    shed = throttle(k=2.0)
    sent(shed, answered=0, refused=9)  # the probability is 9/10
    shed._random = Draws(0.89)
    assert not shed.admit()
    assert shed.snapshot()["requests"] == 10  # a refused call counts as a request at once
    shed._random = Draws(0.95)  # above 10/11 = 0.909
    assert shed.admit()
    assert shed.snapshot()["requests"] == 10  # one that goes out counts when it ends


def test_calls_in_flight_do_not_throttle_each_other(clock: FakeClock) -> None:
    shed = throttle(k=2.0)
    shed._random = Draws(0.0)  # any positive probability would refuse
    assert all(shed.admit() for _ in range(100))  # a burst before any answer


def test_the_window_forgets_on_the_buttress_clock(clock: FakeClock) -> None:
    shed = throttle(window_seconds=10)
    sent(shed, answered=0, refused=20)
    assert shed.snapshot()["probability"] > 0.9
    clock.advance(11.5)
    assert shed.snapshot() == {"service": "svc", "requests": 0, "accepts": 0, "probability": 0.0}


def test_what_counts_as_accepted() -> None:
    assert accepted(ValueError("a 400: the dependency answered"))
    assert not accepted(ConnectionError("refused"))
    assert not accepted(TimeoutError())
    assert not accepted(RejectedError("full", service="svc"))
    assert accepted(KeyboardInterrupt())  # says nothing about the dependency: not held against it


def test_a_seed_makes_the_refusals_repeatable(clock: FakeClock) -> None:
    def refusals() -> list[bool]:
        shed = throttle(seed=7)
        sent(shed, answered=5, refused=45)
        return [shed.admit() for _ in range(50)]

    assert refusals() == refusals()
    assert not all(refusals())


# -- through the decorator ----------------------------------------------------------------------


def test_a_healthy_dependency_is_never_throttled(mode, clock) -> None:
    fn = buttress.with_adaptive_throttle("healthy", seed=1)(mode.define())
    with capture_events([events.CallRejected]) as seen:
        assert [mode.run(fn) for _ in range(200)] == ["ok"] * 200
    assert seen == []


def test_an_overloaded_dependency_is_throttled_locally(mode, clock) -> None:
    sent: list[int] = []

    def refused() -> str:
        sent.append(1)
        raise ConnectionError("503")

    fn = buttress.with_adaptive_throttle("busy", seed=3)(mode.define(refused))
    with capture_events([events.CallRejected]) as seen:
        outcomes = [mode.outcome(fn) for _ in range(200)]
    local = [o for o in outcomes if isinstance(o, RejectedError)]
    assert len(local) + len(sent) == 200
    assert len(local) > 150  # with nothing accepted, almost every call stays in the process
    assert {(e.pattern, e.reason) for e in seen} == {("adaptive_throttle", "throttled")}
    assert len(seen) == len(local)
    assert local[0].service == "busy"
    assert "throttled locally" in str(local[0])


def test_throttled_calls_are_never_retried(mode, clock) -> None:
    sent: list[int] = []

    def refused() -> str:
        sent.append(1)
        raise ConnectionError("down")

    fn = buttress.retry_with_backoff("retried", budget=False)(
        buttress.with_adaptive_throttle("retried", seed=5)(mode.define(refused))
    )
    outcomes = [mode.outcome(fn) for _ in range(50)]
    throttled = sum(isinstance(o, RejectedError) for o in outcomes)
    assert throttled > 0
    # Each call tried until it was throttled or used its three attempts; none retried a refusal.
    shed = registry.instances(adaptive_throttle.PATTERN)["retried"]
    assert shed.snapshot()["requests"] == len(sent) + throttled


def test_call_sites_share_the_service_throttle_across_threads_and_tasks(mode, clock) -> None:
    random.seed(0)
    adaptive_throttle._rng.seed(11)
    fn = buttress.with_adaptive_throttle("fleet")(mode.define(lambda: "ok"))
    other = buttress.with_adaptive_throttle("fleet")(mode.define(lambda: "ok"))
    assert mode.gather(fn, 20) == ["ok"] * 20
    assert mode.gather(other, 20) == ["ok"] * 20
    shed = registry.instances(adaptive_throttle.PATTERN)["fleet"]
    assert shed.snapshot()["requests"] == shed.snapshot()["accepts"] == 40


def test_shadow_mode_counts_what_it_would_refuse(mode, clock) -> None:
    config.reload_settings(env={"BUTTRESS_SERVICES__WATCHED__MODE": "shadow"})
    try:
        fn = buttress.with_adaptive_throttle("watched", seed=2)(
            mode.define(lambda: (_ for _ in ()).throw(ConnectionError("down")))
        )
        with capture_events([events.ShadowDecision, events.CallRejected]) as seen:
            outcomes = [mode.outcome(fn) for _ in range(50)]
    finally:
        config.reload_settings()
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert seen
    assert {type(e) for e in seen} == {events.ShadowDecision}


def test_bad_settings_fail_at_load_naming_the_key() -> None:
    with pytest.raises(ConfigurationError, match=r"services\.svc\.adaptive_throttle\.k"):
        config.load_settings({"BUTTRESS_SERVICES__SVC__ADAPTIVE_THROTTLE__K": "0.5"})
    settings = config.load_settings({"BUTTRESS_SERVICES__SVC__ADAPTIVE_THROTTLE__ENABLED": "true"})
    view = config.Snapshot(1, settings).service("svc")
    assert view.options("adaptive_throttle", {}, None).enabled
