"""Rate limit: a token bucket that paces calls to a dependency's quota.

The bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second on the buttress
clock. A call takes one token. With none left it may wait up to ``max_wait`` for one; the token is
*reserved* before the wait (the bucket goes into debt), so concurrent waiters queue behind each
other instead of all waking for the same token. A call that would wait longer is rejected with
:class:`~buttress.RateLimitedError` whose ``retry_after`` says when a token will be there; so is one
whose token would only come at or after the enclosing deadline (``buttress.remaining()``): the
wait would be for nothing, so it is refused at once.
"""

from __future__ import annotations

import threading
from typing import ClassVar, TypedDict

from pydantic import Field

from buttress import _clock, _context, events
from buttress._deadline import caller_gave_up, not_started
from buttress._values import Rate, Seconds
from buttress.exceptions import RateLimitedError
from buttress.patterns._base import BuildContext, Mode, Options, Sleep, Strategy

__all__ = [
    "PATTERN",
    "RateLimitOptions",
    "RateLimitSnapshot",
    "RateLimitStrategy",
    "RateLimiter",
    "build",
]

PATTERN = "rate_limit"


class RateLimitOptions(Options):
    """Options of ``with_rate_limit`` (and of ``services.<name>.rate_limit``).

    With ``rate`` unset the pattern is off (so ``resilient()`` only limits services that set it).
    """

    enabled: bool = True
    rate: Rate | None = Field(None, description="tokens added per second")
    burst: int | None = Field(None, gt=0, description="bucket size (default: max(1, rate))")
    max_wait: Seconds = Field(0.0, description="seconds a call may wait for a token")


class RateLimitSnapshot(TypedDict):
    """A rate limiter at one instant."""

    service: str
    tokens: float  # tokens in the bucket now (0 while waiters hold reservations)
    rate: float
    burst: int


def _settings(options: RateLimitOptions) -> tuple[float, int]:
    """``(rate, burst)`` of ``options``, with the default burst ``max(1, rate)``."""
    if options.rate is None:  # build() returns no strategy without a rate, so no limiter exists
        raise ValueError("a rate limiter needs a rate")
    burst = options.burst if options.burst is not None else max(1, int(options.rate))
    return options.rate, burst


class RateLimiter:
    """The shared token bucket of one service."""

    __slots__ = ("_lock", "_tokens", "_updated", "burst", "max_wait", "rate", "service")

    def __init__(self, service: str, options: RateLimitOptions) -> None:
        self.service = service
        self._lock = threading.Lock()
        self.rate, self.burst = _settings(options)
        self.max_wait = options.max_wait
        # Below zero while callers hold reservations for tokens not yet refilled.
        self._tokens = float(self.burst)
        self._updated = _clock.monotonic()

    def _refill(self) -> float:
        """Bring the bucket up to now (caller holds the lock); return the token level."""
        now = _clock.monotonic()
        tokens = self._tokens + (now - self._updated) * self.rate
        tokens = min(tokens, self.burst)
        self._updated = now
        return tokens

    def reserve(self) -> float:
        """Take a token: return 0.0, or the seconds to wait for the one reserved for the caller.

        Raises:
            RateLimitedError: the wait would be longer than ``max_wait``, or would end at or after
                the enclosing deadline; nothing is taken.
        """
        with self._lock:
            tokens = self._refill()
            if tokens >= 1.0:
                self._tokens = tokens - 1.0
                return 0.0
            wait = (1.0 - tokens) / self.rate
            reason = "no_tokens"
            if wait <= self.max_wait:
                deadline = _deadline.get()
                if deadline is None or self._updated + wait < deadline:
                    self._tokens = tokens - 1.0
                    return wait
                reason = "deadline"
            self._tokens = tokens
        raise self._rejected(wait, reason)

    def refund(self) -> None:
        """Give back a reserved token the caller will not use (it was cancelled while waiting)."""
        with self._lock:
            self._tokens = min(float(self.burst), self._refill() + 1.0)

    def note_acquired(self, waited: float) -> None:
        """Emit ``RateLimitAcquired`` (if anyone listens) for a token taken after ``waited`` s."""
        handlers = events.ROUTES.get(events.RateLimitAcquired)
        if handlers:
            left = max(0.0, self._tokens)
            events.dispatch(handlers, events.RateLimitAcquired(self.service, waited, left))

    def _rejected(self, retry_after: float, reason: str) -> RateLimitedError:
        handlers = events.ROUTES.get(events.CallRejected)
        if handlers:
            event = events.CallRejected(self.service, PATTERN, reason, retry_after)
            events.dispatch(handlers, event)
        detail = ", after the enclosing deadline" if reason == "deadline" else ""
        return RateLimitedError(
            f"rate limit of {self.service!r} reached ({self.rate:g}/s, burst {self.burst}); "
            f"next token in {retry_after:.3g} s{detail}",
            service=self.service,
            retry_after=retry_after,
        )

    def shadow_take(self) -> None:
        """Shadow mode: account for the call as enforcement would, but never wait or reject."""
        with self._lock:
            tokens = self._refill()
            rejected = tokens < 1.0 and (1.0 - tokens) / self.rate > self.max_wait
            # A call enforcement would reject never happens, so it takes nothing; one it would
            # delay happens later, so it takes its reservation.
            self._tokens = tokens if rejected else tokens - 1.0
        if rejected:
            handlers = events.ROUTES.get(events.ShadowDecision)
            if handlers:
                events.dispatch(handlers, events.ShadowDecision(self.service, PATTERN, "reject"))

    def reconfigure(self, options: RateLimitOptions) -> None:
        """Adopt new options; the tokens in the bucket (and reservations) carry over."""
        rate, burst = _settings(options)
        with self._lock:
            tokens = self._refill()
            self.rate, self.burst = rate, burst
            self.max_wait = options.max_wait
            self._tokens = min(tokens, float(self.burst))

    def snapshot(self) -> RateLimitSnapshot:
        """Tokens available now, the rate and the burst."""
        with self._lock:
            tokens = self._refill()
            self._tokens = tokens
            return RateLimitSnapshot(
                service=self.service, tokens=max(0.0, tokens), rate=self.rate, burst=self.burst
            )


_deadline = _context.deadline


class _TokenWait(Sleep):
    """The wait for a token reserved in the bucket's debt."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: RateLimiter, seconds: float) -> None:
        super().__init__(seconds)
        self.limiter = limiter

    def resume(self) -> None:
        limiter = self.limiter
        if caller_gave_up():  # a sync timeout's caller left while it waited
            limiter.refund()
            raise not_started(limiter.service, self.seconds, "a rate-limit token")
        if events.ROUTES.get(events.RateLimitAcquired):
            limiter.note_acquired(self.seconds)

    def abandon(self) -> None:  # cancelled while waiting: the reservation goes back
        self.limiter.refund()


class RateLimitStrategy:
    """``with_rate_limit`` at one call site, over the service's shared :class:`RateLimiter`.

    A gate with nothing to give back: ``before`` takes a token, or asks the driver to wait for
    the one it reserved, or rejects.
    """

    pattern: ClassVar[str] = PATTERN
    after = None

    def __init__(self, limiter: RateLimiter, mode: Mode = "enforce") -> None:
        self.limiter = limiter
        self.mode = mode
        # Bound once: the driver calls it on every call.
        self.before = limiter.shadow_take if mode == "shadow" else self._take

    def _take(self) -> _TokenWait | None:
        limiter = self.limiter
        wait = limiter.reserve()
        if wait:
            return _TokenWait(limiter, wait)
        if events.ROUTES.get(events.RateLimitAcquired):
            limiter.note_acquired(0.0)
        return None


def build(ctx: BuildContext) -> Strategy | None:
    """A :class:`RateLimitStrategy` over the shared limiter of ``ctx.key``; no rate: ``None``."""
    options: RateLimitOptions = ctx.options
    if not options.enabled or options.rate is None:
        return None
    service = ctx.service
    limiter = ctx.shared(PATTERN, lambda opts: RateLimiter(service, opts))
    return RateLimitStrategy(limiter, ctx.mode)
