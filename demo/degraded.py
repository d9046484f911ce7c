"""Degraded service: an assistant answered from its cache, and notifications held for later.

Two more clients call the same flaky upstream during the run, both ``resilient()`` from the
demo's settings:

* the **assistant** (``services.assistant``), an LLM-style service: a handful of prompts asked
  again and again, from ``def`` call sites. Its cache answers a prompt asked within ``ttl``
  without calling; while the upstream is down, a stale answer (within ``stale_ttl``) keeps it
  answering; identical prompts in flight share one request (coalescing).
* **notifications** (``services.notifications``), numbered messages sent from an ``async def``
  call site: while its circuit is open a message is not lost but deferred, and the queue sends
  the deferred messages, in order, once the circuit lets calls through again.

Every figure comes from what the callers got back and what the upstream received; the events
only say which kind of answer a call got.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import httpx

from buttress import Deferred, _clock, events, resilient
from demo.upstream import CLIENT_HEADER, Hit

__all__ = ["ASSISTANT", "NOTIFICATIONS", "DegradedFigures", "DegradedTraffic"]

ASSISTANT: Final = "assistant"
NOTIFICATIONS: Final = "notifications"
PROMPTS: Final = 6  # distinct prompts the assistant is asked
ASSISTANT_CALLERS: Final = 3
ASSISTANT_PACING: Final = (0.03, 0.08)
NOTIFICATION_PACING: Final = 0.1
# The item the upstream serves for a message is this plus its number (one item per message).
_MESSAGE_BASE: Final = 1000
# After the traffic, how long the demo waits for the deferred messages to be sent.
DRAIN_GRACE: Final = 15.0
# Bound of one upstream request (the patterns' own timeouts are shorter).
_REQUEST_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class DegradedFigures:
    """What the two degraded-service clients got, and what reached the upstream."""

    assistant_calls: int
    assistant_from_upstream: int  # the call ran and the upstream answered
    assistant_fresh_from_cache: int  # a fresh entry answered: no request at all
    assistant_stale_from_cache: int  # the call failed or was rejected; a stale entry answered
    assistant_failed: int
    assistant_coalesced: int  # calls that shared an identical call's request
    assistant_upstream_requests: int
    assistant_answered_during_outage: int
    assistant_calls_during_outage: int
    notifications: int
    notifications_sent_at_once: int
    notifications_deferred: int
    notifications_replayed: int  # deferred, then sent by the replay
    notifications_lost: int  # failed or dropped: the caller got an error, or the replay failed
    notifications_pending: int  # still queued when the demo stopped waiting
    replayed_in_order: bool
    delivered_once: bool  # every message reached the upstream exactly once

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        outage = self.assistant_calls_during_outage
        lines = [
            "Degraded service",
            f"  assistant ({ASSISTANT}, LLM-style, cache + coalescing):",
            f"    {self.assistant_calls:,} calls; {self.assistant_upstream_requests:,} requests "
            "reached the upstream",
            f"    answered by the upstream {self.assistant_from_upstream:,}, fresh from cache "
            f"{self.assistant_fresh_from_cache:,}, stale from cache during trouble "
            f"{self.assistant_stale_from_cache:,}, failed {self.assistant_failed:,}",
            f"    shared an identical call in flight: {self.assistant_coalesced:,}",
            f"    during the outage: {self.assistant_answered_during_outage:,} of {outage:,} "
            "calls answered (from cache)",
            f"  notifications ({NOTIFICATIONS}, deferred while the circuit is open):",
            f"    {self.notifications:,} messages: sent at once "
            f"{self.notifications_sent_at_once:,}, deferred {self.notifications_deferred:,}, "
            f"replayed {self.notifications_replayed:,}, still queued "
            f"{self.notifications_pending:,}, lost {self.notifications_lost:,} (a call that "
            "failed before its circuit opened is not deferred: only rejections are)",
            f"    deferred messages replayed in order: {'yes' if self.replayed_in_order else 'NO'}"
            f"; every message delivered once: {'yes' if self.delivered_once else 'NO'}",
        ]
        return "\n".join(lines)


class DegradedTraffic:
    """Drives the two clients against ``url`` until ``duration`` seconds after ``started``."""

    def __init__(self, url: str, *, started: float, duration: float, seed: int) -> None:
        self.url = url
        self.started = started
        self.duration = duration
        self.seed = seed
        self._lock = threading.Lock()
        # (outcome, started): outcome as CallFinished counted it (success, cached, failure, ...)
        self.assistant: list[tuple[str, float]] = []
        self.stale = 0
        self.coalesced = 0
        self.messages: list[Any] = []  # what each send returned: a result, a handle, an error
        self.delivered: list[int] = []  # message numbers, in the order the upstream took them
        self._threads: list[threading.Thread] = []
        self._undo: Callable[[], None] | None = None
        self._local = threading.local()

    def elapsed(self) -> float:
        return _clock.monotonic() - self.started

    def start(self) -> None:
        self._undo = events.subscribe(
            self._on_event, [events.CallFinished, events.CacheServedStale, events.CoalescingJoined]
        )
        self._http = httpx.Client(base_url=self.url, timeout=_REQUEST_TIMEOUT)
        ask = _assistant(self._http)
        for index in range(ASSISTANT_CALLERS):
            rng = random.Random(f"{self.seed}/assistant/{index}")
            self._threads.append(
                threading.Thread(
                    target=self._ask, args=(ask, rng), name=f"demo-assistant-{index}", daemon=True
                )
            )
        self._threads.append(
            threading.Thread(target=self._run_notifications, name="demo-notify", daemon=True)
        )
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(DRAIN_GRACE + _REQUEST_TIMEOUT + 5)
        if self._undo is not None:
            self._undo()
        self._http.close()

    # -- the assistant -----------------------------------------------------------------------------
    def _ask(self, ask: Callable[[str], Any], rng: random.Random) -> None:
        while (started := self.elapsed()) < self.duration:
            self._local.started = started
            # A failure is counted from its CallFinished event.
            with contextlib.suppress(Exception):
                ask(f"prompt {rng.randrange(PROMPTS)}")
            _clock.sleep(rng.uniform(*ASSISTANT_PACING))

    def _on_event(self, event: Any) -> None:
        if event.service != ASSISTANT:
            return
        with self._lock:
            if type(event) is events.CallFinished:
                self.assistant.append((event.outcome, getattr(self._local, "started", 0.0)))
            elif type(event) is events.CacheServedStale:
                self.stale += 1
            else:
                self.coalesced += 1

    # -- notifications -----------------------------------------------------------------------------
    def _run_notifications(self) -> None:
        asyncio.run(self._notify())

    async def _notify(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=_REQUEST_TIMEOUT) as http:
            send = _notifications(http, self.delivered)
            number = 0
            while self.elapsed() < self.duration:
                try:
                    self.messages.append(await send(number))
                except Exception as exc:  # noqa: BLE001 - a lost message is a figure
                    self.messages.append(exc)
                number += 1
                await _clock.asleep(NOTIFICATION_PACING)
            # The loop keeps running while the deferred messages are replayed on it.
            handles = [m for m in self.messages if isinstance(m, Deferred)]
            limit = _clock.monotonic() + DRAIN_GRACE
            while any(not h.done() for h in handles) and _clock.monotonic() < limit:
                await _clock.asleep(0.05)

    # -- figures -----------------------------------------------------------------------------------
    def figures(self, hits: list[Hit], outage: tuple[float, float]) -> DegradedFigures:
        with self._lock:
            calls = list(self.assistant)
            stale, coalesced = self.stale, self.coalesced
        outcomes = Counter(outcome for outcome, _ in calls)
        during = [o for o, at in calls if outage[0] <= at < outage[1]]
        handles = [m for m in self.messages if isinstance(m, Deferred)]
        statuses = Counter(h.status for h in handles)
        deferred = {n for n, m in enumerate(self.messages) if isinstance(m, Deferred)}
        replayed_order = [n for n in self.delivered if n in deferred]
        return DegradedFigures(
            assistant_calls=len(calls),
            assistant_from_upstream=outcomes["success"],
            assistant_fresh_from_cache=outcomes["cached"] - stale,
            assistant_stale_from_cache=stale,
            assistant_failed=len(calls) - outcomes["success"] - outcomes["cached"],
            assistant_coalesced=coalesced,
            assistant_upstream_requests=sum(1 for h in hits if h.client == ASSISTANT),
            assistant_answered_during_outage=sum(1 for o in during if o in {"success", "cached"}),
            assistant_calls_during_outage=len(during),
            notifications=len(self.messages),
            notifications_sent_at_once=sum(
                1 for m in self.messages if not isinstance(m, Deferred | Exception)
            ),
            notifications_deferred=len(handles),
            notifications_replayed=statuses["replayed"],
            notifications_lost=sum(1 for m in self.messages if isinstance(m, Exception))
            + statuses["failed"]
            + statuses["dropped"],
            notifications_pending=statuses["queued"],
            replayed_in_order=replayed_order == sorted(replayed_order),
            delivered_once=len(self.delivered) == len(set(self.delivered)),
        )


def _assistant(http: httpx.Client) -> Callable[[str], Any]:
    @resilient(ASSISTANT)
    def ask(prompt: str) -> Any:
        item = int(prompt.rsplit(" ", 1)[-1])
        response = http.get(f"/items/{item}", headers={CLIENT_HEADER: ASSISTANT})
        response.raise_for_status()
        return response.json()

    return ask


def _notifications(http: httpx.AsyncClient, delivered: list[int]) -> Callable[[int], Any]:
    @resilient(NOTIFICATIONS)
    async def send(number: int) -> Any:
        response = await http.get(
            f"/items/{_MESSAGE_BASE + number}", headers={CLIENT_HEADER: NOTIFICATIONS}
        )
        response.raise_for_status()
        delivered.append(number)
        return response.json()

    return send
