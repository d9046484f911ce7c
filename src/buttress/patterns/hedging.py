"""Hedging: when a call is slow, send a copy of it and take whichever answers first.

A tail of slow answers (a garbage-collecting replica, a cold cache, a lost packet) sets a
service's p99. Hedging starts another copy of a call that has not answered after ``delay``
seconds, up to ``max_hedges`` copies; the first copy that returns answers the call, and the
others are cancelled (``async def``) or abandoned to finish unobserved (``def``). ``delay`` is a
fixed number of seconds or a percentile of the service's recent latency (``"p95"``): at ``p95``
about one call in twenty sends a copy, so the extra load stays near 5 %, and every copy also
draws on the service's retry budget, which caps it whatever the delay.

A copy runs the call again *at the same time*: only calls that are safe to repeat may be hedged,
so ``idempotent=True`` must be declared with the delay (in code or in settings); without it the
decorator (or the settings load) is refused. The decision to hedge and the latency it learns
from are here; the drivers in :mod:`buttress.policy` run the race (the :class:`Hedge` effect).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Final, cast

from pydantic import Field, ValidationInfo, field_validator, model_validator

from buttress import _clock, _context, events
from buttress._values import PositiveSeconds
from buttress.patterns._base import BuildContext, Hedge, Mode, Options, from_code
from buttress.patterns._budget import RetryBudget, shared_budget

__all__ = ["PATTERN", "HedgingOptions", "HedgingStrategy", "LatencyPercentile", "build"]

PATTERN = "hedging"

# "p95", "p99.9": a percentile of recent latency.
_PERCENTILE: Final = re.compile(r"p(\d{1,2}(?:\.\d+)?)")
# Recent latency is kept for this many calls ...
SAMPLES: Final = 500
# ... hedging waits for this many before a percentile means anything (no hedge until then) ...
MIN_SAMPLES: Final = 20
# ... and the percentile is recomputed every this many new samples (sorting is not per call).
REFRESH: Final = 25


class HedgingOptions(Options):
    """Options of ``with_hedging`` (and of ``services.<name>.hedging``)."""

    enabled: bool = True
    delay: PositiveSeconds | str | None = Field(
        default=None,
        description='seconds before a copy is sent, or a percentile of recent latency ("p95"); '
        "unset: no hedging",
    )
    max_hedges: int = Field(default=1, ge=1, le=10, description="copies sent besides the call")
    idempotent: bool = Field(
        default=False, description="true: the call is safe to run twice at once (required)"
    )

    @field_validator("delay", mode="before")
    @classmethod
    def _seconds_or_percentile(cls, delay: object, info: ValidationInfo) -> object:
        # Settings give every value as text: "0.05" is seconds, "p95" a percentile. Code gives
        # seconds as a number: there "0.05" is refused, like any number given as text (and a
        # bool, which the union would otherwise report twice, once per member).
        if not isinstance(delay, str):
            wrong = isinstance(delay, bool) or not isinstance(delay, int | float | None)
            if wrong and from_code(info):
                raise ValueError(
                    "delay must be seconds (a number) or a percentile such as 'p95', got "
                    f"{type(delay).__name__}"
                )
            return delay
        match = _PERCENTILE.fullmatch(delay.strip())
        if match is not None and 0 < float(match.group(1)) < 100:
            return delay.strip()
        if from_code(info):
            raise ValueError(
                f"delay must be seconds (a number) or a percentile such as 'p95', got {delay!r}"
            )
        try:
            return float(delay)
        except ValueError:
            raise ValueError(
                f"delay must be seconds or a percentile such as 'p95' or 'p99.9', got {delay!r}"
            ) from None

    @model_validator(mode="after")
    def _idempotent(self) -> HedgingOptions:
        if self.delay is not None and self.enabled and not self.idempotent:
            raise ValueError(
                "hedging runs the call a second time while the first is still running: declare "
                "idempotent=True if that is safe (reads, idempotent writes), or do not hedge it"
            )
        return self


class LatencyPercentile:
    """A percentile of one service's recent call latency (the last :data:`SAMPLES` calls)."""

    __slots__ = ("_lock", "_samples", "_since", "_written", "fraction", "value")

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self._lock = threading.Lock()
        self._samples: list[float] = []
        self._written = 0  # samples ever recorded (the ring's write position)
        self._since = 0  # samples since the value was last computed
        self.value: float | None = None  # None until MIN_SAMPLES calls were seen

    def reconfigure(self, fraction: float) -> None:
        with self._lock:
            self.fraction = fraction
            self._since = REFRESH  # recompute on the next sample

    def record(self, seconds: float) -> None:
        with self._lock:
            samples = self._samples
            if len(samples) < SAMPLES:
                samples.append(seconds)
            else:
                samples[self._written % SAMPLES] = seconds
            self._written += 1
            self._since += 1
            if len(samples) >= MIN_SAMPLES and (self.value is None or self._since >= REFRESH):
                ordered = sorted(samples)
                self.value = ordered[min(len(ordered) - 1, int(self.fraction * len(ordered)))]
                self._since = 0


class _Race(Hedge):
    """One hedged call: when the next copy is due, whether it may start, what it learns."""

    __slots__ = ("hedges", "started", "strategy")

    def __init__(self, strategy: HedgingStrategy, delay: float | None) -> None:
        super().__init__(delay, strategy.service)
        self.strategy = strategy
        self.hedges = 0
        self.started = _clock.monotonic()

    def launch(self) -> bool:
        strategy = self.strategy
        budget = strategy.budget
        if budget is not None and not budget.withdraw("hedge"):
            self.delay = None
            return False
        self.hedges = hedges = self.hedges + 1
        delay = cast("float", self.delay)
        if hedges >= strategy.max_hedges:
            self.delay = None
        handlers = events.ROUTES.get(events.HedgeLaunched)
        if handlers:
            events.dispatch(handlers, events.HedgeLaunched(strategy.service, hedges, delay))
        return True

    def over(self, winner: int | None) -> None:
        strategy = self.strategy
        if winner is not None and strategy.latency is not None:
            # The latency of the call itself, also when a copy beat it: then the call took at
            # least this long, and that is what the percentile must see, or winners would pull it
            # down and hedging would feed on itself.
            strategy.latency.record(_clock.monotonic() - self.started)
        if self.hedges:
            handlers = events.ROUTES.get(events.HedgeWon)
            if handlers:
                kind = "none" if winner is None else "primary" if winner == 0 else "hedge"
                events.dispatch(handlers, events.HedgeWon(strategy.service, kind))


class HedgingStrategy:
    """``with_hedging`` at one call site: a gate whose answer is always a race (:class:`_Race`)."""

    pattern: ClassVar[str] = PATTERN
    after = None  # nothing held: the race is the whole call

    def __init__(
        self,
        service: str,
        options: HedgingOptions,
        latency: LatencyPercentile | None,
        budget: RetryBudget | None,
        mode: Mode = "enforce",
    ) -> None:
        self.service = service
        self.max_hedges = options.max_hedges
        self.latency = latency
        self.budget = budget
        fixed = options.delay if isinstance(options.delay, float) else None
        self._fixed = fixed
        self.before: Callable[[], Any] = self._shadow if mode == "shadow" else self._race

    def _delay(self) -> float | None:
        if self._fixed is not None:
            return self._fixed
        return cast("LatencyPercentile", self.latency).value

    def _race(self) -> _Race:
        budget = self.budget
        # A logical call counts once in the budget: inside a retry, the retry counted it.
        if budget is not None and _context.retry_scope.get() is None:
            budget.deposit()
        # An integration's request that may not be sent twice (a POST without an idempotency
        # key) races alone: settings say the service is idempotent, the request says otherwise.
        if _context.repeatable.get() is False:
            return _Race(self, None)
        return _Race(self, self._delay())

    def _shadow(self) -> _Race:
        # Shadow mode learns the latency and never sends a copy.
        return _Race(self, None)


def build(ctx: BuildContext) -> HedgingStrategy | None:
    """The hedging strategy of ``ctx``, or ``None`` when no delay is configured."""
    options: HedgingOptions = ctx.options
    if not options.enabled or options.delay is None:
        return None
    latency = None
    if isinstance(options.delay, str):
        fraction = float(options.delay[1:]) / 100
        service = ctx.service

        def make(chosen: float) -> LatencyPercentile:
            return LatencyPercentile(chosen)

        # One latency record per service (as the budget), whatever the call site.
        latency = (
            make(fraction)
            if ctx.instances is None
            else cast("LatencyPercentile", ctx.instances(PATTERN, service, fraction, make))
        )
    budget = None
    if ctx.budget is not None and ctx.budget.enabled:
        budget = shared_budget(ctx, ctx.budget)
    return HedgingStrategy(ctx.service, options, latency, budget, ctx.mode)
