"""Retry budget: one per service, shared by call sites and hedges, over a sliding window."""

from __future__ import annotations

import threading

import pytest

import buttress
from buttress import config, events, registry
from buttress.exceptions import ConfigurationError
from buttress.patterns._budget import BUDGET, RetryBudget, RetryBudgetOptions
from buttress.testing import FakeClock, capture_events


def budget(**options: float) -> RetryBudget:
    return RetryBudget("svc", RetryBudgetOptions(**options))


def failing(mode, counter: list[int]):
    def body() -> str:
        counter.append(1)
        raise ConnectionError("down")

    return mode.define(body)


# -- the window --------------------------------------------------------------------------------


def test_retries_may_add_ratio_of_first_attempts(clock: FakeClock) -> None:
    spent = budget(ratio=0.2, min_per_second=0.0, window_seconds=10)
    for _ in range(50):
        spent.deposit()
    taken = [spent.withdraw("retry") for _ in range(20)]
    assert taken.count(True) == 10  # 0.2 x 50
    assert taken[10:] == [False] * 10
    assert spent.snapshot() == {
        "service": "svc",
        "enabled": True,
        "requests": 50,
        "retries": 10,
        "remaining": 0,
    }


def test_the_floor_is_a_floor_not_an_addition(clock: FakeClock) -> None:
    # 2 a second over 10 s: a reserve of 20 retries even with no traffic (spent at once if need
    # be, then none until the window slides on), and no more than 0.2 x 500 with traffic.
    quiet = budget(ratio=0.2, min_per_second=2.0, window_seconds=10)
    assert sum(quiet.withdraw("retry") for _ in range(30)) == 20
    clock.advance(5)
    assert not quiet.withdraw("retry")
    clock.advance(6)
    assert sum(quiet.withdraw("retry") for _ in range(30)) == 20
    busy = budget(ratio=0.2, min_per_second=2.0, window_seconds=10)
    for _ in range(500):
        busy.deposit()
    assert sum(busy.withdraw("retry") for _ in range(200)) == 100


def test_the_window_slides_on_the_buttress_clock(clock: FakeClock) -> None:
    spent = budget(ratio=0.5, min_per_second=0.0, window_seconds=10)
    for _ in range(4):
        spent.deposit()
    assert [spent.withdraw("retry") for _ in range(3)] == [True, True, False]
    clock.advance(5)
    for _ in range(4):
        spent.deposit()
    assert [spent.withdraw("retry") for _ in range(3)] == [True, True, False]
    clock.advance(6)  # the first four requests and their two retries have left the window
    assert spent.snapshot()["requests"] == 4
    assert spent.snapshot()["retries"] == 2
    assert not spent.withdraw("retry")
    clock.advance(11)  # everything has left
    assert spent.snapshot()["requests"] == 0
    assert not spent.withdraw("retry")


def test_an_exhausted_budget_says_so_and_a_disabled_one_allows_everything(clock):
    spent = budget(ratio=0.0, min_per_second=0.0)
    with capture_events([events.RetryBudgetExhausted]) as seen:
        assert not spent.withdraw("hedge")
    assert seen == [events.RetryBudgetExhausted("svc", "hedge")]
    spent.reconfigure(RetryBudgetOptions(enabled=False))
    assert all(spent.withdraw("retry") for _ in range(100))


def test_bad_budget_settings_fail_at_load_and_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match=r"services\.svc\.retry\.budget\.ratio"):
        config.load_settings({"BUTTRESS_SERVICES__SVC__RETRY__BUDGET__RATIO": "-0.1"})
    with pytest.raises(ConfigurationError, match="did you mean 'window_seconds'"):
        config.load_settings({"BUTTRESS_SERVICES__SVC__RETRY__BUDGET__WINDOW": "5"})
    with pytest.raises(ConfigurationError, match="budget"):
        buttress.retry_with_backoff(budget={"window_seconds": 0})


def test_budget_keys_merge_across_defaults_services_and_code() -> None:
    settings = config.load_settings(
        {
            "BUTTRESS_DEFAULTS__RETRY__BUDGET__RATIO": "0.5",
            "BUTTRESS_SERVICES__SVC__RETRY__BUDGET__WINDOW_SECONDS": "30",
        }
    )
    view = config.Snapshot(1, settings).service("svc")
    options = view.options("retry", {"budget": {"min_per_second": 1.0}}, None).budget
    assert (options.ratio, options.window_seconds, options.min_per_second) == (0.5, 30.0, 1.0)


# -- through retry_with_backoff ------------------------------------------------------------------


def test_an_outage_adds_at_most_the_ratio_in_retries(mode, clock) -> None:
    attempts: list[int] = []
    fn = buttress.retry_with_backoff(
        "outage", max_attempts=3, budget={"ratio": 0.2, "min_per_second": 0.0}
    )(failing(mode, attempts))
    with capture_events([events.RetryExhausted, events.RetryBudgetExhausted]) as seen:
        outcomes = [mode.outcome(fn) for _ in range(100)]
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    assert len(attempts) <= 120  # 100 calls, at most 20 retries: not 300
    assert len(attempts) >= 110  # and the budget does let retries through
    refused = seen.of(events.RetryBudgetExhausted)
    assert refused
    assert {e.kind for e in refused} == {"retry"}
    by_budget = [e for e in seen.of(events.RetryExhausted) if e.reason == "budget"]
    assert len(by_budget) == len(refused)
    last = outcomes[-1]
    (note,) = [n for n in last.__notes__ if n.startswith("buttress retry")]
    assert "retry budget is spent" in note


def test_call_sites_of_one_service_share_its_budget(mode, clock) -> None:
    attempts: list[int] = []
    one = buttress.retry_with_backoff(
        "shared", initial=0.0, jitter="none", budget={"ratio": 0.0, "min_per_second": 0.5}
    )(failing(mode, attempts))
    two = buttress.retry_with_backoff("shared", initial=0.0, jitter="none")(failing(mode, attempts))
    # 0.5 a second over the default 10 s window: 5 retries for the whole service.
    for _ in range(10):
        mode.outcome(one)
        mode.outcome(two)
    assert len(attempts) == 20 + 5
    (shared,) = registry.instances(BUDGET).values()
    assert shared.snapshot()["retries"] == 5


def test_switched_off_the_budget_never_stops_a_retry(mode, clock) -> None:
    attempts: list[int] = []
    fn = buttress.retry_with_backoff("open", budget=False)(failing(mode, attempts))
    for _ in range(100):
        mode.outcome(fn)
    assert len(attempts) == 300
    assert registry.instances(BUDGET) == {}


def test_concurrent_threads_and_tasks_never_overdraw(mode, clock) -> None:
    attempts: list[int] = []
    fn = buttress.retry_with_backoff(
        "busy", initial=0.0, jitter="none", budget={"ratio": 0.1, "min_per_second": 0.0}
    )(failing(mode, attempts))
    outcomes = mode.gather(fn, 40)
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes)
    (shared,) = registry.instances(BUDGET).values()
    assert shared.snapshot()["requests"] == 40
    assert len(attempts) - 40 == shared.snapshot()["retries"] <= 4


def test_two_call_sites_cannot_give_one_service_two_budgets() -> None:
    def one() -> None: ...

    def two() -> None: ...

    buttress.retry_with_backoff("claimed", budget={"ratio": 0.1})(one)
    with pytest.raises(ConfigurationError, match=r"services\.claimed\.retry\.budget"):
        buttress.retry_with_backoff("claimed", budget={"ratio": 0.3})(two)


def test_first_attempts_counted_without_the_lock_are_all_in_the_window(clock: FakeClock) -> None:
    # Within a slot a first attempt takes no lock; threads counting at once lose none, and the
    # counts made before a slot's end stay in that slot (they leave the window with it).
    spent = budget(ratio=0.5, min_per_second=0.0, window_seconds=10)
    spent.deposit()  # the first slides the window to now
    start = threading.Barrier(8)

    def deposit_many() -> None:
        start.wait()
        for _ in range(2_000):
            spent.new_scope()

    threads = [threading.Thread(target=deposit_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clock.advance(5)
    spent.deposit()  # a later slot: folds the pending ones into theirs first
    assert spent.snapshot()["requests"] == 16_002
    clock.advance(5.5)  # the first slot has left the window; the second has not
    assert spent.snapshot()["requests"] == 1
    assert spent.withdraw("retry") is False  # 0.5 x 1 first attempt: not one whole retry


def test_a_budget_keeps_no_slots_until_the_window_slides_past_counted_ones(
    clock: FakeClock,
) -> None:
    # At rest (a service called within one slot, or once): no list of slots. The first slide
    # past a slot that counted first attempts makes it, with those counts in their slot.
    spent = budget(ratio=0.5, min_per_second=0.0, window_seconds=10)
    for _ in range(3):
        spent.deposit()
    assert spent._requests is None
    assert spent.snapshot()["requests"] == 3
    clock.advance(1.5)  # the next slot: the first one's three are still in the window
    spent.deposit()
    assert spent._requests is not None
    assert spent.snapshot()["requests"] == 4
    clock.advance(9.2)  # the first slot leaves the window, the second stays
    assert spent.snapshot()["requests"] == 1
    quiet = budget(window_seconds=10)
    clock.advance(30)
    quiet.deposit()
    clock.advance(30)  # a whole window passed: nothing to keep, still no list
    quiet.deposit()
    assert quiet._requests is None
    assert quiet.snapshot()["requests"] == 1


@pytest.mark.parametrize("seed", range(20))
def test_the_budgets_window_counts_as_sliding_counts_do(seed: int, clock: FakeClock) -> None:
    # The budget keeps its window compactly (and its slots only once they are needed); the
    # first attempts and retries in it are always those of ``SlidingCounts`` over the same steps.
    import random

    from buttress.patterns._sliding import SlidingCounts

    draw = random.Random(seed)
    spent = budget(ratio=1.0, min_per_second=100.0, window_seconds=10)
    model = SlidingCounts(10, 2)
    for _ in range(300):
        clock.advance(draw.choice((0.0, 0.0, 0.05, 0.4, 1.0, 3.0, 12.0)))
        now = clock.monotonic()
        if draw.random() < 0.8:
            spent.deposit()
            model.add(now, 0)
        else:
            assert spent.withdraw("retry") is True  # the floor allows every one here
            model.add(now, 1)
        model.advance(now)
        snapshot = spent.snapshot()
        assert (snapshot["requests"], snapshot["retries"]) == tuple(model.totals)
