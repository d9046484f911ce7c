"""Rate limit: a token bucket that paces calls to a dependency's quota.

The bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second on the buttress
clock. A call takes one token. With none left it may wait up to ``max_wait`` for one; the token is
*reserved* before the wait (the bucket goes into debt), so concurrent waiters queue behind each
other instead of all waking for the same token. A call that would wait longer is rejected with
:class:`~buttress.RateLimitedError` whose ``retry_after`` says when a token will be there; so is one
whose token would only come at or after the enclosing deadline (``buttress.remaining()``): the
wait would be for nothing, so it is refused at once.

With ``state_url`` the rate is the whole fleet's: every call asks Redis (one atomic script on
Redis's clock, see ``_rate_redis``) through an :class:`~buttress.patterns._base.AskStore` effect
the drivers perform; the wait for a reserved token stays local. While Redis cannot be reached the
pod falls back to a local bucket at its fair share of the rate (see :class:`FleetRateLimiter`).
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any, ClassVar, NotRequired, TypedDict

from pydantic import Field

from buttress import _clock, _context, events
from buttress._deadline import caller_gave_up, not_started
from buttress._values import Rate, Seconds, StateURL, redact
from buttress.exceptions import ConfigurationError, RateLimitedError
from buttress.patterns import _rate_redis
from buttress.patterns._base import AskStore, BuildContext, Mode, Options, Sleep, Strategy
from buttress.patterns._redis import RedisTransport, connectors

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
    state_url: StateURL | None = Field(
        None,
        description="redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL "
        "(valkey forms too): one rate for every process sharing it",
    )
    expected_pods: int = Field(
        1,
        gt=0,
        description="pods sharing the rate; with Redis unreachable each takes rate/pods "
        "(the larger of this and the pods Redis last counted)",
    )


class RateLimitSnapshot(TypedDict):
    """A rate limiter at one instant."""

    service: str
    tokens: float  # tokens in the bucket now (0 while waiters hold reservations)
    rate: float
    burst: int
    shared: NotRequired[str]  # fleet limiters: "redis", or "local" while Redis is unreachable
    pods: NotRequired[int]  # fleet limiters: the pods the fair share divides the rate among


def _settings(options: RateLimitOptions) -> tuple[float, int]:
    """``(rate, burst)`` of ``options``, with the default burst ``max(1, rate)``."""
    if options.rate is None:  # build() returns no strategy without a rate, so no limiter exists
        raise ValueError("a rate limiter needs a rate")
    burst = options.burst if options.burst is not None else max(1, int(options.rate))
    return options.rate, burst


class RateLimiter:
    """The shared token bucket of one service."""

    __slots__ = ("_lock", "_tokens", "_updated", "burst", "fleet", "max_wait", "rate", "service")

    def __init__(self, service: str, options: RateLimitOptions) -> None:
        self.service = service
        self._lock = threading.Lock()
        # The local bucket's rate and burst: the whole rate, or with a fleet the pod's share.
        self.rate, self.burst = _settings(options)
        self.max_wait = options.max_wait
        self.fleet = None if options.state_url is None else _Fleet(service, options)
        if self.fleet is not None:
            self.rate, self.burst = self.fleet.share()
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
        raise self.rejected(wait, reason)

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

    def rejected(self, retry_after: float, reason: str) -> RateLimitedError:
        """The error refusing a call (``CallRejected`` emitted): next token in ``retry_after``."""
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
        fleet = self.fleet
        if fleet is not None and fleet.url == options.state_url:
            fleet.reconfigure(options)
        else:
            if fleet is not None:
                fleet.transport.retire()
            fleet = None if options.state_url is None else _Fleet(self.service, options)
        if fleet is not None:
            rate, burst = fleet.share()
        with self._lock:
            tokens = self._refill()
            self.fleet = fleet
            self.rate, self.burst = rate, burst
            self.max_wait = options.max_wait
            self._tokens = min(tokens, float(self.burst))

    def snapshot(self) -> RateLimitSnapshot:
        """Tokens available now, the rate and the burst."""
        with self._lock:
            tokens = self._refill()
            self._tokens = tokens
        fleet = self.fleet
        if fleet is None:
            return RateLimitSnapshot(
                service=self.service, tokens=max(0.0, tokens), rate=self.rate, burst=self.burst
            )
        local = fleet.is_down()
        return RateLimitSnapshot(
            service=self.service,
            tokens=max(0.0, tokens) if local else fleet.left,
            rate=fleet.rate,
            burst=fleet.burst,
            shared="local" if local else "redis",
            pods=fleet.pods(),
        )

    def set_share(self, rate: float, burst: int) -> None:
        """Run the local bucket at ``rate`` and ``burst`` (a fleet pod's fair share)."""
        with self._lock:
            tokens = self._refill()
            self.rate, self.burst = rate, burst
            self._tokens = min(tokens, float(burst))


_deadline = _context.deadline


class _TokenWait(Sleep):
    """The wait for a token reserved in the bucket's debt."""

    __slots__ = ("fleet", "limiter")

    def __init__(self, limiter: RateLimiter, seconds: float, *, fleet: bool = False) -> None:
        super().__init__(seconds)
        self.limiter = limiter
        # A token reserved in Redis stays taken (giving it back would cost a request and race
        # the fleet's other reservations): the fleet sees one call fewer, never one more.
        self.fleet = fleet

    def resume(self) -> None:
        limiter = self.limiter
        if caller_gave_up():  # a sync timeout's caller left while it waited
            self.abandon()
            raise not_started(limiter.service, self.seconds, "a rate-limit token")
        if events.ROUTES.get(events.RateLimitAcquired):
            limiter.note_acquired(self.seconds)

    def abandon(self) -> None:  # cancelled while waiting: the reservation goes back
        if not self.fleet:
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

    def before(self) -> _TokenWait | _FleetAsk | None:
        limiter = self.limiter
        fleet = limiter.fleet
        if fleet is not None and not fleet.is_down():
            return fleet.ask(limiter, self.mode == "shadow")
        if self.mode == "shadow":
            limiter.shadow_take()
            return None
        return _take_locally(limiter)


def _take_locally(limiter: RateLimiter) -> _TokenWait | None:
    """A token from the local bucket: none to wait for, or the wait for the one reserved."""
    wait = limiter.reserve()
    if wait:
        return _TokenWait(limiter, wait)
    if events.ROUTES.get(events.RateLimitAcquired):
        limiter.note_acquired(0.0)
    return None


# A pod tells Redis it is alive at most this often (seconds), and counts in the fair share until
# it has been silent for the window.
_BEAT = 1.0
_BEAT_WINDOW = 5.0
# Seconds before asking Redis again after a fault: doubling from the first to the last while
# Redis stays unreachable; calls take the local fair share meanwhile.
_RETRY_FIRST = 0.5
_RETRY_LAST = 5.0


class _Fleet:
    """The fleet side of a limiter: its requests, its transport, what Redis last said.

    Fair share: while Redis is unreachable each pod takes ``rate / pods`` (burst likewise, at
    least 1), where ``pods`` is the larger of ``expected_pods`` and the pods that sent Redis a
    heartbeat within the last ``_BEAT_WINDOW`` seconds (as last counted). A configured count
    holds from the first call; the heartbeat count follows scaling without a redeploy.
    """

    __slots__ = (
        "_backoff",
        "_down_until",
        "_head",
        "_id",
        "_next_beat",
        "_seen",
        "burst",
        "expected_pods",
        "left",
        "rate",
        "service",
        "transport",
        "url",
    )

    def __init__(self, service: str, options: RateLimitOptions) -> None:
        url = options.state_url
        if url is None:  # the limiter makes a fleet only with a URL
            raise ValueError("a fleet rate limit needs a state_url")
        self.service = service
        self.url = url
        shown = redact(url)
        try:
            make_sync, make_async, stale = connectors(
                url, tag=service, socket_timeout=0.1, connect_timeout=0.1
            )
        except ImportError:
            raise ConfigurationError(
                f"service {service!r}: rate_limit.state_url is set ({shown}) but the 'redis' "
                "package is not installed; install buttress[redis]",
                errors=((f"services.{service}.rate_limit.state_url", "state_url", "no redis"),),
            ) from None
        except ValueError as exc:
            raise ConfigurationError(
                f"service {service!r}: rate_limit.state_url {shown} is not valid: {exc}",
                errors=((f"services.{service}.rate_limit.state_url", "state_url", "invalid"),),
            ) from None
        self.transport = RedisTransport(make_sync, make_async, 0.1, _rate_redis.LOAD, stale)
        self._id = uuid.uuid4().hex[:16]
        self._seen = 0
        self._next_beat = 0.0
        self._down_until = 0.0
        self._backoff = _RETRY_FIRST
        self.reconfigure(options)

    def reconfigure(self, options: RateLimitOptions) -> None:
        self.rate, self.burst = _settings(options)
        self.expected_pods = options.expected_pods
        self.left = float(self.burst)
        self._head = _rate_redis.prefix(self.service, self.rate, self.burst)

    def pods(self) -> int:
        """The pods the rate is shared among (for the fair share)."""
        return max(self.expected_pods, self._seen)

    def share(self) -> tuple[float, int]:
        """This pod's fair share of the rate and the burst."""
        pods = self.pods()
        return self.rate / pods, max(1, self.burst // pods)

    def is_down(self) -> bool:
        """Whether calls take the local fair share now (Redis failed and is not asked yet)."""
        return _clock.monotonic() < self._down_until

    def ask(self, limiter: RateLimiter, shadow: bool) -> _FleetAsk:
        now = _clock.monotonic()
        bound = limiter.max_wait
        deadline = _deadline.get()
        if deadline is not None and deadline - now <= bound:
            # A token at or after the deadline is for nothing: ask only for one before it.
            bound = deadline - now - 1e-6
        beat = None
        if now >= self._next_beat:
            self._next_beat = now + _BEAT
            # The pid too: forked workers inherit the id.
            beat = (b"%s-%d" % (self._id.encode(), os.getpid()), _BEAT_WINDOW)
        request = _rate_redis.request(self._head, bound, beat)
        return _FleetAsk(request, self.transport, limiter, self, shadow)

    def answered(self, answer: _rate_redis.Answer) -> None:
        self._backoff = _RETRY_FIRST
        self.left = answer.left
        if answer.pods:
            self._seen = answer.pods

    def failed(self, limiter: RateLimiter, exc: Exception) -> None:
        """Redis did not answer: take the local fair share until the next attempt."""
        now = _clock.monotonic()
        if now >= self._down_until:  # the first failure of this attempt (others are its twins)
            self._down_until = now + self._backoff
            self._backoff = min(self._backoff * 2, _RETRY_LAST)
            self._next_beat = 0.0  # be counted again as soon as Redis answers
            limiter.set_share(*self.share())
            self.transport.reset()
        handlers = events.ROUTES.get(events.StateStoreError)
        if handlers:
            event = events.StateStoreError(self.service, PATTERN, type(exc).__name__)
            events.dispatch(handlers, event)


class _FleetAsk(AskStore):
    """Ask the fleet's bucket in Redis for a token; the answer is acted on here."""

    __slots__ = ("fleet", "limiter", "shadow")

    def __init__(
        self,
        request: bytes,
        transport: RedisTransport,
        limiter: RateLimiter,
        fleet: _Fleet,
        shadow: bool,
    ) -> None:
        super().__init__(request, transport)
        self.limiter = limiter
        self.fleet = fleet
        self.shadow = shadow

    def resume(self, reply: Any) -> _TokenWait | None:
        try:
            answer = _rate_redis.parse(reply)
        except ValueError as exc:
            return self.failed(exc)
        self.fleet.answered(answer)
        limiter = self.limiter
        if self.shadow:  # never waits nor rejects; a refusal is only reported
            if not answer.allowed and events.ROUTES.get(events.ShadowDecision):
                event = events.ShadowDecision(limiter.service, PATTERN, "reject")
                events.dispatch(events.ROUTES[events.ShadowDecision], event)
            return None
        if answer.allowed:
            if answer.wait:
                return _TokenWait(limiter, answer.wait, fleet=True)
            if events.ROUTES.get(events.RateLimitAcquired):
                limiter.note_acquired(0.0)
            return None
        reason = "no_tokens" if answer.wait > limiter.max_wait else "deadline"
        raise limiter.rejected(answer.wait, reason)

    def failed(self, exc: Exception) -> _TokenWait | None:
        limiter = self.limiter
        self.fleet.failed(limiter, exc)
        if self.shadow:
            limiter.shadow_take()
            return None
        return _take_locally(limiter)

    # abandon(): an interrupted request may have taken a token in Redis; it is not given back,
    # so the fleet sees one call fewer than it allowed, never one more.


def build(ctx: BuildContext) -> Strategy | None:
    """A :class:`RateLimitStrategy` over the shared limiter of ``ctx.key``; no rate: ``None``."""
    options: RateLimitOptions = ctx.options
    if not options.enabled or options.rate is None:
        return None
    service = ctx.service
    limiter = ctx.shared(PATTERN, lambda opts: RateLimiter(service, opts))
    return RateLimitStrategy(limiter, ctx.mode)
