"""The three scenarios of issue 12, each beside its baseline, on virtual time.

* :func:`outage`: the dependency refuses everything; clients retry up to 3 attempts. Load
  amplification (attempts that reach it per call) with the retry budget, against tenacity's
  ``AsyncRetrying`` with the same attempts and backoff, and buttress retry with the budget off.
* :func:`overload`: the dependency loses half its capacity mid-run while the offered load stays
  the same. Goodput (answers within the client's deadline, per second) and p99 latency with an
  adaptive limit (AIMD, Gradient2) against fixed limits (and none) at the same load.
* :func:`heavy_tail`: a few calls are very slow. p99 latency with hedging at a percentile delay
  against no hedging, and the extra load hedging adds.

Each scenario is a function of its size (``Size``) and a seed; the same inputs give the same
figures. Every pattern is the real one: the policies are built with the public decorators.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity

import buttress
from buttress import instrumentation, registry
from buttress.patterns import retry as retry_pattern

from .model import Dependency, Tally, open_loop
from .virtual import virtual_time


@dataclass(frozen=True)
class Size:
    """How big a run is: clients, the calls a second each sends, and seconds of virtual time."""

    clients: int
    rate: float
    duration: float


FULL = {
    "outage": Size(clients=20, rate=10, duration=60),
    "overload": Size(clients=20, rate=15, duration=60),
    "heavy_tail": Size(clients=20, rate=20, duration=60),
}
QUICK = {
    "outage": Size(clients=10, rate=10, duration=30),
    "overload": Size(clients=20, rate=15, duration=20),
    "heavy_tail": Size(clients=10, rate=20, duration=30),
}


@dataclass
class Row:
    """One client configuration in one scenario, and what it measured."""

    name: str
    figures: dict[str, float] = field(default_factory=dict)


def _quiet() -> None:
    """No subscriber: the simulation measures the patterns, not the metrics pipeline."""
    instrumentation.configure(prometheus=False, otel=False, logging=False)


def _fresh(seed: int) -> random.Random:
    registry.clear()
    registry.clear_claims()
    retry_pattern._rng.seed(seed)
    random.seed(seed)  # tenacity's jitter draws from the random module
    return random.Random(seed)


def _run(
    seed: int,
    size: Size,
    make: Callable[[Dependency], Callable[[int], Awaitable[object]]],
    dependency: Callable[[random.Random], Dependency],
    tally: Callable[[float], Tally | None],
    during: Callable[[Dependency, Any], None] | None = None,
) -> Dependency:
    rng = _fresh(seed)
    with virtual_time() as run:

        async def main() -> Dependency:
            import asyncio

            dep = dependency(random.Random(rng.randrange(2**32)))
            if during is not None:
                during(dep, asyncio.get_running_loop())
            await open_loop(
                make(dep),
                clients=size.clients,
                rate=size.rate,
                duration=size.duration,
                rng=rng,
                tally=tally,
            )
            return dep

        return run(main())


# -- 1. total outage: load amplification --------------------------------------------------------

ATTEMPTS = 3
INITIAL = 0.1  # seconds before the first retry (full jitter, doubling)


def _tenacity_client(dep: Dependency) -> Callable[[int], Awaitable[object]]:
    async def call(_client: int) -> object:
        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(ATTEMPTS),
            wait=tenacity.wait_random_exponential(multiplier=INITIAL, max=30),
            retry=tenacity.retry_if_exception_type(ConnectionError),
            reraise=True,
        ):
            with attempt:
                return await dep.request()
        raise AssertionError("unreachable: tenacity reraises")

    return call


def _buttress_client(*, budget: bool) -> Callable[[Dependency], Callable[[int], Awaitable[object]]]:
    def make(dep: Dependency) -> Callable[[int], Awaitable[object]]:
        # One call site per client, all of one service: they share its budget.
        sites = {}

        def site(client: int) -> Callable[[], Awaitable[object]]:
            if client not in sites:

                async def request() -> object:
                    return await dep.request()

                sites[client] = buttress.retry_with_backoff(
                    "outage",
                    max_attempts=ATTEMPTS,
                    initial=INITIAL,
                    **({} if budget else {"budget": False}),
                )(request)
            return sites[client]

        def call(client: int) -> Awaitable[object]:
            return site(client)()

        return call

    return make


def outage(size: Size, seed: int = 1) -> list[Row]:
    """Every request fails; how many attempts reach the dependency per call."""
    _quiet()
    rows = []
    for name, make in (
        (f"tenacity, {ATTEMPTS} attempts (baseline)", _tenacity_client),
        (f"buttress retry, {ATTEMPTS} attempts, budget off", _buttress_client(budget=False)),
        (
            f"buttress retry, {ATTEMPTS} attempts, budget on (default)",
            _buttress_client(budget=True),
        ),
    ):
        tally = Tally()
        dep = _run(
            seed,
            size,
            make,
            lambda _rng: Dependency(1, lambda: 0.0, down=True),
            lambda _t, tally=tally: tally,
        )
        rows.append(
            Row(
                name,
                {
                    "calls": tally.started,
                    "attempts": dep.arrivals,
                    "amplification": dep.arrivals / tally.started,
                },
            )
        )
    return rows


# -- 2. overload: the dependency loses half its capacity ------------------------------------------

WORKERS = 20
SERVICE_TIME = 0.05  # median seconds of work per request
DEADLINE = 1.0  # the client's timeout per call
FIXED_LIMITS = (5, 10, 20, 40, 80)


def _service_time(rng: random.Random) -> Callable[[], float]:
    sigma = 0.3
    mu = math.log(SERVICE_TIME)
    return lambda: rng.lognormvariate(mu, sigma)


def _limited(**bulkhead: Any) -> Callable[[Dependency], Callable[[int], Awaitable[object]]]:
    def make(dep: Dependency) -> Callable[[int], Awaitable[object]]:
        async def request() -> object:
            return await dep.request()

        protect = buttress.with_timeout("api", seconds=DEADLINE)
        if bulkhead:
            protect = protect.then(buttress.with_bulkhead("api", max_queue=0, **bulkhead))
        fn = protect(request)

        def call(_client: int) -> Awaitable[object]:
            return fn()

        return call

    return make


def overload(size: Size, seed: int = 2) -> list[Row]:
    """Capacity halves at mid-run; goodput and p99 over the overloaded half."""
    _quiet()
    half = size.duration / 2
    settle = min(5.0, half / 4)  # the first seconds after the loss are a transition
    configs: list[tuple[str, dict[str, Any]]] = [("no limit, timeout only (baseline)", {})]
    configs += [(f"fixed limit {limit}", {"limit": limit}) for limit in FIXED_LIMITS]
    configs += [
        ("adaptive aimd", {"adaptive": "aimd"}),
        ("adaptive gradient2", {"adaptive": "gradient2"}),
    ]
    rows = []
    for name, bulkhead in configs:
        before, after = Tally(), Tally()

        def phase(started: float, before=before, after=after) -> Tally | None:
            if started < half:
                return before
            return after if started >= half + settle else None

        def halve(dep: Dependency, loop: Any) -> None:
            loop.call_at(loop.time() + half, dep.set_workers, WORKERS // 2)

        dep = _run(
            seed,
            size,
            _limited(**bulkhead),
            lambda rng: Dependency(WORKERS, _service_time(rng)),
            phase,
            during=halve,
        )
        measured = size.duration - half - settle
        rows.append(
            Row(
                name,
                {
                    "goodput_full": before.succeeded / half,
                    "goodput_half": after.succeeded / measured,
                    "p99_half": after.p(0.99),
                    "p50_half": after.p(0.5),
                    "failed_half": after.failed / max(after.started, 1),
                    "load": dep.arrivals / (before.started + after.started or 1),
                },
            )
        )
    return rows


# -- 3. heavy-tailed latency: hedging -----------------------------------------------------------

FAST = 0.010  # median of the ordinary calls
SLOW_SHARE = 0.03  # calls that hit a slow replica, a pause, a lost packet ...
SLOW = 0.25  # ... and take this long, plus an exponential tail of the same mean
# A copy for the calls slower than 96 % of recent ones: about 4 % extra load (a little more than
# 100 - 96, since the percentile is an estimate from the last calls), under the 5 % target.
HEDGE_AT = "p96"


def _tail(rng: random.Random) -> Callable[[], float]:
    mu = math.log(FAST)

    def draw() -> float:
        if rng.random() < SLOW_SHARE:
            return SLOW + rng.expovariate(1 / SLOW)
        return rng.lognormvariate(mu, 0.25)

    return draw


def _hedged(
    delay: float | str | None,
) -> Callable[[Dependency], Callable[[int], Awaitable[object]]]:
    def make(dep: Dependency) -> Callable[[int], Awaitable[object]]:
        async def request() -> object:
            return await dep.request()

        fn = (
            request
            if delay is None
            else buttress.with_hedging("replicas", delay=delay, idempotent=True)(request)
        )

        def call(_client: int) -> Awaitable[object]:
            return fn()

        return call

    return make


def heavy_tail(size: Size, seed: int = 3) -> list[Row]:
    """p99 with and without hedging; the extra requests hedging sends."""
    _quiet()
    rows = []
    for name, delay in (("no hedging (baseline)", None), (f"hedging at {HEDGE_AT}", HEDGE_AT)):
        tally = Tally()
        dep = _run(
            seed,
            size,
            _hedged(delay),
            lambda rng: Dependency(1, _tail(rng), unbounded=True),
            lambda _t, tally=tally: tally,
        )
        rows.append(
            Row(
                name,
                {
                    "calls": tally.started,
                    "p50": tally.p(0.5),
                    "p99": tally.p(0.99),
                    "p999": tally.p(0.999),
                    "extra_load": dep.arrivals / tally.started - 1,
                },
            )
        )
    return rows
