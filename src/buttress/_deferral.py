"""Deferred calls: the queue a deferring fallback puts rejected calls in, and their replay.

A call rejected while its dependency takes no calls (circuit open, rate limited, bulkhead full)
is queued here and its caller answered with a :class:`Deferred` handle. The queue of one
protected function replays its items in order, each through the patterns inside the fallback
(retry, breaker, ...), in a context that carries the idempotency key the call had:

* when a circuit of its service closes (:class:`~buttress.events.CircuitStateChanged`), at once;
* else when the rejection said it would be worth trying (its ``retry_after``, or every
  ``retry_interval`` seconds): the replay of the first item is then the call that tells.

A replay rejected again stops the drain (the item stays first); one that fails otherwise is
dropped from the queue and its handle fails with that error. Items older than ``max_age`` are
dropped unreplayed, and a put into a full queue is refused (the caller gets the rejection).

The items live in this process (:class:`LocalStore`), or in a Redis stream
(:mod:`buttress._deferral_redis`) that outlives the process: whichever process holds the stream's
replay lease drains it, so each item is replayed once while no process dies mid-replay. Replays
run on a thread of the queue's own (``def`` functions) or as tasks on the event loop the
function was last called on (``async def`` functions); the thread exists only while a replay is
due.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from buttress import _clock, _context, events
from buttress.exceptions import RejectedError

__all__ = [
    "DeferralQueue",
    "Deferred",
    "Item",
    "LocalStore",
    "Store",
    "clear",
    "depths",
    "queue_for",
    "queues",
]

_log = logging.getLogger("buttress.deferral")

# How often a waiting replay thread looks at the clock (real seconds).
_POLL_SECONDS = 0.05


class Deferred:
    """The answer of a deferred call: a handle on its replay.

    Attributes:
        id: the item's id in its queue.
        service: the service of the call.
        idempotency_key: the key the call's replay sends (``buttress.idempotency_key()`` inside
            it), the same its rejected attempts had.
        status: ``queued``, then ``replayed`` (the replay returned), ``failed`` (it raised) or
            ``dropped`` (too old to replay). A handle whose item another process replayed (a
            Redis stream) stays ``queued`` here.
    """

    __slots__ = (
        "_done",
        "_error",
        "_lock",
        "_result",
        "_waiters",
        "id",
        "idempotency_key",
        "service",
        "status",
    )

    def __init__(self, item_id: str, service: str, idempotency_key: str) -> None:
        self.id = item_id
        self.service = service
        self.idempotency_key = idempotency_key
        self.status = "queued"
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._result: Any = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Deferred {self.service} {self.id} {self.status}>"

    def done(self) -> bool:
        """Whether the replay is over (or the item was dropped)."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The replay's result, waiting up to ``timeout`` seconds for it (``None``: forever).

        Raises:
            TimeoutError: not replayed in time.
            Exception: what the replay raised, or the original rejection of a dropped item.
        """
        if not _clock.wait(self._done, timeout):
            raise TimeoutError(f"deferred call {self.id} of {self.service!r} not replayed yet")
        if self._error is not None:
            raise self._error
        return self._result

    async def wait(self) -> Any:
        """:meth:`result` for a task: waits without blocking its loop (bound it with
        ``asyncio.timeout``)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        with self._lock:
            waiting = not self._done.is_set()
            if waiting:
                self._waiters.append(waiter)
        if waiting:
            try:
                await future
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        return self.result(0)

    def _settle(self, status: str, result: Any, error: BaseException | None) -> None:
        with self._lock:
            self.status = status
            self._result = result
            self._error = error
            self._done.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                continue


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(slots=True)
class Item:
    """One deferred call."""

    id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: str  # the idempotency key of the call
    queued_at: float  # wall-clock seconds (the age of an item must survive a restart)
    target: Callable[..., Any] | None = None  # the function Policy.call() ran, if it did
    # The stack it was queued from (``step``, ``is_async``: see DeferralQueue.link), when it is
    # kept in this process: several functions of one service and one name (lambdas, partials,
    # instances of one class, a function decorated per request) share a queue, and each call is
    # replayed through its own. None: the queue's (an item a durable stream handed back).
    step: Callable[..., Any] | None = field(default=None, compare=False)
    is_async: bool = False
    handle: Deferred | None = field(default=None, compare=False)
    entry: Any = None  # the store's own id of the item (a stream entry id)


class Store(Protocol):
    """Where the items of one queue live, in order."""

    def push(self, item: Item, max_items: int) -> int | None:
        """Append ``item``; the new depth, or ``None`` when the queue is full."""

    def head(self) -> Item | None:
        """The oldest item, or ``None``."""

    def remove(self, item: Item) -> None:
        """Remove ``item`` (the head, once replayed or dropped)."""

    def depth(self) -> int:
        """How many items are queued."""

    def lease(self) -> bool:
        """Take the right to replay (one process at a time); ``False``: another holds it."""

    def renew(self) -> None:
        """Still replaying: keep the right to."""

    def release(self) -> None:
        """Give the right to replay back."""


class LocalStore:
    """The items in this process's memory."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def push(self, item: Item, max_items: int) -> int | None:
        with self._lock:
            if len(self._items) >= max_items:
                return None
            item.id = str(next(self._ids))
            self._items.append(item)
            return len(self._items)

    def head(self) -> Item | None:
        with self._lock:
            return self._items[0] if self._items else None

    def remove(self, item: Item) -> None:
        with self._lock:
            if self._items and self._items[0] is item:
                self._items.popleft()

    def depth(self) -> int:
        return len(self._items)

    def lease(self) -> bool:
        return True

    def renew(self) -> None:
        return

    def release(self) -> None:
        return


class _StoreUnavailableError(Exception):
    """The store could not be reached; the caller decides what that means."""


class DeferralQueue:
    """The deferred calls of one protected function, and their replay."""

    def __init__(self, service: str, site: str, options: Any, store: Store) -> None:
        self.service = service
        self.site = site
        self.options = options
        self.store = store
        self.handles: dict[str, Deferred] = {}
        self._step: Callable[..., Any] | None = None
        self._is_async = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._due: float | None = None  # when the next drain is due (buttress clock)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = threading.Lock()
        self._closed = False
        # Items queued, as this process last saw the store (a shared stream is not read for it).
        self._depth = 0

    # -- the fallback's side ---------------------------------------------------------------------
    def link(self, step: Callable[..., Any], *, is_async: bool) -> None:
        """Replays run ``step(args, kwargs)``: the patterns inside the deferring fallback."""
        self._step = step
        self._is_async = is_async
        if is_async:
            self._note_loop()
        if not isinstance(self.store, LocalStore):
            # A durable queue may hold items a previous process left: look soon (the drain
            # finds out; nothing here waits for Redis).
            self.schedule(self.options.retry_interval)

    def put(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rejection: RejectedError,
        step: Callable[..., Any] | None = None,
        *,
        is_async: bool = False,
    ) -> Deferred | None:
        """Queue a rejected call; its handle, or ``None`` when it could not be queued.

        ``step`` (with ``is_async``): the stack the call came through, which replays it from a
        queue of this process (a durable stream's items replay through the queue's ``link``).
        """
        scope = _context.call_scope.get()
        key = _context.idempotency_key() if scope is not None else None
        item = Item(
            id="",
            args=args,
            kwargs=dict(kwargs),
            key=key or uuid.uuid4().hex,
            queued_at=_clock.wall(),
            target=_context.call_target.get(None),
        )
        if isinstance(self.store, LocalStore):
            item.step, item.is_async = step, is_async
        try:
            if item.target is not None and not isinstance(self.store, LocalStore):
                # Policy.call(fn, ...): another process could not know which fn to replay.
                raise TypeError("a Policy.call target cannot be kept in a shared queue")
            depth = self.store.push(item, self.options.max_items)
        except TypeError:
            _log.warning(
                "buttress.deferral.unserializable",
                extra={"service": self.service, "site": self.site},
            )
            events.emit(events.DeferralDropped(self.service, "unserializable"))
            return None
        except _StoreUnavailableError:
            events.emit(events.DeferralDropped(self.service, "store_error"))
            return None
        if depth is None:
            events.emit(events.DeferralDropped(self.service, "full"))
            return None
        self._depth = depth
        if is_async or self._is_async:
            self._note_loop()
        handle = item.handle = Deferred(item.id, self.service, item.key)
        with self._lock:
            self.handles[item.id] = handle
        events.emit(events.DeferralQueued(self.service, type(rejection).__name__, depth))
        self.schedule(rejection.retry_after or self.options.retry_interval)
        return handle

    def forked(self) -> None:
        """In a forked child: no replay thread (the parent's is not here), no lock held by
        another of the parent's threads, and none of the parent's calls from a queue of this
        process (the parent replays those; a child replaying them too would run each twice)."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._draining = threading.Lock()
        self._thread = None
        self._due = None
        self._loop = None  # the parent's event loop runs nothing here
        self.handles.clear()  # the parent's callers wait on theirs, in the parent
        # (A durable stream's calls stay whoever takes its lease's: the parent's, while it
        # lives. No thread is started here: a fork hook also runs before a subprocess's exec.)
        if isinstance(self.store, LocalStore):
            self.store = LocalStore()
            self._depth = 0

    def _note_loop(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return

    # -- replay ----------------------------------------------------------------------------------
    def schedule(self, delay: float, since: float | None = None) -> None:
        """Drain ``delay`` seconds after ``since`` (default: now), or sooner if due sooner."""
        due = (_clock.monotonic() if since is None else since) + max(0.0, delay)
        with self._lock:
            if self._due is not None and self._due <= due:
                return
            self._due = due
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run_replays, name=f"buttress-deferral-{self.service}", daemon=True
                )
                self._thread.start()
                return
        self._wake.set()

    def close(self) -> None:
        """Stop replaying (the queue is forgotten); its thread ends at its next look."""
        with self._lock:
            self._closed = True
            self._due = None
        self._wake.set()

    def _run_replays(self) -> None:
        while True:
            with self._lock:
                due = self._due
                if due is None or self._closed:
                    self._thread = None
                    return
                wait = due - _clock.monotonic()
                if wait <= 0:
                    self._due = None
            if wait > 0:
                # Polled in short real-time slices against the buttress clock rather than one
                # timed wait: a thread that registers its wait late would miss time that a
                # simulated clock (tests) moved meanwhile. Only while a replay is due.
                self._wake.wait(min(wait, _POLL_SECONDS))
                self._wake.clear()
                continue
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - a store fault: try again later
                _log.exception("buttress.deferral.drain_failed", extra={"service": self.service})
                self.schedule(self.options.retry_interval)

    def drain(self) -> int:
        """Replay the queued items in order until one is rejected again; how many ran.

        Only one drain runs at a time in a process, and, for a shared store, in the fleet.
        """
        if not self._draining.acquire(blocking=False):
            return 0
        ran = 0
        try:
            if not self.store.lease():
                # Another process drains; try again later in case it stops half-way.
                self.schedule(self.options.retry_interval)
                return 0
            try:
                while (item := self.store.head()) is not None:
                    if not self._replay(item):
                        break
                    ran += 1
                    self.store.renew()
                else:
                    self._emptied()
            finally:
                self.store.release()
        finally:
            self._draining.release()
        return ran

    def _replay(self, item: Item) -> bool:
        """Replay ``item``; ``False`` when the drain must stop (rejected again, nothing to run)."""
        waited = max(0.0, _clock.wall() - item.queued_at)
        if waited > self.options.max_age:
            self._remove(item)
            events.emit(events.DeferralDropped(self.service, "expired"))
            self._settle(item, "dropped", None, _expired(self.service, waited))
            return True
        step, is_async = (item.step, item.is_async) if item.step else (self._step, self._is_async)
        if step is None:
            return False
        started = _clock.monotonic()
        try:
            result = self._run(step, item, is_async=is_async)
        except RejectedError as exc:
            # Counted from before the replay (the refusal came later, never earlier): a loop or
            # this thread that sees the refusal late must not push the next try further out.
            self.schedule(exc.retry_after or self.options.retry_interval, since=started)
            return False
        except _NoLoopError:
            self.schedule(self.options.retry_interval)
            return False
        except Exception as exc:  # noqa: BLE001 - the replay's own failure ends this item
            self._remove(item)
            events.emit(events.DeferralReplayed(self.service, "failure", waited))
            self._settle(item, "failed", None, exc)
            return True
        self._remove(item)
        events.emit(events.DeferralReplayed(self.service, "success", waited))
        self._settle(item, "replayed", result, None)
        return True

    def _run(self, step: Callable[..., Any], item: Item, *, is_async: bool) -> Any:
        context = contextvars.Context()
        context.run(_enter_replay, item)
        if not is_async:
            return context.run(step, item.args, item.kwargs)
        loop = self._loop
        if loop is None or loop.is_closed():
            raise _NoLoopError
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def start() -> None:
            task = loop.create_task(_replay_async(step, item), context=context)
            task.add_done_callback(lambda t: _transfer(t, done))

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # closed meanwhile
            raise _NoLoopError from None
        while True:
            try:
                return done.result(_POLL_SECONDS)
            except TimeoutError:
                # Its loop may never run again (closed, or this queue forgotten): give up then.
                if loop.is_closed() or self._closed:
                    raise _NoLoopError from None

    def _remove(self, item: Item) -> None:
        # Before the handle settles: whoever its result wakes sees the depth without it.
        self.store.remove(item)
        self._depth = max(0, self._depth - 1)

    def depth(self) -> int:
        """Items queued: the store's count, or for a shared stream the last one seen here."""
        return self.store.depth() if isinstance(self.store, LocalStore) else self._depth

    def _emptied(self) -> None:
        self._depth = 0
        with self._lock:
            # Handles whose items another process replayed: they stay "queued" for their callers,
            # but this queue has nothing left to settle them with.
            self.handles.clear()

    def _settle(self, item: Item, status: str, result: Any, error: BaseException | None) -> None:
        with self._lock:
            handle = self.handles.pop(item.id, None)
        if handle is not None:
            handle._settle(status, result, error)


class _NoLoopError(Exception):
    """An ``async def`` function's replay has no open event loop to run on yet."""


def _expired(service: str, waited: float) -> Exception:
    return TimeoutError(f"deferred call of {service!r} dropped unreplayed after {waited:.0f}s")


def _enter_replay(item: Item) -> None:
    scope = _context.RetryScope()
    scope.key = item.key
    _context.call_scope.set(scope)
    if item.target is not None:
        _context.call_target.set(item.target)


async def _replay_async(step: Callable[..., Any], item: Item) -> Any:
    return await step(item.args, item.kwargs)


def _transfer(task: asyncio.Task[Any], done: concurrent.futures.Future[Any]) -> None:
    if task.cancelled():
        done.set_exception(_NoLoopError("the replay's task was cancelled"))
        return
    error = task.exception()
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(task.result())


# -- the queues of this process ----------------------------------------------------------------
_queues: dict[tuple[str, str], DeferralQueue] = {}
_queues_lock = threading.Lock()
_subscribed = False


def queue_for(service: str, site: str, options: Any, connect: Callable[..., Any]) -> DeferralQueue:
    """The queue of the function ``site`` of ``service``, made (or remade) for ``options``.

    ``connect`` makes the Redis client of a shared stream (``options.state_url``): see
    :class:`buttress._deferral_redis.RedisStore`.
    """
    global _subscribed
    slot = (service, site)
    with _queues_lock:
        queue = _queues.get(slot)
        if queue is not None and queue.options == options:
            return queue
        if queue is not None and queue.options.state_url == options.state_url:
            queue.options = options
            return queue
        store: Store
        if options.state_url is not None:
            from buttress import _deferral_redis  # noqa: PLC0415 - only for a Redis stream

            store = _deferral_redis.RedisStore(options.state_url, service, site, connect)
        else:
            store = LocalStore()
        queue = _queues[slot] = DeferralQueue(service, site, options, store)
        if not _subscribed:
            events.subscribe(_on_state_changed, [events.CircuitStateChanged])
            _subscribed = True
        return queue


def _on_state_changed(event: events.CircuitStateChanged) -> None:
    # A circuit of the service closed (here, or seen from the shared state): drain at once.
    if event.new_state != "closed":
        return
    with _queues_lock:
        ready = [q for (service, _), q in _queues.items() if service == event.service]
    for queue in ready:
        queue.schedule(0.0)


def _after_fork_in_child() -> None:
    global _queues_lock
    _queues_lock = threading.Lock()  # another of the parent's threads may have held it
    for queue in _queues.values():
        queue.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def queues() -> dict[tuple[str, str], DeferralQueue]:
    """Every queue of this process, by (service, function)."""
    with _queues_lock:
        return dict(_queues)


def depths() -> dict[str, int]:
    """Items queued per service (a shared stream as this process last saw it: never read here)."""
    found: dict[str, int] = {}
    for (service, _), queue in queues().items():
        depth = queue.depth()
        if depth:
            found[service] = found.get(service, 0) + depth
    return found


def clear() -> None:
    """Forget every queue (tests); their replay threads end after their current wait."""
    global _subscribed
    with _queues_lock:
        for queue in _queues.values():
            queue.close()
        _queues.clear()
        if _subscribed:
            events.unsubscribe(_on_state_changed)
            _subscribed = False
