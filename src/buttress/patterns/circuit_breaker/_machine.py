"""The breaker's state machine, written once: closed, open, half-open, and what moves between them.

Pure: it reads no clock and takes no lock (its owner holds one around every method) and knows
nothing of overrides, events, listeners or the rate window. The local breaker decides with it,
and so does the Redis storage while Redis is down; ``circuit.lua`` is the same machine for the
fleet, and ``tests/redis/test_machine_drift.py`` runs both on the same operations.
"""

from __future__ import annotations

import math
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
    open_backoff: float = 1.0  # the n-th trip in a row stays open reset_timeout*backoff**(n-1)
    max_timeout: float = math.inf  # ... at most this long
    # Not an option: the least time a circuit this very request opens stays open (a server's
    # Retry-After on the failure it records, already capped); 0 on every other request.
    hold: float = 0.0


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
        override: a fleet-wide override in Redis (``forced_open``, ``forced_closed``,
            ``disabled``), or ``""``; the machine knows none.
        override_left: seconds until that override ends.
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
    override: str = ""
    override_left: float = 0.0


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

    The open time grows on repeated trips: the ``streak``-th trip in a row without a close stays
    open ``reset_timeout * open_backoff ** (streak - 1)``, capped at ``max_timeout``, or ``hold``
    (a server's Retry-After on the failure that opened it) if that is longer.

    Args:
        now: the monotonic time the machine starts at (closed).
        generations: the numbers of the states it enters, in order (None: 1, 2, 3...).
    """

    __slots__ = (
        "_generations",
        "base",
        "generation",
        "hold",
        "opened_at",
        "phase",
        "seq",
        "since",
        "streak",
        "succ",
        "trials",
    )

    def __init__(self, now: float, generations: Iterator[int] | None = None) -> None:
        # None: each state is numbered one more than the last (no counter kept per machine).
        self._generations = generations
        self.phase: str = CLOSED
        self.generation = 0
        self.seq = self.base = self.succ = 0
        self.trials = 0  # trials of this machine in flight
        self.since = now  # when the phase began
        self.opened_at = now
        self.streak = 0  # trips since the circuit last closed
        self.hold = 0.0  # seconds the current open state lasts at least

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

    def open_time(self, limits: Limits) -> float:
        """Seconds the current open state lasts (see the class)."""
        seconds = limits.reset_timeout
        if self.streak > 1 and limits.open_backoff != 1.0:
            seconds = min(
                seconds * limits.open_backoff ** min(self.streak - 1, 64), limits.max_timeout
            )
        return seconds if seconds >= self.hold else self.hold

    def decision(
        self,
        now: float,
        open_time: float,
        *,
        admitted: bool = False,
        trial: bool = False,
        change: str | None = None,
    ) -> Decision:
        """The current state as a :class:`Decision` (with what was just decided)."""
        retry_after = None
        if self.phase == OPEN:
            retry_after = max(0.0, self.opened_at + open_time - now)
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
        if phase == OPEN:
            self.streak += 1
        elif phase == CLOSED:
            self.streak = 0
        self.hold = 0.0
        self.adopt(phase, now, now)
        self._entered(phase)

    def admit(self, limits: Limits, now: float) -> Decision:
        """Whether a call may run now (an open circuit whose time is up half-opens first)."""
        change = None
        if self.phase == OPEN:
            open_time = self.open_time(limits)
            if now < self.opened_at + open_time:
                return self.decision(now, open_time)
            self.move(HALF_OPEN, now)
            change = "timeout_elapsed"
        if self.phase == HALF_OPEN:
            if self.trials >= limits.half_open_max_calls:
                return self.decision(now, 0.0, change=change)
            self.trials += 1
            return self.decision(now, 0.0, admitted=True, trial=True, change=change)
        return self.decision(now, 0.0, admitted=True, change=change)

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
        without ever tripping (forced closed). A failed trial re-opens the circuit in any case
        (and counts as a repeated trip); a circuit it opens stays open ``limits.hold`` at least.
        """
        if generation != self.generation:
            return self._now(now, limits)
        if trial and self.trials:
            self.trials -= 1
        change = None
        phase = self.phase
        if outcome == FAILURE:
            if phase == CLOSED:
                failures = self._count_failure()
                if trips and limits is not None and failures >= limits.fail_max:
                    self.move(OPEN, now)
                    self.hold = limits.hold
                    change = "fail_max"
            elif phase == HALF_OPEN:
                self._count_failure()  # kept while open, as pybreaker counts a failed trial
                self.move(OPEN, now)
                if limits is not None:
                    self.hold = limits.hold
                change = "trial_failed"
        elif outcome == SUCCESS:
            if phase == CLOSED:
                self._clear_failures(upto)
            elif phase == HALF_OPEN:
                successes = self._count_success()
                if limits is not None and successes >= limits.success_threshold:
                    self.move(CLOSED, now)
                    change = "success_threshold"
        return self._now(now, limits, change)

    def _now(self, now: float, limits: Limits | None, change: str | None = None) -> Decision:
        open_time = 0.0 if limits is None or self.phase != OPEN else self.open_time(limits)
        return self.decision(now, open_time, change=change)

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
        generations = self._generations
        self.generation = self.generation + 1 if generations is None else next(generations)
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
        if decision.state == OPEN and decision.retry_after is not None:
            # Redis chose the open time (its streak and hold): this copy's is all of it.
            self.streak = 0
            self.hold = decision.age + decision.retry_after
        self.phase = decision.state
        self.generation = decision.generation
        self.seq = decision.seq
        self.base = decision.seq - decision.failures
        self.succ = decision.successes
