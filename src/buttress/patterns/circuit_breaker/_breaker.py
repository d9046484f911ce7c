"""The pybreaker-facing breaker, and the strategy that puts it in a policy's chain.

The breaker only decides (``before``, ``judge``); the drivers in ``buttress.policy`` run the call
and perform the effects (asking Redis) for threads and tasks alike.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import itertools
import math
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar, Final, TypedDict, TypeVar, cast

import pybreaker

from buttress import _clock, events
from buttress.events import CallRejected, CircuitCallRecorded
from buttress.exceptions import CircuitOpenError, RejectedError
from buttress.patterns import _transient
from buttress.patterns._base import DRIVERS, BuildContext, Call, Effect
from buttress.patterns.circuit_breaker import redis_storage
from buttress.patterns.circuit_breaker._machine import Decision, Limits, Machine
from buttress.patterns.circuit_breaker._options import PATTERN, CircuitBreakerOptions
from buttress.patterns.circuit_breaker._pybreaker_compat import CompatBreaker
from buttress.patterns.circuit_breaker._states import (
    CLOSED,
    DISABLED,
    FAILURE,
    FORCED_CLOSED,
    FORCED_OPEN,
    FROM_PYBREAKER,
    HALF_OPEN,
    IGNORED,
    OPEN,
    SUCCESS,
    TO_PYBREAKER,
)
from buttress.patterns.circuit_breaker._window import CountWindow, Window
from buttress.patterns.circuit_breaker.redis_storage import SharedStateStorage

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerStrategy",
    "CircuitSnapshot",
    "FailedResult",
    "build",
]

T = TypeVar("T")


# Admission tokens: ``generation << 1 | is_trial`` for a call whose outcome counts; the negative
# values mark calls whose outcome must not touch the state.
_BYPASS: Final = -1  # disabled: not even an event
_UNCOUNTED: Final = -2  # shadow mode let through a call it would have rejected: event only
# The state is in Redis: the caller takes the shared path (admission decided by the storage).
_REROUTE: Final = -3

# A shared call's ticket: the storage's admission, and this breaker's generation at that moment.
_Ticket = tuple[Decision, int]


# A shared call's token: its ticket (None: a call shadow mode let through although it was not
# admitted) and the storage that admitted it. A tuple, not an int: how judge() tells it apart.
_SharedCall = tuple[_Ticket | None, SharedStateStorage]

# ``_open_until`` values: no lock-free rejection / rejected until a manual change (forced open).
_NEVER = -math.inf
_FOREVER = math.inf

# Numbers the requests of every breaker to its shared storage, in the order they are sent (one
# counter for all: the numbers of each breaker still increase, which is all _is_news needs).
_ASKED = itertools.count(1)
# Guards each breaker's ``_delivering`` flag (held for a test and a flip, never while delivering),
# and the making of its outbox: one lock for every breaker rather than one each.
_DELIVERY = threading.Lock()
# Guards the making of a breaker's own lock, on its first use (see CircuitBreaker.lock).
_MAKING_LOCK = threading.Lock()

# An event waiting in a breaker's outbox: the handlers, and the event.
_Queued = tuple[tuple[events.Handler, ...], Any]


class CircuitSnapshot(TypedDict):
    """One circuit as health checks see it."""

    service: str
    state: str  # closed | open | half_open | forced_open | forced_closed | disabled
    failures: int  # consecutive failures counted towards fail_max
    successes: int  # half-open successes counted towards success_threshold
    trials_in_flight: int
    seconds_left_open: float | None  # open: time until the next trial; None once it has come
    failure_rate: float | None  # over the window; None when no rate threshold is configured
    slow_call_rate: float | None


# --- pybreaker listeners, delivered through the event hub's guard ---------------------------------
# A listener that raises must never lose the caller's result (pybreaker does not guard them), so
# each listener method becomes a stable handler for events.dispatch, which logs a failing one once.


class _StateChangeHook:
    __slots__ = ("breaker", "listener")

    def __init__(self, listener: pybreaker.CircuitBreakerListener, cb: CircuitBreaker) -> None:
        self.listener = listener
        self.breaker = cb

    def __call__(
        self, change: tuple[pybreaker.CircuitBreakerState, pybreaker.CircuitBreakerState]
    ) -> None:
        self.listener.state_change(self.breaker, *change)


class _BeforeCallHook:
    __slots__ = ("breaker", "listener")

    def __init__(self, listener: pybreaker.CircuitBreakerListener, cb: CircuitBreaker) -> None:
        self.listener = listener
        self.breaker = cb

    def __call__(self, call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]) -> None:
        func, args, kwargs = call
        self.listener.before_call(self.breaker, func, *args, **kwargs)


class FailedResult(Exception):  # noqa: N818 - it names what failed: a result, not an error
    """A returned value that ``failure_on_result`` counts as a failure. Never raised.

    pybreaker listeners get it in ``failure(cb, exc)``; ``value`` is the value (which the caller
    still gets), and its name is the ``error_type`` label of the failure.
    """

    def __init__(self, value: Any) -> None:
        super().__init__("the result counts as a failure")
        self.value = value


# Equal limits are one object, whichever breaker has them (most services share a configuration);
# up to _INTERNED distinct ones, past which each breaker keeps its own.
_LIMITS: dict[Limits, Limits] = {}
_INTERNED: Final = 1024


def _limits(opts: CircuitBreakerOptions) -> Limits:
    limits = Limits(
        opts.fail_max,
        opts.timeout,
        opts.success_threshold,
        opts.half_open_max_calls,
        opts.open_backoff,
        opts.open_cap,
    )
    if len(_LIMITS) >= _INTERNED:
        return _LIMITS.get(limits, limits)
    return _LIMITS.setdefault(limits, limits)


_THROTTLED: Final = frozenset({429, "RESOURCE_EXHAUSTED"})


def _throttled(exc: Exception) -> bool:
    """Whether ``exc`` says "too many requests": HTTP 429 or gRPC RESOURCE_EXHAUSTED.

    The errors of httpx, requests and aiohttp, an integration's ``FailedResponse`` (status 429
    or ``"RESOURCE_EXHAUSTED"``), a gRPC error, or any exception with a ``status_code`` or
    ``status`` of 429 (the API SDKs built on them carry one).
    """
    try:
        status: object = _transient.http_status(exc)
        if status is None:
            status = getattr(exc, "status_code", None)
            if status is None:
                status = getattr(exc, "status", None)
                if status is None:
                    status = _transient.grpc_code(exc)
    except Exception:  # noqa: BLE001 - a strange attribute is not a 429; the call's error stands
        return False
    return status in _THROTTLED


def _exclusions(
    excluded: Sequence[object],
) -> tuple[tuple[type, ...], tuple[Callable[[BaseException], object], ...]]:
    # isinstance(x, type) holds for classes with a custom metaclass (ABCMeta) too; pybreaker's
    # ``type(x) is type`` does not, and then calls the class as a predicate, excluding everything.
    types: list[type] = []
    predicates: list[Callable[[BaseException], object]] = []
    for item in excluded:
        if isinstance(item, type):
            types.append(item)
        elif callable(item):
            predicates.append(item)
    return tuple(types), tuple(predicates)


_Excluding = tuple[tuple[type, ...], tuple[Callable[[BaseException], object], ...], bool]
# A breaker that excludes nothing (most) shares one of these.
_NOTHING_EXCLUDED: Final[dict[bool, _Excluding]] = {False: ((), (), False), True: ((), (), True)}


def _excluding(excluded: Sequence[object], count_throttled: bool) -> _Excluding:
    """What is_system_error() excludes: (types, predicates, whether a 429 counts)."""
    types, predicates = _exclusions(excluded)
    if not types and not predicates:
        return _NOTHING_EXCLUDED[bool(count_throttled)]
    return types, predicates, count_throttled


class _StoredMachine(Machine):
    """The state machine with its counters in a pybreaker storage, where pybreaker's readers
    (``fail_counter``, a storage shared with other breakers) find them.

    Only the counting differs from :class:`Machine`: a success clears every failure
    (pybreaker's rule), and each transition is written to the storage.

    It also holds the breaker's own state that no call on a fast path reads (overrides, the
    shared circuit's bookkeeping, the direct steps): in slots here, because the breaker's
    instance dictionary is pybreaker's and stays small only while it has few keys (see
    :class:`CircuitBreaker`).
    """

    __slots__ = (
        "adopted_at",
        "async_step",
        "change_hooks",
        "failure_hooks",
        "fleet_override",
        "label_since",
        "override",
        "override_until",
        "seen_generation",
        "shared",
        "store",
        "sync_step",
    )

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.store: pybreaker.CircuitBreakerStorage = pybreaker.CircuitMemoryStorage(
            pybreaker.STATE_CLOSED
        )
        # The storage decides for other processes too (Redis, or a storage given by the user).
        self.shared = False
        self.override: str | None = None  # sits on top of the machine's phase
        # When a timed override of this process ends (monotonic), None: until a manual change.
        self.override_until: float | None = None
        # A fleet-wide override (in Redis, with a TTL), as the last shared decision said.
        self.fleet_override: str | None = None
        self.seen_generation: int | None = None  # of the last shared decision adopted
        self.adopted_at = 0  # the number of the request that decision answered
        self.label_since = now  # when the current state (as labelled) began
        # The drivers' steps for call() and acall(), linked on first use.
        self.sync_step: Any = None
        self.async_step: Any = None
        # pybreaker listeners' failure and state-change hooks (see _refresh_listeners).
        self.failure_hooks: tuple[Any, ...] = ()
        self.change_hooks: tuple[Any, ...] = ()

    @property
    def failures(self) -> int:
        return self.store.counter

    @property
    def successes(self) -> int:
        return self.store.success_counter

    def _count_failure(self) -> int:
        self.store.increment_counter()
        return self.store.counter

    def _clear_failures(self, upto: int | None) -> None:
        if self.store.counter:
            self.store.reset_counter()

    def _count_success(self) -> int:
        self.store.increment_success_counter()
        return self.store.success_counter

    def _entered(self, phase: str) -> None:
        self.save(phase, _wall_datetime() if phase == OPEN else None)

    def save(self, phase: str, opened_at: dt.datetime | None) -> None:
        """Write ``phase`` (opened at ``opened_at`` on the wall clock) to the storage."""
        store = self.store
        if opened_at is not None:
            store.opened_at = opened_at
        if phase == CLOSED:
            store.reset_counter()
        store.reset_success_counter()
        store.state = TO_PYBREAKER[phase]


# The rejections' recorder of a breaker that has not rejected yet: it records nothing.
_NOT_REJECTING: Final = events.Recorder(CallRejected, "")

_MESSAGES: Final = {
    "open": "circuit of {!r} is open",
    "half_open_full": "circuit of {!r} is half-open and its trial calls are taken",
    "forced_open": "circuit of {!r} is forced open",
}


def _messages(service: str) -> dict[str, str]:
    """The messages of a breaker's rejections (``CircuitOpenError``), by reason."""
    return {reason: message.format(service) for reason, message in _MESSAGES.items()}


class _Unmade(dict[str, str]):
    """The rejection messages of every breaker that has not rejected yet: none, shared.

    A closed breaker holds this one empty dict rather than three strings of its own (≈ 0.3 KB
    less per service); ``_may_reject`` swaps in the breaker's plain dict (:func:`_messages`)
    before it publishes a state that rejects, so every rejection path reads a plain instance
    attribute and a plain dict (no descriptor: a class attribute of that name would keep
    CPython from specialising the read). Only a rejection that got past that order would miss
    here; it gets the message without the service's name rather than an error of its own.
    """

    __slots__ = ()

    def __missing__(self, reason: str) -> str:
        return _MESSAGES[reason].format("this service")

    def __setitem__(self, key: str, value: str) -> None:
        raise TypeError("the shared unmade messages are read-only")


_UNMADE: Final = _Unmade()


class _Limit:
    """pybreaker's own copy of one limit (``_fail_max``...): a view of the breaker's ``_limits``.

    pybreaker's constructor stores them; the breaker keeps them in ``_limits`` (every decision
    reads them there), so no instance holds a second copy.
    """

    __slots__ = ("field",)

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, cb: CircuitBreaker | None, owner: type | None = None) -> Any:
        return self if cb is None else getattr(cb._limits, self.field)

    def __set__(self, cb: CircuitBreaker, value: Any) -> None:
        if getattr(cb._limits, self.field) != value:
            cb._limits = cb._limits._replace(**{self.field: value})


class CircuitBreaker(CompatBreaker):
    """The shared breaker of one service: lock-free calls over pybreaker's state and storage.

    Args:
        service: the service name (events, errors, registry key, Redis keys).
        options: the breaker's options; ``reconfigure()`` swaps them in place.
        state_storage: any ``pybreaker.CircuitBreakerStorage``. Default: the Redis of
            ``options.state_url`` when set (:func:`redis_storage.make_storage`), else in memory.
        listeners: ``pybreaker.CircuitBreakerListener`` objects; more via ``add_listener``.

    Raises:
        ConfigurationError: ``state_url`` is set but the ``redis`` package is missing.

    Memory: an instance of at most 29 attributes keeps them in a compact array of values whose
    keys all instances share; one more and it gets a dictionary of its own, ≈ 1.3 KB more per
    service (CPython 3.11). pybreaker's attributes count too, so what no fast path reads
    lives in slots of ``_m`` (overrides, the shared circuit's bookkeeping), and pybreaker's copies
    of the limits are views of ``_limits`` (``tests/test_scale.py`` checks the size).
    """

    # pybreaker's constructor sets these; the limits live in _limits, and buttress never raises
    # CircuitBreakerError (open() returns False), so none is an instance attribute.
    _fail_max = _Limit("fail_max")
    _reset_timeout = _Limit("reset_timeout")
    _success_threshold = _Limit("success_threshold")
    _throw_new_error_on_trip = property(lambda _: False, lambda _, __: None)

    # pybreaker's lock and lists, made when first needed: a closed circuit that never fails
    # takes no lock, and most breakers have no listener and exclude nothing (≈ 0.2 KB less per
    # service). pybreaker's constructor sets all three; each is a view of an attribute of the
    # breaker's own (no more attributes than pybreaker's three).
    _rlock: threading.RLock | None

    @property
    def lock(self) -> threading.RLock:
        """pybreaker's own lock (``_lock``), made on first use; held only for bookkeeping,
        never around the protected call."""
        lock = self._rlock
        if lock is None:
            with _MAKING_LOCK:
                lock = self._rlock
                if lock is None:
                    lock = self._rlock = threading.RLock()
        return lock

    def _set_lock(self, lock: threading.RLock) -> None:
        self._rlock = lock

    _lock = property(lambda self: self.lock, _set_lock)

    # pybreaker's state object (``_state``, what ``state`` returns): its name (pybreaker's
    # STATE_* string) until somebody reads it, then the object (see _show_state).
    _shown: pybreaker.CircuitBreakerState | str

    def _get_state(self) -> pybreaker.CircuitBreakerState:
        shown = self._shown
        if shown.__class__ is str:
            # Under the breaker's lock, which _show_state holds: a state change is never lost.
            with self.lock:
                shown = self._shown
                if isinstance(shown, str):
                    shown = self._shown = self._create_new_state(shown, notify=False)
        return cast("pybreaker.CircuitBreakerState", shown)

    def _set_state(self, state: pybreaker.CircuitBreakerState) -> None:
        self._shown = state

    _state = property(_get_state, _set_state)

    def _show_state(
        self, name: str
    ) -> tuple[pybreaker.CircuitBreakerState, pybreaker.CircuitBreakerState] | None:
        """Make ``breaker.state`` report ``name``; the caller holds the lock.

        Returns ``(old, new)`` state objects for the listeners when the name changed and there
        are listeners, else None (and only the name is kept until ``state`` is read).
        """
        old = self._shown
        if (old if isinstance(old, str) else old.name) == name:
            return None
        if not self._m.change_hooks:
            self._shown = name
            return None
        if isinstance(old, str):
            old = self._create_new_state(old, notify=False)
        new = self._create_new_state(name, prev_state=old, notify=False)
        self._shown = new
        return old, new

    # The lists: the empty tuple while empty, a list from the first add on (which pybreaker's
    # add_listener and add_excluded_exception append to, under the lock).
    _listening: list[pybreaker.CircuitBreakerListener] | tuple[()]
    _excluded: list[object] | tuple[()]

    def _get_listeners(self) -> list[pybreaker.CircuitBreakerListener] | tuple[()]:
        return self._listening

    def _set_listeners(self, listeners: list[pybreaker.CircuitBreakerListener]) -> None:
        self._listening = listeners or ()

    _listeners = property(_get_listeners, _set_listeners)

    def _get_excluded(self) -> list[object] | tuple[()]:
        return self._excluded

    def _set_excluded(self, excluded: list[object]) -> None:
        self._excluded = excluded or ()

    _excluded_exceptions = property(_get_excluded, _set_excluded)

    def __init__(
        self,
        service: str,
        options: CircuitBreakerOptions | None = None,
        *,
        state_storage: pybreaker.CircuitBreakerStorage | None = None,
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
    ) -> None:
        opts = options if options is not None else CircuitBreakerOptions.model_validate({})
        if state_storage is None and opts.state_url is not None:
            state_storage = redis_storage.make_storage(
                opts.state_url, service, near_ttl=opts.near_cache_ttl
            )
        remote = state_storage if isinstance(state_storage, SharedStateStorage) else None
        # Every decision of a shared circuit takes these; fail_max, reset_timeout and
        # success_threshold (pybreaker's public setters included) read and write them here.
        self._limits = _limits(opts)
        self._remote: SharedStateStorage | None = None  # read by current_state, below
        # Events decided under the lock wait here and are delivered after it is released, one
        # thread at a time and in the order they were decided (see _deliver).
        # A list, not a deque: it holds an event or two at a time, and an empty deque weighs
        # about 600 bytes more, per service. append and pop(0) are atomic under the GIL. The
        # empty tuple until the first event is queued (see _queue): most breakers never queue.
        self._outbox: list[_Queued] | tuple[()] = cast("list[_Queued] | tuple[()]", ())
        self._delivering = False  # flipped under _DELIVERY
        # The per-call events' fast paths: no event built where a subscriber bound its series.
        self._recorded = events.recorder(CircuitCallRecorded, service)
        # A rejection's, and the same rejection when it ends the call (before_final: one record
        # for both events). Made when the calls may first be rejected (see _may_reject): until
        # then one that records nothing stands in for both (most breakers never reject).
        self._rejected = _NOT_REJECTING
        self._rejected_call = _NOT_REJECTING
        super().__init__(
            name=service,
            fail_max=opts.fail_max,
            reset_timeout=opts.timeout,
            success_threshold=opts.success_threshold,
            exclude=opts.exclude,
            listeners=listeners,
            # With Redis, pybreaker's own storage is a private one in memory: the overrides,
            # which stay in this process, count there (and pybreaker's constructor reads it:
            # nothing may talk to Redis before the first call).
            state_storage=None if remote is not None else state_storage,
        )
        now = _clock.monotonic()
        self.service = service
        self.options = opts
        # The phase, generation, counters (in pybreaker's storage) and trials in flight, and
        # the state no fast path reads (overrides, the shared circuit's bookkeeping).
        self._m = _StoredMachine(now)
        self._use_storage(remote)
        self._slow_after = opts.slow_call_duration
        self._window = self._new_window(opts, now)
        self._fast_token: int | None = None
        self._open_until = _NEVER
        # What is_system_error() excludes: (types, predicates, whether a 429 counts).
        self._excluding = _excluding(self.excluded_exceptions, opts.count_throttled)
        self._failure_on_result = opts.failure_on_result
        self._refresh_listeners()
        # pybreaker's lock is made on first use (see lock): a closed circuit's calls never
        # take it, and nobody else holds this breaker yet.
        self._rlock = None
        # The rejection messages, by reason: made when the circuit first leaves the closed fast
        # path (see _may_reject); most breakers never reject.
        self._messages: dict[str, str] = _UNMADE
        shown = self._shown
        if not isinstance(shown, str):
            self._shown = shown.name  # the object is made when first read
        stored = FROM_PYBREAKER.get(self._store.state, CLOSED)
        if stored != CLOSED:
            with self.lock:
                opened_at = self._stored_opened_at(now) if stored == OPEN else now
                self._adopt(stored, "shared_state", now, opened_at)
                self._refresh_fast_paths()
        else:
            self._refresh_fast_paths()
        if self._outbox:
            self._deliver()

    # --- the per-call protocol (the strategy's before/judge, and call/acall/calling) ------------

    def admit(self, shadow: bool = False) -> int:
        """Decide whether a call may run; return its token.

        With state in Redis (``state_url``) the decision is not taken here: the token is
        ``_REROUTE`` and the caller takes the shared path (``before`` does), which asks the
        storage without holding the lock.

        Raises:
            CircuitOpenError: the circuit is open, forced open, or its trial slots are taken
                (never in shadow mode, which emits ``ShadowDecision`` and lets the call through).
        """
        token = self._fast_token
        if token is not None:
            return token
        until = self._open_until
        if until != _NEVER:
            reason, retry_after = (
                ("forced_open", None) if until == _FOREVER else ("open", until - _clock.monotonic())
            )
            if retry_after is None or retry_after > 0:
                if shadow or self._rejected.record is not None:
                    return self._reject(reason, retry_after, shadow, locked=False)
                # While open, rejecting is all the breaker does: the shortest path raises here.
                raise _open_error(self._messages[reason], self.service, retry_after)
        try:
            with self.lock:
                return self._admit_locked(shadow)
        finally:
            if self._outbox:
                self._deliver()

    def judge(
        self, token: Any, started: float, error: BaseException | None, result: Any
    ) -> Effect | None:
        """Record how a call admitted with ``token`` (by ``before``) and started at ``started``
        ended: it raised ``error``, or returned ``result``. Never raises.

        Returns:
            None, or (state in Redis) the effect that records the outcome there.
        """
        if token.__class__ is not int:
            return self._finish_shared(token, started, error, result)
        if token == _BYPASS:
            return None
        now = _clock.monotonic()
        elapsed = now - started
        slow = self._slow_after is not None and elapsed >= self._slow_after
        if error is None:
            if self._failure_on_result is None or not self._failing(result):
                # Closed, no failure to clear, no window: nothing to record, so no lock.
                if token >= 0 and (
                    token != self._fast_token or self._window is not None or self._store.counter
                ):
                    with self.lock:
                        self._record(token, SUCCESS, now, slow=slow)
                    if self._outbox:
                        self._deliver()
                record = self._recorded.record
                if (
                    record is not None
                    and self._window is None
                    and not self._success_hooks
                    and not self._outbox
                    and not self._delivering
                ):
                    # _announce's common case inline (no rates, nothing queued before it, no
                    # listener): one frame less on every successful call.
                    try:
                        record(SUCCESS, elapsed, slow, None, None, None)
                    except Exception:  # noqa: BLE001 - a subscriber must never break the call
                        events.failed(record)
                elif record is not None or self._success_hooks:
                    self._announce(SUCCESS, elapsed, None, slow)
                return None
            error = FailedResult(result)
        outcome = FAILURE if self.is_system_error(error) else IGNORED
        if outcome == FAILURE and self._m.failure_hooks:
            # pybreaker's order: the failure, then the state change it causes.
            self._publish(self._m.failure_hooks, error)
        if token >= 0:
            hold = self._hold(error) if outcome == FAILURE else 0.0
            with self.lock:
                self._record(token, outcome, now, slow=slow, hold=hold)
            if self._outbox:
                self._deliver()
        self._announce(outcome, elapsed, error, slow)
        return None

    def succeeded(self, token: Any, started: float, succeeded: events.Recorder) -> bool:
        """Judge the success of the policy's final step (the call admitted with ``token`` at
        ``started`` returned) when there is nothing to judge but that: closed with memory
        storage (``token`` is the fast token), no failure to clear, no window (so no
        slow-call duration either), no ``failure_on_result``, no listener, nothing queued. Then
        it records ``succeeded`` (the
        step's ``SucceededCall`` recorder, of this breaker's service: its
        ``CircuitCallRecorded`` and the call's ``CallFinished`` in one call; the clock is read
        only if somebody listens) and returns ``True``. Otherwise ``False``: the step calls
        :meth:`judge` and records the call as usual. (The recorder is the step's, not an
        attribute: a breaker keeps its attributes within CPython's shared-keys limit.)
        """
        if (
            token != self._fast_token
            or token < 0  # disabled: no event of the breaker's
            or self._failure_on_result is not None
            or self._window is not None
            or self._success_hooks
            or self._outbox
            or self._delivering
            or self._store.counter
        ):
            return False
        record = succeeded.record
        if record is not None:
            try:
                record(_clock.monotonic() - started)
            except Exception:  # noqa: BLE001 - a subscriber must never break the call
                events.failed(record)
        return True

    def _hold(self, error: BaseException) -> float:
        """Seconds a circuit this failure opens stays open at least: the server's Retry-After
        (``honor_retry_after``), capped at ``max_timeout``; 0 if none."""
        if not self.options.honor_retry_after:
            return 0.0
        try:
            delay = _transient.retry_after(error, _clock.wall())
        except Exception:  # noqa: BLE001 - a strange header is no delay; the failure stands
            return 0.0
        if delay is None or not delay > 0:
            return 0.0
        return min(delay, self._limits.max_timeout)

    def _failing(self, result: Any) -> bool:
        """Whether ``failure_on_result`` counts ``result`` as a failure.

        A predicate that raises is a bug in the predicate: the call returned, so it counts as
        the success it looks like, and the caller still gets its value.
        """
        predicate = self._failure_on_result
        try:
            return predicate is not None and bool(predicate(result))
        except Exception:  # noqa: BLE001 - never replace the caller's result with its error
            return False

    def on_success(self, token: int, started: float) -> None:
        """Record a call admitted with ``token`` and started at ``started`` that returned."""
        self.judge(token, started, None, None)

    def on_error(self, token: int, exc: BaseException, started: float) -> None:
        """Record a call admitted with ``token`` that raised ``exc``; never raises itself."""
        self.judge(token, started, exc, None)

    def before(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Admit a call of ``call`` with ``args`` and ``kwargs``: its token for :meth:`judge`.

        With state in Redis it returns the effect that asks Redis (and ends in the token).
        pybreaker listeners hear ``before_call(cb, call, *args, **kwargs)`` once the call is
        admitted: ``call`` is the next step of the policy's chain (an ``(args, kwargs)``
        callable), the function given to ``call``/``acall``, or ``breaker.calling`` for a
        ``calling()`` block.

        Raises:
            CircuitOpenError: the circuit is open, forced open, or its trial slots are taken.
        """
        token = self._fast_token  # admit()'s own first check, without the call
        if token is None:
            until = self._open_until
            if until != _NEVER:
                # While open, rejecting is all the breaker does: admit()'s shortest path, here,
                # so the error is raised one frame from the caller.
                retry_after = None if until == _FOREVER else until - _clock.monotonic()
                if retry_after is None or retry_after > 0:
                    reason = "open" if retry_after is not None else "forced_open"
                    record = self._rejected.record
                    if record is None:
                        raise _open_error(self._messages[reason], self.service, retry_after)
                    if self._remote is None:
                        if not self._outbox and not self._delivering:
                            # _reject's common case inline (nothing queued before it): every
                            # call comes here while the circuit is open.
                            try:
                                record(PATTERN, reason, retry_after)
                            except Exception:  # noqa: BLE001 - a subscriber must never break it
                                events.failed(record)
                            raise _open_error(self._messages[reason], self.service, retry_after)
                        self._reject(reason, retry_after, shadow=False, locked=False)
            if self._remote is not None:
                return self._admission(call, args, kwargs, shadow=False)
            token = self.admit()
            if token == _REROUTE:  # the storage changed meanwhile
                return self._admission(call, args, kwargs, shadow=False)
        if self._before_hooks and token != _BYPASS:
            self._publish(self._before_hooks, (call, args, kwargs))
        return token

    def before_final(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """:meth:`before` for a breaker whose rejection ends the call: the outermost step of a
        chain that nothing outside can answer, and that records the call's CallFinished itself
        (the policy's final step). A rejection records ``RejectedCall``: the CallRejected and
        the rejected call's CallFinished in one pre-bound call, with no catch anywhere.

        An admission that takes an effect (state in Redis) rejects when the step settles it;
        the step records that call's CallFinished then.
        """
        token = self._fast_token  # before()'s own first check: closed, it is all there is
        if token is None:
            until = self._open_until
            if until != _NEVER and self._remote is None:
                # before()'s shortest path, recording the fused kind: every call comes here
                # while the circuit is open.
                retry_after = None if until == _FOREVER else until - _clock.monotonic()
                if (retry_after is None or retry_after > 0) and not (
                    self._outbox or self._delivering
                ):
                    reason = "open" if retry_after is not None else "forced_open"
                    record = self._rejected_call.record
                    if record is not None:
                        try:
                            record(PATTERN, reason, retry_after)
                        except Exception:  # noqa: BLE001 - a subscriber must never break it
                            events.failed(record)
                    raise _open_error(self._messages[reason], self.service, retry_after)
            try:
                return self.before(call, args, kwargs)
            except RejectedError as exc:  # rarer rejections: half-open full, events queued
                self.ended(exc)
                raise
        if self._before_hooks and token != _BYPASS:
            self._publish(self._before_hooks, (call, args, kwargs))
        return token

    def ended(self, exc: RejectedError) -> None:
        """Record the CallFinished of a call that a rejection recorded as CallRejected ended."""
        record = events.recorder(events.CallFinished, self.service).record
        if record is not None:
            try:
                record("rejected", 0.0, type(exc).__name__)
            except Exception:  # noqa: BLE001 - a subscriber must never break the call
                events.failed(record)

    def before_shadow(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """:meth:`before` in shadow mode: a call it would reject runs uncounted instead."""
        return self._admission(call, args, kwargs, shadow=True)

    def _admission(
        self,
        call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        shadow: bool,
    ) -> Any:
        remote = self._remote
        if remote is None or self._m.override is not None:
            token = self.admit(shadow)
            remote = self._remote
            if token != _REROUTE or remote is None:
                if self._before_hooks and token != _BYPASS:
                    self._publish(self._before_hooks, (call, args, kwargs))
                return token
            # The storage changed meanwhile: Redis decides after all.
        # The state is in Redis: the storage decides (asking Redis is an effect), and this
        # process adopts what it learns and hands out a ticket.
        asked = next(_ASKED)  # numbered before it is sent
        shared_remote = remote

        def admitted(decision: Decision) -> _SharedCall | int:
            ticket = self._enter_shared(decision, asked, shadow=shadow)
            if decision.override == DISABLED:
                return _BYPASS  # disabled for the fleet: straight through, nothing recorded
            shared = (ticket, shared_remote)
            if self._before_hooks:
                self._publish(self._before_hooks, (call, args, kwargs))
            return shared

        return remote.admission(self._limits, admitted)

    # --- manual control ------------------------------------------------------------------------

    def force_open(self, *, ttl: float | None = None) -> None:
        """Reject every call until ``reset()`` (or ``close()``), whatever the outcomes.

        ``ttl``: for that many seconds only; with ``state_url``, for the whole fleet (see
        :meth:`_timed`), then open as after a trip (a trial probes before it closes).
        """
        if ttl is not None:
            self._timed(FORCED_OPEN, ttl)
            return
        self._manual(OPEN, FORCED_OPEN, "manual")

    def force_closed(self, *, ttl: float | None = None) -> None:
        """Admit every call until ``reset()``; outcomes are counted but never trip the circuit.

        ``ttl``: for that many seconds only; with ``state_url``, for the whole fleet.
        """
        if ttl is not None:
            self._timed(FORCED_CLOSED, ttl)
            return
        self._manual(CLOSED, FORCED_CLOSED, "manual")

    def disable(self, *, ttl: float | None = None) -> None:
        """Let every call straight through and record nothing until ``enable()`` or ``reset()``.

        ``ttl``: for that many seconds only; with ``state_url``, for the whole fleet.
        """
        if ttl is not None:
            self._timed(DISABLED, ttl)
            return
        self._manual(CLOSED, DISABLED, "manual")

    def _timed(self, override: str, ttl: float) -> None:
        """An override for ``ttl`` seconds.

        With ``state_url`` it is written to Redis with that TTL: every process obeys it (at
        once through pub/sub, within ``near_cache_ttl`` at worst) and it ends by itself, even
        if this process is gone; ``reset()``, ``enable()`` or ``close()`` in any process end
        it sooner. Without Redis (or while Redis is unreachable) it holds in this process only.

        Raises:
            ValueError: ``ttl`` is not a positive number of seconds.
        """
        seconds: object = ttl  # checked at run time for untyped callers ("5", True)
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < ttl < math.inf
        ):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        remote = self._remote
        if remote is not None:
            asked = next(_ASKED)
            decision = cast(
                "Decision", DRIVERS.settle(remote.overriding(override, ttl, self._limits))
            )
            if decision.shared:
                with self.lock:
                    old_label = self._label()
                    self._m.override = None
                    self._m.override_until = None
                    self._m.fleet_override = decision.override or None
                    if self._is_news(decision, asked):
                        self._adopt_decision(decision, "manual", asked, old_label=old_label)
                    else:
                        self._announce_state(old_label, "manual", _clock.monotonic())
                if self._outbox:
                    self._deliver()
                return
        phase = OPEN if override == FORCED_OPEN else CLOSED
        with self.lock:
            now = _clock.monotonic()
            self._move(phase, override, "manual", now)
            self._m.override_until = now + ttl
            self._refresh_fast_paths()
        if self._outbox:
            self._deliver()

    def _end_timed_override(self) -> None:
        """A timed override of this process ran out (the caller holds the lock)."""
        old_label = self._label()
        self._m.override = None
        self._m.override_until = None
        self._refresh_fast_paths()
        self._announce_state(old_label, "override_expired", _clock.monotonic())

    def _visible_override(self, now: float) -> str | None:
        """The override as health sees it: this process's unless it has run out, else the
        fleet's."""
        until = self._m.override_until
        if until is not None and now >= until:
            return self._m.fleet_override
        return self._m.override or self._m.fleet_override

    def _label(self) -> str:
        """The state as labelled: an override (this process's, then the fleet's), or the phase."""
        return self._m.override or self._m.fleet_override or self._m.phase

    def enable(self) -> None:
        """Undo ``disable()``: back to closed with fresh counters (no effect unless disabled);
        a fleet-wide ``disable(ttl=...)`` ends for every process."""
        if self._m.fleet_override == DISABLED:
            self._end_fleet_override("manual")
        with self.lock:
            if self._m.override == DISABLED:
                self._move(CLOSED, None, "manual", _clock.monotonic())
        if self._outbox:
            self._deliver()

    def _end_fleet_override(self, reason: str) -> None:
        """End the fleet-wide override in Redis: closed, fresh counters, for every process."""
        remote = self._remote
        if remote is None:
            return
        asked = next(_ASKED)
        decision = cast("Decision", DRIVERS.settle(remote.overriding("", 0.0, self._limits)))
        if decision.shared:
            with self.lock:
                old_label = self._label()
                self._m.fleet_override = None
                if self._is_news(decision, asked):
                    self._adopt_decision(decision, reason, asked, old_label=old_label)
            if self._outbox:
                self._deliver()

    def reset(self) -> None:
        """Closed, with every counter and the rate window cleared; ends any override."""
        self._manual(CLOSED, None, "reset")

    def open(self) -> bool:
        """Trip now: open for ``timeout`` seconds, then half-open as usual (pybreaker's ``open``).

        Returns:
            False: buttress never raises pybreaker's ``CircuitBreakerError`` (pybreaker returns
            whether it would).
        """
        self._manual(OPEN, None, "manual")
        return False

    def half_open(self) -> None:
        """Half-open now: the next calls are trials (pybreaker's ``half_open``)."""
        self._manual(HALF_OPEN, None, "manual")

    def close(self) -> None:
        """Close now, clearing the counters (pybreaker's ``close``); ends any override."""
        self._manual(CLOSED, None, "manual")

    # --- options -------------------------------------------------------------------------------

    def reconfigure(self, options: CircuitBreakerOptions) -> None:
        """Adopt new options, keeping the state (an open circuit stays open, counted failures
        stay counted). A changed ``window``, ``window_seconds`` or ``window_size`` starts an
        empty window.

        A changed ``state_url`` swaps the storage: a new Redis is asked from the next call on
        (its state is adopted then); with no URL any more, the breaker goes on in memory from
        the state it last knew. Calls in flight record their outcome where they were admitted.

        Raises:
            ConfigurationError: a new ``state_url`` needs the ``redis`` package, which is missing
                (the breaker is left as it was).
        """
        previous = self.options
        swap = options.state_url != previous.state_url
        new_remote = None
        if swap and options.state_url is not None:
            new_remote = redis_storage.make_storage(
                options.state_url, self.service, near_ttl=options.near_cache_ttl
            )
        retired = None
        with self.lock:
            self.options = options
            self._limits = _limits(options)
            if swap:
                retired = self._remote
                self._use_storage(new_remote)
                self._m.seen_generation = None
                self._m.fleet_override = None
                if retired is not None and not self._m.shared:
                    # Back in memory, from the state this process last knew.
                    self._m.save(self._m.phase, self._opened_wall())
            if self._remote is not None:
                self._remote.near_ttl = options.near_cache_ttl
            self._slow_after = options.slow_call_duration
            self._failure_on_result = options.failure_on_result
            if options.exclude != previous.exclude:
                for old in self.excluded_exceptions:
                    super().remove_excluded_exception(old)  # type: ignore[arg-type,type-var]
                for new in options.exclude:
                    super().add_excluded_exception(new)  # type: ignore[arg-type,type-var]
            self._excluding = _excluding(self.excluded_exceptions, options.count_throttled)
            if (
                self._window is None
                or options.window != previous.window
                or options.window_seconds != previous.window_seconds
                or options.window_size != previous.window_size
            ):
                self._window = self._new_window(options, _clock.monotonic())
            elif (
                options.failure_rate_threshold is None and options.slow_call_rate_threshold is None
            ):
                self._window = None
            self._refresh_fast_paths()
        if retired is not None:
            retired.retire()

    # --- pybreaker's public readers and limits, also for a circuit kept in Redis ----------------

    @property
    def storage(self) -> pybreaker.CircuitBreakerStorage:
        """The storage that decides: the Redis one with ``state_url``, else pybreaker's own."""
        remote = self._remote
        return remote if remote is not None else super().storage

    @property
    def current_state(self) -> str:
        """pybreaker's state name (closed, open, half-open); in Redis: as last seen, no request."""
        if self._remote is not None:
            return self.state.name
        return super().current_state

    @property
    def fail_counter(self) -> int:
        """Consecutive failures towards ``fail_max``; in Redis: the fleet's, as last seen."""
        remote = self._remote
        if remote is not None and self._m.override is None:
            return remote.last_known().failures
        return self._store.counter

    @property
    def success_counter(self) -> int:
        """Half-open successes towards ``success_threshold``; in Redis: as last seen."""
        remote = self._remote
        if remote is not None and self._m.override is None:
            return remote.last_known().successes
        return self._store.success_counter

    @property
    def fail_max(self) -> int:
        """Consecutive failures that open the circuit (pybreaker's setter works)."""
        return self._limits.fail_max

    @fail_max.setter
    def fail_max(self, number: int) -> None:
        self._limits = self._limits._replace(fail_max=number)

    @property
    def reset_timeout(self) -> float:
        """Seconds the circuit stays open (pybreaker's name for ``timeout``)."""
        return self._limits.reset_timeout

    @reset_timeout.setter
    def reset_timeout(self, timeout: float) -> None:
        with self.lock:
            self._limits = self._limits._replace(reset_timeout=timeout)
            self._refresh_fast_paths()

    @property
    def success_threshold(self) -> int:
        """Half-open successes that close the circuit."""
        return self._limits.success_threshold

    @success_threshold.setter
    def success_threshold(self, threshold: int) -> None:
        self._limits = self._limits._replace(success_threshold=threshold)

    # --- what health checks read ---------------------------------------------------------------

    @property
    def state_label(self) -> str:
        """closed, open, half_open, forced_open, forced_closed or disabled, as health sees it.

        An open circuit whose open time has run out reads ``half_open``: the next call is a
        trial. Only that call moves the state (reading it changes nothing and takes no trial
        slot), and an idle service, say one its load balancer stopped sending to, would otherwise
        read ``open`` for ever.
        """
        now = _clock.monotonic()
        return self._visible_override(now) or self._visible_phase(now)

    def snapshot(self) -> CircuitSnapshot:
        """The circuit's state and counters, read consistently under the lock.

        The state is :attr:`state_label`'s: ``half_open`` (and ``seconds_left_open`` None) once
        an open circuit's time has run out, though the move waits for the next call. A shared
        circuit reports the fleet's counters as this process last saw them (no request to Redis,
        and the open time runs from when the fleet's circuit opened, as last seen) and this
        process's trial calls in flight; under a manual override, the override's own counters.
        """
        remote = self._remote
        known = remote.last_known() if remote is not None else None
        with self.lock:
            now = _clock.monotonic()
            window = self._window
            if window is not None:
                window.roll(now)
            override = self._visible_override(now)
            if known is not None and override is None:
                failures, successes = known.failures, known.successes
            else:
                failures, successes = self._store.counter, self._store.success_counter
            phase = self._visible_phase(now)
            left: float | None = None
            if override is None and phase == OPEN:
                left = self._m.opened_at + self._m.open_time(self._limits) - now
            return CircuitSnapshot(
                service=self.service,
                state=override or phase,
                failures=failures,
                successes=successes,
                trials_in_flight=self._m.trials,
                seconds_left_open=left,
                failure_rate=window.failure_rate if window is not None else None,
                slow_call_rate=window.slow_call_rate if window is not None else None,
            )

    def _visible_phase(self, now: float) -> str:
        """The phase, with an open circuit whose open time has run out read as half-open."""
        phase = self._m.phase
        if phase == OPEN and now >= self._m.opened_at + self._m.open_time(self._limits):
            return HALF_OPEN
        return phase

    # --- pybreaker's public API, rerouted through admit/record -----------------------------------

    def __call__(self, *call_args: Any, **call_kwargs: Any) -> Any:
        """pybreaker's decorator: ``@breaker`` or ``@breaker()`` over a function.

        Unlike pybreaker's, an ``async def`` function is guarded through :meth:`acall` (its
        awaited outcome counts), and a generator function is refused: its body runs after the
        call has returned, so nothing it raises could be counted.

        Raises:
            TypeError: ``func`` is a generator or async generator function.
        """
        if call_kwargs.pop("__pybreaker_call_async", False):
            self.call_async(None)

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
                raise TypeError(
                    f"a circuit breaker cannot guard the generator function {func.__qualname__}: "
                    "its body runs after the call returns; guard the code that consumes it with "
                    "`with breaker.calling():`"
                )
            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                    return await self.acall(func, *args, **kwargs)

                return guarded_async

            @functools.wraps(func)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                return self.call(func, *args, **kwargs)

            return guarded

        if call_args:
            return decorate(*call_args)
        return decorate

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` through the breaker, with no lock held while it runs.

        Raises:
            CircuitOpenError: instead of pybreaker's ``CircuitBreakerError``.
            TypeError: ``func`` is an ``async def`` function (its coroutine would be counted
                as a success before it ran): use ``await breaker.acall(...)``.
        """
        if inspect.iscoroutinefunction(func):
            raise TypeError(
                f"breaker.call() runs def functions; {func.__qualname__} is async def: "
                "use `await breaker.acall(...)`"
            )
        step = self._m.sync_step
        if step is None:
            step = DRIVERS.link(_Direct(self), _apply)
            self._m.sync_step = step
        return cast("T", step((func, *args), kwargs))

    def acall(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Awaitable[T]:
        """``await func(*args, **kwargs)`` through the breaker (asyncio; no tornado needed).

        With state in Redis, the requests are awaited: the event loop is never blocked.
        """
        step = self._m.async_step
        if step is None:
            step = DRIVERS.alink(_Direct(self), _apply)
            self._m.async_step = step
        return cast("Awaitable[T]", step((func, *args), kwargs))

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """The block as one call through the breaker.

        The block may ``await``, but with state in Redis entering it makes a blocking request:
        asyncio code should use ``acall`` or the decorators.
        """
        # The drivers' judged step, for a block instead of a function.
        token = self.before(self.calling, (), {})
        if isinstance(token, Effect):
            token = DRIVERS.settle(token)
        started = _clock.monotonic()
        try:
            yield
        except BaseException as exc:
            effect = self.judge(token, started, exc, None)
            if effect is not None:
                DRIVERS.settle(effect)
            raise
        effect = self.judge(token, started, None, None)
        if effect is not None:
            DRIVERS.settle(effect)

    def call_async(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """pybreaker's tornado entry point: not supported, use ``acall`` (asyncio)."""
        raise NotImplementedError(
            "buttress's circuit breaker supports asyncio, not tornado: "
            "use `await breaker.acall(...)`"
        )

    def is_system_error(self, exception: BaseException) -> bool:
        """Whether ``exception`` counts as a failure of the dependency.

        Not: ``exclude``-d exceptions, ``RejectedError`` from inner patterns, anything that is
        not an ``Exception`` (cancellation, ``KeyboardInterrupt``, ``SystemExit``), and an HTTP
        429 Too Many Requests unless ``count_throttled`` (the dependency answered: it is alive,
        and throttling us).
        """
        if exception.__class__ is FailedResult:
            return True
        if not isinstance(exception, Exception) or isinstance(exception, RejectedError):
            return False
        types, predicates, count_throttled = self._excluding
        if isinstance(exception, types):
            return False
        for predicate in predicates:
            try:
                if predicate(exception):
                    return False
            except Exception:  # noqa: BLE001 - a broken predicate must not replace the error
                return True
        return count_throttled or not _throttled(exception)

    def add_excluded_exception(self, exception: type[BaseException]) -> None:
        with self.lock:
            if not self._excluded:
                self._excluded = []  # pybreaker's method appends to it
            super().add_excluded_exception(exception)
            self._excluding = _excluding(self.excluded_exceptions, self._excluding[2])

    def remove_excluded_exception(self, exception: type[BaseException]) -> None:
        with self.lock:
            if not self._excluded:
                self._excluded = []  # pybreaker's method removes from it (ValueError)
            try:
                super().remove_excluded_exception(exception)
            finally:
                self._excluded = self._excluded or ()
            self._excluding = _excluding(self.excluded_exceptions, self._excluding[2])

    def add_listener(self, listener: pybreaker.CircuitBreakerListener) -> None:
        with self.lock:
            if not self._listening:
                self._listening = []  # pybreaker's method appends to it
            super().add_listener(listener)
            self._refresh_listeners()

    def remove_listener(self, listener: pybreaker.CircuitBreakerListener) -> None:
        with self.lock:
            if not self._listening:
                self._listening = []  # pybreaker's method removes from it (ValueError)
            try:
                super().remove_listener(listener)
            finally:
                self._listening = self._listening or ()
            self._refresh_listeners()

    def __repr__(self) -> str:
        return f"<buttress CircuitBreaker {self.service!r} {self.state_label}>"

    # --- decisions (the caller holds the lock) ---------------------------------------------------

    def _admit_locked(self, shadow: bool) -> int:
        override = self._m.override
        until = self._m.override_until
        if until is not None and _clock.monotonic() >= until:
            self._end_timed_override()
            override = None
        m = self._m
        if override is not None:
            if override == DISABLED:
                return _BYPASS
            if override == FORCED_CLOSED:
                return m.generation << 1
            return self._reject("forced_open", None, shadow)
        now = _clock.monotonic()
        if self._m.shared:
            if self._remote is not None:
                return _REROUTE
            self._sync_shared(now)
        phase = m.phase
        if phase == CLOSED:
            return m.generation << 1
        decision = m.admit(self._limits, now)
        if decision.change is not None:
            self._after_move(phase, None, decision.change, now)
        if not decision.admitted:
            if decision.state == OPEN:
                return self._reject("open", decision.retry_after, shadow)
            return self._reject("half_open_full", None, shadow)
        handlers = events.ROUTES.get(events.CircuitTrialStarted)
        if handlers:
            self._queue((handlers, events.CircuitTrialStarted(self.service, m.trials)))
        return m.generation << 1 | 1

    def _record(
        self, token: int, outcome: str, now: float, *, slow: bool, hold: float = 0.0
    ) -> None:
        m = self._m
        if token >> 1 != m.generation:
            return  # admitted under a state that has ended: not evidence about this one
        phase = m.phase
        window = self._window if phase == CLOSED and outcome != IGNORED else None
        if window is not None:
            window.add(now, failed=outcome == FAILURE, slow=slow)
        override = self._m.override
        # Forced closed counts, and never trips.
        limits = self._limits if not hold else self._limits._replace(hold=hold)
        decision = m.record(
            token >> 1, bool(token & 1), outcome, limits, now, trips=override is None
        )
        if decision.change is not None:
            self._after_move(override or phase, None, decision.change, now)
        elif window is not None and override is None:
            reason = self._window_trip(window)
            if reason is not None:
                self._move(OPEN, None, reason, now, hold=hold)

    def _window_trip(self, window: Window | CountWindow) -> str | None:
        """The reason the rate window trips the circuit now (failure_rate, slow_call_rate)."""
        opts = self.options
        if window.calls >= opts.minimum_calls:
            rate = opts.failure_rate_threshold
            if rate is not None and window.failures >= rate * window.calls:
                return "failure_rate"
            rate = opts.slow_call_rate_threshold
            if rate is not None and window.slow >= rate * window.calls:
                return "slow_call_rate"
        return None

    def _reject(
        self, reason: str, retry_after: float | None, shadow: bool, *, locked: bool = True
    ) -> int:
        """Reject a call (raise), or let it through uncounted in shadow mode.

        ``locked``: the caller holds the lock, so the event is queued and the caller delivers
        it once it has released the lock (``_deliver``).
        """
        if shadow:
            handlers = events.ROUTES.get(events.ShadowDecision)
            if handlers:
                event = events.ShadowDecision(self.service, PATTERN, "reject")
                if locked:
                    self._queue((handlers, event))
                else:
                    self._publish(handlers, event)
        else:
            record = self._rejected.record
            if record is not None:
                if locked:
                    self._queue(
                        _later(record, CallRejected, self.service, PATTERN, reason, retry_after)
                    )
                elif self._outbox or self._delivering:
                    self._publish(
                        *_later(record, CallRejected, self.service, PATTERN, reason, retry_after)
                    )
                else:
                    # Nothing queued to deliver before it: the fast path, no event built.
                    try:
                        record(PATTERN, reason, retry_after)
                    except Exception:  # noqa: BLE001 - a subscriber must never break the call
                        events.failed(record)
        if shadow:
            return _UNCOUNTED
        raise _open_error(self._messages[reason], self.service, retry_after)

    def _publish(self, handlers: tuple[events.Handler, ...], event: Any) -> None:
        """Deliver an event decided outside the lock, behind any that are still queued."""
        if self._outbox or self._delivering:
            self._queue((handlers, event))
            self._deliver()
        else:
            events.dispatch(handlers, event)

    def _queue(self, item: _Queued) -> None:
        """Queue an event for :meth:`_deliver`; the outbox is made here, the first time.

        Once a list, the outbox stays that list (``_deliver`` holds it while it delivers).
        """
        outbox = self._outbox
        if outbox.__class__ is tuple:
            with _DELIVERY:
                outbox = self._outbox
                if outbox.__class__ is tuple:
                    outbox = self._outbox = []
        cast("list[_Queued]", outbox).append(item)

    def _deliver(self) -> None:
        """Deliver the queued events; the caller holds no lock of this breaker.

        Subscribers never run under the breaker's lock: one that reads the breaker from another
        thread (and waits for it) would deadlock. One thread at a time delivers, in the order
        the events were decided; a thread that finds another one delivering leaves its events
        to it (so a subscriber may see an event on another caller's thread, and a subscriber
        that calls the breaker finds its own events delivered after it returns).
        """
        outbox = self._outbox
        if outbox.__class__ is tuple:  # nothing was ever queued
            return
        outbox = cast("list[_Queued]", outbox)
        with _DELIVERY:
            if self._delivering:
                return
            self._delivering = True
        try:
            while True:
                try:
                    handlers, event = outbox.pop(0)
                except IndexError:
                    with _DELIVERY:
                        # Another thread may have queued since, and left it to this one.
                        if not outbox:
                            self._delivering = False
                            return
                    continue
                events.dispatch(handlers, event)
        except BaseException:
            with _DELIVERY:
                self._delivering = False
            raise

    def _announce(
        self, outcome: str, elapsed: float, exc: BaseException | None, slow: bool
    ) -> None:
        record = self._recorded.record
        if record is not None:
            window = self._window
            error_type = None if exc is None else type(exc).__name__
            failure_rate = None if window is None else window.failure_rate
            slow_call_rate = None if window is None else window.slow_call_rate
            if self._outbox or self._delivering:
                self._publish(
                    *_later(
                        record,
                        CircuitCallRecorded,
                        self.service,
                        outcome,
                        elapsed,
                        slow,
                        error_type,
                        failure_rate,
                        slow_call_rate,
                    )
                )
            else:
                try:
                    record(outcome, elapsed, slow, error_type, failure_rate, slow_call_rate)
                except Exception:  # noqa: BLE001 - a subscriber must never break the call
                    events.failed(record)
        if outcome == SUCCESS and self._success_hooks:
            self._publish(self._success_hooks, self)

    def _manual(self, phase: str, override: str | None, reason: str) -> None:
        remote = self._remote
        if remote is not None and override is None and self._m.fleet_override is not None:
            self._end_fleet_override(reason)  # reset, close, open, half_open end it first
        self._m.override_until = None
        if remote is not None and override is None:
            # The fleet's circuit moves (the overrides stay in this process).
            asked = next(_ASKED)
            decision = remote.force(phase, self._limits)
            with self.lock:
                self._move(decision.state, None, reason, _clock.monotonic())
                self._m.seen_generation = decision.generation
                self._m.adopted_at = max(asked, self._m.adopted_at)
        else:
            with self.lock:
                self._move(phase, override, reason, _clock.monotonic())
        if self._outbox:
            self._deliver()

    def _move(
        self, phase: str, override: str | None, reason: str, now: float, *, hold: float = 0.0
    ) -> None:
        """Enter a state: a new generation, fresh counters for it, storage, listeners, event."""
        old_label = self._label()
        self._m.move(phase, now)
        self._m.hold = hold
        self._after_move(old_label, override, reason, now)

    def _after_move(self, old_label: str, override: str | None, reason: str, now: float) -> None:
        """What follows a transition of the machine: window, override, fast paths, events."""
        self._m.seen_generation = None  # a shared circuit adopts the next state it is told
        if self._m.phase == CLOSED and self._window is not None:
            self._window = self._new_window(self.options, now)
        self._m.override = override
        self._refresh_fast_paths()
        self._announce_state(old_label, reason, now)

    def _adopt(
        self,
        phase: str,
        reason: str,
        now: float,
        opened_at: float,
        old_label: str | None = None,
    ) -> None:
        """Take on a state another process wrote to the shared storage (nothing is written)."""
        old_label = old_label or self._label()
        self._m.adopt(phase, now, opened_at)
        if phase == CLOSED and self._window is not None:
            self._window = self._new_window(self.options, now)
        self._refresh_fast_paths()
        self._announce_state(old_label, reason, now)

    def _announce_state(self, old_label: str, reason: str, now: float) -> None:
        change = self._show_state(TO_PYBREAKER[self._m.phase])
        if change is not None and self._m.change_hooks:
            self._queue((self._m.change_hooks, change))
        new_label = self._label()
        if new_label == old_label:
            return
        handlers = events.ROUTES.get(events.CircuitStateChanged)
        if handlers:
            self._queue(
                (
                    handlers,
                    events.CircuitStateChanged(
                        self.service, old_label, new_label, reason, now - self._m.label_since
                    ),
                )
            )
        self._m.label_since = now

    def _refresh_fast_paths(self) -> None:
        # Readers look at these without the lock: each is one attribute, replaced whole.
        if self._m.override_until is not None:
            # A timed override: every call goes through _admit_locked, which ends it on time.
            self._may_reject()
            self._fast_token = None
            self._open_until = _NEVER
            return
        local = not self._m.shared
        m = self._m
        if self._m.override == DISABLED:
            self._fast_token = _BYPASS
        elif self._m.override is None and m.phase == CLOSED and local:
            self._fast_token = m.generation << 1
        else:
            self._fast_token = None
        if self._fast_token is None:
            self._may_reject()
        if self._m.override == FORCED_OPEN:
            self._open_until = _FOREVER
        elif self._m.override is None and m.phase == OPEN and local:
            self._open_until = m.opened_at + m.open_time(self._limits)
        else:
            self._open_until = _NEVER

    def _may_reject(self) -> None:
        """The calls may be rejected from now on: the rejections' recorders, and the messages as
        a plain dict (set before the fast paths that read them are, so a rejection finds them)."""
        if self._rejected is _NOT_REJECTING:
            self._rejected = events.recorder(CallRejected, self.service)
            self._rejected_call = events.recorder(events.RejectedCall, self.service)
        if self._messages is _UNMADE:
            self._messages = _messages(self.service)

    def _refresh_listeners(self) -> None:
        listeners = self.listeners
        self._before_hooks = tuple(_BeforeCallHook(x, self) for x in listeners)
        self._success_hooks = tuple(x.success for x in listeners)
        self._m.failure_hooks = tuple(functools.partial(x.failure, self) for x in listeners)
        self._m.change_hooks = tuple(_StateChangeHook(x, self) for x in listeners)

    @staticmethod
    def _new_window(options: CircuitBreakerOptions, now: float) -> Window | CountWindow | None:
        if options.failure_rate_threshold is None and options.slow_call_rate_threshold is None:
            return None
        if options.window == "count":
            return CountWindow(options.window_size)
        return Window(options.window_seconds, now)

    # --- the shared path: Redis decides, this process keeps its labels, events and window ------

    def _enter_shared(self, decision: Decision, asked: int, *, shadow: bool) -> _Ticket | None:
        """Act on the storage's admission (request number ``asked``); return the call's ticket.

        Returns:
            None for a call shadow mode lets through although it was not admitted.

        Raises:
            CircuitOpenError: not admitted (open, or the fleet's trial calls are all taken).
        """
        with self.lock:
            fleet = decision.override or None
            if fleet != self._m.fleet_override and (decision.shared or fleet is None):
                old_label = self._label()
                self._m.fleet_override = fleet
                if self._is_news(decision, asked):
                    self._adopt_decision(decision, "manual", asked, old_label=old_label)
                else:
                    self._announce_state(old_label, "manual", _clock.monotonic())
            elif self._is_news(decision, asked):
                self._adopt_decision(decision, decision.change or "shared_state", asked)
            if decision.admitted:
                if decision.trial:
                    self._m.trials += 1
                    handlers = events.ROUTES.get(events.CircuitTrialStarted)
                    if handlers:
                        self._queue(
                            (handlers, events.CircuitTrialStarted(self.service, self._m.trials))
                        )
                ticket = decision, self._m.generation
            else:
                ticket = None
        try:
            if ticket is None:
                if decision.override == FORCED_OPEN:
                    self._reject("forced_open", None, shadow, locked=False)
                elif decision.state == OPEN:
                    self._reject("open", decision.retry_after, shadow, locked=False)
                else:
                    self._reject("half_open_full", None, shadow, locked=False)
            return ticket
        finally:
            if self._outbox:
                self._deliver()

    def _finish_shared(
        self, token: _SharedCall, started: float, exc: BaseException | None, result: Any
    ) -> Effect | None:
        """Record a shared call's outcome: at most one request (two when the window trips)."""
        if exc is None and self._failure_on_result is not None and self._failing(result):
            exc = FailedResult(result)
        outcome, now, elapsed, slow = self._outcome(exc, started)
        ticket, remote = token
        if ticket is None:
            self._announce(outcome, elapsed, exc, slow)
            return None
        decision = ticket[0]
        asked = next(_ASKED)
        limits = self._limits
        if outcome == FAILURE:
            hold = self._hold(exc)  # type: ignore[arg-type]
            if hold:
                limits = limits._replace(hold=hold)

        def recorded(after: Decision | None) -> Effect | None:
            # Nothing to settle after a plain closed-state call with no window: no lock.
            if after is not None or decision.trial or self._window is not None:
                reason = self._settle(ticket, outcome, after, asked, now=now, slow=slow)
                if reason is not None:
                    trip_asked = next(_ASKED)

                    def tripped(moved: Decision) -> None:
                        self._settle_trip(moved, trip_asked, reason)
                        if self._outbox:
                            self._deliver()
                        self._announce(outcome, elapsed, exc, slow)

                    quorum = self.options.min_reporters
                    if quorum > 1:
                        # The fleet opens once `quorum` processes' windows tripped; until then
                        # this process alone rejects, for the open time.
                        held = self._limits.reset_timeout
                        # A vote stands as long as what it reports: a time window's span. A
                        # count window has no span: its vote stands while this process holds
                        # open on it (then it calls again with a fresh window, whose own trip
                        # votes again). docs/distributed.md#quorum-for-rate-based-trips
                        options = self.options
                        standing = options.window_seconds if options.window == "time" else held

                        def voted(moved: Decision) -> None:
                            if (
                                moved.shared
                                and moved.state == CLOSED
                                and moved.generation == decision.generation
                            ):
                                moved = remote.hold_open(held, reason)
                            tripped(moved)

                        return cast(
                            "Effect | None",
                            remote.voting(
                                decision.generation, standing, quorum, limits, then=voted
                            ),
                        )
                    return cast(
                        "Effect | None",
                        remote.setting(
                            OPEN,
                            limits,
                            expected=decision.generation,
                            always=False,
                            then=tripped,
                        ),
                    )
                if self._outbox:
                    self._deliver()
            self._announce(outcome, elapsed, exc, slow)
            return None

        return cast("Effect | None", remote.recording(decision, outcome, limits, recorded))

    def _outcome(self, exc: BaseException | None, started: float) -> tuple[str, float, float, bool]:
        """``(outcome, now, elapsed, slow)`` of a call that ended; tells pybreaker listeners."""
        now = _clock.monotonic()
        elapsed = now - started
        slow = self._slow_after is not None and elapsed >= self._slow_after
        if exc is None:
            return SUCCESS, now, elapsed, slow
        outcome = FAILURE if self.is_system_error(exc) else IGNORED
        if outcome == FAILURE and self._m.failure_hooks:
            self._publish(self._m.failure_hooks, exc)
        return outcome, now, elapsed, slow

    def _settle(
        self,
        ticket: _Ticket,
        outcome: str,
        after: Decision | None,
        asked: int,
        *,
        now: float,
        slow: bool,
    ) -> str | None:
        """Bookkeeping once the storage recorded an outcome; the reason if the window trips."""
        decision, generation = ticket
        with self.lock:
            current = generation == self._m.generation
            if decision.trial and current:
                self._m.trials -= 1
            if after is not None and (after.override or None) != self._m.fleet_override:
                old_label = self._label()
                self._m.fleet_override = after.override or None
                self._announce_state(old_label, "manual", now)
            if after is not None and self._is_news(after, asked):
                self._adopt_decision(after, after.change or "shared_state", asked)
                return None
            window = self._window
            if (
                window is None
                or not current
                or outcome == IGNORED
                or decision.state != CLOSED
                or self._m.override is not None
                or self._m.fleet_override is not None
            ):
                return None
            window.add(now, failed=outcome == FAILURE, slow=slow)
            return self._window_trip(window)

    def _settle_trip(self, moved: Decision, asked: int, reason: str) -> None:
        # The storage moves only from the generation the window counted in: if another
        # process moved first, this process learns that move instead of making its own.
        with self.lock:
            if self._is_news(moved, asked):
                self._adopt_decision(moved, reason if moved.change else "shared_state", asked)

    def _is_news(self, decision: Decision, asked: int) -> bool:
        """Whether ``decision`` (the answer to request ``asked``) is a state to adopt."""
        seen = self._m.seen_generation
        generation = decision.generation
        if generation == seen:
            return False
        # Answers to concurrent requests arrive in any order: one to a request sent before the
        # answer last adopted is old news, unless its shared generation is visibly newer.
        return asked > self._m.adopted_at or (seen is not None and generation > seen > 0)

    def _adopt_decision(
        self, decision: Decision, reason: str, asked: int, old_label: str | None = None
    ) -> None:
        self._m.seen_generation = decision.generation
        self._m.adopted_at = max(asked, self._m.adopted_at)
        now = _clock.monotonic()
        if decision.state == OPEN and decision.retry_after is not None:
            # Redis chose the open time (its streak, a Retry-After): this copy's is all of it.
            self._m.streak = 0
            self._m.hold = decision.age + decision.retry_after
        self._adopt(decision.state, reason, now, now - decision.age, old_label)

    # --- the storage seam: the only methods that read or write self._store ------------------------

    def _use_storage(self, remote: SharedStateStorage | None) -> None:
        """Decide with ``remote`` (Redis), or with pybreaker's own storage when it is None.

        pybreaker's storage stays the one it was given (or made); with Redis it only counts
        for the overrides.
        """
        self._remote = remote
        self._store = super().storage
        self._m.store = self._store
        self._m.shared = (
            remote is not None or type(self._store) is not pybreaker.CircuitMemoryStorage
        )

    def _opened_wall(self) -> dt.datetime | None:
        """When the circuit opened, on the wall clock; None unless open."""
        if self._m.phase != OPEN:
            return None
        ago = _clock.monotonic() - self._m.opened_at
        return dt.datetime.fromtimestamp(_clock.wall() - ago, dt.UTC)

    def _sync_shared(self, now: float) -> None:
        stored = FROM_PYBREAKER.get(self._store.state)
        if stored is not None and stored != self._m.phase:
            opened_at = self._stored_opened_at(now) if stored == OPEN else now
            self._adopt(stored, "shared_state", now, opened_at)

    def _stored_opened_at(self, now: float) -> float:
        opened = self._store.opened_at
        if opened is None:
            return now
        return now - max(0.0, _clock.wall() - opened.timestamp())


def _later(
    record: Callable[..., object], kind: type[Any], service: str, *fields: Any
) -> tuple[tuple[events.Handler, ...], Any]:
    """A recorder's call queued behind the events waiting in the outbox, in their order.

    Delivered as an event (as every queued one is) whose fields are handed to ``record``, so the
    subscribers see what the fast path would have given them.
    """

    def replay(event: Any) -> None:
        record(*event[1:])

    return (replay,), kind(service, *fields)


def _open_error(message: str, service: str, retry_after: float | None) -> CircuitOpenError:
    """``CircuitOpenError(message, service=service, retry_after=retry_after)``, at half the cost.

    Rejecting is the breaker's other hot path: while open it is all the breaker does, so it must
    cost well under pybreaker's rejection. Running ``RejectedError.__init__`` (a Python frame with
    keyword arguments) was a third of it. A test checks that this builds the same object.
    The messages are built once per breaker for the same reason; ``retry_after`` is an attribute.
    """
    error = CircuitOpenError.__new__(CircuitOpenError, message)
    error.service = service
    error.retry_after = retry_after
    return error


def _wall_datetime() -> dt.datetime:
    return dt.datetime.fromtimestamp(_clock.wall(), dt.UTC)


# --- the strategy ---------------------------------------------------------------------------------


class CircuitBreakerStrategy:
    """The circuit breaker as one link of a policy's chain: it admits (``before``) and judges
    how each call ended (``judge``); the drivers run the call and perform its effects."""

    pattern: ClassVar[str] = PATTERN
    __slots__ = ("before", "breaker", "final", "judge", "shadow")

    def __init__(self, cb: CircuitBreaker, *, shadow: bool) -> None:
        self.breaker = cb
        self.shadow = shadow
        self.before = cb.before_shadow if shadow else cb.before
        self.judge = cb.judge
        # Whether its rejection may end the call in the policy's final step, which calls the
        # breaker's own before_final, judge, ended and succeeded (it keeps the breaker, not four
        # bound methods: 0.25 KB a stack).
        self.final = not shadow


class _Direct:
    """The breaker as a judge of ``call()``/``acall()``: the function comes first in ``args``,
    and pybreaker listeners are told about it (not about the step that applies it)."""

    pattern: ClassVar[str] = PATTERN
    __slots__ = ("breaker", "judge")

    def __init__(self, cb: CircuitBreaker) -> None:
        self.breaker = cb
        self.judge = cb.judge

    def before(self, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.breaker.before(args[0], args[1:], kwargs)


def _apply(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0](*args[1:], **kwargs)


def build(ctx: BuildContext) -> CircuitBreakerStrategy | None:
    """The strategy over the shared breaker of ``ctx.key`` (built on first use).

    With ``state_url`` the breaker keeps its state in that Redis, under ``ctx.service``'s keys;
    the storage is made with the breaker (connecting on its first call), and swapped when a
    reload changes the URL.
    """
    options: CircuitBreakerOptions = ctx.options
    if not options.enabled:
        return None
    cb = ctx.shared(PATTERN, functools.partial(CircuitBreaker, ctx.service))
    return CircuitBreakerStrategy(cb, shadow=ctx.mode == "shadow")
