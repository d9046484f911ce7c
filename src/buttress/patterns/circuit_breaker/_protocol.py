"""What the breaker says to Redis and how it reads the answers: request builders, reply parser.

Pure: bytes in, bytes or a :class:`Decision` out; no connection, lock or clock. Requests are
packed once into the Redis wire format (RESP) and sent as they are by ``_transport``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from importlib import resources
from typing import Final

from buttress.patterns.circuit_breaker._machine import Decision, Limits
from buttress.patterns.circuit_breaker._states import OPEN, TO_PYBREAKER

__all__ = [
    "EMPTY",
    "LOAD",
    "SCRIPT",
    "SHA",
    "CorruptStateError",
    "Order",
    "admit_request",
    "bulk",
    "longest_open",
    "observe_request",
    "override_request",
    "parse",
    "prefix",
    "record_request",
    "set_request",
    "tail",
    "vote_request",
]

# One script for every operation: one SHA to load after a Redis restart, one code path to review.
# ARGV: 1 op, 2 ttl_ms, 3 reset_ms, 4 max_trials, 5 lease_ms, 6 fail_max ('' never trips),
# 7 success_threshold ('' never closes), 8 cleared_gen, 9 cleared_seq (a success to apply first,
# '' none), 10 lease, 11 generation the call was admitted in ('' any), 12 outcome | target state,
# 13 seq at admission | set mode ('force' or ''), 14 trial leases to give back (space-separated:
# granted to requests whose reply never arrived, '' none).
# Ops 'override' (ARGV 12: forced_open, forced_closed, disabled or '' to end it; 13: its ms to
# live) and 'vote' (ARGV 10: the process; 11: its window's generation; 12: ms a vote stands; 13:
# min_reporters) use the same places. KEYS: the circuit hash, the trial leases, the reporters.
# Reply: "state gen seq base succ since now admitted trial change lease open_ms override
# override_ms" (lease: if granted; override: '-' for none).
SCRIPT: Final = (resources.files(__package__) / "circuit.lua").read_bytes()
SHA: Final = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest().encode()

# How replies are ordered: (Redis time, generation, seq, base, succ), each of which only grows as
# Redis runs the script.
Order = tuple[int, int, int, int, int]


class CorruptStateError(Exception):
    """The circuit's keys in Redis held what this version cannot read; the script reset them.

    Its name is the ``error_type`` of the ``StateStoreError`` event reporting it.
    """


def bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(bulk(part) for part in parts)


LOAD: Final = _command(b"SCRIPT", b"LOAD", SCRIPT)
EMPTY: Final = bulk(b"")
_NOTHING_CLEARED: Final = EMPTY * 2
_ADMIT_TAIL: Final = EMPTY * 4  # no generation, outcome, seq; no orphans


def prefix(
    keys: tuple[bytes, ...], op: bytes, ttl: float, limits: Limits | None, lease: float
) -> bytes:
    """The constant head of a request: command, keys and the limits-derived arguments.

    ``ttl``: seconds the keys outlive their last change; ``lease``: seconds a trial holds its
    slot. Seven per-request arguments follow it (ARGV 8-14), then :func:`tail`'s three.
    """
    if limits is None:
        numbers: tuple[bytes, ...] = (b"0", b"0", b"0", b"", b"")
    else:
        numbers = (
            b"%d" % math.ceil(limits.reset_timeout * 1000),
            b"%d" % limits.half_open_max_calls,
            b"%d" % math.ceil(lease * 1000),
            b"%d" % limits.fail_max,
            b"%d" % limits.success_threshold,
        )
    head = (b"EVALSHA", SHA, b"%d" % len(keys), *keys, op, b"%d" % math.ceil(ttl * 1000))
    return b"*%d\r\n" % (len(head) + len(numbers) + 10) + b"".join(
        bulk(part) for part in (*head, *numbers)
    )


_NO_TAIL: Final = EMPTY * 3


def longest_open(limits: Limits) -> float:
    """The longest the circuit may stay open at a time under ``limits`` (for the keys' TTL)."""
    longest = max(limits.reset_timeout, limits.hold)
    if limits.open_backoff != 1.0 and not math.isinf(limits.max_timeout):
        longest = max(longest, limits.max_timeout)
    return longest


@functools.lru_cache(maxsize=64)  # limits change rarely; a hold is one failure's
def tail(limits: Limits | None) -> bytes:
    """ARGV 15-17, after every request: ``open_backoff``, ``max_timeout`` (ms) and ``hold`` (ms,
    the least time a circuit this request opens stays open)."""
    if limits is None:
        return _NO_TAIL
    return (
        bulk(repr(limits.open_backoff).encode())
        + (EMPTY if math.isinf(limits.max_timeout) else bulk(b"%d" % (limits.max_timeout * 1000)))
        + bulk(b"%d" % math.ceil(limits.hold * 1000))
    )


def _cleared(cleared: tuple[int, int] | None) -> bytes:
    if cleared is None:
        return EMPTY * 2
    return bulk(b"%d" % cleared[0]) + bulk(b"%d" % cleared[1])


def _orphans(orphans: tuple[bytes, ...]) -> bytes:
    return bulk(b" ".join(orphans)) if orphans else EMPTY


def admit_request(
    head: bytes, cleared: tuple[int, int] | None, lease: bytes, orphans: tuple[bytes, ...]
) -> bytes:
    """Admit a call (a half-open trial takes ``lease``)."""
    # The common case inline: nothing rides along (this is built on every shared call).
    if cleared is None and not orphans:
        return head + _NOTHING_CLEARED + b"$%d\r\n%s\r\n" % (len(lease), lease) + _ADMIT_TAIL
    return head + _cleared(cleared) + bulk(lease) + EMPTY * 3 + _orphans(orphans)


def record_request(
    head: bytes,
    cleared: tuple[int, int] | None,
    ticket: Decision,
    outcome: str,
    orphans: tuple[bytes, ...],
) -> bytes:
    """Record the ``outcome`` of a call admitted with ``ticket``."""
    return (
        head
        + _cleared(cleared)
        + b"".join(
            bulk(part)
            for part in (
                ticket.lease.encode(),
                b"%d" % ticket.generation,
                outcome.encode(),
                b"%d" % ticket.seq,
            )
        )
        + _orphans(orphans)
    )


def observe_request(
    head: bytes, cleared: tuple[int, int] | None, orphans: tuple[bytes, ...]
) -> bytes:
    """Read the state (applying what rides along)."""
    return head + _cleared(cleared) + EMPTY * 4 + _orphans(orphans)


def set_request(
    head: bytes, state: str, expected: int | None, *, always: bool, orphans: tuple[bytes, ...]
) -> bytes:
    """Move to ``state``: if still in generation ``expected`` (None: any); ``always``: even if
    already there.

    Raises:
        ValueError: ``state`` is not closed, open or half_open.
    """
    if state not in TO_PYBREAKER:
        raise ValueError(f"unknown circuit state {state!r}: closed, open or half_open")
    return head + b"".join(
        bulk(part)
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


def override_request(
    head: bytes, override: str, ttl: float, *, orphans: tuple[bytes, ...]
) -> bytes:
    """Put the fleet under ``override`` (forced_open, forced_closed, disabled) for ``ttl``
    seconds, or end the one in place (``override`` empty)."""
    return head + b"".join(
        bulk(part)
        for part in (
            b"",
            b"",
            b"",
            b"",
            override.encode(),
            b"%d" % math.ceil(ttl * 1000),
            b" ".join(orphans),
        )
    )


def vote_request(  # noqa: PLR0917 - each is one of the script's arguments
    head: bytes,
    reporter: bytes,
    generation: int,
    standing: float,
    min_reporters: int,
    orphans: tuple[bytes, ...],
) -> bytes:
    """Report that this process's rate window tripped in ``generation``; the fleet counts the
    votes cast within the last ``standing`` seconds."""
    return head + b"".join(
        bulk(part)
        for part in (
            b"",
            b"",
            reporter,
            b"%d" % generation,
            b"%d" % math.ceil(standing * 1000),
            b"%d" % min_reporters,
            b" ".join(orphans),
        )
    )


def parse(reply: bytes, limits: Limits | None) -> tuple[Decision, Order]:
    """The script's reply as a decision, and its place in the order Redis ran the requests.

    Raises:
        CorruptStateError: the script found keys it could not read (and started them over).
    """
    fields = reply.split(b" ")
    state = fields[0].decode()
    gen, seq, base, succ, since, now, admitted, trial = map(int, fields[1:9])
    change_b, lease_b, open_ms = fields[9], fields[10], int(fields[11])
    override = "" if fields[12] == b"-" else fields[12].decode()
    if change_b == b"corrupt":
        raise CorruptStateError("the circuit's keys in Redis were unreadable")
    if state == OPEN and limits is not None:
        retry_after: float | None = max(0.0, (since + open_ms - now) / 1000)
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
        override=override,
        override_left=int(fields[13]) / 1000 if override else 0.0,
    )
    return decision, (now, gen, seq, base, succ)
