"""The breaker's state machine, written once: closed, open, half-open, and what moves between them.

Pure: it reads no clock and takes no lock (its owner holds one around every method) and knows
nothing of overrides, events, listeners or the rate window. The local breaker decides with it,
and so does the Redis storage while Redis is down; ``circuit.lua`` is the same machine for the
fleet, and ``tests/redis/test_machine_drift.py`` runs both on the same operations.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

from buttress.patterns.circuit_breaker._states import CLOSED, FAILURE, HALF_OPEN, OPEN, SUCCESS

__all__ = ["Decision", "Limits", "Machine"]


class Limits(NamedTuple):
    """The breaker options a decision depends on (passed on every call: they may change)."""

    fail_max: int
    reset_timeout: float
    success_threshold: int
    half_open_max_calls: int


class Decision(NamedTuple):
    """What the machine (or Redis) decided for one call, or the state after recording its outcome.

    Attributes:
        state: ``closed``, ``open`` or ``half_open``.
        generation: identifies this state instance; it changes on every transition (shared
            generations are positive, the Redis storage's local ones negative).
        admitted: the call may run.
        trial: the call is a half-open trial (its outcome must be recorded, even if ignored).
        retry_after: open: seconds until a trial may run; otherwise None.
        failures: consecutive failures counted towards ``fail_max``.
        successes: trial successes counted towards ``success_threshold``.
        change: the reason when this very request made a transition (``timeout_elapsed``,
            ``fail_max``, ``trial_failed``, ``success_threshold``, ``manual``), else None.
        shared: decided by Redis; False when a machine in this process decided.
        age: seconds since the state began (Redis's clock when shared).
        seq: failures recorded in this generation when decided (bookkeeping).
        lease: the trial lease held in Redis, or ``""`` (bookkeeping).
    """

    state: str
    generation: int
    admitted: bool
    trial: bool
    retry_after: float | None
    failures: int
    successes: int
    change: str | None
    shared: bool
    age: float
    seq: int = 0
    lease: str = ""


class Machine:
    """One circuit's phase, generation, counters and trials in flight.

    Failures are counted as in ``circuit.lua``: ``seq`` failures recorded in this generation,
    ``base`` of them cleared by successes, ``failures = seq - base``. A success clears the
    failures recorded before its call was admitted (``upto``, the ``seq`` of its ticket), or all
    of them (``upto`` None: pybreaker's rule, which the local breaker keeps). The count survives a
    trip; only a close clears it.

    Where the counters live is the one thing a subclass may change (the breaker keeps them in a
    pybreaker storage): ``failures``, ``successes``, ``_count_failure``, ``_clear_failures``,
    ``_count_success`` and ``_entered``.

    Args:
        now: the monotonic time the machine starts at (closed).
        generations: the numbers of the states it enters, in order.
    """

    __slots__ = (
        "_generations",
        "base",
        "generation",
        "opened_at",
        "phase",
        "seq",
        "since",
        "succ",
        "trials",
    )

    def __init__(self, now: float, generations: Iterator[int] | None = None) -> None:
        self._generations = itertools.count(1) if generations is None else generations
        self.phase: str = CLOSED
        self.generation = 0
        self.seq = self.base = self.succ = 0
        self.trials = 0  # trials of this machine in flight
        self.since = now  # when the phase began
        self.opened_at = now

    # --- where the counters live ----------------------------------------------------------------

    @property
    def failures(self) -> int:
        return self.seq - self.base

    @property
    def successes(self) -> int:
        return self.succ

    def _count_failure(self) -> int:
        self.seq += 1
        return self.seq - self.base

    def _clear_failures(self, upto: int | None) -> None:
        cleared = self.seq if upto is None else min(upto, self.seq)
        self.base = max(self.base, cleared)

    def _count_success(self) -> int:
        self.succ += 1
        return self.succ

    def _entered(self, phase: str) -> None:
        """A transition to ``phase``: fresh counters (failures are kept unless it closes)."""
        self.seq = 0 if phase == CLOSED else self.seq - self.base
        self.base = self.succ = 0

    # --- decisions ------------------------------------------------------------------------------

    def decision(
        self,
        now: float,
        reset_timeout: float,
        *,
        admitted: bool = False,
        trial: bool = False,
        change: str | None = None,
    ) -> Decision:
        """The current state as a :class:`Decision` (with what was just decided)."""
        retry_after = None
        if self.phase == OPEN:
            retry_after = max(0.0, self.opened_at + reset_timeout - now)
        return Decision(
            self.phase,
            self.generation,
            admitted,
            trial,
            retry_after,
            self.failures,
            self.successes,
            change,
            shared=False,
            age=now - self.since,
            seq=self.seq,
        )

    def move(self, phase: str, now: float) -> None:
        """Enter ``phase``: a new generation, fresh counters, no trial in flight."""
        self.adopt(phase, now, now)
        self._entered(phase)

    def admit(self, limits: Limits, now: float) -> Decision:
        """Whether a call may run now (an open circuit whose time is up half-opens first)."""
        change = None
        if self.phase == OPEN:
            if now < self.opened_at + limits.reset_timeout:
                return self.decision(now, limits.reset_timeout)
            self.move(HALF_OPEN, now)
            change = "timeout_elapsed"
        if self.phase == HALF_OPEN:
            if self.trials >= limits.half_open_max_calls:
                return self.decision(now, limits.reset_timeout, change=change)
            self.trials += 1
            return self.decision(
                now, limits.reset_timeout, admitted=True, trial=True, change=change
            )
        return self.decision(now, limits.reset_timeout, admitted=True, change=change)

    def record(
        self,
        generation: int,
        trial: bool,
        outcome: str,
        limits: Limits | None,
        now: float,
        *,
        upto: int | None = None,
        trips: bool = True,
    ) -> Decision:
        """Apply the ``outcome`` of a call admitted in ``generation``.

        An outcome from a generation that has ended changes nothing. ``limits`` None counts
        without tripping at ``fail_max`` or closing at ``success_threshold`` (for a breaker that
        decides those itself, as pybreaker does); ``trips`` False counts in the closed state
        without ever tripping (forced closed). A failed trial re-opens the circuit in any case.
        """
        reset_timeout = 0.0 if limits is None else limits.reset_timeout
        if generation != self.generation:
            return self.decision(now, reset_timeout)
        if trial and self.trials:
            self.trials -= 1
        change = None
        phase = self.phase
        if outcome == FAILURE:
            if phase == CLOSED:
                failures = self._count_failure()
                if trips and limits is not None and failures >= limits.fail_max:
                    self.move(OPEN, now)
                    change = "fail_max"
            elif phase == HALF_OPEN:
                self._count_failure()  # kept while open, as pybreaker counts a failed trial
                self.move(OPEN, now)
                change = "trial_failed"
        elif outcome == SUCCESS:
            if phase == CLOSED:
                self._clear_failures(upto)
            elif phase == HALF_OPEN:
                successes = self._count_success()
                if limits is not None and successes >= limits.success_threshold:
                    self.move(CLOSED, now)
                    change = "success_threshold"
        return self.decision(now, reset_timeout, change=change)

    def force(
        self, phase: str, now: float, *, always: bool, expected: int | None = None
    ) -> Decision:
        """Move to ``phase`` (``always``: even when already there, as a new generation).

        ``expected``: only if the machine is still in that generation (compare-and-set).
        """
        change = None
        if (expected is None or expected == self.generation) and (always or phase != self.phase):
            self.move(phase, now)
            change = "manual"
        return self.decision(now, 0.0, change=change)

    def adopt(self, phase: str, now: float, opened_at: float) -> None:
        """Take on a phase someone else entered (a shared storage): a new generation, no trial
        in flight, the counters as they are (they live with whoever moved)."""
        self.phase = phase
        self.generation = next(self._generations)
        self.trials = 0
        self.since = now
        if phase == OPEN:
            self.opened_at = opened_at

    def mirror(self, decision: Decision, now: float) -> None:
        """Become a copy of a state Redis decided (its generation and counters)."""
        if decision.generation != self.generation:
            self.trials = 0
            self.since = now - decision.age
            if decision.state == OPEN:
                self.opened_at = self.since
        self.phase = decision.state
        self.generation = decision.generation
        self.seq = decision.seq
        self.base = decision.seq - decision.failures
        self.succ = decision.successes
