"""The modelled dependency and the clients that call it, on virtual time.

:class:`Dependency` is a server with ``workers`` that serve requests first come, first served,
each for a drawn service time. A request whose client gave up (timed out, cancelled) is still
served: the server cannot know, so overload wastes its work, as it does for real servers.
Every request that reaches it counts as load (``arrivals``), whatever its fate.

:func:`open_loop` drives it: ``clients`` each send calls at exponentially distributed intervals
(Poisson arrivals), whatever the latency, as independent users do.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class DependencyDownError(ConnectionError):
    """The dependency refused the request (connection refused, 503): transient for every client."""


class Dependency:
    """A server: ``workers`` serving a FIFO queue; ``service_time()`` draws each request's work.

    Args:
        workers: requests served at once (its capacity is ``workers / mean service time``).
        service_time: draws the seconds one request takes.
        down: while true, every request fails after ``refusal_time`` without using a worker.
        unbounded: no workers and no queue: every request only takes its drawn time (a
            dependency with room to spare, whose latency alone is under study).
    """

    def __init__(
        self,
        workers: int,
        service_time: Callable[[], float],
        *,
        down: bool = False,
        refusal_time: float = 0.005,
        unbounded: bool = False,
    ) -> None:
        self.service_time = service_time
        self.down = down
        self.refusal_time = refusal_time
        self.arrivals = 0
        self.unbounded = unbounded
        self._workers = workers
        self._busy = 0
        self._queue: asyncio.Queue[asyncio.Future[str]] = asyncio.Queue()

    def set_workers(self, workers: int) -> None:
        """Change the capacity (a node lost): busy workers finish what they serve."""
        self._workers = workers
        self._start_idle()

    def _start_idle(self) -> None:
        while self._busy < self._workers and not self._queue.empty():
            self._busy += 1
            asyncio.get_running_loop().create_task(self._serve(self._queue.get_nowait()))

    async def _serve(self, reply: asyncio.Future[str]) -> None:
        await asyncio.sleep(self.service_time())
        if not reply.done():  # a client that gave up is not told; the work was done anyway
            reply.set_result("ok")
        self._busy -= 1
        self._start_idle()

    async def request(self) -> str:
        """One request, as a client sends it (``await``: until its answer)."""
        self.arrivals += 1
        if self.down:
            await asyncio.sleep(self.refusal_time)
            raise DependencyDownError("connection refused")
        if self.unbounded:
            # No queueing at all: only the drawn latency (the heavy-tailed case).
            await asyncio.sleep(self.service_time())
            return "ok"
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(reply)
        self._start_idle()
        return await reply


@dataclass
class Tally:
    """What the clients saw: each call's outcome and, for successes, its latency."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)

    def p(self, quantile: float) -> float:
        """The latency at ``quantile`` of the successful calls (seconds)."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


async def open_loop(
    call: Callable[[int], Awaitable[object]],
    *,
    clients: int,
    rate: float,
    duration: float,
    rng: random.Random,
    tally: Callable[[float], Tally | None],
) -> None:
    """``clients`` sending ``rate`` calls a second each for ``duration`` seconds; wait for all.

    Client ``i`` makes its calls with ``call(i)`` (its own call site). Each call is counted in
    ``tally(start)`` (``None``: not counted, a warm-up), by the time it started.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    calls: list[asyncio.Task[None]] = []

    async def one(client: int) -> None:
        began = loop.time()
        counted = tally(began - start)
        if counted is not None:
            counted.started += 1
        try:
            await call(client)
        except Exception:
            if counted is not None:
                counted.failed += 1
            return
        if counted is not None:
            counted.succeeded += 1
            counted.latencies.append(loop.time() - began)

    async def client(index: int, seed: int) -> None:
        draws = random.Random(seed)
        while True:
            await asyncio.sleep(draws.expovariate(rate))
            if loop.time() - start >= duration:
                return
            calls.append(loop.create_task(one(index)))

    await asyncio.gather(*(client(i, rng.randrange(2**32)) for i in range(clients)))
    await asyncio.gather(*calls)
