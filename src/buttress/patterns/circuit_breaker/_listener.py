"""Transitions of shared circuits, heard through Redis pub/sub: what keeps the near-caches fresh.

``circuit.lua`` publishes the new state on ``<circuit key>:changes`` whenever a request moves
the circuit. One daemon thread per process and Redis subscribes to the channels of the storages
that use it and hands each message to its storage (threads and event loops alike read the
storage's copy: no task per loop, nothing that a closed loop could strand).

Nothing here can fail a call: a message that cannot be read, a lost connection or a Redis that
is down only leave the near-caches to their TTL. After a reconnect every cache is dropped (a
transition may have been missed), so the next call of each circuit asks Redis again.

The connections are the transport's (the maker of the first storage on that Redis), so the
topology (one server, a Sentinel master, the node of a cluster) is the transport's too; classic
pub/sub reaches every node of a cluster.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol

__all__ = ["Subscriber", "Subscribing", "subscribe", "unsubscribe"]

# How long a read waits for a message before the thread looks for channels to add or drop (a
# new circuit's first transitions in that time are covered by its cache's TTL).
_POLL: Final = 0.25
_RETRY_MIN: Final = 0.5
_RETRY_MAX: Final = 5.0


class Subscribing(Protocol):
    """What a storage offers the listener."""

    @property
    def channel(self) -> bytes: ...

    def heard(self, message: bytes) -> None:
        """A transition published on its channel (never raises)."""

    def resubscribed(self) -> None:
        """Messages may have been missed: drop the near-cache (never raises)."""


class Subscriber:
    """One Redis's subscription, shared by the storages of this process that use it.

    Args:
        make: makes a new (unconnected) redis-py synchronous ``Connection`` to that Redis.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._storages: dict[bytes, weakref.WeakSet[Any]] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False  # subscribed and reading (for tests and health)

    def add(self, storage: Subscribing) -> None:
        with self._lock:
            self._storages.setdefault(storage.channel, weakref.WeakSet()).add(storage)
            self._stopped.clear()  # a thread about to end for want of storages goes on
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="buttress-circuit-changes", daemon=True
                )
                self._thread.start()

    def discard(self, storage: Subscribing) -> bool:
        """Forget ``storage``; True when no storage is left (the thread then ends)."""
        with self._lock:
            listeners = self._storages.get(storage.channel)
            if listeners is not None:
                listeners.discard(storage)
            return self._idle_locked()

    def _idle_locked(self) -> bool:
        for channel, listeners in list(self._storages.items()):
            if not listeners:
                del self._storages[channel]
        if not self._storages:
            self._stopped.set()
            return True
        return False

    def stop(self) -> None:
        """End the thread (at its next poll) and wait for it."""
        self._stopped.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2 * _POLL + 1.0)

    def _wanted(self) -> set[bytes]:
        with self._lock:
            self._idle_locked()
            return set(self._storages)

    def _run(self) -> None:
        faults = 0
        while True:
            with self._lock:
                # Decided under the lock add() takes: a storage added after this starts a
                # new thread.
                if self._stopped.is_set() or self._idle_locked():
                    self._thread = None
                    return
            try:
                self._listen()
                faults = 0
            except Exception:  # noqa: BLE001 - pub/sub faults leave the caches to their TTL
                faults += 1
            finally:
                self.connected = False
            if faults:
                self._stopped.wait(min(_RETRY_MAX, _RETRY_MIN * 2 ** min(faults - 1, 10)))

    def _listen(self) -> None:
        conn = self._make()
        read = _push_reader(conn)
        try:
            conn.connect()
            subscribed: set[bytes] = set()
            while not self._stopped.is_set():
                wanted = self._wanted()
                if wanted - subscribed:
                    conn.send_command("SUBSCRIBE", *sorted(wanted - subscribed))
                if subscribed - wanted:
                    conn.send_command("UNSUBSCRIBE", *sorted(subscribed - wanted))
                subscribed = wanted
                if not conn.can_read(timeout=_POLL):
                    continue
                # RESP3 (redis-py's default) delivers pub/sub as push messages: asked for here.
                # A refused SUBSCRIBE (an ACL without it) raises here: retried later.
                message = read()
                if not isinstance(message, list) or len(message) != 3:
                    continue
                kind, channel, payload = message
                if kind == b"message":
                    self._deliver(channel, payload)
                elif kind == b"subscribe":
                    # What was published before the subscription is lost: those caches re-read.
                    self.connected = True
                    self._each(channel, lambda storage: storage.resubscribed())
        finally:
            conn.disconnect()

    def _each(self, channel: bytes, action: Callable[[Any], None]) -> None:
        with self._lock:
            storages = list(self._storages.get(channel, ()))
        for storage in storages:
            action(storage)

    def _deliver(self, channel: bytes, payload: bytes) -> None:
        self._each(channel, lambda storage: storage.heard(payload))


def _push_reader(conn: Any) -> Callable[[], Any]:
    """``conn.read_response(push_request=True)``: the next reply, push messages included.

    Past redis-py's Sentinel connection: before 5.1 its ``read_response`` either refuses
    ``push_request`` (5.0.0: every read raised TypeError, so no Sentinel user ever heard a
    transition) or drops it. That override only turns a demoted master's READONLY error into a
    reconnect, which a subscriber never gets (a demoted master still relays what is published).
    """
    import redis.sentinel  # noqa: PLC0415 - redis is installed wherever a storage made conn

    read = conn.read_response
    if isinstance(conn, redis.sentinel.SentinelManagedConnection):
        read = super(redis.sentinel.SentinelManagedConnection, conn).read_response
    return functools.partial(read, push_request=True)


_subscribers: dict[bytes, Subscriber] = {}
_registry_lock = threading.Lock()


def subscribe(key: bytes, make: Callable[[], Any], storage: Subscribing) -> Subscriber:
    """Hear ``storage``'s transitions through the subscription to the Redis ``key`` names (a
    digest of its URL), made with ``make`` on first use."""
    with _registry_lock:
        subscriber = _subscribers.get(key)
        if subscriber is None:
            subscriber = _subscribers[key] = Subscriber(make)
    subscriber.add(storage)
    return subscriber


def unsubscribe(key: bytes, storage: Subscribing) -> None:
    """Stop hearing for ``storage``; the last one out ends the thread."""
    with _registry_lock:
        subscriber = _subscribers.get(key)
        if subscriber is None or not subscriber.discard(storage):
            return
        del _subscribers[key]
    subscriber.stop()


def _after_fork() -> None:
    # The parent's threads do not exist in the child, and its sockets are not the child's.
    _subscribers.clear()


os.register_at_fork(after_in_child=_after_fork)
