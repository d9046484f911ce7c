"""Which Redis a storage's connections go to: one server, a Sentinel-managed master, or the
node of a Redis Cluster that owns the circuit's slot.

Only redis-py discovers: its URL parser, its ``Sentinel`` (the master is asked for each time a
connection opens, so a failover is followed at the next reconnect) and its cluster
``NodesManager`` (``CLUSTER SLOTS``, refreshed after a fault). The transport keeps its own
connections to where that points; a fault (a dead node, ``MOVED``, ``READONLY`` on a demoted
master) is the storage's like any other: it goes on locally, and the next connection asks again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Final, NamedTuple

__all__ = ["Connectors", "connectors"]

# valkey names the same protocol; redis-py parses only its own schemes.
_ALIASES: Final = {
    "valkey": "redis",
    "valkeys": "rediss",
    "valkey+sentinel": "redis+sentinel",
    "valkey+cluster": "redis+cluster",
}


class Connectors(NamedTuple):
    """What a transport needs: new (unconnected) connections, and a hook for after a fault."""

    make_sync: Callable[[], Any]
    make_async: Callable[[], Any]
    stale: Callable[[], None] | None


def connectors(
    url: str, tag: bytes, options: dict[str, Any], retry: Any, aretry: Any
) -> Connectors:
    """The connections for ``url`` (any scheme ``_values.redact`` shows); ``tag``: the hash tag.

    Raises:
        ValueError, TypeError: redis-py cannot parse the URL.
    """
    import redis.asyncio  # noqa: PLC0415 - the optional dependency, only when state is shared

    scheme, _, rest = url.partition("://")
    scheme = _ALIASES.get(scheme.lower(), scheme.lower())
    if scheme == "redis+sentinel":
        return _sentinel(rest, options, retry, aretry)
    if scheme == "redis+cluster":
        return _cluster(rest, tag, options, retry, aretry)
    url = f"{scheme}://{rest}"
    # The pools only parse the URL; the transport keeps its own connections.
    sync = redis.ConnectionPool.from_url(url, retry=retry, **options)
    asyncs = redis.asyncio.ConnectionPool.from_url(url, retry=aretry, **options)
    return Connectors(
        _connector(sync.connection_class, sync.connection_kwargs),
        _connector(asyncs.connection_class, asyncs.connection_kwargs),
        None,
    )


def _connector(connection_class: Any, kwargs: dict[str, Any]) -> Callable[[], Any]:
    # A closure, not functools.partial: a partial's repr would show the password.
    def connect() -> Any:
        return connection_class(**kwargs)

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
            raise ValueError("each address must be host:port")
        addresses.append((name.strip("[]"), int(port)))
    db = path.partition("/")[2] if db_allowed else ""
    single = f"redis://{userinfo}{at}localhost/{db}{'?' if query else ''}{query}"
    parse: Any = redis.connection.parse_url  # untyped in redis-py
    kwargs = dict(parse(single))
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    return addresses, path.partition("/")[0], kwargs


def _sentinel(rest: str, options: dict[str, Any], retry: Any, aretry: Any) -> Connectors:
    """``[user:password@]host:port[,host:port...]/master[/db][?query]``."""
    import redis.asyncio.sentinel  # noqa: PLC0415
    import redis.sentinel  # noqa: PLC0415

    sentinels, master, kwargs = _split(rest, db_allowed=True)
    if not master:
        raise ValueError("the master's name is missing: redis+sentinel://host:port/master")
    merged = {**options, **kwargs}  # as from_url: the URL's options win
    # The sentinels are asked with the same short timeouts and no retries either; no password:
    # the URL's is the master's (sentinels usually have none).
    asked = {k: v for k, v in merged.items() if k.startswith("socket_")}
    sync = redis.sentinel.Sentinel(sentinels, sentinel_kwargs={**asked, "retry": retry}, **merged)
    asyncs = redis.asyncio.sentinel.Sentinel(
        sentinels, sentinel_kwargs={**asked, "retry": aretry}, **merged
    )
    # A master-managed connection asks the sentinels for the master as it connects.
    sync_pool = sync.master_for(master, retry=retry).connection_pool
    async_pool = asyncs.master_for(master, retry=aretry).connection_pool
    # Each discovery leaves the sentinels' clients connected: those connections are closed at
    # once (a new connection of the storage is rare; an idle socket per sentinel per loop, left
    # to the garbage collector, is not).
    sync_class = sync_pool.connection_class
    async_class = async_pool.connection_class

    class Discovering(sync_class):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            try:
                super().connect()
            finally:
                for client in sync.sentinels:
                    client.connection_pool.disconnect()

    class ADiscovering(async_class):  # type: ignore[misc, valid-type]
        async def connect(self) -> None:
            try:
                await super().connect()
            finally:
                for client in asyncs.sentinels:
                    await client.connection_pool.disconnect()

    return Connectors(
        _from_pool(Discovering, sync_pool), _from_pool(ADiscovering, async_pool), None
    )


def _from_pool(connection_class: Any, pool: Any) -> Callable[[], Any]:
    """New connections of ``pool``'s kind, the pool kept alive (the asyncio Sentinel
    connections hold their pool only by a weak reference)."""

    def connect() -> Any:
        return connection_class(**pool.connection_kwargs)

    return connect


class _SlotOwner:
    """Where a circuit's slot lives, as redis-py's cluster ``NodesManager`` maps it.

    One per storage, for threads and event loops alike. The map is read (``CLUSTER SLOTS``) on
    the first connection and again on the first connection after a fault, and the manager's
    own connections are closed at once: the transport keeps its own.
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


def _cluster(rest: str, tag: bytes, options: dict[str, Any], retry: Any, aretry: Any) -> Connectors:
    """``[user:password@]host:port[,host:port...][?query]`` (a cluster has only db 0)."""
    import redis.asyncio  # noqa: PLC0415
    from redis.crc import key_slot  # noqa: PLC0415

    nodes, path, kwargs = _split(rest, db_allowed=False)
    if path:
        raise ValueError("a redis+cluster:// URL has no path (a cluster has only db 0)")
    kwargs.pop("db", None)
    merged = {**options, **kwargs}
    # Both keys carry the hash tag {service}: one slot, so one script can hold both.
    owner = _SlotOwner(nodes, key_slot(b"{%s}" % tag), {**merged, "retry": retry})

    connection: Any = redis.Connection  # untyped in redis-py

    def make_sync() -> Any:
        host, port = owner.locate()
        return connection(host=host, port=port, retry=retry, **merged)

    located = _located_class(redis.asyncio.Connection)

    def make_async() -> Any:
        return located(owner, host="", port=0, retry=aretry, **merged)

    return Connectors(make_sync, make_async, owner.stale)


def _located_class(base: type[Any]) -> type[Any]:
    class Located(base):  # type: ignore[misc]
        """An asyncio connection that learns its address as it connects: from the slot map
        when known, else from the cluster in a worker thread (the loop never waits on it)."""

        def __init__(self, owner: _SlotOwner, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._owner = owner

        async def connect(self) -> None:
            where = self._owner.known()
            if where is None:
                where = await asyncio.to_thread(self._owner.locate)
            self.host, self.port = where
            await super().connect()

    return Located
