"""The connections to Redis: one transport per store, for threads and for event loops.

The drivers send a pattern's requests through it (``call`` from a thread, ``await acall`` from a
task): the shared circuit's and the fleet rate limit's. It talks to redis-py's connections
directly, with requests packed once by the pattern, pooled LIFO, with no client-side retries:
a fault is the caller's to handle (the pattern goes on locally).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

# Where the connections go (one server, Sentinel, Cluster) is the topology module's to say.
from buttress.patterns._topology import connectors

__all__ = ["RedisTransport", "connectors"]


def _is_noscript(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoScriptError"


class _SyncLink:
    """Requests on redis-py's synchronous connections, pooled LIFO; no client-side retries.

    It talks to redis-py's ``Connection`` directly with requests packed once, which costs about
    a third of ``Redis.evalsha``'s Python overhead per call.
    """

    def __init__(self, make: Callable[[], Any], load: bytes) -> None:
        self._make = make
        self._load = load
        self._idle: deque[tuple[int, Any]] = deque()
        self._incarnation = 0

    def call(self, request: bytes) -> Any:
        incarnation = self._incarnation
        try:
            born, conn = self._idle.pop()
        except IndexError:
            born, conn = incarnation, None
        try:
            if conn is None:
                conn = self._make()
                # Connected here, not on the first send: a send connects without the
                # connection's own connect(), where a Sentinel-managed one finds the master.
                conn.connect()
            conn.send_packed_command((request,), check_health=False)
            try:
                reply = conn.read_response()
            except Exception as exc:
                if not _is_noscript(exc):
                    raise
                # Redis restarted or flushed its scripts: load ours and ask again.
                conn.send_packed_command((self._load, request), check_health=False)
                conn.read_response()
                reply = conn.read_response()
        except BaseException:
            if conn is not None:
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

    def __init__(self, make: Callable[[], Any], timeout: float, load: bytes) -> None:
        self._make = make
        self._timeout = timeout
        self._load = load
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
                await conn.send_packed_command((self._load, request), check_health=False)
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


class RedisTransport:
    """Requests to one Redis, from threads (:meth:`call`) and from event loops (:meth:`acall`).

    Args:
        make_sync: makes a redis-py synchronous ``Connection`` (not yet connected).
        make_async: makes a redis-py asyncio ``Connection``.
        timeout: seconds an asyncio reply may take (the sync connections have their own).
        load: the packed ``SCRIPT LOAD`` of the script the requests ``EVALSHA``: sent once when
            Redis answers ``NOSCRIPT`` (it restarted or flushed its scripts).
        stale: called on :meth:`reset`: where the connections go may have moved (a cluster
            slot's owner); the next connection asks again.
    """

    __slots__ = ("_alink", "_link", "_stale", "acall", "call")

    def __init__(
        self,
        make_sync: Callable[[], Any],
        make_async: Callable[[], Any],
        timeout: float,
        load: bytes,
        stale: Callable[[], None] | None = None,
    ) -> None:
        self._stale = stale
        self._link = _SyncLink(make_sync, load)
        self._alink = _AsyncLink(make_async, timeout, load)
        # The links' own methods, with no call in between (one of each per shared call).
        self.call: Callable[[bytes], Any] = self._link.call
        """Send a request and return the reply (blocks the thread)."""
        self.acall: Callable[[bytes], Awaitable[Any]] = self._alink.call
        """Send a request and return the reply (awaits; the event loop goes on)."""

    def reset(self) -> None:
        """Drop the pooled connections (after a fault they are probably broken)."""
        self._link.reset()
        self._alink.reset()
        if self._stale is not None:
            self._stale()

    def forget(self) -> None:
        """After fork: the pooled sockets belong to the parent; leave them alone."""
        self._link.forget()
        self._alink.forget()

    def close(self) -> None:
        """Close the pooled synchronous connections."""
        self._link.reset()

    async def aclose(self) -> None:
        """Close the pooled connections of the running event loop."""
        await self._alink.close()

    def retire(self) -> None:
        """Close the connections of a transport taken out of use (a reload changed the URL).

        The synchronous ones now; the asyncio ones of the running loop, if any, on that loop
        (those of other loops are closed when their loop shuts down).
        """
        self.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


# Closing connections of a transport taken out of use on a running event loop (strong
# references: the loop keeps only weak ones to its tasks).
_closing: set[asyncio.Task[None]] = set()
