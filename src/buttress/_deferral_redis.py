"""A deferral queue in a Redis stream: queued calls outlive the process that queued them.

One stream per protected function, ``buttress:defer:{service}:module.qualname`` (the braces are
part of the key: the service is its hash tag); each entry holds one call as JSON (its arguments,
keyword arguments, idempotency key and the wall-clock time it was queued), so arguments must be
JSON values (a call whose arguments are not is not deferred: its caller gets the rejection, and
``buttress_deferral_dropped_total{reason="unserializable"}`` counts it).

Exactly one process replays at a time: the one holding the lease key (``SET NX PX``), renewed
after each item and given back when the drain stops; an entry is deleted (``XDEL``) once its
replay returned or failed for good. A process that dies between a replay and its ``XDEL`` leaves
the entry first in line: the next drain runs it again, with the same idempotency key, so the
server can tell. The size bound is checked and the entry added in one script (atomic).

The client is the breaker storage's kind: short socket timeouts, no client retries, and any
``state_url`` form (Sentinel, Cluster, valkey) through ``patterns._topology``: the stream and
its lease carry the hash tag ``{service}``, so in a cluster both live on the node owning that
slot (the scripts touch one key each). No consumer group is used, so nothing here depends on
a group's state surviving a failover: an entry is deleted once replayed, and an entry a failover
lost (written to the old master, not yet replicated) is a call not replayed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, Final, TypeVar

from buttress._deferral import Item, _StoreUnavailableError
from buttress._values import redact
from buttress.exceptions import ConfigurationError

__all__ = ["Connect", "RedisStore"]

T = TypeVar("T")

# (url, *, tag, socket_timeout, connect_timeout) -> (a redis-py client, after-a-fault hook).
Connect = Callable[..., tuple[Any, Callable[[], None] | None]]

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
    """The items of one queue in a Redis stream (see the module docstring).

    Args:
        url: any ``state_url`` form (one server, Sentinel, Cluster, valkey).
        service: the service; the hash tag of the keys (one cluster slot).
        site: the protected function.
        connect: makes a redis-py client for a URL and says what to call after a fault
            (``patterns._topology.client``, handed over by the fallback pattern: this module
            sits below the patterns).
    """

    def __init__(
        self,
        url: str,
        service: str,
        site: str,
        connect: Connect,
        *,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
    ) -> None:
        import redis  # noqa: PLC0415 - the optional dependency, only for a durable queue
        import redis.exceptions  # noqa: PLC0415

        self.errors: tuple[type[Exception], ...] = (
            redis.RedisError,
            OSError,
            redis.exceptions.RedisClusterException,  # the cluster's map could not be read
        )
        self.shown = redact(url)
        try:
            self.client, self._stale = connect(
                url, tag=service, socket_timeout=socket_timeout, connect_timeout=connect_timeout
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"service {service!r}: fallback.defer.state_url {self.shown} is not valid: {exc}",
                errors=((f"services.{service}.fallback.defer.state_url", "state_url", "invalid"),),
            ) from None
        # The service is the hash tag (as in every key buttress keeps): in a cluster the stream
        # and its lease live in the slot the client's connections go to.
        self.stream = f"buttress:defer:{{{service}}}:{site}"
        self.lease_key = f"{self.stream}:lease"
        self.token = uuid.uuid4().hex  # this process's lease token
        self._push = self.client.register_script(_PUSH)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    def _fault(self) -> None:
        """After a fault: close the connections, and let the next one find where to go (a
        Sentinel failover, a cluster slot that moved: ``MOVED`` is an error like any other)."""
        self.client.connection_pool.disconnect()
        if self._stale is not None:
            self._stale()

    def _run(self, command: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return command(*args, **kwargs)
        except self.errors:
            self._fault()
            raise

    def push(self, item: Item, max_items: int) -> int | None:
        payload = json.dumps(
            {"args": list(item.args), "kwargs": item.kwargs, "key": item.key, "at": item.queued_at}
        )  # raises TypeError for arguments that are not JSON values
        try:
            depth = self._run(self._push, keys=[self.stream], args=[max_items, payload])
        except self.errors as exc:
            raise _StoreUnavailableError(str(exc)) from exc
        if depth is None:
            return None
        # The entry id is not returned by the script: the handle is named by the key instead,
        # which identifies the call in every process.
        item.id = item.key
        return int(depth)

    def head(self) -> Item | None:
        entries: Any = self._run(self.client.xrange, self.stream, count=1)
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
            self._run(self.client.xdel, self.stream, item.entry)

    def depth(self) -> int:
        return int(self._run(self.client.xlen, self.stream))

    def lease(self) -> bool:
        return bool(
            self._run(
                self.client.set, self.lease_key, self.token, nx=True, px=int(LEASE_SECONDS * 1000)
            )
        )

    def renew(self) -> None:
        self._run(self._renew, keys=[self.lease_key], args=[self.token, int(LEASE_SECONDS * 1000)])

    def release(self) -> None:
        try:
            self._run(self._release, keys=[self.lease_key], args=[self.token])
        except self.errors:
            return  # it expires on its own
