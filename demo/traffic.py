"""The two clients and the traffic that runs through them.

Both clients fetch ``/items/<id>`` from the flaky upstream over httpx, from ``def`` call sites
(threads) and ``async def`` call sites (tasks on one event loop), with the same pacing. The
*protected* client's call sites are ``resilient("inventory")``: fallback, retry, circuit breaker,
timeout and bulkhead, all from settings (``demo/buttress.toml``). The *unprotected* client is what
most code does: one request with a generous timeout.

Under both, the same chaos layer (settings of service ``network``) injects a few connection
failures and delays, as a real network would: the same rates for both clients, each drawing from a
random stream of its own, so that one client's traffic never changes which faults the other
meets. Only the protected client has anything to handle them with. Chaos is off with
``--no-chaos`` (:func:`describe_chaos` says what a run injects).

What happened is recorded twice, independently: each call's latency and outcome here (as the
caller saw it), and every buttress event with the client that caused it (a context variable set
around each call follows it into tasks and into the worker thread of a sync timeout).
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import httpx

from buttress import Policy, _clock, config, events, remaining, resilient, with_chaos
from buttress.patterns import chaos
from buttress.patterns.circuit_breaker.redis_storage import SharedStateStorage
from buttress.registry import breaker
from demo.upstream import CLIENT_HEADER

__all__ = [
    "NETWORK",
    "PROTECTED",
    "SERVICE",
    "UNPROTECTED",
    "CallRecord",
    "EventLog",
    "Observed",
    "Traffic",
    "describe_chaos",
]

SERVICE: Final = "inventory"  # the protected call sites (settings: services.inventory)
NETWORK: Final = "network"  # the chaos layer under both clients (settings: services.network)
PROTECTED: Final = "protected"
UNPROTECTED: Final = "unprotected"
CLIENTS: Final = (PROTECTED, UNPROTECTED)

# How long the unprotected client waits for an answer: a common choice in real code.
UNPROTECTED_TIMEOUT: Final = 10.0
# What the protected client answers when the upstream cannot and nothing is cached.
DEGRADED: Final = {"item": None, "stock": None, "degraded": True}
# Callers per client and kind of call site.
SYNC_CALLERS: Final = 3
ASYNC_CALLERS: Final = 3
# Pause between two calls of one caller, in seconds (a user's think time).
PACING: Final = (0.04, 0.12)
ITEMS: Final = 30

_EVENT_KINDS: Final = (
    events.CallFinished,
    events.CallRejected,
    events.ChaosInjected,
    events.CircuitStateChanged,
    events.FallbackUsed,
    events.RetryExhausted,
    events.RetryScheduled,
    events.TimeoutExceeded,
)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One call as its caller saw it."""

    client: str  # protected | unprotected
    site: str  # sync | async
    worker: int
    started: float  # seconds from the start of the run
    latency: float  # seconds
    outcome: str  # ok (the upstream answered) | fallback | error
    error_type: str | None


@dataclass(frozen=True, slots=True)
class Observed:
    """One buttress event, when it happened, and the client whose call caused it."""

    at: float
    client: str | None
    worker: int
    event: Any


class _Slot:
    """Filled in by the event log while one protected call runs."""

    __slots__ = ("fallback",)

    def __init__(self) -> None:
        self.fallback = False


_current: contextvars.ContextVar[tuple[str, _Slot] | None] = contextvars.ContextVar(
    "buttress_demo_call", default=None
)


class EventLog:
    """Every buttress event of the run, tagged with the client of the call that emitted it."""

    def __init__(self, started: float, worker: int) -> None:
        self.started = started
        self.worker = worker
        self._lock = threading.Lock()
        self.observed: list[Observed] = []
        self._undo: Callable[[], None] | None = None

    def __enter__(self) -> EventLog:
        self._undo = events.subscribe(self._record, _EVENT_KINDS)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._undo is not None:
            self._undo()

    def _record(self, event: Any) -> None:
        tag = _current.get()
        if tag is not None and type(event) is events.FallbackUsed and event.service == SERVICE:
            tag[1].fallback = True
        observed = Observed(
            _clock.monotonic() - self.started, tag[0] if tag else None, self.worker, event
        )
        with self._lock:
            self.observed.append(observed)


def _get(http: httpx.Client, client: str, item: int, wait: float) -> Any:
    response = http.get(f"/items/{item}", headers={CLIENT_HEADER: client}, timeout=wait)
    response.raise_for_status()
    return response.json()


async def _aget(http: httpx.AsyncClient, client: str, item: int, wait: float) -> Any:
    response = await http.get(f"/items/{item}", headers={CLIENT_HEADER: client}, timeout=wait)
    response.raise_for_status()
    return response.json()


def _deadline() -> float:
    # The protected call runs under with_timeout: pass what is left of it down to the socket, so
    # an abandoned sync attempt stops soon after its caller gave up on it.
    left = remaining()
    return UNPROTECTED_TIMEOUT if left is None else max(left, 0.001)


def _network(seed: int, client: str, site: str) -> Policy:
    # Settings (services.network.chaos) say whether and how often; the code fixes the seed, one
    # per client and kind of call site, so that each client meets the faults of its own stream.
    return with_chaos(name=NETWORK, seed=zlib.crc32(f"{seed}/{client}/{site}".encode()))


def describe_chaos() -> str:
    """What the chaos layer injects with the settings in force, and where."""
    if not config.get_settings().chaos_enabled:  # the kill switch, as policies read it
        return "off (--no-chaos): no fault injected"
    options = cast("chaos.ChaosOptions", config.resolve(NETWORK, "chaos"))
    faults = []
    if options.enabled and options.exception_rate:
        faults.append(f"{options.exception_rate:.0%} of requests fail to connect")
    if options.enabled and options.latency_rate:
        faults.append(f"{options.latency_rate:.0%} are delayed {options.latency_seconds:g} s")
    if not faults:
        return f"off: services.{NETWORK}.chaos injects nothing"
    return (
        f"{', '.join(faults)}, under both clients alike (services.{NETWORK}.chaos; each client "
        "draws its own faults)"
    )


Fetch = Callable[[int], Any]
AsyncFetch = Callable[[int], Awaitable[Any]]


def sync_clients(http: httpx.Client, seed: int) -> dict[str, Fetch]:
    """The ``def`` call sites of both clients over one connection pool."""
    protected_get = _network(seed, PROTECTED, "sync")(_get)
    unprotected_get = _network(seed, UNPROTECTED, "sync")(_get)

    @resilient(SERVICE, fallback={"value": DEGRADED})
    def protected_fetch(item: int) -> Any:
        return protected_get(http, PROTECTED, item, _deadline())

    def unprotected_fetch(item: int) -> Any:
        return unprotected_get(http, UNPROTECTED, item, UNPROTECTED_TIMEOUT)

    return {PROTECTED: protected_fetch, UNPROTECTED: unprotected_fetch}


def async_clients(http: httpx.AsyncClient, seed: int) -> dict[str, AsyncFetch]:
    """The ``async def`` call sites of both clients over one connection pool."""
    protected_get = _network(seed, PROTECTED, "async")(_aget)
    unprotected_get = _network(seed, UNPROTECTED, "async")(_aget)

    @resilient(SERVICE, fallback={"value": DEGRADED})
    async def protected_fetch(item: int) -> Any:
        return await protected_get(http, PROTECTED, item, _deadline())

    async def unprotected_fetch(item: int) -> Any:
        return await unprotected_get(http, UNPROTECTED, item, UNPROTECTED_TIMEOUT)

    return {PROTECTED: protected_fetch, UNPROTECTED: unprotected_fetch}


class Traffic:
    """Drives both clients against ``url`` until ``duration`` seconds after ``started``."""

    def __init__(
        self, url: str, *, started: float, duration: float, seed: int, worker: int = 0
    ) -> None:
        self.url = url
        self.started = started
        self.duration = duration
        self.seed = seed
        self.worker = worker
        self.records: list[CallRecord] = []
        self._threads: list[threading.Thread] = []
        self._limits = httpx.Limits(max_connections=4 * (SYNC_CALLERS + ASYNC_CALLERS))

    def elapsed(self) -> float:
        return _clock.monotonic() - self.started

    def start(self) -> None:
        """Start every caller; they stop by themselves when the run is over."""
        self._http = httpx.Client(base_url=self.url, limits=self._limits)
        fetchers = sync_clients(self._http, self.seed)
        for index in range(SYNC_CALLERS):
            for client, fetch in fetchers.items():
                name = f"demo-{client}-sync-{index}"
                rng = random.Random(f"{self.seed}/{self.worker}/{name}")
                thread = threading.Thread(
                    target=self._sync_caller, args=(client, fetch, rng), name=name, daemon=True
                )
                self._threads.append(thread)
        self._threads.append(
            threading.Thread(target=self._run_async_callers, name="demo-async", daemon=True)
        )
        for thread in self._threads:
            thread.start()

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            # Bounded: a caller in flight at the end waits at most UNPROTECTED_TIMEOUT.
            thread.join(UNPROTECTED_TIMEOUT + 5)
        self._http.close()

    # -- callers ---------------------------------------------------------------------------------

    def _record(
        self, client: str, site: str, started: float, outcome: str, error: str | None
    ) -> None:
        now = self.elapsed()
        self.records.append(
            CallRecord(client, site, self.worker, started, now - started, outcome, error)
        )

    def _sync_caller(self, client: str, fetch: Fetch, rng: random.Random) -> None:
        while (started := self.elapsed()) < self.duration:
            slot = _Slot()
            token = _current.set((client, slot))
            try:
                fetch(_pick(rng))
            except Exception as exc:  # noqa: BLE001 - every failure is a figure of the report
                self._record(client, "sync", started, "error", type(exc).__name__)
            else:
                self._record(client, "sync", started, "fallback" if slot.fallback else "ok", None)
            finally:
                _current.reset(token)
            _clock.sleep(rng.uniform(*PACING))

    def _run_async_callers(self) -> None:
        asyncio.run(self._async_callers())

    async def _async_callers(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, limits=self._limits) as http:
            fetchers = async_clients(http, self.seed)
            callers = []
            for index in range(ASYNC_CALLERS):
                for client, fetch in fetchers.items():
                    rng = random.Random(f"{self.seed}/{self.worker}/demo-{client}-async-{index}")
                    callers.append(self._async_caller(client, fetch, rng))
            await asyncio.gather(*callers)
        # With --redis the circuit's asyncio connections belong to this loop, which asyncio.run
        # closes next: close them while it still runs.
        storage = breaker(SERVICE).storage
        if isinstance(storage, SharedStateStorage):
            await storage.aclose()

    async def _async_caller(self, client: str, fetch: AsyncFetch, rng: random.Random) -> None:
        while (started := self.elapsed()) < self.duration:
            slot = _Slot()
            token = _current.set((client, slot))
            try:
                await fetch(_pick(rng))
            except Exception as exc:  # noqa: BLE001 - every failure is a figure of the report
                self._record(client, "async", started, "error", type(exc).__name__)
            else:
                outcome = "fallback" if slot.fallback else "ok"
                self._record(client, "async", started, outcome, None)
            finally:
                _current.reset(token)
            await _clock.asleep(rng.uniform(*PACING))


def _pick(rng: random.Random) -> int:
    # A few popular items and a long tail, as in most catalogues: the fallback cache warms up.
    return min(int(rng.expovariate(0.15)), ITEMS - 1)
