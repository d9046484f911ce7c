"""Retry with backoff: try a failed call again, for transient errors only, without a retry storm.

Adapts tenacity. The first attempt runs with no retry machinery at all (one ``try``, one context
variable), because tenacity's per-call set-up costs tens of microseconds and most calls succeed.
Only a failure the predicate calls retryable enters tenacity: a ``Retrying`` template built once,
copied per failed call (a shared instance keeps per-call state on itself, so concurrent tasks would
clobber each other), and fed the first failure as its attempt 1. Its ``iter()`` decides; it never
sleeps nor calls: the drivers in :mod:`buttress.policy` wait and run the attempts. buttress
supplies every decision tenacity asks for: the predicate (tenacity's default retries everything,
bugs included), the delay (backoff with jitter, or the server's ``Retry-After``), the stop (attempts
used up, or an enclosing deadline too close) and the give-up, which re-raises the caller's own last
exception with a note of the attempts, so tenacity's ``RetryError`` never escapes.

The drivers wait on the buttress clock, so a fake clock drives the waits in tests and testing mode
skips them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar, Literal, cast

import tenacity
from pydantic import Field, model_validator

from buttress import _clock, _context, events
from buttress._context import RetryScope
from buttress._values import GrowthFactor, Seconds
from buttress.exceptions import RejectedError, set_note
from buttress.patterns import _transient
from buttress.patterns._base import BuildContext, Mode, Options, RetryAfter, Return, error_type
from buttress.patterns._budget import RetryBudget, RetryBudgetOptions, shared_budget

PATTERN = "retry"

RetryOn = (
    Literal["transient", "network"]
    | tuple[type[BaseException], ...]
    | Callable[[BaseException], bool]
)


class RetryOptions(Options):
    """Options of ``retry_with_backoff`` (and of ``services.<name>.retry``)."""

    enabled: bool = True
    max_attempts: int = Field(3, gt=0, description="attempts including the first call")
    initial: Seconds = Field(0.1, description="seconds before the first retry (before jitter)")
    exponential_base: GrowthFactor = Field(2.0, description="growth factor of the delay")
    max_delay: Seconds = Field(30.0, description="cap on any single delay, Retry-After included")
    jitter: Literal["none", "full", "equal", "decorrelated"] = "full"
    retry_on: RetryOn = Field(
        "transient",
        description='"transient" (default), "network", exception types, or a predicate',
    )
    idempotent: bool | None = Field(
        default=None,
        description="true: always safe to repeat; false: repeat only a call never sent; "
        "unset: decided per HTTP request from its method and Idempotency-Key",
    )
    respect_retry_after: bool = Field(
        default=True, description="a server's Retry-After sets the delay"
    )
    retry_rejected: bool = Field(
        default=False,
        description="retry a RejectedError that carries retry_after, after that delay",
    )
    budget: RetryBudgetOptions = Field(
        RetryBudgetOptions(),
        description="the service's retry budget (docs/patterns/retry-budget.md)",
    )
    retry_on_result: Callable[[Any], bool] | None = Field(
        default=None,
        description="a returned value for which this is true is retried like a failure",
    )

    code_only: ClassVar[frozenset[str]] = frozenset({"retry_on_result"})

    @model_validator(mode="after")
    def _cap_above_initial(self) -> RetryOptions:
        if self.max_delay < self.initial:
            raise ValueError(f"max_delay ({self.max_delay}) must be >= initial ({self.initial})")
        return self


# Jitter draws from this generator; tests seed it (``retry._rng.seed(1)``) for repeatable delays.
_rng = random.Random()

# Decorrelated jitter grows the window to this multiple of the previous delay (the factor of the
# AWS Architecture Blog's "Exponential Backoff And Jitter", where the scheme comes from).
_DECORRELATED_GROWTH = 3.0


def _predicate(retry_on: RetryOn) -> Callable[[BaseException], bool]:
    if retry_on == "transient":
        return _transient.is_transient
    if retry_on == "network":
        return _transient.is_network
    # A lone exception class is also a callable; called as a predicate it would build an instance,
    # which is truthy, and retry everything. Treat it as the one type it names.
    if isinstance(retry_on, tuple | type):
        types = retry_on

        def is_listed(exc: BaseException) -> bool:
            return isinstance(exc, types)

        return is_listed
    return retry_on


class RetriedResult(Exception):  # noqa: N818 - a returned value, carried as a failure
    """A value the ``retry_on_result`` predicate rejected, carried through the retry loop.

    It never reaches the caller: when no attempt is left, the call returns the last ``value``.
    """

    def __init__(self, value: Any) -> None:
        super().__init__("retry_on_result rejected the returned value")
        self.value = value


def _failure(state: tenacity.RetryCallState) -> BaseException:
    # tenacity calls the wait, stop, before_sleep and give-up hooks only after a failed attempt.
    return cast("BaseException", cast("tenacity.Future", state.outcome).exception())


class RetryStrategy:
    """Retry for one service: decisions only; the drivers wait and run the attempts.

    ``retryable`` (the predicate), ``delay`` (how long before the next attempt, and why),
    ``fits_deadline`` and ``should_retry`` (whether a first failure enters the retry loop at all),
    and ``recover``, which hands the driver the loop of one failed call.
    """

    # Slots: a strategy lives as long as its compiled stack (the step's ``recover``), one per
    # retrying call site; attributes in a dict of their own would cost ≈ 40 bytes more.
    __slots__ = ("_matches", "_shadow", "budget", "check_result", "options", "service")

    pattern: ClassVar[str] = PATTERN
    alternatives = ()  # nothing for a driver to call in the call's place
    succeeded = None
    # Each logical call, its retries included, runs in a fresh scope (what ``attempt()`` and
    # ``idempotency_key()`` read), which the driver sets around it.
    scope = _context.retry_scope
    # tenacity decides, never sleeps (the driver does): one template for def and async def
    # callers, copied per retried call because a copy keeps that call's state. Only ever
    # copied, never run, so one serves every strategy (none is built per service).
    _retrying: ClassVar[tenacity.Retrying] = tenacity.Retrying()

    def __init__(
        self,
        service: str,
        options: RetryOptions,
        mode: Mode = "enforce",
        budget: RetryBudget | None = None,
    ) -> None:
        self.service = service
        self.options = options
        # The service's shared budget: every logical call counts as a first attempt in it (as
        # its scope is made), and every retry must draw on it (in ``stop``).
        self.budget = budget
        self._shadow = mode == "shadow"
        self._matches = _predicate(options.retry_on)
        # The drivers run check_result on what each attempt returns (only when it is set).
        rejects = options.retry_on_result
        self.check_result: Callable[[Any], None] | None = None
        if rejects is not None:

            def check_result(result: Any) -> None:
                if rejects(result):
                    raise RetriedResult(result)

            self.check_result = check_result

    @property
    def new_scope(self) -> Callable[[], RetryScope]:
        """What makes each logical call's scope: the budget's ``new_scope``, which also counts
        the call as a first attempt, or a bare :class:`RetryScope` with no budget.

        Asked when the driver links the step (which keeps the budget, not a method object of
        its own: see ``policy._split``), not per call.
        """
        budget = self.budget
        return RetryScope if budget is None else budget.new_scope

    # -- decisions --------------------------------------------------------------------------------
    def retryable(self, exc: BaseException) -> bool:
        """Whether another attempt may help: the ``retry_on`` predicate, within the hard rules.

        Cancellation and interpreter exits (not ``Exception``) are never retried; a
        ``RejectedError`` only with ``retry_rejected`` and a ``retry_after`` to wait for.
        """
        if not isinstance(exc, Exception):
            return False
        if isinstance(exc, RetriedResult):
            return True  # retry_on_result said so already
        if isinstance(exc, RejectedError):
            return self.options.retry_rejected and exc.retry_after is not None
        return self._matches(exc)

    def repeatable(self, exc: BaseException) -> bool:
        """Whether running the call again is safe, as far as ``idempotent`` and ``exc`` tell.

        A call that never reached the dependency (refused or timed-out connection, a rejection)
        is always safe. Otherwise ``idempotent=True`` says yes and ``False`` no; unset, the
        integration sending the request says (from its method and ``Idempotency-Key``), else
        only an HTTP error about a non-idempotent request without that header is unsafe.
        """
        idempotent = self.options.idempotent
        if idempotent:
            return True
        if isinstance(exc, RejectedError) or _transient.never_sent(exc):
            return True
        if idempotent is not None:
            return False
        told = _context.repeatable.get()
        return told if told is not None else not _transient.not_idempotent(exc)

    def delay(self, exc: BaseException, failed_attempt: int, previous: float) -> tuple[float, str]:
        """Seconds to wait after ``failed_attempt`` failed with ``exc``, and the reason.

        Args:
            exc: the failure of that attempt.
            failed_attempt: its number, 1 for the first call.
            previous: the delay before it (``initial`` for the first), for decorrelated jitter.

        Returns:
            ``(seconds, "retry_after")`` when the server or a rejection said how long, else
            ``(seconds, "backoff")``; never more than ``max_delay``.
        """
        options = self.options
        if isinstance(exc, RejectedError) and exc.retry_after is not None:
            return min(options.max_delay, max(0.0, exc.retry_after)), "retry_after"
        if options.respect_retry_after:
            asked = _transient.retry_after(exc, _clock.wall())
            if asked is not None:
                return min(options.max_delay, asked), "retry_after"
        return self._backoff(failed_attempt, previous), "backoff"

    def _backoff(self, failed_attempt: int, previous: float) -> float:
        options = self.options
        if options.jitter == "decorrelated":
            upper = max(options.initial, previous * _DECORRELATED_GROWTH)
            return min(options.max_delay, _rng.uniform(options.initial, upper))
        try:
            ceiling = min(
                options.max_delay,
                options.initial * options.exponential_base ** (failed_attempt - 1),
            )
        except OverflowError:  # a long run of attempts: the cap was reached long ago
            ceiling = options.max_delay
        if options.jitter == "full":
            return _rng.uniform(0.0, ceiling)
        if options.jitter == "equal":
            return ceiling / 2 + _rng.uniform(0.0, ceiling / 2)
        return ceiling

    def fits_deadline(self, delay: float) -> bool:
        """Whether waiting ``delay`` still ends before the enclosing ``with_timeout`` deadline."""
        limit = _context.deadline.get()
        return limit is None or _clock.monotonic() + delay < limit

    def should_retry(self, exc: BaseException) -> bool:
        """Whether the first failure enters the retry loop; reports the cases where it does not."""
        if not self.retryable(exc):
            return False
        options = self.options
        if not self.repeatable(exc):
            events.emit(events.RetryExhausted(self.service, 1, error_type(exc), "not_idempotent"))
            return False
        if self._shadow:
            if options.max_attempts > 1 and self.fits_deadline(
                self.delay(exc, 1, options.initial)[0]
            ):
                events.emit(events.ShadowDecision(self.service, PATTERN, "retry"))
            return False
        return True

    # -- the call's turn ------------------------------------------------------------------------
    def recover(
        self, failure: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _Run | Return:
        """The retry loop for a failed first attempt; re-raises ``failure`` when it is not retried.

        Only now is tenacity involved: a call whose first attempt succeeds never enters it. A
        rejected result that is not retried is the call's answer.
        """
        if not self.should_retry(failure):
            if isinstance(failure, RetriedResult):
                return Return(failure.value)
            raise failure
        # The driver set this call's scope around it: attempt 2 counts on from there.
        return _Run(self, cast("RetryScope", self.scope.get()), failure)


# How many attempts a retry note lists (the first and last halves).
_NOTE_STEPS = 10


class _Run(RetryAfter):
    """One logical call inside the retry loop: tenacity's decisions, bound to its own state.

    tenacity's ``iter()`` decides (retry or not, the wait, the stop, the give-up) through the hooks
    below; the driver does what it says: wait ``seconds``, run the next attempt, report it. Attempt
    1 already happened before tenacity was involved; its failure is fed in as tenacity's first
    attempt, so tenacity's attempt numbers are the caller's.
    """

    __slots__ = (
        "classifying",
        "gave_up",
        "history",
        "previous",
        "reason",
        "retrying",
        "scope",
        "state",
        "strategy",
        "upcoming",
    )

    def __init__(self, strategy: RetryStrategy, scope: RetryScope, failure: Exception) -> None:
        super().__init__(0.0)
        self.strategy = strategy
        self.scope = scope
        self.previous = strategy.options.initial
        self.upcoming = 0.0
        self.reason = "backoff"
        self.gave_up: str | None = None
        # The error type the retry_on predicate was classifying when it raised (else None).
        self.classifying: str | None = None
        # (error type, backoff chosen after it) for each retried attempt; testing mode and fake
        # clocks may not really wait it, so the note says "backoff", not "waited"
        self.history: list[tuple[str, float]] = []
        self.retrying = retrying = strategy._retrying.copy(
            retry=self.retry,
            before=self.before,
            wait=self.wait,
            stop=self.stop,
            before_sleep=self.before_sleep,
            retry_error_callback=self.give_up,
        )
        retrying.begin()
        self.state = tenacity.RetryCallState(retrying, None, (), {})
        retrying.iter(self.state)  # attempt 1: the one that already failed
        self.failed(failure)

    # -- the driver's questions -------------------------------------------------------------------
    def failed(self, exc: Exception) -> _Run | Return:
        """Attempt failed with ``exc``: set ``seconds`` and return self, or give up.

        Giving up raises the last error (annotated), or returns the last result that
        ``retry_on_result`` rejected as the call's answer.
        """
        state = self.state
        state.set_exception((type(exc), exc, exc.__traceback__))
        try:
            do = self.retrying.iter(state)
        except RetriedResult as given_up:
            return Return(given_up.value)
        except Exception as given_up:
            self.annotate(given_up)
            raise
        self.seconds = float(cast("tenacity.DoSleep", do))
        return self

    def attempting(self) -> None:
        """The wait is over: the next attempt starts."""
        state = self.state
        state.prepare_for_next_attempt()
        self.retrying.iter(state)  # DoAttempt; runs the ``before`` hook

    def succeeded(self) -> None:
        """The attempt just run returned."""
        events.emit(events.RetrySucceeded(self.strategy.service, self.scope.attempt))

    # -- tenacity hooks ---------------------------------------------------------------------------
    def retry(self, state: tenacity.RetryCallState) -> bool:
        outcome = cast("tenacity.Future", state.outcome)
        if not outcome.failed:
            return False
        # The replayed first failure was classified by should_retry already: a predicate with a
        # cost or a side effect (a counter, a log line) runs once per failed attempt.
        if state.attempt_number == 1:
            return True
        strategy = self.strategy
        exc = _failure(state)
        try:
            retryable = strategy.retryable(exc)
        except Exception:
            # The predicate's own error reaches the caller (as in tenacity); the note must not
            # say an attempt raised it.
            self.classifying = error_type(exc)
            raise
        if not retryable:
            return False
        if not strategy.repeatable(exc):
            # The earlier attempts were safe to repeat (say, a refused connection); this one is not.
            self.gave_up = "not_idempotent"
            events.emit(
                events.RetryExhausted(
                    strategy.service, state.attempt_number, error_type(exc), "not_idempotent"
                )
            )
            return False
        return True

    def before(self, state: tenacity.RetryCallState) -> None:
        self.scope.attempt = state.attempt_number

    def wait(self, state: tenacity.RetryCallState) -> float:
        delay, self.reason = self.strategy.delay(
            _failure(state), state.attempt_number, self.previous
        )
        self.previous = self.upcoming = delay
        return delay

    def stop(self, state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= self.strategy.options.max_attempts:
            self.gave_up = "max_attempts"
        elif not self.strategy.fits_deadline(state.upcoming_sleep):
            self.gave_up = "deadline"
        elif (budget := self.strategy.budget) is not None and not budget.withdraw("retry"):
            self.gave_up = "budget"
        return self.gave_up is not None

    def before_sleep(self, state: tenacity.RetryCallState) -> None:
        kind = error_type(_failure(state))
        self.history.append((kind, state.upcoming_sleep))
        events.emit(
            events.RetryScheduled(
                self.strategy.service, state.attempt_number, state.upcoming_sleep, kind, self.reason
            )
        )

    def give_up(self, state: tenacity.RetryCallState) -> Any:
        exc = _failure(state)
        events.emit(
            events.RetryExhausted(
                self.strategy.service, state.attempt_number, error_type(exc), str(self.gave_up)
            )
        )
        raise exc

    # -- outcome ----------------------------------------------------------------------------------
    def annotate(self, exc: Exception) -> None:
        """Add a note of the attempts to the exception the caller is about to get."""
        attempts = self.scope.attempt
        if self.gave_up == "max_attempts":
            why = f"gave up after {attempts} attempts (max_attempts)"
        elif self.gave_up == "not_idempotent":
            why = (
                f"attempt {attempts} raised {error_type(exc)} after the request may have reached "
                "the server, and it is not idempotent"
            )
        elif self.gave_up == "deadline":
            why = (
                f"gave up after {attempts} attempts: the next wait ({self.upcoming:.3g}s) "
                "would end past the enclosing deadline"
            )
        elif self.gave_up == "budget":
            budget = self.strategy.options.budget
            why = (
                f"gave up after {attempts} attempts: the service's retry budget is spent "
                f"(retries may add {budget.ratio:g} of its calls over {budget.window_seconds:g}s)"
            )
        elif self.classifying is not None:
            why = (
                f"the retry_on predicate raised {error_type(exc)} while classifying attempt "
                f"{attempts}'s {self.classifying}"
            )
        else:
            why = f"attempt {attempts} raised {error_type(exc)}, which is not retried"
        steps = [
            f"#{n} {kind}, backoff {slept:.3g}s" for n, (kind, slept) in enumerate(self.history, 1)
        ]
        steps.append(f"#{attempts} {self.classifying or error_type(exc)}")
        if len(steps) > _NOTE_STEPS:
            # A note lists the first and last attempts: a long run must not make a huge note.
            kept = _NOTE_STEPS // 2
            steps[kept:-kept] = [f"... {len(steps) - 2 * kept} more"]
        prefix = f"buttress retry ({self.strategy.service}): "
        set_note(exc, prefix, f"{prefix}{why}: {'; '.join(steps)}")


def build(ctx: BuildContext) -> RetryStrategy | None:
    """The retry strategy for ``ctx.options``, or ``None`` when retry is switched off."""
    options: RetryOptions = ctx.options
    if not options.enabled:
        return None
    budget = shared_budget(ctx, options.budget) if options.budget.enabled else None
    return RetryStrategy(ctx.service, options, ctx.mode, budget)
