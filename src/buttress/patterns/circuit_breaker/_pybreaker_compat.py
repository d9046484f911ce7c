"""Where buttress reaches into pybreaker's internals.

This module touches pybreaker 1.4's private members (``_lock``, ``_state_storage``,
``_state``, ``_create_new_state``) and the one call site inside it that the Redis storage must
recognise (:func:`noticing_a_close`); the breaker (``_breaker.py``) also redefines ``_lock``,
``_state``, ``_listeners`` and ``_excluded_exceptions`` as views of its own attributes, made when
first needed. ``tests/patterns/test_pybreaker_contract.py`` checks each of
them against the installed pybreaker, and :func:`incompatibilities` runs the structural part of it
when this module is imported. Why each is needed: ``docs/internals.md`` (The reach into pybreaker).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import threading
from collections.abc import Callable, Iterable, Sequence

import pybreaker

__all__ = [
    "SUPPORTED_VERSIONS",
    "CompatBreaker",
    "incompatibilities",
    "noticing_a_close",
]

# The range pyproject.toml pins; a newer pybreaker may move the members listed above.
SUPPORTED_VERSIONS = ((1, 4), (1, 5))  # >= first, < second


class CompatBreaker(pybreaker.CircuitBreaker):
    """A ``pybreaker.CircuitBreaker`` opened up just enough for a lock-free caller."""

    def __init__(
        self,
        *,
        name: str,
        fail_max: int,
        reset_timeout: float,
        success_threshold: int,
        exclude: Iterable[type[BaseException] | Callable[[BaseException], bool]],
        listeners: Sequence[pybreaker.CircuitBreakerListener],
        state_storage: pybreaker.CircuitBreakerStorage | None,
    ) -> None:
        super().__init__(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            exclude=list(exclude),
            listeners=listeners,
            state_storage=state_storage,
            name=name,
            # buttress never raises CircuitBreakerError: the tripping call raises its own error.
            throw_new_error_on_trip=False,
        )

    @property
    def lock(self) -> threading.RLock:
        """pybreaker's own lock: held only for bookkeeping, never around the protected call."""
        return self._lock

    @property
    def storage(self) -> pybreaker.CircuitBreakerStorage:
        """The state storage this breaker reads and writes."""
        return self._state_storage

    @property
    def state(self) -> pybreaker.CBStateType:
        """pybreaker's state object for the current state (``.name``: closed, open, half-open).

        Unlike pybreaker's, reading it has no side effects.
        """
        return self._state

    @state.setter
    def state(self, state_str: str) -> None:
        # pybreaker's public meaning of ``breaker.state = "open"`` is a manual transition.
        moves = {
            pybreaker.STATE_CLOSED: self.close,
            pybreaker.STATE_OPEN: self.open,
            pybreaker.STATE_HALF_OPEN: self.half_open,
        }
        try:
            move = moves[state_str]
        except KeyError:
            raise ValueError(
                f"unknown state {state_str!r}, valid states: {', '.join(moves)}"
            ) from None
        move()

    def _show_state(
        self, name: str
    ) -> tuple[pybreaker.CircuitBreakerState, pybreaker.CircuitBreakerState] | None:
        """Make ``breaker.state`` report ``name``; the caller holds the lock.

        Returns ``(old, new)`` state objects for the listeners when the name changed, else None.
        """
        old = self._state
        if old.name == name:
            return None
        new = self._create_new_state(name, prev_state=old, notify=False)
        self._state = new
        return old, new


# The one caller of a storage's reset_counter() that does not report a success (pybreaker 1.4).
_CLOSED_STATE_INIT = pybreaker.CircuitClosedState.__init__.__code__


def noticing_a_close() -> bool:
    """Whether the storage method that asks was called by pybreaker's closed state constructor.

    pybreaker resets the failure counter whenever it builds a ``CircuitClosedState``, including
    when it merely notices that a shared storage says closed; a storage asks this from
    ``reset_counter()`` to tell that call from a success's.
    """
    # Frame 0 is this function, 1 the storage method, 2 its caller.
    return sys._getframe(2).f_code is _CLOSED_STATE_INIT


def _version() -> tuple[int, ...]:
    raw = importlib.metadata.version("pybreaker")
    return tuple(int(part) for part in raw.split(".")[:2] if part.isdigit())


def incompatibilities() -> list[str]:
    """What the installed pybreaker lacks of what :class:`CompatBreaker` relies on (empty: fine)."""
    problems: list[str] = []
    low, high = SUPPORTED_VERSIONS
    version = _version()
    if not low <= version < high:
        problems.append(
            f"pybreaker {importlib.metadata.version('pybreaker')} is outside the supported range "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        )
    problems.extend(
        f"pybreaker.{state} is gone"
        for state in ("STATE_CLOSED", "STATE_OPEN", "STATE_HALF_OPEN")
        if not hasattr(pybreaker, state)
    )
    create = getattr(pybreaker.CircuitBreaker, "_create_new_state", None)
    if create is None:
        problems.append("CircuitBreaker._create_new_state is gone")
    elif not {"new_state", "prev_state", "notify"} <= set(inspect.signature(create).parameters):
        problems.append(
            "CircuitBreaker._create_new_state no longer takes (new_state, prev_state, notify): "
            f"{inspect.signature(create)}"
        )
    try:
        probe = pybreaker.CircuitBreaker()
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return [*problems, f"CircuitBreaker() cannot be built: {exc!r}"]
    lock = getattr(probe, "_lock", None)
    if not (callable(getattr(lock, "acquire", None)) and callable(getattr(lock, "release", None))):
        problems.append("CircuitBreaker()._lock is not a lock")
    if not isinstance(getattr(probe, "_state_storage", None), pybreaker.CircuitBreakerStorage):
        problems.append("CircuitBreaker()._state_storage is not a CircuitBreakerStorage")
    if not isinstance(getattr(probe, "_state", None), pybreaker.CircuitBreakerState):
        problems.append("CircuitBreaker()._state is not a CircuitBreakerState")
    return problems


_problems = incompatibilities()
if _problems:
    raise ImportError(
        "buttress's circuit breaker cannot adapt the installed pybreaker: "
        + "; ".join(_problems)
        + ". Install pybreaker>=1.4,<1.5 (the range buttress is tested with)."
    )
