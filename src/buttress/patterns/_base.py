"""The contract between :class:`buttress.Policy` and the pattern modules.

A pattern has three parts:

* ``Options``: a frozen pydantic model whose field names are the decorator's keyword arguments
  and the keys of its settings section. Code arguments are validated against it at decoration
  time; settings are validated against it at load time.
* a *strategy*: built from resolved options when a policy first runs (and again after
  ``reload_settings()``). It only *decides*; the two drivers in :mod:`buttress.policy` (one for
  ``def`` callers, one for ``async def`` callers) do every wait. A strategy is one of these
  shapes:

  - a :class:`Gate` decides before the call (``before()``: a token, or an :class:`Effect` to
    perform first) and is told when it is over (``after(token)``, or no ``after`` at all); a
    :class:`JudgedGate` is told how it ended (``finish(token, exc or None)``), to learn from it;
  - a :class:`Judge` decides before the call, like a gate, and after it from its outcome
    (``judge(token, started, error, result)``: nothing, or an :class:`Effect` to perform, the
    circuit breaker's);
  - a :class:`Keyed` strategy decides from the call's arguments before it (``enter(args,
    kwargs)``: a token, a :class:`Return`, or a :class:`Join`) and hears how it ended
    (``returned``, ``raised``) (cache, coalescing);
  - a :class:`Recovery` decides after a failure (``recover()``: an effect that answers it, or it
    re-raises) and may note each success (``succeeded``). One may also keep a scope of its own
    around the call and its answer: a context variable (``scope``) the driver sets to
    ``new_scope()`` (retry's attempt count), and treat some returned values as failures: a
    ``check_result`` the driver runs on each value the call returns, which raises for those
    (retry's ``retry_on_result``).

  The effects are a small closed set: :class:`Sleep`, :class:`WaitForSlot`, :class:`Return`,
  :class:`TryAlternatives`, :class:`RetryAfter`, :class:`AskStore`, :class:`Hedge` and
  :class:`Join`. A strategy of none of these shapes is refused when a policy links it.
* a ``build(ctx)`` function returning the strategy.

A step of the chain takes the positional arguments as a tuple and the keyword arguments as a dict,
so no layer re-packs them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol, TypeVar, cast

from pydantic import BaseModel, ConfigDict, ValidationInfo

__all__ = [
    "CODE_CONTEXT",
    "DRIVERS",
    "AskStore",
    "AsyncCall",
    "BuildContext",
    "Call",
    "Drivers",
    "Effect",
    "Gate",
    "Hedge",
    "Join",
    "Judge",
    "JudgedGate",
    "Keyed",
    "Mode",
    "Options",
    "Recovery",
    "RetryAfter",
    "Return",
    "Sleep",
    "StoreTransport",
    "Strategy",
    "TryAlternatives",
    "WaitForSlot",
    "Waiter",
    "error_type",
    "from_code",
]

Call = Callable[[tuple[Any, ...], dict[str, Any]], Any]
AsyncCall = Callable[[tuple[Any, ...], dict[str, Any]], Awaitable[Any]]
Mode = Literal["enforce", "shadow"]
T = TypeVar("T")


# The validation context of code arguments (``config.code_arguments``), which are validated in
# pydantic's strict mode. Strict mode does not reach a "before" validator: one that turns text
# into a value, for settings (where every value is text), asks this to leave code's text alone.
CODE_CONTEXT: Final = "buttress.code"


def from_code(info: ValidationInfo) -> bool:
    """Whether the value a validator sees is a code argument (else a setting or a default)."""
    context = info.context
    return isinstance(context, dict) and context.get(CODE_CONTEXT) is True


class Options(BaseModel):
    """Base of every pattern's options: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    # Fields that only code can set (exception types, predicates, callables); a config file or an
    # environment variable that names one is an error.
    code_only: ClassVar[frozenset[str]] = frozenset()


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a pattern needs to build its strategy.

    Attributes:
        service: the service name (metric label, settings section, shared-state key).
        options: the resolved options (settings over code arguments over preset over defaults).
        key: the registry key of the pattern's shared instance: the service name when the call
            site named one, else a key private to the call site.
        mode: ``enforce`` acts; ``shadow`` only emits what it would have done.
        instances: where shared instances live, ``instances(pattern, key, options, factory)``
            (the registry's ``shared``, given by the policy, so no pattern imports the registry);
            ``None``: every build makes its own.
        armed: whether this process allows fault injection at all (the chaos kill switch, read
            from the environment when settings load: a config file cannot arm it).
        budget: the service's retry budget options (``retry.budget``), for a pattern that draws
            on the budget without being retry (hedging); ``None`` for the others.
        site: the qualified name of the protected function (``module.qualname``): the same in
            every process that runs this code, so durable per-function state (a deferral
            stream) can be named by it.
    """

    service: str
    options: Any
    key: str
    mode: Mode = "enforce"
    instances: Callable[[str, str, Any, Callable[[Any], Any]], Any] | None = None
    armed: bool = False
    budget: Any = None
    site: str = ""

    def shared(self, pattern: str, factory: Callable[[Any], T]) -> T:
        """The instance of ``pattern`` for this key, made by ``factory(options)`` on first use.

        Shared through ``instances``, it is reconfigured in place when the options changed.
        """
        if self.instances is None:
            return factory(self.options)
        return cast("T", self.instances(pattern, self.key, self.options, factory))


# -- effects: what a strategy asks a driver to do -------------------------------------------------
class Effect:
    """Something only a driver can do (wait, answer in the call's place); the closed set below."""

    __slots__ = ()


class Sleep(Effect):
    """Wait ``seconds``, then ask :meth:`resume` what comes next.

    A pattern subclasses it to say what the wait was for: ``resume`` returns the token (or the
    next effect) once the time has passed, ``abandon`` undoes what was taken when the wait is
    interrupted (cancellation, an interpreter exit).
    """

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def resume(self) -> Any:
        """After the wait: the token of the call, or the next effect (may raise instead)."""
        return None

    def abandon(self) -> None:
        """The wait was interrupted: give back whatever the call held."""


class Waiter:
    """A call waiting in a pattern's queue; the driver makes it (a thread's or a task's).

    ``granted`` is written under the owning pattern's lock only.
    """

    __slots__ = ("granted",)

    def __init__(self) -> None:
        self.granted = False

    def wake(self) -> bool:
        """Tell the waiter it holds a slot now; ``False`` if it can no longer be told."""
        raise NotImplementedError


class WaitForSlot(Effect):
    """Wait in a queue for a slot someone else frees.

    The driver makes a :class:`Waiter` for its kind of caller and hands it to :meth:`queue`; when
    that returns ``True`` it waits until the waiter is woken or ``bound`` seconds pass (``None``:
    no bound), then asks :meth:`resume`. An interrupted wait calls :meth:`abandon` instead.
    """

    __slots__ = ("bound",)

    def __init__(self) -> None:
        self.bound: float | None = None

    def queue(self, waiter: Waiter) -> bool:
        """Queue ``waiter`` (or raise if the queue is full); ``False`` if it holds a slot now."""
        raise NotImplementedError

    def resume(self, waiter: Waiter) -> Any:
        """After the wait (woken or out of time): the token of the call, or raise."""
        raise NotImplementedError

    def abandon(self, waiter: Waiter) -> None:
        """The wait was interrupted: leave the queue, giving back a slot granted meanwhile."""
        raise NotImplementedError


class Return(Effect):
    """Answer the call with ``value`` instead of running it (or instead of its failure)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class TryAlternatives(Effect):
    """Answer a failure with the first of ``alternatives`` that does not raise.

    Each alternative is called as ``alternative(failure, *args, **kwargs)`` (an awaitable result
    is awaited for an ``async def`` caller); the first that returns answers, and :meth:`answered`
    is told which one. When all raise, :meth:`exhausted` gets their errors and answers or raises.
    """

    __slots__ = ("alternatives",)

    def __init__(self, alternatives: tuple[tuple[Callable[..., Any], str], ...]) -> None:
        self.alternatives = alternatives  # (alternative, label) pairs, tried in order

    def answered(self, label: str) -> None:
        """The alternative labelled ``label`` answered the call."""
        raise NotImplementedError

    def exhausted(self, errors: list[tuple[Callable[..., Any], Exception]]) -> Any:
        """Every alternative raised (``errors``): the answer, or raise."""
        raise NotImplementedError


class RetryAfter(Effect):
    """Run the call again after ``seconds``, and again, until an attempt returns or it gives up.

    The driver waits ``seconds``, calls :meth:`attempting`, runs the call, and reports the
    outcome: :meth:`succeeded`, or :meth:`failed`, which sets the next ``seconds`` and returns the
    effect, or raises to give up.
    """

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def attempting(self) -> None:
        """The wait is over; the next attempt starts now."""

    def failed(self, exc: Exception) -> RetryAfter | Return:
        """The attempt raised ``exc``: the effect for the next one, or raise to give up.

        A :class:`Return` gives up with a value (the last result a predicate rejected).
        """
        raise exc

    def succeeded(self) -> None:
        """The attempt returned."""


class StoreTransport(Protocol):
    """How a shared store is reached: from a thread (``call``) or a task (``acall``)."""

    def call(self, request: bytes) -> Any:
        """Send ``request``, return the reply (blocks the thread)."""

    def acall(self, request: bytes) -> Awaitable[Any]:
        """Send ``request``; awaiting it gives the reply."""


class AskStore(Effect):
    """Send ``request`` to a shared store through ``transport`` and act on what it answers.

    The driver sends it with ``transport.call`` (a thread) or ``await transport.acall`` (a
    task) and hands the reply to :meth:`resume`, or the error that stopped it to :meth:`failed`
    (the store is unreachable: the pattern decides without it); each returns the token of the
    call, the next effect, or raises. An interrupted request calls :meth:`abandon` instead.
    """

    __slots__ = ("request", "transport")

    def __init__(self, request: bytes, transport: StoreTransport) -> None:
        self.request = request
        self.transport = transport

    def resume(self, reply: Any) -> Any:
        """The store's ``reply``: the token, or the next effect (may raise instead)."""
        raise NotImplementedError

    def failed(self, exc: Exception) -> Any:
        """No reply (``exc``): the token or the next effect, decided without the store."""
        raise NotImplementedError

    def abandon(self) -> None:
        """The request was interrupted (cancellation, an interpreter exit)."""


class Hedge(Effect):
    """Run the call, and one more copy of it each time ``delay`` passes without an answer.

    The driver starts the call (copy 0) and waits up to ``delay`` seconds (``None``: no more
    copies) for a copy to end; then it asks :meth:`launch` whether another copy may start, which
    also sets the next ``delay``. The first copy that returns answers the call. A copy that raises
    while others still run is forgotten; when every copy started has raised (and no more may
    start), the last failure is raised. :meth:`over` is told once, with the winning copy (``None``
    when all raised). The losers are cancelled (tasks) or abandoned (threads: they finish
    unobserved): nothing about them is reported, so no outcome counts twice. Only a gate that
    holds nothing (no ``after``) answers with it: the race is the whole call.
    """

    __slots__ = ("delay", "service")

    def __init__(self, delay: float | None, service: str) -> None:
        self.delay = delay
        self.service = service  # whose share of the worker pool runs a def call's copies

    def launch(self) -> bool:
        """``delay`` passed with no answer: whether another copy starts now (sets ``delay``)."""
        raise NotImplementedError

    def over(self, winner: int | None) -> None:
        """The race is decided: copy ``winner`` answered (0 is the call), or none did."""


class Join(Effect):
    """Share one run of the call with the identical calls made while it runs (single-flight).

    When ``leads`` is true this caller starts the run: the driver runs the call (for an ``async
    def`` caller in a task of its own, so no caller's cancellation reaches it) and reports how it
    ended to :meth:`settle`. Every other caller, and a leading task, hands a :class:`Waiter` to
    :meth:`wait`: ``True``, wait until woken (no bound of its own: the patterns inside the run
    bound it); ``False``, the run is over already. Then :meth:`outcome` returns a
    :class:`Return` with the run's result, raises its error, or returns another ``Join`` to start
    over when the run was interrupted rather than finished. An interrupted wait calls
    :meth:`leave`; the run goes on for the others.
    """

    __slots__ = ("leads",)

    def __init__(self, *, leads: bool) -> None:
        self.leads = leads

    def settle(self, result: Any, error: BaseException | None) -> None:
        """The run ended: with ``result``, or raising ``error``."""
        raise NotImplementedError

    def wait(self, waiter: Waiter) -> bool:
        """Wait for the run's end with ``waiter``; ``False`` if it has ended already."""
        raise NotImplementedError

    def outcome(self, waiter: Waiter) -> Effect:
        """After the wait: a :class:`Return` of the result, a ``Join`` to start over, or raise."""
        raise NotImplementedError

    def leave(self, waiter: Waiter) -> None:
        """The wait was interrupted: forget ``waiter``."""
        raise NotImplementedError


# -- the shapes of a strategy -------------------------------------------------------------------
class Gate(Protocol):
    """A strategy that decides before the call and is told when it is over."""

    pattern: ClassVar[str]

    @property
    def before(self) -> Callable[[], Any]:
        """Returns ``None`` or a token to pass to ``after``, or an :class:`Effect` to perform first.

        It raises to reject the call. A :class:`Return` answers the call without running it (and
        ``after`` is not called: nothing was taken).
        """

    @property
    def after(self) -> Callable[[Any], None] | None:
        """Runs once the call is over, whatever its outcome, with the token.

        ``None`` when the pattern holds nothing during the call (the driver then skips the
        ``try``/``finally``).
        """


class Judge(Protocol):
    """A strategy that decides before the call and again from how it ended."""

    pattern: ClassVar[str]

    @property
    def before(self) -> Callable[[Call, tuple[Any, ...], dict[str, Any]], Any]:
        """Called as ``before(call, args, kwargs)``: a token, or an :class:`Effect` to perform
        first (which ends in the token); it raises to reject the call."""

    @property
    def judge(self) -> Callable[[Any, float, BaseException | None, Any], Effect | None]:
        """Called as ``judge(token, started, error, result)`` once the call is over.

        ``started`` is when it started (``_clock.monotonic()``), ``error`` what it raised (then
        ``result`` is None), else None. Returns None, or an :class:`Effect` to perform before
        the call's own outcome goes on to the caller.
        """


class JudgedGate(Protocol):
    """A gate that learns from each call: told how it ended, not just that it did."""

    pattern: ClassVar[str]

    @property
    def before(self) -> Callable[[], Any]:
        """As :attr:`Gate.before`; the token is passed to ``finish``."""

    @property
    def finish(self) -> Callable[[Any, BaseException | None], None]:
        """Runs once the call is over: ``finish(token, None)`` after it returned,
        ``finish(token, exc)`` after it raised ``exc`` (cancellation included)."""


class Keyed(Protocol):
    """A strategy that decides from the call's arguments, and hears how the call ended."""

    pattern: ClassVar[str]

    def enter(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A token for ``returned``/``raised``, or an effect: :class:`Return` answers the call
        without running it, :class:`Join` shares the run of an identical call."""

    @property
    def returned(self) -> Callable[[Any, Any], None] | None:
        """Called as ``returned(token, result)`` after a call that returned, if set."""

    @property
    def raised(self) -> Callable[[Any, Exception], Effect] | None:
        """Called as ``raised(token, failure)``: the effect that answers it, or it re-raises.

        ``None``: failures pass through untouched.
        """


class Recovery(Protocol):
    """A strategy that decides after the call: it answers failures, and may note successes."""

    pattern: ClassVar[str]

    @property
    def alternatives(self) -> tuple[tuple[Callable[..., Any], str], ...]:
        """The callables an ``async def`` caller may await and a ``def`` caller may not.

        The ``def`` driver refuses coroutine functions among them when it links the strategy.
        """

    @property
    def succeeded(self) -> Callable[[tuple[Any, ...], dict[str, Any], Any], None] | None:
        """Called as ``succeeded(args, kwargs, result)`` after a call that returned, if set."""

    def recover(self, failure: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Effect:
        """The effect that answers ``failure``; re-raises it when nothing should."""


Strategy = Gate | Judge | JudgedGate | Keyed | Recovery


# -- the drivers, for a pattern's own entry points ------------------------------------------------


class Drivers:
    """The two drivers, for the entry points a pattern offers outside a policy's chain.

    The circuit breaker's pybreaker-facing ``call``, ``acall`` and ``calling`` and its storage's
    pybreaker interface perform effects through the same drivers as a policy does.
    :mod:`buttress.policy` installs them here when it is imported (the package imports it before
    any pattern runs), so no pattern imports the policy.

    Attributes:
        settle: ``settle(effect)``: perform it and those that follow, for a thread.
        asettle: ``await asettle(effect)``: the same, for a task.
        link: ``link(strategy, call)``: the step running ``call`` under it for a ``def`` caller.
        alink: ``alink(strategy, call)``: the same for an ``async def`` caller.
    """

    __slots__ = ("alink", "asettle", "link", "settle")

    def __init__(self) -> None:
        self.settle: Callable[[Any], Any] = _not_installed
        self.asettle: Callable[[Any], Awaitable[Any]] = _not_installed
        self.link: Callable[[Any, Call], Call] = _not_installed
        self.alink: Callable[[Any, AsyncCall], AsyncCall] = _not_installed


def _not_installed(*args: Any) -> Any:
    raise RuntimeError("buttress.policy was not imported: no driver performs effects")


DRIVERS = Drivers()


def error_type(exc: BaseException) -> str:
    """The bounded label for an exception: its class name, never its message."""
    return type(exc).__name__
