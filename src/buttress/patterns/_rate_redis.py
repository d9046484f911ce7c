"""What the fleet rate limit says to Redis and how it reads the answer: pure, no connection.

One Lua script decides a call for the whole fleet with GCRA (the generic cell rate algorithm, a
token bucket kept as one timestamp) on Redis's own clock (``TIME`` inside the script), so host
clocks never matter and no two pods can take the same token. It answers "allowed now", "allowed
after waiting x" (the token is reserved: the wait happens locally, in the caller's driver) or
"refused, the next token in x". A request may also carry the pod's heartbeat: the script then
counts the pods seen within the heartbeat window, which gives each pod its fair share of the rate
when Redis cannot be reached.
"""

from __future__ import annotations

import hashlib
from typing import Final, NamedTuple

__all__ = ["LOAD", "SCRIPT", "Answer", "parse", "prefix", "request"]

# KEYS: 1 the theoretical arrival time (TAT, microseconds of Redis time), 2 the pods' heartbeats.
# ARGV: 1 microseconds per token, 2 burst, 3 the longest wait accepted (microseconds),
# 4 this pod's id ('' no heartbeat), 5 the heartbeat window (microseconds).
# Reply: {allowed 0|1, wait (microseconds), tokens left (thousandths), pods seen (0: no beat)}.
SCRIPT: Final = b"""
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local bound = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local pods = 0
if ARGV[4] ~= '' then
  local window = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  redis.call('PEXPIRE', KEYS[2], math.ceil(window / 1000))
  pods = redis.call('ZCARD', KEYS[2])
end
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat + interval - burst * interval - now
if wait < 0 then wait = 0 end
if wait > bound then
  return {0, wait, 0, pods}
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1)
local left = (now + burst * interval - new) * 1000 / interval
if left < 0 then left = 0 end
return {1, wait, left, pods}
"""
SHA: Final = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest().encode()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


LOAD: Final = b"*3\r\n" + _bulk(b"SCRIPT") + _bulk(b"LOAD") + _bulk(SCRIPT)
_NO_BEAT: Final = _bulk(b"") + _bulk(b"0")


class Answer(NamedTuple):
    """What the script decided for one call."""

    allowed: bool
    wait: float  # seconds: to wait for the reserved token, or until the next one (refused)
    left: float  # tokens left in the fleet's bucket after this call
    pods: int  # pods seen within the heartbeat window (0: the request carried no heartbeat)


def prefix(service: str, rate: float, burst: int) -> bytes:
    """The constant head of the requests of ``service``'s limiter: command, keys, rate, burst.

    The keys share one hash tag (``{service}``), so both live in one slot of a cluster.
    """
    interval = max(1, round(1_000_000 / rate))
    tag = service.encode()
    return (
        b"*10\r\n"
        + _bulk(b"EVALSHA")
        + _bulk(SHA)
        + _bulk(b"2")
        + _bulk(b"buttress:{%s}:rate" % tag)
        + _bulk(b"buttress:{%s}:rate:pods" % tag)
        + _bulk(b"%d" % interval)
        + _bulk(b"%d" % burst)
    )


def request(head: bytes, bound: float, beat: tuple[bytes, float] | None) -> bytes:
    """A request: take a token if it comes within ``bound`` seconds; ``beat``: (pod, window s)."""
    tail = _NO_BEAT if beat is None else _bulk(beat[0]) + _bulk(b"%d" % round(beat[1] * 1e6))
    return head + _bulk(b"%d" % max(0, int(bound * 1_000_000))) + tail


def parse(reply: object) -> Answer:
    """The script's reply as an :class:`Answer`.

    Raises:
        ValueError: the reply is not the script's (a wrong server, a corrupt answer).
    """
    if not isinstance(reply, list) or len(reply) != 4:
        raise ValueError(f"unexpected rate-limit reply {reply!r:.80}")
    allowed, wait, left, pods = (int(part) for part in reply)
    return Answer(allowed == 1, wait / 1e6, left / 1000, pods)
