"""Coalescing: identical concurrent calls share one run, its result or its error."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import buttress
from buttress import config, events, with_coalescing
from buttress.events import CallFinished
from buttress.testing import capture_events

THREADS = 64
TASKS = 1000


class Joined:
    """Counts the calls that joined a run in flight (real-time waits: other threads progress)."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.undo = events.subscribe(self._seen, [events.CoalescingJoined])

    def _seen(self, _: Any) -> None:
        with self.lock:
            self.count += 1

    def wait_for(self, n: int) -> None:
        limit = time.monotonic() + 5
        while self.count < n:
            assert time.monotonic() < limit, f"{self.count} of {n} calls joined"
            time.sleep(0.001)


@pytest.fixture
def joined() -> Any:
    counter = Joined()
    yield counter
    counter.undo()


def test_64_threads_share_one_run(joined: Joined) -> None:
    release = threading.Event()
    runs = []

    @with_coalescing(name="search")
    def search(query: str) -> str:
        runs.append(query)
        release.wait(5)
        return f"results for {query}"

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [pool.submit(search, "q") for _ in range(THREADS)]
        joined.wait_for(THREADS - 1)
        release.set()
        results = [f.result(5) for f in futures]
    assert runs == ["q"]
    assert results == ["results for q"] * THREADS


def test_1000_tasks_share_one_run(joined: Joined) -> None:
    runs = []

    @with_coalescing(name="search")
    async def search(query: str) -> str:
        runs.append(query)
        await release.wait()
        return f"results for {query}"

    async def main() -> list[str]:
        tasks = [asyncio.create_task(search("q")) for _ in range(TASKS)]
        while joined.count < TASKS - 1:
            await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*tasks)

    release = asyncio.Event()
    results = asyncio.run(main())
    assert runs == ["q"]
    assert results == ["results for q"] * TASKS


def test_the_error_of_the_run_is_everyone_s(mode, joined: Joined) -> None:
    release = threading.Event()
    runs = []

    def body(query: str) -> str:
        runs.append(query)
        release.wait(5)
        raise ConnectionError("down")

    search = with_coalescing(name="search")(mode.define(body))
    outcomes = concurrently(mode, search, 8, joined, release, "q")
    assert runs == ["q"]
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 1  # the same error, as asyncio futures share it


def test_different_keys_run_apart_and_a_finished_run_frees_its_key(mode) -> None:
    runs = []

    def body(query: str) -> str:
        runs.append(query)
        return query

    search = with_coalescing(name="search")(mode.define(body))
    assert mode.run(search, "a") == "a"
    assert mode.run(search, "a") == "a"  # not a cache: the first run is over
    assert mode.run(search, "b") == "b"
    assert runs == ["a", "a", "b"]


def test_a_key_function_decides_what_is_identical(mode, joined: Joined) -> None:
    release = threading.Event()
    runs = []

    def body(query: str, request_id: int) -> str:
        runs.append(request_id)
        release.wait(5)
        return query

    search = with_coalescing(name="search", key=lambda query, request_id: query)(mode.define(body))
    outcomes = concurrently(mode, search, 4, joined, release, "q", 7)
    assert outcomes == ["q"] * 4
    assert len(runs) == 1


def test_a_shared_call_is_counted_as_a_success_per_caller(mode, joined: Joined) -> None:
    release = threading.Event()
    search = with_coalescing(name="search")(mode.define(lambda q: release.wait(5) and q))
    with capture_events([CallFinished]) as seen:
        concurrently(mode, search, 3, joined, release, "q")
    assert [e.outcome for e in seen] == ["success"] * 3


def concurrently(
    mode: Any, fn: Any, n: int, joined: Joined, release: threading.Event, *args: Any
) -> list[Any]:
    """``n`` identical calls at once; released once ``n - 1`` joined the first one's run."""
    if mode.is_async:

        async def main() -> list[Any]:
            tasks = [asyncio.create_task(fn(*args)) for _ in range(n)]
            while joined.count < n - 1:
                await asyncio.sleep(0)
            # The run waits on a threading.Event: set it from a thread, off the loop.
            await asyncio.to_thread(release.set)
            return await asyncio.gather(*tasks, return_exceptions=True)

        return mode.run(main)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(fn, *args) for _ in range(n)]
        joined.wait_for(n - 1)
        release.set()
        out: list[Any] = []
        for future in futures:
            try:
                out.append(future.result(5))
            except Exception as exc:
                out.append(exc)
        return out


def test_cancelling_a_waiter_never_cancels_the_shared_call(joined: Joined) -> None:
    finished = []

    @with_coalescing(name="search")
    async def search(query: str) -> str:
        await release.wait()
        finished.append(query)
        return query

    async def main() -> list[Any]:
        first = asyncio.create_task(search("q"))  # leads the run
        others = [asyncio.create_task(search("q")) for _ in range(3)]
        while joined.count < 3:
            await asyncio.sleep(0)
        first.cancel()
        others[0].cancel()
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, *others, return_exceptions=True)

    release = asyncio.Event()
    outcomes = asyncio.run(main())
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert outcomes[2:] == ["q", "q"]
    assert finished == ["q"]  # it ran once, to its end


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt in the thread that runs the shared call."""


def test_an_interrupted_run_makes_its_waiters_start_over(joined: Joined) -> None:
    release, again = threading.Event(), threading.Event()
    runs: list[str] = []

    @with_coalescing(name="search")
    def search(query: str) -> str:
        runs.append(threading.current_thread().name)
        if len(runs) == 1:
            release.wait(5)
            raise Interrupted
        again.wait(5)
        return query

    outcomes: list[Any] = []

    def call() -> None:
        try:
            outcomes.append(search("q"))
        except Interrupted as exc:
            outcomes.append(exc)

    leader = threading.Thread(target=call, name="leader")
    leader.start()
    while not runs:
        time.sleep(0.001)
    waiters = [threading.Thread(target=call) for _ in range(3)]
    for thread in waiters:
        thread.start()
    joined.wait_for(3)
    release.set()
    joined.wait_for(5)  # the two that did not lead the second run joined it
    again.set()
    for thread in [leader, *waiters]:
        thread.join(5)
    assert sum(isinstance(o, Interrupted) for o in outcomes) == 1  # only the leader's
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["q", "q", "q"]
    assert len(runs) == 2  # the waiters started over: one of them ran it again


def test_a_cancelled_shared_task_makes_its_waiters_start_over(joined: Joined) -> None:
    runs = []

    @with_coalescing(name="search")
    async def search(query: str) -> str:
        runs.append(query)
        if len(runs) == 1:
            await release.wait()
            raise asyncio.CancelledError  # the run itself ends cancelled
        return query

    async def main() -> list[Any]:
        tasks = [asyncio.create_task(search("q")) for _ in range(4)]
        while joined.count < 3:
            await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    release = asyncio.Event()
    assert asyncio.run(main()) == ["q"] * 4
    assert len(runs) == 2


def test_coalescing_is_off_in_resilient_until_settings_turn_it_on(mode) -> None:
    runs = []
    fn = buttress.resilient("search")(mode.define(runs.append))
    assert [s.pattern for s in fn.__buttress_policy__.specs][2] == "coalescing"
    config.reload_settings(env={"BUTTRESS_SERVICES__SEARCH__COALESCING__ENABLED": "true"})
    try:
        with capture_events([events.CoalescingJoined]) as seen:
            mode.run(fn, 1)
    finally:
        config.reload_settings(env={})
    assert runs == [1]
    assert seen == []


def test_shadow_mode_reports_what_would_have_been_shared(joined: Joined) -> None:
    release = threading.Event()
    runs = []
    config.reload_settings(env={"BUTTRESS_SERVICES__SEARCH__MODE": "shadow"})
    try:

        @with_coalescing(name="search")
        def search(query: str) -> str:
            runs.append(query)
            release.wait(5)
            return query

        with capture_events([events.ShadowDecision]) as seen:
            leader = threading.Thread(target=search, args=("q",))
            # In shadow mode nothing is shared: every call runs.
            leader.start()
            while not runs:
                time.sleep(0.001)
            release.set()
            assert search("q") == "q"
            leader.join(5)
    finally:
        config.reload_settings(env={})
    assert len(runs) == 2
    assert all(e.action == "coalesced" for e in seen)
