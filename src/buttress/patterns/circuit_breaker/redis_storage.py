"""Circuit state shared through Redis: one breaker for a whole fleet, that survives Redis failing.

``circuit_breaker(state_url="redis://...")`` makes every process of a service decide from one state
kept in Redis, each decision one atomic Lua script, with a local copy of the state while Redis is
unreachable. The script's algorithm, the keys, the reconnection policy and the two ways to drive
the storage: ``docs/internals.md`` (Circuit state in Redis).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import hashlib
import itertools
import math
import os
import threading
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable
from importlib import resources
from typing import Any, Final

import pybreaker

from buttress import _clock, events
from buttress._values import redact
from buttress.exceptions import ConfigurationError
from buttress.patterns.circuit_breaker._machine import Decision, Limits, Machine
from buttress.patterns.circuit_breaker._pybreaker_compat import noticing_a_close
from buttress.patterns.circuit_breaker._states import (
    CLOSED,
    FAILURE,
    FROM_PYBREAKER,
    OPEN,
    SUCCESS,
    TO_PYBREAKER,
)

__all__ = [
    "KEY_PREFIX",
    "Decision",
    "Limits",
    "SharedStateStorage",
    "make_storage",
]

KEY_PREFIX: Final = "buttress"


# One script for every operation: one SHA to load after a Redis restart, one code path to review.
# ARGV: 1 op, 2 ttl_ms, 3 reset_ms, 4 max_trials, 5 lease_ms, 6 fail_max ('' never trips),
# 7 success_threshold ('' never closes), 8 cleared_gen, 9 cleared_seq (a success to apply first,
# '' none), 10 lease, 11 generation the call was admitted in ('' any), 12 outcome | target state,
# 13 seq at admission | set mode ('force' or ''), 14 trial leases to give back (space-separated:
# granted to requests whose reply never arrived, '' none).
# Reply: "state gen seq base succ since now admitted trial change lease" (lease: if granted).
_SCRIPT_BYTES: Final = (resources.files(__package__) / "circuit.lua").read_bytes()
_SHA: Final = hashlib.sha1(_SCRIPT_BYTES, usedforsecurity=False).hexdigest().encode()


# --- the connections ----------------------------------------------------------------------------


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)


_LOAD: Final = _command(b"SCRIPT", b"LOAD", _SCRIPT_BYTES)
_EMPTY: Final = _bulk(b"")


def _is_noscript(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoScriptError"


class _SyncLink:
    """Requests on redis-py's synchronous connections, pooled LIFO; no client-side retries.

    It talks to redis-py's ``Connection`` directly with requests packed once, which costs about
    a third of ``Redis.evalsha``'s Python overhead per call.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._idle: deque[tuple[int, Any]] = deque()
        self._incarnation = 0

    def call(self, request: bytes) -> Any:
        incarnation = self._incarnation
        try:
            born, conn = self._idle.pop()
        except IndexError:
            born, conn = incarnation, self._make()
        try:
            conn.send_packed_command((request,), check_health=False)
            try:
                reply = conn.read_response()
            except Exception as exc:
                if not _is_noscript(exc):
                    raise
                # Redis restarted or flushed its scripts: load ours and ask again.
                conn.send_packed_command((_LOAD, request), check_health=False)
                conn.read_response()
                reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        if born == self._incarnation:
            self._idle.append((born, conn))
        else:
            conn.disconnect()
        return reply

    def reset(self) -> None:
        """Drop every pooled connection (after a failure they are probably broken)."""
        self._incarnation += 1
        idle = self._idle
        while idle:
            try:
                _, conn = idle.pop()
            except IndexError:
                break
            conn.disconnect()

    def forget(self) -> None:
        """After fork: the pooled sockets belong to the parent; leave them alone."""
        self._incarnation += 1
        self._idle = deque()


class _AsyncLink:
    """The same on redis-py's asyncio connections, one pool per event loop.

    A connection is opened (handshake included) under its ``socket_timeout``; after that each
    reply is awaited with an explicit read timeout instead, because redis-py wraps every send
    of a connection with a ``socket_timeout`` in ``asyncio.wait_for``, a task per request. A
    request of a few hundred bytes never waits for the socket to drain, so the send needs none.

    A loop's connections are closed when the loop shuts down: each pool comes with an async
    generator started on its loop, which ``loop.shutdown_asyncgens()`` closes (``asyncio.run``
    and ``asyncio.Runner`` call it before closing the loop), and closing it closes the pool. A
    connection cannot be closed once its loop is closed, so a loop closed without that step
    keeps its pool until the storage is garbage-collected (and redis-py warns about it then).
    """

    def __init__(self, make: Callable[[], Any], timeout: float) -> None:
        self._make = make
        self._timeout = timeout
        self._pools: dict[asyncio.AbstractEventLoop, deque[tuple[int, Any]]] = {}
        # Strong references: a loop holds its async generators only weakly.
        self._closers: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}
        self._inherited: list[AsyncGenerator[None, None]] = []
        self._incarnation = 0

    async def _open(self, loop: asyncio.AbstractEventLoop) -> deque[tuple[int, Any]]:
        """The pool of ``loop`` (the running one), closed when the loop shuts down."""
        idle: deque[tuple[int, Any]] = deque()
        closer = self._close_at_shutdown(loop, idle)
        await closer.asend(None)  # runs to its yield, registered with the loop's shutdown
        self._pools[loop] = idle
        self._closers[loop] = closer
        return idle

    async def _close_at_shutdown(
        self, loop: asyncio.AbstractEventLoop, idle: deque[tuple[int, Any]]
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if self._pools.get(loop) is idle:
                del self._pools[loop]
                self._closers.pop(loop, None)
            while idle:
                _, conn = idle.pop()
                await conn.disconnect()

    async def call(self, request: bytes) -> Any:
        loop = asyncio.get_running_loop()
        idle = self._pools.get(loop)
        if idle is None:
            idle = await self._open(loop)
        try:
            born, conn = idle.pop()
        except IndexError:
            born, conn = self._incarnation, self._make()
        try:
            if not conn.is_connected:
                await conn.connect()
                conn.socket_timeout = None
            await conn.send_packed_command((request,), check_health=False)
            try:
                reply = await self._reply(conn)
            except Exception as exc:
                if not _is_noscript(exc):
                    raise
                await conn.send_packed_command((_LOAD, request), check_health=False)
                await self._reply(conn)
                reply = await self._reply(conn)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        if born == self._incarnation:
            idle.append((born, conn))
        else:
            await conn.disconnect(nowait=True)
        return reply

    async def _reply(self, conn: Any) -> Any:
        reply = await conn.read_response(timeout=self._timeout)
        if reply is None:  # redis-py's answer to an explicit read timeout
            raise TimeoutError(f"no reply from Redis within {self._timeout}s")
        return reply

    def reset(self) -> None:
        # Connections of other loops can only be closed from their loop: they are dropped when
        # next taken there, by the incarnation check.
        self._incarnation += 1

    async def close(self) -> None:
        """Close the pool of the running loop (a new one opens on its next request)."""
        closer = self._closers.get(asyncio.get_running_loop())
        if closer is not None:
            await closer.aclose()

    def forget(self) -> None:
        self._incarnation += 1
        self._pools = {}
        # The parent's loops and sockets: never finalize their closers here (that would
        # schedule them on the parent's loop objects).
        self._inherited.extend(self._closers.values())
        self._closers = {}


# --- the storage --------------------------------------------------------------------------------

_NOT_DOWN: Final = -math.inf


class CorruptStateError(Exception):
    """The circuit's keys in Redis held what this version cannot read; the script reset them.

    Its name is the ``error_type`` of the ``StateStoreError`` event reporting it.
    """


_MAX_ORPHANS: Final = 32

# What a request carries that must ride on the next one if it gets no reply: a success's clearing
# (generation, seq), and trial leases to give back.
_Carry = tuple[tuple[int, int] | None, tuple[bytes, ...]]


class SharedStateStorage(pybreaker.CircuitBreakerStorage):
    """A service's circuit state in Redis, shared by every process, with a local fallback.

    Build it with :func:`make_storage`. The decision API (``admit``, ``record``, ``force`` and
    their ``a``-prefixed asyncio twins) is what buttress's breaker uses; pybreaker's storage
    interface works on top of the same script for any ``pybreaker.CircuitBreaker``.

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
    ) -> None:
        super().__init__("redis")
        self.service = service
        self.url = url
        self.max_delay = connect_timeout + 2 * socket_timeout
        self.idle_ttl = idle_ttl
        self.trial_lease = trial_lease
        self._reconnect = (reconnect_min, reconnect_max)
        tag = service.encode()
        self._keys = (
            b"%s:{%s}:circuit" % (KEY_PREFIX.encode(), tag),
            b"%s:{%s}:trials" % (KEY_PREFIX.encode(), tag),
        )
        self._link = _SyncLink(make_sync)
        self._alink = _AsyncLink(make_async, socket_timeout)
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
        """The Redis keys of this circuit: the state hash and the trial-lease sorted set."""
        return self._keys[0].decode(), self._keys[1].decode()

    @property
    def available(self) -> bool:
        """False while Redis is considered down (calls decide locally)."""
        return self._down_until == _NOT_DOWN

    # --- the decision API ------------------------------------------------------------------------

    def admit(self, limits: Limits) -> Decision:
        """Decide whether a call may run (one request to Redis, or local while it is down)."""
        if self._may_try():
            request, carry = self._admit_request(limits)
            decision = self._send("admit", request, carry, limits)
            if decision is not None:
                return decision
        with self._lock:
            return self._local.admit(limits, _clock.monotonic())

    async def aadmit(self, limits: Limits) -> Decision:
        """``admit`` for asyncio callers: awaits Redis, never blocks the event loop."""
        if self._may_try():
            request, carry = self._admit_request(limits)
            decision = await self._asend("admit", request, carry, limits)
            if decision is not None:
                return decision
        with self._lock:
            return self._local.admit(limits, _clock.monotonic())

    def record(self, ticket: Decision, outcome: str, limits: Limits | None) -> Decision | None:
        """Record the ``outcome`` (success, failure, ignored) of a call admitted with ``ticket``.

        ``limits`` None counts without tripping or closing (for a breaker that decides
        transitions itself, like pybreaker).

        Returns:
            the state after, or None when nothing needed sending (a closed-state success or an
            ignored outcome of a call that was not a trial).
        """
        if ticket.shared:
            if not self._worth_sending(ticket, outcome):
                return None
            if self._may_try():
                request, carry = self._record_request(ticket, outcome, limits)
                decision = self._send("record", request, carry, limits)
                if decision is not None:
                    return decision
        with self._lock:
            return self._record_locally(ticket, outcome, limits)

    async def arecord(
        self, ticket: Decision, outcome: str, limits: Limits | None
    ) -> Decision | None:
        """``record`` for asyncio callers."""
        if ticket.shared:
            if not self._worth_sending(ticket, outcome):
                return None
            if self._may_try():
                request, carry = self._record_request(ticket, outcome, limits)
                decision = await self._asend("record", request, carry, limits)
                if decision is not None:
                    return decision
        with self._lock:
            return self._record_locally(ticket, outcome, limits)

    def transition(self, state: str, generation: int, limits: Limits | None) -> Decision:
        """Move to ``state`` if the circuit is still in ``generation`` (compare-and-set).

        For transitions a breaker decides itself (a failure-rate trip): of several processes
        making the same move from the same state, the first one wins and the others see it.
        """
        return self._set(state, limits, expected=generation, always=False)

    async def atransition(self, state: str, generation: int, limits: Limits | None) -> Decision:
        """``transition`` for asyncio callers."""
        return await self._aset(state, limits, expected=generation, always=False)

    def force(self, state: str, limits: Limits | None = None) -> Decision:
        """Put the fleet's circuit in ``state`` (closed, open, half_open) with fresh counters.

        For manual control: it always starts a new generation, even in the same state.
        """
        return self._set(state, limits, expected=None, always=True)

    async def aforce(self, state: str, limits: Limits | None = None) -> Decision:
        """``force`` for asyncio callers."""
        return await self._aset(state, limits, expected=None, always=True)

    def observe(self) -> Decision:
        """The current state, read from Redis (or local while it is down); changes nothing."""
        if self._may_try():
            request, carry = self._observe_request()
            decision = self._send("read", request, carry, None)
            if decision is not None:
                return decision
        return self.last_known()

    def last_known(self) -> Decision:
        """The state as this process last saw it (no request): for health checks."""
        with self._lock:
            return self._local.decision(_clock.monotonic(), 0.0)

    def close(self) -> None:
        """Close the pooled synchronous connections."""
        self._link.reset()

    async def aclose(self) -> None:
        """Close the pooled connections of the running event loop."""
        await self._alink.close()

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

    # --- sending -------------------------------------------------------------------------------

    def _send(self, operation: str, request: bytes, carry: _Carry, limits: Any) -> Decision | None:
        """One request to Redis; None (and the store marked down) if it failed.

        ``carry`` is what the request carries that must be sent again if it gets no reply.
        """
        asked = next(self._requests)
        try:
            decision = self._accept(self._link.call(request), limits, asked)
        except CorruptStateError as exc:
            self._corrupt(operation, exc, carry)
            return None
        except Exception as exc:  # noqa: BLE001 - any Redis fault means: go on locally
            self._failed(operation, exc, carry)
            return None
        except BaseException:
            self._abandoned(carry)
            raise
        self._recovered()
        return decision

    async def _asend(
        self, operation: str, request: bytes, carry: _Carry, limits: Any
    ) -> Decision | None:
        asked = next(self._requests)
        try:
            decision = self._accept(await self._alink.call(request), limits, asked)
        except CorruptStateError as exc:
            self._corrupt(operation, exc, carry)
            return None
        except Exception as exc:  # noqa: BLE001 - any Redis fault means: go on locally
            self._failed(operation, exc, carry)
            return None
        except BaseException:  # cancelled: the next caller may probe
            self._abandoned(carry)
            raise
        self._recovered()
        return decision

    def _set(
        self, state: str, limits: Limits | None, *, expected: int | None, always: bool
    ) -> Decision:
        if self._may_try():
            request, carry = self._set_request(state, limits, expected=expected, always=always)
            decision = self._send("set_state", request, carry, limits)
            if decision is not None:
                return decision
        with self._lock:
            return self._local.force(state, _clock.monotonic(), always=always, expected=expected)

    async def _aset(
        self, state: str, limits: Limits | None, *, expected: int | None, always: bool
    ) -> Decision:
        if self._may_try():
            request, carry = self._set_request(state, limits, expected=expected, always=always)
            decision = await self._asend("set_state", request, carry, limits)
            if decision is not None:
                return decision
        with self._lock:
            return self._local.force(state, _clock.monotonic(), always=always, expected=expected)

    # --- requests and replies --------------------------------------------------------------------

    def _prefix(self, op: bytes, limits: Limits | None) -> bytes:
        """The constant head of a request: command, keys and the limits-derived arguments."""
        key = (op, limits)
        prefix = self._prefixes.get(key)
        if prefix is None:
            if limits is None:
                ttl = self.idle_ttl
                numbers = (b"0", b"0", b"0", b"", b"")
            else:
                lease = self._lease_seconds(limits)
                ttl = max(self.idle_ttl, 2 * limits.reset_timeout + lease)
                numbers = (
                    b"%d" % math.ceil(limits.reset_timeout * 1000),
                    b"%d" % limits.half_open_max_calls,
                    b"%d" % math.ceil(lease * 1000),
                    b"%d" % limits.fail_max,
                    b"%d" % limits.success_threshold,
                )
            head = (b"EVALSHA", _SHA, b"2", *self._keys, op, b"%d" % math.ceil(ttl * 1000))
            # seven per-request arguments follow (ARGV 8-14)
            prefix = b"*%d\r\n" % (len(head) + len(numbers) + 7) + b"".join(
                _bulk(part) for part in (*head, *numbers)
            )
            if len(self._prefixes) > 64:  # limits change rarely; never grow without bound
                self._prefixes.clear()
            self._prefixes[key] = prefix
        return prefix

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

    @staticmethod
    def _cleared_args(cleared: tuple[int, int] | None) -> bytes:
        if cleared is None:
            return _EMPTY * 2
        return _bulk(b"%d" % cleared[0]) + _bulk(b"%d" % cleared[1])

    def _take_orphans(self) -> tuple[bytes, ...]:
        if not self._orphans:
            return ()
        with self._lock:
            orphans, self._orphans = tuple(self._orphans), []
        return orphans

    @staticmethod
    def _orphans_arg(orphans: tuple[bytes, ...]) -> bytes:
        return _bulk(b" ".join(orphans)) if orphans else _EMPTY

    def _admit_request(self, limits: Limits) -> tuple[bytes, _Carry]:
        cleared = self._take_cleared()
        orphans = self._take_orphans()
        lease = f"{self._lease_prefix}:{next(self._lease_ids)}".encode()
        request = (
            self._prefix(b"admit", limits)
            + self._cleared_args(cleared)
            + _bulk(lease)
            + _EMPTY * 3
            + self._orphans_arg(orphans)
        )
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
        lease = ticket.lease.encode()
        request = (
            self._prefix(b"record", limits)
            + self._cleared_args(cleared)
            + b"".join(
                _bulk(part)
                for part in (
                    lease,
                    b"%d" % ticket.generation,
                    outcome.encode(),
                    b"%d" % ticket.seq,
                )
            )
            + self._orphans_arg(orphans)
        )
        # With no reply, the trial's lease may still be held: it joins the orphans.
        return request, (cleared, (*orphans, lease) if lease else orphans)

    def _observe_request(self) -> tuple[bytes, _Carry]:
        cleared = self._take_cleared()
        orphans = self._take_orphans()
        request = (
            self._prefix(b"observe", None)
            + self._cleared_args(cleared)
            + _EMPTY * 4
            + self._orphans_arg(orphans)
        )
        return request, (cleared, orphans)

    def _set_request(
        self, state: str, limits: Limits | None, *, expected: int | None, always: bool
    ) -> tuple[bytes, _Carry]:
        if state not in TO_PYBREAKER:
            raise ValueError(f"unknown circuit state {state!r}: closed, open or half_open")
        orphans = self._take_orphans()
        request = self._prefix(b"set", limits) + b"".join(
            _bulk(part)
            for part in (
                b"",  # no success to apply
                b"",
                b"",  # no lease
                b"" if expected is None else b"%d" % expected,
                state.encode(),
                b"force" if always else b"",
                b" ".join(orphans),
            )
        )
        return request, (None, orphans)

    def _note_cleared(self, generation: int, seq: int) -> None:
        # Generations only grow, so the newest generation's highest seq is the one that matters.
        with self._lock:
            if self._cleared is None or (generation, seq) > self._cleared:
                self._cleared = (generation, seq)

    def _accept(self, reply: Any, limits: Limits | None, asked: int) -> Decision:
        """Turn the script's reply (to request number ``asked``) into a decision; mirror it."""
        fields = reply.split(b" ")
        state = fields[0].decode()
        gen, seq, base, succ, since, now, admitted, trial = map(int, fields[1:9])
        change_b, lease_b = fields[9], fields[10]
        if change_b == b"corrupt":
            raise CorruptStateError(f"the circuit of {self.service!r} in Redis was unreadable")
        if state == OPEN and limits is not None:
            retry_after: float | None = max(
                0.0, (since + math.ceil(limits.reset_timeout * 1000) - now) / 1000
            )
        else:
            retry_after = None
        change = change_b.decode()
        decision = Decision(
            state,
            gen,
            bool(admitted),
            bool(trial),
            retry_after,
            seq - base,
            succ,
            None if change in {"", "stale"} else change,
            shared=True,
            age=max(0, now - since) / 1000 if since else 0.0,
            seq=seq,
            lease=lease_b.decode(),
        )
        mirrored = (gen, seq - base, succ, state)
        if mirrored != self._mirrored:
            order = (now, gen, seq, base, succ)
            with self._lock:
                # A request sent after the last adoption saw a later Redis (whatever its clock
                # or a lost key say); one sent before it is adopted only if Redis ran it later.
                if asked > self._adopted_mark or order > self._adopted_order:
                    self._mirrored = mirrored
                    self._adopted_order = order
                    self._adopted_mark = next(self._requests)
                    self._local.mirror(decision, _clock.monotonic())
        return decision

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
        with self._lock:
            self._faults += 1
            low, high = self._reconnect
            delay = min(high, low * 2 ** min(self._faults - 1, 30))
            self._down_until = _clock.monotonic() + delay
            self._probing = False
            self._keep(carry)
        self._link.reset()
        self._alink.reset()
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
        self._link.forget()
        self._alink.forget()
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
        self._remember(self._set(target, None, expected=expected, always=False))

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
) -> SharedStateStorage:
    """The shared state of ``service``'s circuit in the Redis at ``state_url``.

    Nothing connects until the first call, so an unreachable Redis at start-up only means the
    first calls decide locally.

    Args:
        state_url: ``redis://[user:password@]host[:port][/db]``, ``rediss://`` (TLS) or
            ``unix://``.
        service: the service name (the keys are ``buttress:{service}:...``).
        socket_timeout: seconds a Redis reply may take.
        connect_timeout: seconds a connection may take.
        idle_ttl: seconds a circuit's keys outlive its last change.
        reconnect_min: seconds before asking Redis again after the first fault (doubles).
        reconnect_max: the longest wait between attempts while Redis stays down.
        trial_lease: seconds a half-open trial holds its slot if its process never reports
            (default: ``max(1, reset_timeout)``).

    Raises:
        ConfigurationError: the URL is not a Redis URL, or the ``redis`` package is missing.
    """
    shown = redact(state_url)  # the one redaction helper: masked, or nothing of a non-URL
    try:
        # The optional dependency, imported only when a service shares its state.
        import redis.asyncio  # noqa: PLC0415
        import redis.asyncio.retry  # noqa: PLC0415
        import redis.backoff  # noqa: PLC0415
        import redis.retry  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(
            f"service {service!r}: circuit_breaker.state_url is set ({shown}) but the 'redis' "
            "package is not installed; install buttress[redis]",
            errors=(
                (
                    f"services.{service}.circuit_breaker.state_url",
                    "state_url",
                    "redis not installed",
                ),
            ),
        ) from None
    if shown.startswith("<"):
        raise ConfigurationError(
            f"service {service!r}: circuit_breaker.state_url must be a redis://, rediss:// or "
            "unix:// URL (the value is not repeated here: it may hold a password)",
            errors=(
                (f"services.{service}.circuit_breaker.state_url", "state_url", "not a Redis URL"),
            ),
        )
    options = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }
    try:
        # No client retries: a fault falls back to local state at once. Each pool gets the
        # Retry of its own world; redis-py 8.2 warns when a sync one reaches an asyncio pool.
        sync_pool = redis.ConnectionPool.from_url(
            state_url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **options
        )
        async_pool = redis.asyncio.ConnectionPool.from_url(
            state_url, retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **options
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"service {service!r}: circuit_breaker.state_url {shown} is not valid: "
            f"{type(exc).__name__}",
            errors=((f"services.{service}.circuit_breaker.state_url", "state_url", "invalid URL"),),
        ) from None
    # The pools only parsed the URL; the storage keeps its own connections (see _SyncLink).
    make_sync = _connector(sync_pool.connection_class, sync_pool.connection_kwargs)
    make_async = _connector(async_pool.connection_class, async_pool.connection_kwargs)
    return SharedStateStorage(
        service,
        url=shown,
        make_sync=make_sync,
        make_async=make_async,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        idle_ttl=idle_ttl,
        reconnect_min=reconnect_min,
        reconnect_max=reconnect_max,
        trial_lease=trial_lease,
    )


def _connector(connection_class: Any, kwargs: dict[str, Any]) -> Callable[[], Any]:
    # A closure, not functools.partial: a partial's repr would show the password.
    def connect() -> Any:
        return connection_class(**kwargs)

    return connect
