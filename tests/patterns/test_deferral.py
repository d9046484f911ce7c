"""with_fallback(defer=...): rejected calls queued and replayed, on ``def`` and ``async def``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import buttress
from buttress import (
    CircuitOpenError,
    DeferOptions,
    Deferred,
    RateLimitedError,
    circuit_breaker,
    events,
    idempotency_key,
    retry_with_backoff,
    with_fallback,
    with_rate_limit,
)
from buttress.events import CallFinished
from buttress.testing import FakeClock, capture_events, force_circuit_state


class Sender:
    """Records ``(text, idempotency_key())`` of every call that ran; raises while ``down``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None]] = []
        self.down: Exception | None = None

    def __call__(self, text: str) -> str:
        if self.down is not None:
            raise self.down
        self.sent.append((text, idempotency_key()))
        return f"sent {text}"


def notifier(mode: Any, sender: Sender, defer: Any = True, **breaker: Any) -> Any:
    options = {"fail_max": 1, "timeout": 30, **breaker}
    return with_fallback(name="notify", defer=defer)(
        circuit_breaker(name="notify", **options)(mode.define(sender))
    )


def replayed(mode: Any, handle: Deferred) -> Any:
    """The handle's result once the replay thread settled it (bounded real-time wait)."""
    if mode.is_async:

        async def wait() -> Any:
            async with asyncio.timeout(5):
                return await handle.wait()

        return mode.run(wait)
    limit = time.monotonic() + 5
    while not handle.done():
        assert time.monotonic() < limit, "not replayed in time"
        time.sleep(0.001)
    return handle.result(0)


def outcome_of(mode: Any, handle: Deferred) -> Any:
    try:
        return replayed(mode, handle)
    except Exception as exc:
        return exc


def trip(mode: Any, notify: Any, sender: Sender) -> None:
    sender.down = ConnectionError("down")
    assert isinstance(mode.outcome(notify, "trip"), ConnectionError)
    sender.down = None


def test_a_rejected_call_is_queued_and_its_caller_gets_a_handle(mode, clock: FakeClock) -> None:
    sender = Sender()
    notify = notifier(mode, sender)
    trip(mode, notify, sender)
    with capture_events([events.DeferralQueued, CallFinished]) as seen:
        handle = mode.run(notify, "hello")
    assert isinstance(handle, Deferred)
    assert (handle.service, handle.status, handle.done()) == ("notify", "queued", False)
    assert seen == [
        events.DeferralQueued("notify", "CircuitOpenError", 1),
        CallFinished("notify", "deferred", 0.0, None),
    ]
    assert sender.sent == []
    health = buttress.health()
    assert health["deferred"] == {"notify": 1}
    assert health["status"] == "degraded"


def test_queued_calls_are_replayed_in_order_when_the_circuit_closes(mode, clock) -> None:
    sender = Sender()
    notify = notifier(mode, sender)
    trip(mode, notify, sender)
    handles = [mode.run(notify, text) for text in ("one", "two", "three")]
    with capture_events([events.DeferralReplayed]) as seen:
        force_circuit_state("notify", "closed")  # CircuitStateChanged(new_state="closed")
        results = [replayed(mode, h) for h in handles]
    assert results == ["sent one", "sent two", "sent three"]
    assert [text for text, _ in sender.sent] == ["one", "two", "three"]
    assert [key for _, key in sender.sent] == [h.idempotency_key for h in handles]
    assert [h.status for h in handles] == ["replayed"] * 3
    assert [(e.service, e.outcome) for e in seen] == [("notify", "success")] * 3
    assert buttress.health()["deferred"] == {}


def test_with_no_traffic_the_replay_is_the_trial_once_the_open_time_is_over(
    mode, clock: FakeClock
) -> None:
    sender = Sender()
    notify = notifier(mode, sender)
    trip(mode, notify, sender)
    handle = mode.run(notify, "hello")
    clock.advance(29)
    assert not handle.done()
    clock.advance(1.5)
    assert replayed(mode, handle) == "sent hello"
    assert buttress.health()["circuits"]["notify"]["state"] == "closed"


def test_the_replay_sends_the_idempotency_key_its_attempts_sent(mode, clock) -> None:
    keys: list[str | None] = []

    def send(text: str) -> str:
        keys.append(idempotency_key())
        if len(keys) == 1:
            raise ConnectionError("down")  # trips the circuit; the retry is then rejected
        return text

    notify = with_fallback(name="notify", defer=True)(
        retry_with_backoff(name="notify", max_attempts=3, jitter="none")(
            circuit_breaker(name="notify", fail_max=1, timeout=30)(mode.define(send))
        )
    )
    handle = mode.run(notify, "hello")
    assert isinstance(handle, Deferred)
    assert keys == [handle.idempotency_key]
    clock.advance(31)
    assert replayed(mode, handle) == "hello"
    assert keys == [handle.idempotency_key] * 2


def test_every_call_of_a_deferring_fallback_has_an_idempotency_key(mode, clock) -> None:
    sender = Sender()
    notify = notifier(mode, sender)
    mode.run(notify, "a")
    mode.run(notify, "b")
    (_, first), (_, second) = sender.sent
    assert first is not None
    assert second is not None
    assert first != second


def test_a_full_queue_refuses_the_call_with_a_metric(mode, clock: FakeClock) -> None:
    sender = Sender()
    notify = notifier(mode, sender, defer=DeferOptions(max_items=2))
    trip(mode, notify, sender)
    mode.run(notify, "one")
    mode.run(notify, "two")
    with capture_events([events.DeferralDropped, CallFinished]) as seen:
        refused = mode.outcome(notify, "three")
    assert isinstance(refused, CircuitOpenError)
    assert seen == [
        events.DeferralDropped("notify", "full"),
        CallFinished("notify", "rejected", 0.0, "CircuitOpenError"),
    ]


def test_calls_older_than_max_age_are_dropped_unreplayed(mode, clock: FakeClock) -> None:
    sender = Sender()
    notify = notifier(mode, sender, defer=DeferOptions(max_age=60), timeout=600)
    trip(mode, notify, sender)
    old = mode.run(notify, "old")
    clock.advance(120)
    young = mode.run(notify, "young")
    with capture_events([events.DeferralDropped]) as seen:
        force_circuit_state("notify", "closed")
        assert replayed(mode, young) == "sent young"
    error = outcome_of(mode, old)
    assert isinstance(error, TimeoutError)
    assert "dropped unreplayed after 120s" in str(error)
    assert old.status == "dropped"
    assert seen == [events.DeferralDropped("notify", "expired")]
    assert sender.sent == [("young", young.idempotency_key)]


def test_a_replay_that_fails_fails_its_handle_and_the_next_one_goes_on(mode, clock) -> None:
    sent = []

    def send(text: str) -> str:
        if text == "first":
            raise ValueError("rejected by the API")
        sent.append(text)
        return text

    notify = with_fallback(name="notify", defer=True)(
        circuit_breaker(name="notify", fail_max=5)(mode.define(send))
    )
    force_circuit_state("notify", "forced_open")
    first = mode.run(notify, "first")
    second = mode.run(notify, "second")
    with capture_events([events.DeferralReplayed]) as seen:
        force_circuit_state("notify", "closed")
        error = outcome_of(mode, first)
        assert replayed(mode, second) == "second"
    assert isinstance(error, ValueError)
    assert first.status == "failed"
    assert [e.outcome for e in seen] == ["failure", "success"]


def test_a_replay_rejected_again_stays_first_in_line(mode, clock: FakeClock) -> None:
    sender = Sender()
    notify = notifier(mode, sender)
    trip(mode, notify, sender)
    first = mode.run(notify, "first")
    second = mode.run(notify, "second")
    sender.down = ConnectionError("still down")
    clock.advance(31)  # the replay of "first" is the trial: it fails and re-opens the circuit
    assert isinstance(outcome_of(mode, first), ConnectionError)
    assert not second.done()  # rejected on replay: still queued
    sender.down = None
    clock.advance(31)
    assert replayed(mode, second) == "sent second"
    assert second.status == "replayed"


def test_a_rate_limited_call_is_replayed_when_the_limit_allows(mode, clock: FakeClock) -> None:
    sender = Sender()
    notify = with_fallback(name="notify", defer=True)(
        with_rate_limit(name="notify", rate=1, burst=1)(mode.define(sender))
    )
    assert mode.run(notify, "now") == "sent now"
    with capture_events([events.DeferralQueued]) as seen:
        handle = mode.run(notify, "later")
    assert seen == [events.DeferralQueued("notify", RateLimitedError.__name__, 1)]
    clock.advance(1)
    assert replayed(mode, handle) == "sent later"


def test_a_non_rejection_is_left_to_the_other_alternatives(mode, clock: FakeClock) -> None:
    sender = Sender()
    sender.down = ConnectionError("down")
    notify = with_fallback("queued later", name="notify", defer=True)(mode.define(sender))
    with capture_events([events.DeferralQueued]) as seen:
        assert mode.run(notify, "x") == "queued later"
    assert seen == []


def test_policy_call_replays_the_function_it_was_given(mode, clock: FakeClock) -> None:
    sender = Sender()
    policy = with_fallback(name="notify", defer=True).then(
        circuit_breaker(name="notify", fail_max=1, timeout=30)
    )
    run = policy.acall if mode.is_async else policy.call
    force_circuit_state("notify", "forced_open")
    handle = mode.run(run, mode.define(sender), "via policy")
    force_circuit_state("notify", "closed")
    assert replayed(mode, handle) == "sent via policy"


@pytest.mark.parametrize("bad", [{"max_items": 0}, {"max_age": 0}, {"retry_interval": -1}])
def test_bad_defer_options_fail_at_decoration(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        with_fallback(defer=DeferOptions(**bad))


def test_defer_from_settings(mode, clock: FakeClock) -> None:
    sender = Sender()
    buttress.config.reload_settings(
        env={"BUTTRESS_SERVICES__NOTIFY__FALLBACK__DEFER__MAX_ITEMS": "1"}
    )
    try:
        notify = buttress.resilient(
            "notify", retry={"max_attempts": 1}, circuit_breaker={"fail_max": 1}
        )(mode.define(sender))
        trip(mode, notify, sender)
        assert isinstance(mode.run(notify, "one"), Deferred)
        assert isinstance(mode.outcome(notify, "two"), CircuitOpenError)
    finally:
        buttress.config.reload_settings(env={})
