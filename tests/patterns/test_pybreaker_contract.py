"""What buttress relies on inside pybreaker (see ``patterns/circuit_breaker/_pybreaker_compat.py``).

If one of these fails after a pybreaker upgrade, the message names the assumption that broke;
fix ``CompatBreaker`` (the only class that touches pybreaker's internals), then the pin in
``pyproject.toml`` and ``SUPPORTED_VERSIONS``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import threading
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pybreaker
import pytest

from buttress.patterns.circuit_breaker import CircuitBreaker, CircuitBreakerOptions
from buttress.patterns.circuit_breaker._pybreaker_compat import (
    SUPPORTED_VERSIONS,
    incompatibilities,
    noticing_a_close,
)

ROOT = Path(__file__).resolve().parents[2]

# The instance attributes pybreaker 1.4's CircuitBreaker sets. buttress's subclass adds its own
# (``_phase``, ``_override``, ``_generation``, ...) and must never reuse one of these names.
PYBREAKER_ATTRIBUTES = {
    "_excluded_exceptions",
    "_fail_max",
    "_listeners",
    "_lock",
    "_name",
    "_reset_timeout",
    "_state",
    "_state_storage",
    "_success_threshold",
    "_throw_new_error_on_trip",
}


class Recorder(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def before_call(self, cb: Any, func: Any, *args: Any, **kwargs: Any) -> None:
        self.seen.append("before_call")

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.seen.append("failure")

    def success(self, cb: Any) -> None:
        self.seen.append("success")

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.seen.append("state_change")


def test_the_installed_pybreaker_has_everything_buttress_reaches_into():
    problems = incompatibilities()
    assert problems == [], "pybreaker changed under buttress: " + "; ".join(problems)


def test_the_supported_range_is_the_one_pyproject_pins():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("pybreaker")]
    (low, high) = (".".join(map(str, v)) for v in SUPPORTED_VERSIONS)
    assert pins == [f"pybreaker>={low},<{high}"], (
        f"pyproject pins {pins}, but _pybreaker_compat.SUPPORTED_VERSIONS says >={low},<{high}"
    )
    installed = importlib.metadata.version("pybreaker")
    assert tuple(int(p) for p in installed.split(".")[:2]) >= SUPPORTED_VERSIONS[0]


def test_pybreaker_sets_the_known_instance_attributes():
    attributes = set(vars(pybreaker.CircuitBreaker()))
    assert attributes == PYBREAKER_ATTRIBUTES, (
        "pybreaker.CircuitBreaker's instance attributes changed "
        f"(new: {sorted(attributes - PYBREAKER_ATTRIBUTES)}, "
        f"gone: {sorted(PYBREAKER_ATTRIBUTES - attributes)}): check that CompatBreaker's use of "
        "_lock/_state/_state_storage still holds and no buttress attribute collides"
    )


def test_buttress_attributes_leave_pybreakers_meaning_intact():
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    listener = Recorder()
    cb = CircuitBreaker(
        "svc",
        CircuitBreakerOptions(fail_max=4, timeout=7, success_threshold=2, exclude=(KeyError,)),
        state_storage=storage,
        listeners=[listener],
    )
    assert (cb._fail_max, cb._reset_timeout, cb._success_threshold) == (4, 7, 2)
    assert cb._excluded_exceptions == [KeyError]
    assert cb._listeners == [listener]
    assert cb._name == "svc"
    assert cb._state_storage is storage
    assert cb._throw_new_error_on_trip is False
    assert isinstance(cb._state, pybreaker.CircuitClosedState)
    assert (cb.fail_max, cb.reset_timeout, cb.success_threshold, cb.name) == (4, 7, 2, "svc")


def test_constructing_fires_no_listener_and_leaves_the_storage_counters_alone():
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    storage.increment_counter()
    storage.increment_counter()
    storage.increment_success_counter()
    listener = Recorder()
    CircuitBreaker("svc", state_storage=storage, listeners=[listener])
    assert (storage.counter, storage.success_counter, listener.seen) == (2, 1, [])


def test_the_lock_is_reentrant_and_guards_pybreakers_public_methods():
    cb = pybreaker.CircuitBreaker()
    assert cb._lock.acquire(blocking=False)
    assert cb._lock.acquire(blocking=False), "CircuitBreaker._lock is no longer reentrant"
    cb._lock.release()
    added = threading.Event()

    def add() -> None:
        cb.add_listener(Recorder())
        added.set()

    thread = threading.Thread(target=add)
    thread.start()
    assert not added.wait(0.05), "add_listener no longer takes CircuitBreaker._lock"
    cb._lock.release()
    assert added.wait(5)
    thread.join()


def test_create_new_state_without_notify_has_no_side_effects():
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    storage.increment_counter()
    storage.increment_success_counter()
    listener = Recorder()
    cb = pybreaker.CircuitBreaker(state_storage=storage, listeners=[listener])
    for name, kind in [
        (pybreaker.STATE_OPEN, pybreaker.CircuitOpenState),
        (pybreaker.STATE_HALF_OPEN, pybreaker.CircuitHalfOpenState),
        (pybreaker.STATE_CLOSED, pybreaker.CircuitClosedState),
    ]:
        state = cb._create_new_state(name, prev_state=cb._state, notify=False)
        assert isinstance(state, kind)
        assert state.name == name
    assert (storage.counter, storage.success_counter, storage.state) == (1, 1, "closed"), (
        "_create_new_state(notify=False) now touches the storage"
    )
    assert listener.seen == [], "_create_new_state(notify=False) now calls listeners"


def test_state_names_are_the_ones_buttress_maps():
    assert (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN) == (
        "closed",
        "open",
        "half-open",
    )


def test_the_storage_interface_buttress_uses():
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    assert isinstance(storage, pybreaker.CircuitBreakerStorage)
    storage.state = pybreaker.STATE_OPEN
    storage.increment_counter()
    storage.increment_success_counter()
    opened = datetime(2026, 1, 1, tzinfo=UTC)
    storage.opened_at = opened
    assert (storage.state, storage.counter, storage.success_counter) == ("open", 1, 1)
    assert storage.opened_at == opened
    storage.reset_counter()
    storage.reset_success_counter()
    assert (storage.counter, storage.success_counter) == (0, 0)
    assert type(pybreaker.CircuitBreaker()._state_storage) is pybreaker.CircuitMemoryStorage


class _AskingStorage(pybreaker.CircuitMemoryStorage):
    """Records, on each reset_counter(), whether pybreaker's closed state constructor called it."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.asked: list[bool] = []

    def reset_counter(self) -> None:
        self.asked.append(noticing_a_close())
        super().reset_counter()


def test_the_closed_state_constructor_is_the_caller_the_redis_storage_recognises():
    # The Redis storage ignores the reset_counter() pybreaker makes when it builds a closed state
    # (it only noticed a close; it is not a success), telling it apart by the calling frame.
    storage = _AskingStorage()
    breaker = pybreaker.CircuitBreaker(state_storage=storage)
    breaker.close()  # builds CircuitClosedState(notify=True), as noticing a shared close does
    assert storage.asked == [True], "CircuitClosedState() no longer resets the counter itself"
    storage.asked.clear()
    breaker.call(lambda: None)  # a success resets the counter from elsewhere
    assert storage.asked == [False]
    storage.reset_counter()
    assert storage.asked == [False, False]


def test_the_listener_interface_buttress_calls():
    expected = {
        "before_call": ["self", "cb", "func", "args", "kwargs"],
        "failure": ["self", "cb", "exc"],
        "success": ["self", "cb"],
        "state_change": ["self", "cb", "old_state", "new_state"],
    }
    for method, parameters in expected.items():
        signature = inspect.signature(getattr(pybreaker.CircuitBreakerListener, method))
        assert list(signature.parameters) == parameters, (
            f"CircuitBreakerListener.{method} is now {signature}"
        )


def test_public_setters_and_listener_registry_buttress_uses():
    cb = pybreaker.CircuitBreaker()
    cb.fail_max, cb.reset_timeout, cb.success_threshold = 9, 3.5, 4
    assert (cb.fail_max, cb.reset_timeout, cb.success_threshold) == (9, 3.5, 4)
    listener = Recorder()
    cb.add_listener(listener)
    assert cb.listeners == (listener,)
    cb.add_excluded_exception(KeyError)
    assert cb.excluded_exceptions == (KeyError,)
    cb.remove_excluded_exception(KeyError)
    assert cb.excluded_exceptions == ()


def test_incompatibilities_name_what_broke(monkeypatch):
    monkeypatch.delattr(pybreaker.CircuitBreaker, "_create_new_state")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.5.0")
    problems = incompatibilities()
    assert "CircuitBreaker._create_new_state is gone" in problems
    assert "pybreaker 1.5.0 is outside the supported range >=1.4,<1.5" in problems


def test_importing_buttress_with_an_incompatible_pybreaker_fails_loudly():
    script = (
        "import pybreaker\n"
        "del pybreaker.CircuitBreaker._create_new_state\n"
        "import buttress.patterns.circuit_breaker._pybreaker_compat\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode != 0
    assert "ImportError: buttress's circuit breaker cannot adapt the installed pybreaker" in (
        result.stderr
    )
    assert "CircuitBreaker._create_new_state is gone" in result.stderr
    assert "Install pybreaker>=1.4,<1.5" in result.stderr


@pytest.mark.parametrize("name", ["_lock", "_state", "_state_storage"])
def test_compat_class_exposes_the_internals_under_public_names(name):
    cb = CircuitBreaker("svc")
    public = {"_lock": cb.lock, "_state": cb.state, "_state_storage": cb.storage}
    assert public[name] is getattr(cb, name)


class _Down(Exception):
    pass


def _fail() -> None:
    raise _Down("down")


def test_fail_counter_counts_like_pybreakers_through_a_failed_trial(clock):
    # pybreaker counts every failure, the failed half-open trial included (its _handle_error
    # increments before on_failure re-opens), and keeps the count while open. With
    # reset_timeout=0 pybreaker's next call after a trip is a trial; ours waits out timeout.
    theirs = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=0, throw_new_error_on_trip=False)
    ours = CircuitBreaker("svc", CircuitBreakerOptions(fail_max=2, timeout=1))
    counts: list[tuple[int, int]] = []
    for _ in range(3):
        with pytest.raises(_Down):
            theirs.call(_fail)
        with pytest.raises(_Down):
            ours.call(_fail)
        counts.append((theirs.fail_counter, ours.fail_counter))
        clock.advance(1)
    assert counts == [(1, 1), (2, 2), (3, 3)]
    assert (theirs.current_state, ours.current_state) == ("open", "open")
