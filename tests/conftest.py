"""Shared fixtures: every behaviour runs both on ``def`` and on ``async def`` through ``mode``."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from buttress import _clock, _deferral, registry
from buttress.health_app import reset as forget_fallbacks
from buttress.policy import alink, link
from buttress.testing import FakeClock


class Mode:
    """Runs the same test on ``def`` functions and threads, or ``async def`` functions and tasks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_async = name == "async"
        self._loop = asyncio.new_event_loop() if self.is_async else None

    def __repr__(self) -> str:
        return f"Mode({self.name})"

    def define(
        self, body: Callable[..., Any] | None = None, *, latency: float = 0.0, name: str = "op"
    ) -> Callable[..., Any]:
        """A function of this mode that waits ``latency`` on the buttress clock, then runs ``body``.

        ``body`` is plain code (it may raise); ``None`` returns ``"ok"``.
        """
        action = body if body is not None else (lambda *a, **kw: "ok")
        if self.is_async:

            async def op(*args: Any, **kwargs: Any) -> Any:
                if latency:
                    await _clock.asleep(latency)
                return action(*args, **kwargs)

        else:

            def op(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                if latency:
                    _clock.sleep(latency)
                return action(*args, **kwargs)

        op.__name__ = op.__qualname__ = name
        return op

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` (awaiting it in async mode) and return its result."""
        if self._loop is not None:
            return self._loop.run_until_complete(fn(*args, **kwargs))
        return fn(*args, **kwargs)

    def outcome(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Like ``run`` but returns the exception instead of raising it."""
        try:
            return self.run(fn, *args, **kwargs)
        except Exception as exc:
            return exc

    def gather(self, fn: Callable[..., Any], n: int, *args: Any) -> list[Any]:
        """Run ``n`` concurrent calls (threads or tasks); results and exceptions, in order."""
        if self._loop is not None:

            async def many() -> list[Any]:
                return await asyncio.gather(*(fn(*args) for _ in range(n)), return_exceptions=True)

            return self._loop.run_until_complete(many())
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(fn, *args) for _ in range(n)]
            out: list[Any] = []
            for future in futures:
                try:
                    out.append(future.result())
                except Exception as exc:
                    out.append(exc)
            return out

    def chain(self, strategy: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` behind one built strategy, without a Policy (for pattern unit tests)."""
        if self.is_async:
            step = alink(strategy, lambda a, kw: fn(*a, **kw))

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await step(args, kwargs)

            return call
        sync_step = link(strategy, lambda a, kw: fn(*a, **kw))
        return lambda *args, **kwargs: sync_step(args, kwargs)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Iterator[Mode]:
    m = Mode(request.param)
    yield m
    m.close()


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    fake = FakeClock()
    previous = _clock.set_clock(fake)
    yield fake
    _clock.set_clock(previous)


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    registry.clear()
    registry.clear_claims()
    forget_fallbacks()
    _deferral.clear()
    yield
    registry.clear()
    registry.clear_claims()
    forget_fallbacks()
    _deferral.clear()
