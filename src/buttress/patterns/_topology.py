"""Which Redis a state URL's connections go to: one server, a Sentinel-managed master, or the
node of a Redis Cluster that owns the user's hash slot.

Every ``state_url`` user makes its connections here: the shared circuit and the fleet rate
limit (through :class:`~buttress.patterns._redis.RedisTransport`, :func:`connectors`) and the
deferral stream (a redis-py client, :func:`client`). Their keys all carry the hash tag
``{service}``, so what one of them keeps lives in one slot of a cluster: one node answers it.

Only redis-py discovers: its URL parser, its ``Sentinel`` (the master is asked for each time a
connection opens, so a failover is followed at the next reconnect) and its cluster
``NodesManager`` (``CLUSTER SLOTS``, read again after a fault). The connections go where that
points; a fault (a dead node, ``MOVED``, ``READONLY`` on a demoted master) is the user's like
any other: it goes on locally, and the next connection asks again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import cache
from typing import Any, Final, NamedTuple

__all__ = ["Connectors", "client", "connectors"]

# valkey names the same protocol; redis-py parses only its own schemes.
_ALIASES: Final = {
    "valkey": "redis",
    "valkeys": "rediss",
    "valkey+sentinel": "redis+sentinel",
    "valkey+cluster": "redis+cluster",
}


class _BadURLError(ValueError):
    """A topology URL this module cannot read; the message never repeats the URL."""


class Connectors(NamedTuple):
    """What a transport needs: new (unconnected) connections, and a hook for after a fault."""

    make_sync: Callable[[], Any]
    make_async: Callable[[], Any]
    stale: Callable[[], None] | None


def _options(socket_timeout: float, connect_timeout: float) -> dict[str, Any]:
    # No client retries and no health checks: a fault is the caller's to handle at once.
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


def _retries() -> tuple[Any, Any]:
    """No retries, for sync and for asyncio connections: each pool gets the Retry of its own
    world (redis-py 8.2 warns when a sync one reaches an asyncio pool)."""
    import redis.asyncio.retry  # noqa: PLC0415 - the optional dependency, only when shared
    import redis.backoff  # noqa: PLC0415
    import redis.retry  # noqa: PLC0415

    return (
        redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0),
    )


def _scheme(url: str) -> tuple[str, str]:
    scheme, _, rest = url.partition("://")
    return _ALIASES.get(scheme.lower(), scheme.lower()), rest


def connectors(
    state_url: str, *, tag: str, socket_timeout: float, connect_timeout: float
) -> Connectors:
    """Makers of redis-py's sync and asyncio connections for ``state_url`` (not yet connected).

    Args:
        state_url: any form ``_values.check_state_url`` accepts.
        tag: the hash tag of the user's keys (the service): in a cluster, the node owning its
            slot is the one connected to.
        socket_timeout: seconds a reply may take.
        connect_timeout: seconds a connection may take.

    Raises:
        ImportError: the ``redis`` package is missing.
        ValueError: ``state_url`` cannot be read (the message never repeats the URL).
    """
    import redis.asyncio  # noqa: PLC0415

    options = _options(socket_timeout, connect_timeout)
    retry, aretry = _retries()
    scheme, rest = _scheme(state_url)
    try:
        if scheme == "redis+sentinel":
            sync, asyncs, master = _sentinels(rest, options, retry, aretry)
            sync_pool = sync.master_for(
                master, retry=retry, connection_class=_discovering(sync)
            ).connection_pool
            async_pool = asyncs.master_for(
                master, retry=aretry, connection_class=_adiscovering(asyncs)
            ).connection_pool
            return Connectors(_from_pool(sync_pool), _from_pool(async_pool), None)
        if scheme == "redis+cluster":
            owner, merged = _owner(rest, tag, options, retry)
            sync_class, async_class = _located_classes()

            def make_sync() -> Any:
                return sync_class(owner, host="", port=0, retry=retry, **merged)

            def make_async() -> Any:
                return async_class(owner, host="", port=0, retry=aretry, **merged)

            return Connectors(make_sync, make_async, owner.stale)
        url = f"{scheme}://{rest}"
        # The pools only parse the URL; the transport keeps its own connections.
        sync_parsed = redis.ConnectionPool.from_url(url, retry=retry, **options)
        async_parsed = redis.asyncio.ConnectionPool.from_url(url, retry=aretry, **options)
    except (ValueError, TypeError) as exc:
        raise _unreadable(exc) from None
    return Connectors(_from_pool(sync_parsed), _from_pool(async_parsed), None)


def client(
    state_url: str, *, tag: str, socket_timeout: float, connect_timeout: float
) -> tuple[Any, Callable[[], None] | None]:
    """A redis-py synchronous ``Redis`` client for ``state_url`` (nothing connects yet), and the
    hook to call after a fault (where its connections go may have moved), if any.

    In a cluster the client talks to the node owning ``tag``'s slot only: every key its user
    names must carry that hash tag (one slot, so scripts over several keys work too).

    Raises:
        ImportError: the ``redis`` package is missing.
        ValueError: ``state_url`` cannot be read (the message never repeats the URL).
    """
    import redis  # noqa: PLC0415

    options = _options(socket_timeout, connect_timeout)
    retry, aretry = _retries()
    scheme, rest = _scheme(state_url)
    try:
        if scheme == "redis+sentinel":
            sync, _, master = _sentinels(rest, options, retry, aretry)
            return sync.master_for(master, retry=retry, connection_class=_discovering(sync)), None
        if scheme == "redis+cluster":
            owner, merged = _owner(rest, tag, options, retry)
            pool = redis.ConnectionPool(
                connection_class=_located_classes()[0], owner=owner, retry=retry, **merged
            )
            return redis.Redis(connection_pool=pool), owner.stale
        return redis.Redis.from_url(f"{scheme}://{rest}", retry=retry, **options), None
    except (ValueError, TypeError) as exc:
        raise _unreadable(exc) from None


def _unreadable(exc: ValueError | TypeError) -> ValueError:
    """The error to raise for a URL that cannot be read: ours as it is; redis-py's by its kind
    only, since its message may repeat part of the URL."""
    return exc if isinstance(exc, _BadURLError) else ValueError(type(exc).__name__)


def _from_pool(pool: Any) -> Callable[[], Any]:
    """New connections of ``pool``'s kind. A closure, not ``functools.partial`` (its repr would
    show the password), that keeps the pool alive (the asyncio Sentinel connections hold theirs
    only by a weak reference)."""

    def connect() -> Any:
        return pool.connection_class(**pool.connection_kwargs)

    return connect


def _split(rest: str, *, db_allowed: bool) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``[user:password@]host:port[,host:port...][/path][?query]``: the addresses, the path, and
    the connection options a ``redis://`` URL with the same user, password, db and query gives."""
    import redis.connection  # noqa: PLC0415

    netloc, _, tail = rest.partition("/")
    netloc, _, early_query = netloc.partition("?")
    path, _, query = tail.partition("?")
    query = query or early_query
    userinfo, at, hosts = netloc.rpartition("@")
    addresses = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":")
        if not colon or not name or not port.isdigit():
            raise _BadURLError("each address must be host:port")
        addresses.append((name.strip("[]"), int(port)))
    db = path.partition("/")[2] if db_allowed else ""
    single = f"redis://{userinfo}{at}localhost/{db}{'?' if query else ''}{query}"
    parse: Any = redis.connection.parse_url  # untyped in redis-py
    kwargs = dict(parse(single))
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    return addresses, path.partition("/")[0], kwargs


def _sentinels(rest: str, options: dict[str, Any], retry: Any, aretry: Any) -> tuple[Any, Any, str]:
    """``[user:password@]host:port[,host:port...]/master[/db][?query]``: redis-py's sync and
    asyncio ``Sentinel`` for it, and the master's name."""
    import redis.asyncio.sentinel  # noqa: PLC0415
    import redis.sentinel  # noqa: PLC0415

    sentinels, master, kwargs = _split(rest, db_allowed=True)
    if not master:
        raise _BadURLError("the master's name is missing: redis+sentinel://host:port/master")
    merged = {**options, **kwargs}  # as from_url: the URL's options win
    # The sentinels are asked with the same short timeouts and no retries either; no password:
    # the URL's is the master's (sentinels usually have none).
    asked = {k: v for k, v in merged.items() if k.startswith("socket_")}
    sync = redis.sentinel.Sentinel(sentinels, sentinel_kwargs={**asked, "retry": retry}, **merged)
    asyncs = redis.asyncio.sentinel.Sentinel(
        sentinels, sentinel_kwargs={**asked, "retry": aretry}, **merged
    )
    return sync, asyncs, master


# A master-managed connection asks the sentinels for the master as it connects. Each discovery
# leaves the sentinels' clients connected: those connections are closed at once (a new
# connection is rare; an idle socket per sentinel per loop, left to the garbage collector, is
# not).
def _discovering(sentinel: Any) -> type[Any]:
    import redis.sentinel  # noqa: PLC0415

    base: Any = redis.sentinel.SentinelManagedConnection  # untyped in redis-py

    class Discovering(base):  # type: ignore[misc]
        def connect(self) -> None:
            try:
                super().connect()
            finally:
                for asked in sentinel.sentinels:
                    asked.connection_pool.disconnect()

    return Discovering


def _adiscovering(sentinel: Any) -> type[Any]:
    import redis.asyncio.sentinel  # noqa: PLC0415

    base: Any = redis.asyncio.sentinel.SentinelManagedConnection

    class ADiscovering(base):  # type: ignore[misc]
        async def connect(self) -> None:
            try:
                await super().connect()
            finally:
                for asked in sentinel.sentinels:
                    await asked.connection_pool.disconnect()

    return ADiscovering


class _SlotOwner:
    """Where a hash slot lives, as redis-py's cluster ``NodesManager`` maps it.

    One per user, for threads and event loops alike. The map is read (``CLUSTER SLOTS``) on
    the first connection and again on the first connection after a fault, and the manager's
    own connections are closed at once: the users keep their own.
    """

    def __init__(self, nodes: list[tuple[str, int]], slot: int, kwargs: dict[str, Any]) -> None:
        self._nodes = nodes
        self._slot = slot
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._where: tuple[str, int] | None = None

    def stale(self) -> None:
        self._where = None

    def known(self) -> tuple[str, int] | None:
        """The owner's address when known (no I/O), else None."""
        return self._where

    def locate(self) -> tuple[str, int]:
        """The owner's address, asking the cluster if not known (blocks)."""
        import redis.cluster  # noqa: PLC0415

        node_at: Any = redis.cluster.ClusterNode  # untyped in redis-py

        with self._lock:
            where = self._where
            if where is None:
                manager = redis.cluster.NodesManager(
                    [node_at(host, port) for host, port in self._nodes], **self._kwargs
                )  # reads the slots now
                try:
                    node = manager.get_node_from_slot(self._slot)
                    where = self._where = (node.host, node.port)
                finally:
                    manager.close()
            return where


def _owner(
    rest: str, tag: str, options: dict[str, Any], retry: Any
) -> tuple[_SlotOwner, dict[str, Any]]:
    """``[user:password@]host:port[,host:port...][?query]`` (a cluster has only db 0): where
    ``{tag}``'s slot lives, and the connection options."""
    from redis.crc import key_slot  # noqa: PLC0415

    nodes, path, kwargs = _split(rest, db_allowed=False)
    if path:
        raise _BadURLError("a redis+cluster:// URL has no path (a cluster has only db 0)")
    kwargs.pop("db", None)
    merged = {**options, **kwargs}
    slot = key_slot(b"{%s}" % tag.encode())
    return _SlotOwner(nodes, slot, {**merged, "retry": retry}), merged


@cache
def _located_classes() -> tuple[type[Any], type[Any]]:
    """redis-py's sync and asyncio ``Connection`` that learn their address as they connect."""
    import redis.asyncio  # noqa: PLC0415

    # Untyped in redis-py.
    sync_base: Any = redis.Connection
    async_base: Any = redis.asyncio.Connection

    class Located(sync_base):  # type: ignore[misc]
        """Connects to the slot's owner (asking the cluster if not known)."""

        def __init__(self, owner: _SlotOwner, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._owner = owner

        def connect(self) -> None:
            self.host, self.port = self._owner.locate()
            super().connect()

    class ALocated(async_base):  # type: ignore[misc]
        """The same from the slot map when known, else from the cluster in a worker thread
        (the loop never waits on it)."""

        def __init__(self, owner: _SlotOwner, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._owner = owner

        async def connect(self) -> None:
            where = self._owner.known()
            if where is None:
                where = await asyncio.to_thread(self._owner.locate)
            self.host, self.port = where
            await super().connect()

    return Located, ALocated
