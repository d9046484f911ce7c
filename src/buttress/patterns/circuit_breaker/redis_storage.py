"""Circuit state shared through Redis: one breaker for a whole fleet, that survives Redis failing.

``circuit_breaker(state_url="redis://...")`` makes every process of a service decide from one state
kept in Redis, each decision one atomic Lua script, with a local copy of the state while Redis is
unreachable. A closed (or open) state read from Redis decides the next ``near_ttl`` seconds of
calls without a request (the near-cache); the script publishes every transition and ``_listener``
hears it, so the copy rarely lives that long. This module decides; ``_protocol`` builds the
requests and parses the replies,
``_transport`` holds the connections, and the drivers send the requests (an ``AskStore`` effect).
The script's algorithm, the keys, the reconnection policy and the two ways to drive the storage:
``docs/internals.md`` (Circuit state in Redis).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import hashlib
import itertools
import math
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import pybreaker

from buttress import _clock, events
from buttress._values import redact
from buttress.exceptions import ConfigurationError
from buttress.patterns._base import DRIVERS, AskStore
from buttress.patterns._redis import connectors
from buttress.patterns.circuit_breaker import _listener
from buttress.patterns.circuit_breaker import _protocol as protocol
from buttress.patterns.circuit_breaker._machine import Decision, Limits, Machine
from buttress.patterns.circuit_breaker._protocol import CorruptStateError
from buttress.patterns.circuit_breaker._pybreaker_compat import noticing_a_close
from buttress.patterns.circuit_breaker._states import (
    CLOSED,
    FAILURE,
    FORCED_OPEN,
    FROM_PYBREAKER,
    OPEN,
    SUCCESS,
    TO_PYBREAKER,
)
from buttress.patterns.circuit_breaker._transport import RedisTransport

__all__ = [
    "KEY_PREFIX",
    "CorruptStateError",
    "Decision",
    "Limits",
    "SharedStateStorage",
    "make_storage",
]

KEY_PREFIX: Final = "buttress"

T = TypeVar("T")

_NOT_DOWN: Final = -math.inf


_MAX_ORPHANS: Final = 32

# What a request carries that must ride on the next one if it gets no reply: a success's clearing
# (generation, seq), and trial leases to give back.
_Carry = tuple[tuple[int, int] | None, tuple[bytes, ...]]


def _same(decision: T) -> T:
    return decision


class _Ask(AskStore):
    """One request of a storage; ``then`` makes of its decision what the caller needs.

    Without a reply (Redis unreachable, or the circuit there unreadable) the decision is
    ``local()``'s, and the storage is marked down as its health policy says.
    """

    __slots__ = ("asked", "carry", "limits", "local", "operation", "storage", "then")

    def __init__(  # noqa: PLR0917 - positional: one is made on every shared call
        self,
        storage: SharedStateStorage,
        operation: str,
        request: bytes,
        carry: _Carry,
        limits: Limits | None,
        local: Callable[[], Decision],
        then: Callable[[Decision], Any],
    ) -> None:
        # AskStore's fields, set here: this runs on every shared call.
        self.request = request
        self.transport = storage._transport
        self.storage = storage
        self.operation = operation
        self.carry = carry  # what must ride on the next request if this one gets no reply
        self.limits = limits
        self.local = local
        self.then = then
        self.asked = next(storage._requests)  # numbered as it is sent: the driver sends it now

    def resume(self, reply: Any) -> Any:
        storage = self.storage
        try:
            decision = storage._accept(reply, self.limits, self.asked)
        except CorruptStateError as exc:
            storage._corrupt(self.operation, exc, self.carry)
            decision = self.local()
        except Exception as exc:  # noqa: BLE001 - a reply it cannot read is a fault like any other
            storage._failed(self.operation, exc, self.carry)
            decision = self.local()
        else:
            if storage._down_until != _NOT_DOWN or storage._probing:
                storage._recovered()
        return self.then(decision)

    def failed(self, exc: Exception) -> Any:
        self.storage._failed(self.operation, exc, self.carry)
        return self.then(self.local())

    def abandon(self) -> None:
        # Cancelled: nothing is known about Redis; the next caller may probe.
        self.storage._abandoned(self.carry)


class SharedStateStorage(pybreaker.CircuitBreakerStorage):
    """A service's circuit state in Redis, shared by every process, with a local fallback.

    Build it with :func:`make_storage`. The decision API (``admission``, ``recording``,
    ``setting``, ``observation``: each a decision, or an ``AskStore`` effect that ends in one) is
    what buttress's breaker uses, through the drivers; pybreaker's storage interface works on top
    of the same script for any ``pybreaker.CircuitBreaker``.

    Attributes:
        service: the service whose circuit this is (key namespace and event label).
        url: the Redis URL with its password replaced by ``***``.
        max_delay: the longest a request to Redis may take before the call goes on locally.
    """

    def __init__(
        self,
        service: str,
        *,
        url: str,
        make_sync: Callable[[], Any],
        make_async: Callable[[], Any],
        socket_timeout: float,
        connect_timeout: float,
        idle_ttl: float,
        reconnect_min: float,
        reconnect_max: float,
        trial_lease: float | None,
        stale: Callable[[], None] | None = None,
        near_ttl: float = 0.0,
        redis_id: bytes = b"",
    ) -> None:
        super().__init__("redis")
        self.service = service
        self.url = url
        self.near_ttl = near_ttl
        # Which Redis the URL names (a digest: the URL may hold a password): the storages of
        # one Redis share one pub/sub subscription.
        self._redis_id = redis_id
        self._make_sync = make_sync
        self.max_delay = connect_timeout + 2 * socket_timeout
        self.idle_ttl = idle_ttl
        self.trial_lease = trial_lease
        self._reconnect = (reconnect_min, reconnect_max)
        tag = service.encode()
        self._keys = (
            b"%s:{%s}:circuit" % (KEY_PREFIX.encode(), tag),
            b"%s:{%s}:trials" % (KEY_PREFIX.encode(), tag),
            b"%s:{%s}:reporters" % (KEY_PREFIX.encode(), tag),
        )
        self._transport = RedisTransport(make_sync, make_async, socket_timeout, stale)
        self.channel = self._keys[0] + b":changes"
        # The near-cache: the admission of a closed (or open) circuit as last heard from Redis,
        # valid until _fresh_until (monotonic; with an open one, until its open time ends too).
        # Calls it admits cost no request. Replaced whole, read without the lock.
        self._near: Decision | None = None
        self._fresh_until = -math.inf
        self._open_until = math.inf
        self._heard_limits: Limits | None = None  # for the open time of a published state
        self._subscribed = False
        # Quorum: this process's rate window tripped but the fleet's did not open; this process
        # alone rejects until then (monotonic). Replaced whole, read without the lock.
        self._held: Decision | None = None
        self._held_until = -math.inf
        self._reporter = os.urandom(8).hex().encode()  # this process, among the reporters
        self._lock = threading.Lock()
        # The circuit as this process alone sees it: it mirrors every shared decision, so an
        # outage starts from the last state seen in Redis; negative generations. Guarded by _lock.
        self._local = Machine(_clock.monotonic(), itertools.count(-1, -1))
        self._mirrored: tuple[int, int, int, str] | None = None
        # Replies to concurrent requests arrive in any order; the local copy (what health reads)
        # must never go back to an older one. Requests are numbered as they are sent; the reply
        # last adopted is ordered by (Redis time, generation, seq, base, succ), each of which
        # only grows as Redis runs the script, and ``_adopted_mark`` numbers the first request
        # sent after it was adopted (see _accept).
        self._requests = itertools.count()
        self._adopted_order: tuple[int, int, int, int, int] = (-1, 0, 0, 0, 0)
        self._adopted_mark = 0
        # (generation, seq): a success that clears the failures before seq, not yet sent.
        self._cleared: tuple[int, int] | None = None
        # Trial leases of requests that got no reply: Redis may have granted them, and nobody
        # will run those trials; the next request gives them back (at most _MAX_ORPHANS kept:
        # older ones expire with their lease anyway).
        self._orphans: list[bytes] = []
        self._down_until = _NOT_DOWN
        self._probing = False
        self._faults = 0
        self._prefixes: dict[tuple[bytes, Limits | None], bytes] = {}
        self._lease_ids = itertools.count()
        self._lease_prefix = os.urandom(6).hex()
        # pybreaker's interface: what this thread or task last read, and when (wall clock).
        self._seen: contextvars.ContextVar[tuple[Decision, float]] = contextvars.ContextVar(
            f"buttress_seen_{service}"
        )
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))

    def __repr__(self) -> str:
        return f"<SharedStateStorage {self.service!r} at {self.url}>"

    @property
    def keys(self) -> tuple[str, str]:
        """The Redis keys of this circuit: the state hash and the trial-lease sorted set (the
        reporters of a quorum, ``...:reporters``, exist only while a vote is open)."""
        return self._keys[0].decode(), self._keys[1].decode()

    @property
    def available(self) -> bool:
        """False while Redis is considered down (calls decide locally)."""
        return self._down_until == _NOT_DOWN

    # --- the decision API ------------------------------------------------------------------------
    # Each operation returns what ``then`` makes of its decision: at once when it is decided here
    # (Redis is down, or nothing needs sending), else an AskStore effect whose reply leads there.
    # The drivers perform the effect for threads and for tasks alike; the plain methods below
    # (admit, record, ...) perform it for a thread.

    def admission(self, limits: Limits, then: Callable[[Decision], Any] = _same) -> Any:
        """Decide whether a call may run (one request to Redis, or local while it is down).

        With the near-cache (``near_ttl``), a circuit known to be closed admits at once, and one
        known to be open rejects at once, for ``near_ttl`` seconds after Redis last told this
        process its state (a transition published by any process ends that sooner).
        """
        if self._held is not None:
            held = self._held_open()
            if held is not None:
                return then(held)
        near = self._near
        if near is not None:
            now = _clock.monotonic()
            if now < self._fresh_until:
                if near.admitted or near.override:
                    return then(near)
                if now < self._open_until:
                    return then(near._replace(retry_after=self._open_until - now))
        self._heard_limits = limits
        if self._may_try():
            request, carry = self._admit_request(limits)
            local = functools.partial(self._admit_locally, limits)
            return _Ask(self, "admit", request, carry, limits, local, then)
        return then(self._admit_locally(limits))

    def recording(
        self,
        ticket: Decision,
        outcome: str,
        limits: Limits | None,
        then: Callable[[Decision | None], Any] = _same,
    ) -> Any:
        """Record the ``outcome`` (success, failure, ignored) of a call admitted with ``ticket``.

        ``limits`` None counts without tripping or closing (for a breaker that decides
        transitions itself, like pybreaker). ``then`` gets the state after, or None when nothing
        needed sending (a closed-state success or an ignored outcome of a call that was not a
        trial).
        """
        if ticket.shared:
            if not self._worth_sending(ticket, outcome):
                return then(None)
            if self._may_try():
                request, carry = self._record_request(ticket, outcome, limits)
                local = functools.partial(self._record_locked, ticket, outcome, limits)
                return _Ask(self, "record", request, carry, limits, local, then)
        return then(self._record_locked(ticket, outcome, limits))

    def setting(
        self,
        state: str,
        limits: Limits | None,
        *,
        expected: int | None,
        always: bool,
        then: Callable[[Decision], Any] = _same,
    ) -> Any:
        """Move to ``state`` if the circuit is still in generation ``expected`` (None: any);
        ``always``: even when it is in that state already (a new generation)."""
        if self._may_try():
            request, carry = self._set_request(state, limits, expected=expected, always=always)
            local = functools.partial(self._force_locally, state, expected, always)
            return _Ask(self, "set_state", request, carry, limits, local, then)
        return then(self._force_locally(state, expected, always))

    def overriding(
        self,
        override: str,
        ttl: float,
        limits: Limits | None,
        then: Callable[[Decision], Any] = _same,
    ) -> Any:
        """Put the whole fleet under ``override`` (forced_open, forced_closed, disabled) for
        ``ttl`` seconds, or end the override in place (``override`` empty: closed, fresh).

        Without Redis the decision is this process's (``shared`` False): the caller applies
        the override to this process alone.
        """
        if self._may_try():
            head = self._prefix(b"override", limits)
            orphans = self._take_orphans()
            request = protocol.override_request(head, override, ttl, orphans=orphans)
            request += protocol.tail(limits)
            return _Ask(self, "override", request, (None, orphans), limits, self.last_known, then)
        return then(self.last_known())

    def voting(
        self,
        generation: int,
        standing: float,
        min_reporters: int,
        limits: Limits,
        then: Callable[[Decision], Any] = _same,
    ) -> Any:
        """This process's rate window tripped in ``generation``: the fleet opens once
        ``min_reporters`` processes' votes stand, each for ``standing`` seconds after it was
        cast. The state after (still closed: the quorum is not there yet, see
        :meth:`hold_open`)."""
        if self._may_try():
            head = self._prefix(b"vote", limits)
            orphans = self._take_orphans()
            request = protocol.vote_request(
                head, self._reporter, generation, standing, min_reporters, orphans
            )
            request += protocol.tail(limits)
            local = functools.partial(self._force_locally, OPEN, None, always=False)
            return _Ask(self, "vote", request, (None, orphans), limits, local, then)
        return then(self._force_locally(OPEN, None, always=False))

    def hold_open(self, seconds: float, reason: str) -> Decision:
        """Reject this process's calls for ``seconds`` (its own window tripped below the
        fleet's quorum), then go on from the fleet's state. No request."""
        now = _clock.monotonic()
        with self._lock:
            self._local.move(OPEN, now)
            held = self._local.decision(now, seconds, change=reason)
        self._held_until = now + seconds
        self._held = held
        return held

    def _held_open(self) -> Decision | None:
        held = self._held
        if held is None:
            return None
        left = self._held_until - _clock.monotonic()
        if left > 0:
            return held._replace(retry_after=left, change=None)
        self._held = None
        self._near = None  # the fleet's state, read again
        return None

    def observation(self, then: Callable[[Decision], Any] = _same) -> Any:
        """The current state, read from Redis (or local while it is down); changes nothing."""
        if self._may_try():
            request, carry = self._observe_request()
            return _Ask(self, "read", request, carry, None, self.last_known, then)
        return then(self.last_known())

    def admit(self, limits: Limits) -> Decision:
        """:meth:`admission`, performed for a thread."""
        return cast("Decision", DRIVERS.settle(self.admission(limits)))

    def record(self, ticket: Decision, outcome: str, limits: Limits | None) -> Decision | None:
        """:meth:`recording`, performed for a thread."""
        return cast("Decision | None", DRIVERS.settle(self.recording(ticket, outcome, limits)))

    def transition(self, state: str, generation: int, limits: Limits | None) -> Decision:
        """Move to ``state`` if the circuit is still in ``generation`` (compare-and-set).

        For transitions a breaker decides itself (a failure-rate trip): of several processes
        making the same move from the same state, the first one wins and the others see it.
        """
        effect = self.setting(state, limits, expected=generation, always=False)
        return cast("Decision", DRIVERS.settle(effect))

    def force(self, state: str, limits: Limits | None = None) -> Decision:
        """Put the fleet's circuit in ``state`` (closed, open, half_open) with fresh counters.

        For manual control: it always starts a new generation, even in the same state.
        """
        effect = self.setting(state, limits, expected=None, always=True)
        return cast("Decision", DRIVERS.settle(effect))

    def observe(self) -> Decision:
        """:meth:`observation`, performed for a thread."""
        return cast("Decision", DRIVERS.settle(self.observation()))

    def last_known(self) -> Decision:
        """The state as this process last saw it (no request): for health checks."""
        with self._lock:
            return self._local.decision(_clock.monotonic(), 0.0)

    @property
    def transport(self) -> RedisTransport:
        """The connections the requests go through."""
        return self._transport

    def close(self) -> None:
        """Close the pooled synchronous connections (and stop hearing transitions)."""
        self._unsubscribe()
        self._transport.close()

    def retire(self) -> None:
        """Taken out of use (a reload changed the URL): stop hearing transitions, and close the
        connections (see ``RedisTransport.retire``)."""
        self._unsubscribe()
        self._transport.retire()

    def aclose(self) -> Awaitable[None]:
        """Close the pooled connections of the running event loop (await it there)."""
        return self._transport.aclose()

    # --- the local copy --------------------------------------------------------------------------

    def _admit_locally(self, limits: Limits) -> Decision:
        with self._lock:
            return self._local.admit(limits, _clock.monotonic())

    def _record_locked(self, ticket: Decision, outcome: str, limits: Limits | None) -> Decision:
        with self._lock:
            return self._record_locally(ticket, outcome, limits)

    def _record_locally(self, ticket: Decision, outcome: str, limits: Limits | None) -> Decision:
        """Record an outcome in the local copy, as the script records it; holds the lock.

        A success clears only the failures recorded before its call was admitted (its ``seq``).
        """
        return self._local.record(
            ticket.generation,
            ticket.trial and not ticket.shared,  # a shared trial's slot is Redis's lease
            outcome,
            limits,
            _clock.monotonic(),
            upto=ticket.seq,
        )

    def _force_locally(self, state: str, expected: int | None, always: bool) -> Decision:
        with self._lock:
            return self._local.force(state, _clock.monotonic(), always=always, expected=expected)

    # --- requests and replies --------------------------------------------------------------------

    def _prefix(self, op: bytes, limits: Limits | None) -> bytes:
        """The constant head of a request: command, keys and the limits-derived arguments."""
        key = (op, limits)
        head = self._prefixes.get(key)
        if head is None:
            if limits is None:
                ttl, lease = self.idle_ttl, 0.0
            else:
                lease = self._lease_seconds(limits)
                ttl = max(self.idle_ttl, 2 * protocol.longest_open(limits) + lease)
            head = protocol.prefix(self._keys, op, ttl, limits, lease)
            if len(self._prefixes) > 64:  # limits change rarely; never grow without bound
                self._prefixes.clear()
            self._prefixes[key] = head
        return head

    def _lease_seconds(self, limits: Limits) -> float:
        if self.trial_lease is not None:
            return self.trial_lease
        return max(1.0, limits.reset_timeout)

    def _take_cleared(self) -> tuple[int, int] | None:
        if self._cleared is None:
            return None
        with self._lock:
            cleared, self._cleared = self._cleared, None
        return cleared

    def _take_orphans(self) -> tuple[bytes, ...]:
        if not self._orphans:
            return ()
        with self._lock:
            orphans, self._orphans = tuple(self._orphans), []
        return orphans

    def _admit_request(self, limits: Limits) -> tuple[bytes, _Carry]:
        cleared = self._take_cleared()
        orphans = self._take_orphans()
        lease = f"{self._lease_prefix}:{next(self._lease_ids)}".encode()
        request = protocol.admit_request(self._prefix(b"admit", limits), cleared, lease, orphans)
        request += protocol.tail(limits)
        # With no reply, Redis may have granted this lease: it joins the orphans.
        return request, (cleared, (*orphans, lease))

    def _worth_sending(self, ticket: Decision, outcome: str) -> bool:
        """Whether an outcome changes the shared state now (else it rides on the next request)."""
        if ticket.trial or outcome == FAILURE:
            return True
        if outcome == SUCCESS and ticket.failures:
            self._note_cleared(ticket.generation, ticket.seq)
            with self._lock:  # and in the local copy, in case Redis is down by now
                self._record_locally(ticket, SUCCESS, None)
        return False

    def _record_request(
        self, ticket: Decision, outcome: str, limits: Limits | None
    ) -> tuple[bytes, _Carry]:
        cleared = self._take_cleared()
        orphans = self._take_orphans()
        head = self._prefix(b"record", limits)
        request = protocol.record_request(head, cleared, ticket, outcome, orphans)
        request += protocol.tail(limits)
        # With no reply, the trial's lease may still be held: it joins the orphans.
        lease = ticket.lease.encode()
        return request, (cleared, (*orphans, lease) if lease else orphans)

    def _observe_request(self) -> tuple[bytes, _Carry]:
        cleared = self._take_cleared()
        orphans = self._take_orphans()
        request = protocol.observe_request(self._prefix(b"observe", None), cleared, orphans)
        request += protocol.tail(None)
        return request, (cleared, orphans)

    def _set_request(
        self, state: str, limits: Limits | None, *, expected: int | None, always: bool
    ) -> tuple[bytes, _Carry]:
        head = self._prefix(b"set", limits)
        orphans = self._take_orphans()
        request = protocol.set_request(head, state, expected, always=always, orphans=orphans)
        request += protocol.tail(limits)
        return request, (None, orphans)

    def _note_cleared(self, generation: int, seq: int) -> None:
        # Generations only grow, so the newest generation's highest seq is the one that matters.
        # The next call asks Redis, carrying the clearing (the near-cache would hold it back).
        self._near = None
        with self._lock:
            if self._cleared is None or (generation, seq) > self._cleared:
                self._cleared = (generation, seq)

    def _accept(self, reply: Any, limits: Limits | None, asked: int) -> Decision:
        """Turn the script's reply (to request number ``asked``) into a decision; mirror it."""
        decision, order = protocol.parse(reply, limits)
        mirrored = (decision.generation, decision.failures, decision.successes, decision.state)
        if mirrored != self._mirrored:
            with self._lock:
                # A request sent after the last adoption saw a later Redis (whatever its clock
                # or a lost key say); one sent before it is adopted only if Redis ran it later.
                if asked > self._adopted_mark or order > self._adopted_order:
                    self._mirrored = mirrored
                    self._adopted_order = order
                    self._adopted_mark = next(self._requests)
                    self._local.mirror(decision, _clock.monotonic())
                    self._cache(decision)
        elif self.near_ttl:
            # The same state again: cached (again) for another near_ttl.
            self._cache(decision)
        return decision

    # --- the near-cache --------------------------------------------------------------------------

    def _cache(self, decision: Decision) -> None:
        """Remember how this state admits calls, for near_ttl seconds; holds the lock."""
        if not self.near_ttl:
            return
        now = _clock.monotonic()
        if decision.override:
            # Decided by the override until it ends (then read again).
            self._open_until = math.inf
            self._near = decision._replace(
                admitted=decision.override != FORCED_OPEN,
                trial=False,
                change=None,
                lease="",
                retry_after=None,
            )
            self._fresh_until = now + min(self.near_ttl, decision.override_left)
            self._ensure_subscribed()
            return
        if decision.state == CLOSED:
            self._open_until = math.inf
            self._near = decision._replace(admitted=True, trial=False, change=None, lease="")
        elif decision.state == OPEN and decision.retry_after:
            self._open_until = now + decision.retry_after
            self._near = decision._replace(admitted=False, trial=False, change=None, lease="")
        else:
            self._near = None  # half-open: each trial's lease is Redis's to grant
            return
        self._fresh_until = now + self.near_ttl
        self._ensure_subscribed()

    def _ensure_subscribed(self) -> None:
        if not self._subscribed:
            self._subscribed = True
            _listener.subscribe(self._redis_id, self._make_sync, self)

    def heard(self, message: bytes) -> None:
        """A transition another request made, published by the script (the listener's thread)."""
        self._near = None  # whatever comes of it, the cached state has ended
        try:
            decision, order = protocol.parse(message, self._heard_limits)
        except Exception:  # noqa: BLE001 - unreadable: the next call asks Redis
            return
        with self._lock:
            if order > self._adopted_order:
                self._mirrored = (
                    decision.generation,
                    decision.failures,
                    decision.successes,
                    decision.state,
                )
                self._adopted_order = order
                self._adopted_mark = next(self._requests)
                self._local.mirror(decision, _clock.monotonic())
                self._cache(decision)

    def resubscribed(self) -> None:
        """The listener (re)connected: transitions may have been missed; ask Redis next."""
        self._near = None

    def _unsubscribe(self) -> None:
        if self._subscribed:
            self._subscribed = False
            self._near = None
            _listener.unsubscribe(self._redis_id, self)

    # --- Redis health ----------------------------------------------------------------------------

    def _may_try(self) -> bool:
        """Whether to ask Redis now: always while it works; after a fault, one probe at a time."""
        until = self._down_until
        if until == _NOT_DOWN:
            return True
        if _clock.monotonic() < until:
            return False
        with self._lock:
            if self._probing or _clock.monotonic() < self._down_until:
                return False
            self._probing = True
            return True

    def _recovered(self) -> None:
        if self._down_until != _NOT_DOWN or self._probing:
            with self._lock:
                self._down_until = _NOT_DOWN
                self._probing = False
                self._faults = 0

    def _failed(self, operation: str, exc: Exception, carry: _Carry) -> None:
        self._near = None
        with self._lock:
            self._faults += 1
            low, high = self._reconnect
            delay = min(high, low * 2 ** min(self._faults - 1, 30))
            self._down_until = _clock.monotonic() + delay
            self._probing = False
            self._keep(carry)
        self._transport.reset()
        handlers = events.ROUTES.get(events.StateStoreError)
        if handlers:
            events.dispatch(
                handlers, events.StateStoreError(self.service, operation, type(exc).__name__)
            )

    def _corrupt(self, operation: str, exc: Exception, carry: _Carry) -> None:
        """Redis answered, but had to start over from a circuit it could not read.

        Redis works, so it is not marked down; this one call decides locally, from the last
        state this process read, and the next request reads the repaired state (closed).
        """
        self._near = None
        with self._lock:
            self._keep(carry)  # a lease granted in that reply is nobody's
        self._recovered()
        handlers = events.ROUTES.get(events.StateStoreError)
        if handlers:
            events.dispatch(
                handlers, events.StateStoreError(self.service, operation, type(exc).__name__)
            )

    def _abandoned(self, carry: _Carry) -> None:
        """A request was cancelled: nothing is known about Redis; let the next caller probe."""
        with self._lock:
            self._probing = False
            self._keep(carry)

    def _keep(self, carry: _Carry) -> None:
        """What a request that got no reply carried rides on the next one; holds the lock."""
        cleared, leases = carry
        if cleared is not None and (self._cleared is None or cleared > self._cleared):
            self._cleared = cleared
        if leases:
            self._orphans.extend(leases)
            del self._orphans[:-_MAX_ORPHANS]

    def _after_fork(self) -> None:
        self._transport.forget()
        self._subscribed = False  # the parent's listener thread is not the child's
        self._near = None
        self._lease_prefix = os.urandom(6).hex()
        self._lock = threading.Lock()
        self._probing = False
        self._orphans = []  # the parent's to give back

    # --- pybreaker's CircuitBreakerStorage interface ---------------------------------------------

    def _remember(self, decision: Decision) -> None:
        self._seen.set((decision, _clock.wall()))

    def _last_seen(self) -> Decision:
        seen = self._seen.get(None)
        if seen is not None:
            return seen[0]
        with self._lock:
            return self._local.decision(_clock.monotonic(), 0.0)

    @property
    def state(self) -> str:
        """pybreaker: the state (one request). Remembers what this thread or task read."""
        decision = self.observe()
        self._remember(decision)
        return TO_PYBREAKER[decision.state]

    @state.setter
    def state(self, state: str) -> None:
        """pybreaker: a transition, applied only to the state this thread or task last read."""
        target = FROM_PYBREAKER.get(state)
        if target is None:
            raise ValueError(f"unknown pybreaker state {state!r}")
        seen = self._seen.get(None)
        expected = seen[0].generation if seen is not None and seen[0].shared else None
        effect = self.setting(target, None, expected=expected, always=False)
        self._remember(DRIVERS.settle(effect))

    def increment_counter(self) -> None:
        """pybreaker: one more failure in the state this thread or task last read."""
        seen = self._last_seen()
        after = self.record(seen._replace(trial=False, lease=""), FAILURE, None)
        if after is not None:
            self._remember(after)

    def reset_counter(self) -> None:
        """pybreaker: a success clears the failures recorded before it was admitted.

        pybreaker also calls this when it merely *notices* that the circuit closed (its
        ``CircuitClosedState`` constructor); that call is not a success and is ignored, or it
        would wipe the failures other processes recorded since the close.
        """
        if noticing_a_close():
            return
        seen = self._seen.get(None)
        if seen is None:
            return
        decision, read_at = seen
        if decision.state == CLOSED and decision.failures:
            if decision.shared:
                self._note_cleared(decision.generation, decision.seq)
            else:
                with self._lock:
                    self._record_locally(decision, SUCCESS, None)
            self._seen.set((decision._replace(failures=0), read_at))

    def increment_success_counter(self) -> None:
        """pybreaker: one more half-open success (pybreaker closes the circuit itself)."""
        seen = self._last_seen()
        after = self.record(seen._replace(trial=True, lease=""), SUCCESS, None)
        if after is not None:
            self._remember(after)

    def reset_success_counter(self) -> None:
        """pybreaker: nothing to do, every transition starts with fresh counters."""

    @property
    def counter(self) -> int:
        """pybreaker: consecutive failures as last read by this thread or task (no request)."""
        return self._last_seen().failures

    @property
    def success_counter(self) -> int:
        """pybreaker: half-open successes as last read by this thread or task (no request)."""
        return self._last_seen().successes

    @property
    def opened_at(self) -> dt.datetime | None:
        """pybreaker: when the circuit opened, on this host's clock (measured on Redis's)."""
        seen = self._seen.get(None)
        if seen is None:
            decision, read_at = self._last_seen(), _clock.wall()
        else:
            decision, read_at = seen
        if decision.state != OPEN:
            return None
        return dt.datetime.fromtimestamp(read_at - decision.age, dt.UTC)

    @opened_at.setter
    def opened_at(self, value: dt.datetime) -> None:
        """pybreaker: ignored; the transition to open stamps Redis's own time."""


def _after_fork(ref: weakref.ref[SharedStateStorage]) -> None:
    storage = ref()
    if storage is not None:
        storage._after_fork()


def make_storage(
    state_url: str,
    service: str,
    *,
    socket_timeout: float = 0.1,
    connect_timeout: float = 0.1,
    idle_ttl: float = 3600.0,
    reconnect_min: float = 0.5,
    reconnect_max: float = 5.0,
    trial_lease: float | None = None,
    near_ttl: float = 0.0,
) -> SharedStateStorage:
    """The shared state of ``service``'s circuit in the Redis at ``state_url``.

    Nothing connects until the first call, so an unreachable Redis at start-up only means the
    first calls decide locally.

    Args:
        state_url: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS),
            ``unix://``, ``redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]``
            (the master found through redis-py's ``Sentinel``),
            ``redis+cluster://[user:password@]host:port[,host:port...]`` (the node owning the
            circuit's slot, through redis-py's cluster map), or any of these with ``valkey`` in
            place of ``redis`` (``valkeys://`` for ``rediss://``).
        service: the service name (the keys are ``buttress:{service}:...``).
        socket_timeout: seconds a Redis reply may take.
        connect_timeout: seconds a connection may take.
        idle_ttl: seconds a circuit's keys outlive its last change.
        reconnect_min: seconds before asking Redis again after the first fault (doubles).
        reconnect_max: the longest wait between attempts while Redis stays down.
        trial_lease: seconds a half-open trial holds its slot if its process never reports
            (default: ``max(1, reset_timeout)``).
        near_ttl: seconds a closed (or open) state read from Redis decides this process's
            calls without asking again (the near-cache; transitions published through Redis
            pub/sub end it sooner); 0: every call asks Redis.

    Raises:
        ConfigurationError: the URL is not a Redis URL, or the ``redis`` package is missing.
    """
    shown = redact(state_url)  # the one redaction helper: masked, or nothing of a non-URL
    key = f"services.{service}.circuit_breaker.state_url"
    try:
        import redis  # noqa: F401, PLC0415 - the optional dependency, only for shared state
    except ImportError:
        raise ConfigurationError(
            f"service {service!r}: circuit_breaker.state_url is set ({shown}) but the 'redis' "
            "package is not installed; install buttress[redis]",
            errors=((key, "state_url", "redis not installed"),),
        ) from None
    if shown.startswith("<"):
        raise ConfigurationError(
            f"service {service!r}: circuit_breaker.state_url must be a redis://, rediss://, "
            "unix://, redis+sentinel://, redis+cluster:// or valkey:// URL (the value is not "
            "repeated here: it may hold a password)",
            errors=((key, "state_url", "not a Redis URL"),),
        )
    try:
        # No client retries: a fault falls back to local state at once. The pools only parse
        # the URL; the storage keeps its own connections (see _transport).
        make_sync, make_async, stale = connectors(
            state_url,
            tag=service,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"service {service!r}: circuit_breaker.state_url {shown} is not valid: {exc}",
            errors=((key, "state_url", "invalid URL"),),
        ) from None
    return SharedStateStorage(
        service,
        url=shown,
        make_sync=make_sync,
        make_async=make_async,
        stale=stale,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        idle_ttl=idle_ttl,
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        trial_lease=trial_lease,
        near_ttl=near_ttl,
        redis_id=hashlib.sha256(state_url.encode()).digest(),
    )
