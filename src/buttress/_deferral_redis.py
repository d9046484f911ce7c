"""A deferral queue in a Redis stream: queued calls outlive the process that queued them.

One stream per protected function, ``buttress:defer:{service}:{module.qualname}``; each entry
holds one call as JSON (its arguments, keyword arguments, idempotency key and the wall-clock
time it was queued), so arguments must be JSON values (a call whose arguments are not is not
deferred: its caller gets the rejection, and ``buttress_deferral_dropped_total{reason=
"unserializable"}`` counts it).

Exactly one process replays at a time: the one holding the lease key (``SET NX PX``), renewed
after each item and given back when the drain stops; an entry is deleted (``XDEL``) once its
replay returned or failed for good. A process that dies between a replay and its ``XDEL`` leaves
the entry first in line: the next drain runs it again, with the same idempotency key, so the
server can tell. The size bound is checked and the entry added in one script (atomic).

The client is the breaker storage's kind: short socket timeouts, no client retries.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Final

from buttress._deferral import Item, _StoreUnavailableError
from buttress._values import redact

__all__ = ["RedisStore"]

LEASE_SECONDS: Final = 30.0

_PUSH: Final = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return false end
redis.call('XADD', KEYS[1], '*', 'call', ARGV[2])
return n + 1
"""
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """The items of one queue in a Redis stream (see the module docstring)."""

    def __init__(
        self,
        url: str,
        service: str,
        site: str,
        *,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
    ) -> None:
        import redis  # noqa: PLC0415 - the optional dependency, only for a durable queue
        import redis.backoff  # noqa: PLC0415
        import redis.retry  # noqa: PLC0415

        self.errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self.shown = redact(url)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        self.stream = f"buttress:defer:{service}:{site}"
        self.lease_key = f"{self.stream}:lease"
        self.token = uuid.uuid4().hex  # this process's lease token
        self._push = self.client.register_script(_PUSH)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    def push(self, item: Item, max_items: int) -> int | None:
        payload = json.dumps(
            {"args": list(item.args), "kwargs": item.kwargs, "key": item.key, "at": item.queued_at}
        )  # raises TypeError for arguments that are not JSON values
        try:
            depth = self._push(keys=[self.stream], args=[max_items, payload])
        except self.errors as exc:
            raise _StoreUnavailableError(str(exc)) from exc
        if depth is None:
            return None
        # The entry id is not returned by the script: the handle is named by the key instead,
        # which identifies the call in every process.
        item.id = item.key
        return int(depth)

    def head(self) -> Item | None:
        entries: Any = self.client.xrange(self.stream, count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        call = json.loads(fields[b"call"])
        return Item(
            id=call["key"],
            args=tuple(call["args"]),
            kwargs=call["kwargs"],
            key=call["key"],
            queued_at=float(call["at"]),
            entry=entry_id,
        )

    def remove(self, item: Item) -> None:
        if item.entry is not None:
            self.client.xdel(self.stream, item.entry)

    def depth(self) -> int:
        return int(self.client.xlen(self.stream))

    def lease(self) -> bool:
        return bool(
            self.client.set(self.lease_key, self.token, nx=True, px=int(LEASE_SECONDS * 1000))
        )

    def renew(self) -> None:
        self._renew(keys=[self.lease_key], args=[self.token, int(LEASE_SECONDS * 1000)])

    def release(self) -> None:
        try:
            self._release(keys=[self.lease_key], args=[self.token])
        except self.errors:
            return  # it expires on its own
