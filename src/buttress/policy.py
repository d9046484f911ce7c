"""Policy: an immutable, ordered stack of patterns, and the two drivers that run a call through it.

A :class:`Policy` is a tuple of :class:`Spec` (which pattern, for which service, with which code
arguments), outermost first. It decides nothing at decoration time beyond validating arguments:
settings are read when a call happens. The first call (and the first call after
``reload_settings()``) *compiles* the stack: it resolves each pattern's options for its service,
builds the strategies and links them into one callable, through the ``def`` driver or the
``async def`` one. Every later call only checks that the settings snapshot is still the same
object.

Patterns only decide (see :mod:`buttress.patterns._base`); the drivers here do every wait: they
perform the effects a pattern returns (sleep, wait for a slot, retry after a delay, answer with a
value, try alternatives) and run a call under a deadline. Linking picks, per strategy, the
smallest step for its shape, so the common case (no effect) costs a test, not a generic loop.

Stacked decorators fuse: decorating a function that buttress already decorated adds the new
pattern to the existing policy instead of wrapping a wrapper, so a four-decorator stack costs one
wrapper, and ``FF_ENABLE_RESILIENCE_PATTERNS=false`` costs one flag check.

Service names: a spec without a ``name`` takes the service of the stack it is part of (the first
named spec), else the function's qualified name. Specs that share a service share its breaker,
bulkhead and rate limiter.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import itertools
import operator
import threading
import types
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ParamSpec, TypeVar, cast, overload

from buttress import _clock, _context, _deadline, config, events, registry
from buttress._context import answered_as
from buttress._values import RedisURL
from buttress.events import CallFinished, SucceededCall
from buttress.exceptions import ConfigurationError, RejectedError, TimeoutExceededError
from buttress.patterns import PATTERNS
from buttress.patterns._base import (
    DRIVERS,
    AskStore,
    AsyncCall,
    BuildContext,
    Call,
    Effect,
    Hedge,
    RetryAfter,
    Return,
    Sleep,
    Strategy,
    Waiter,
    WaitForSlot,
)

__all__ = ["Policy", "Spec", "alink", "asettle", "link", "settle"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_POLICY_ATTR = "__buttress_policy__"
# Numbers the decorations whose state is private (no service named anywhere in the stack).
_private_keys = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Spec:
    """One pattern of a policy: its name, the service it belongs to, the arguments given in code.

    ``code_args`` holds only the arguments the caller actually passed (``None`` means "not set"),
    already validated against the pattern's options model.
    """

    pattern: str
    service: str | None = None
    code_args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        if self.service is not None:
            # Checked at run time for untyped callers. Names are case-insensitive: one spelling
            # for instances, labels and settings.
            object.__setattr__(self, "service", registry.given_name(self.service))
        preset: object = self.preset  # checked at run time for untyped callers
        if preset is not None and preset not in config.PRESETS:
            raise ConfigurationError(
                f"unknown preset {preset!r}; known: {', '.join(config.PRESETS)}",
                errors=(("preset", "code", f"unknown preset {preset!r}"),),
            )
        # Validate now, strictly (code arguments are typed values, not text), so a misuse fails
        # at decoration time, naming the argument.
        try:
            given, validated = config.code_arguments(self.pattern, self.code_args)
        except ValueError as exc:
            raise _argument_error(self.pattern, exc) from None
        # A URL that may hold a password is kept in its validated form, whose repr masks it, so
        # no repr of this spec, its policy or a conflict between call sites shows the secret.
        code_args = {
            name: value if not isinstance(kept := getattr(validated, name), RedisURL) else kept
            for name, value in given.items()
        }
        object.__setattr__(self, "code_args", _shared_args(code_args))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be pickled: rebuild from a plain dict (validated again on load).
        return (Spec, (self.pattern, self.service, dict(self.code_args), self.preset))


class _Args(dict[str, Any]):
    """Validated code arguments that equal specs share (see :func:`_shared_args`): a dict that
    can be referenced weakly, and its read-only view, which is what a spec holds; and the specs
    of these arguments that name no service, by pattern (see :func:`_shared_spec`)."""

    __slots__ = ("__weakref__", "unnamed", "view")

    view: Mapping[str, Any]
    unnamed: dict[str, Spec] | None


# Equal code arguments, one mapping for all the specs that give them (the same ``fail_max=5,
# timeout=60`` at many services), by their names, types and values in order. An entry goes
# when its last spec does (the view and its dict are a cycle, so at a garbage collection).
_args: weakref.WeakValueDictionary[tuple[Any, ...], _Args] = weakref.WeakValueDictionary()
_args_lock = threading.Lock()
_UNSHARED = object()
# Values compared for sharing: a value of another type (1 and True, or 1.0) is another value.
_FLAT = frozenset({str, int, bool, type(None), type})


def _flat(value: Any) -> Any:
    """What tells ``value`` apart from every other (its type, and for a float its bits), or
    ``_UNSHARED`` for a value whose equality says less than that (lists, objects, ...)."""
    kind = type(value)
    if kind in _FLAT:
        return (kind, value)
    if kind is float:
        return (kind, value.hex())  # -0.0 apart from 0.0, and a NaN equal to itself
    if kind is tuple:
        parts = tuple(_flat(each) for each in value)
        return _UNSHARED if _UNSHARED in parts else (kind, parts)
    return _UNSHARED


def _shared_args(code_args: dict[str, Any]) -> Mapping[str, Any]:
    """A read-only view of ``code_args``: the one that equal arguments already have, if any.

    Arguments with a value :func:`_flat` cannot tell apart from every other get a view of
    their own. The order of the arguments is part of the key (a policy's repr shows it).
    """
    key = _args_key(code_args)
    if key is None:
        return MappingProxyType(code_args)
    with _args_lock:
        found = _args.get(key)
        if found is None:
            found = _Args(code_args)
            found.view = MappingProxyType(found)
            found.unnamed = None
            _args[key] = found
        return found.view


def _args_key(code_args: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The key of ``code_args`` in ``_args``, or None if they cannot be shared (see _flat)."""
    key = tuple((name, _flat(value)) for name, value in code_args.items())
    return None if any(flat is _UNSHARED for _, flat in key) else key


def _shared_spec(spec: Spec) -> Spec:
    """The spec equal to ``spec`` that a policy already holds, if it names no service (nor a
    preset) and its arguments are shared: the inner decorators of most stacks
    (``@retry_with_backoff(max_attempts=3)`` under a named breaker) give the same spec at every
    service, and a spec is immutable. One per pattern and shared arguments, kept by those
    arguments' mapping (so as long as any spec gives them): ≈ 64 bytes less per such decorator.
    """
    if (
        spec.service is not None
        or spec.preset is not None
        or _last_shared.get(spec.pattern) is spec
    ):
        return spec
    key = _args_key(spec.code_args)
    if key is None:
        return spec
    with _args_lock:
        found = _args.get(key)
        if found is None or found.view is not spec.code_args:
            return spec
        unnamed = found.unnamed
        if unnamed is None:
            unnamed = found.unnamed = {}
        shared = _last_shared[spec.pattern] = unnamed.setdefault(spec.pattern, spec)
        return shared


# The spec each pattern last shared: the specs of a fused policy are its decorators' (shared
# already), found here by identity rather than by their arguments' key again.
_last_shared: dict[str, Spec] = {}


def _argument_error(pattern: str, exc: ValueError) -> ConfigurationError:
    from pydantic import ValidationError  # noqa: PLC0415 - only on the error path

    if isinstance(exc, ValidationError):
        problems = tuple(
            (
                ".".join(str(p) for p in err["loc"]) or pattern,
                "code",
                str(err["msg"]).removeprefix("Value error, ") + _got_type(err),
            )
            for err in exc.errors()
        )
        detail = "; ".join(f"{loc or pattern}: {msg}" for loc, _, msg in problems)
        return ConfigurationError(f"invalid argument for {pattern}: {detail}", errors=problems)
    return ConfigurationError(f"invalid argument for {pattern}: {exc}")


def _got_type(error: Mapping[str, Any]) -> str:
    # A wrong type is named; the value is not (it may be a secret typed in the wrong place).
    return f" (got {type(error['input']).__name__})" if error["type"].endswith("_type") else ""


def _build(
    spec: Spec,
    service: str,
    key: str,
    snapshot: config.Snapshot,
    budget_args: Mapping[str, Any],
    *,
    site: str,
) -> Strategy | None:
    view = snapshot.service(service)
    if not view.enabled or not view.pattern_enabled(spec.pattern):
        return None
    # A shared instance is configured by the code arguments of every call site of its service.
    code_args = registry.code_args(spec.pattern, key) if key == service else spec.code_args
    if spec.pattern == "retry" and budget_args:
        code_args = {**code_args, **budget_args}
    options = view.options(spec.pattern, code_args, spec.preset)
    if not getattr(options, "enabled", True):
        return None
    module = importlib.import_module(f"buttress.patterns.{spec.pattern}")
    budget = None
    if spec.pattern in _DRAWS_ON_BUDGET:
        # The budget it shares with retry: what the retry of its stack (or settings) configures.
        budget = view.options("retry", budget_args, spec.preset).budget  # type: ignore[attr-defined]
    ctx = BuildContext(
        service=service,
        options=options,
        key=key,
        mode=view.mode,
        instances=registry.shared,
        # Asked when a policy compiles (first call, every reload), never mid-way through one.
        armed=snapshot.settings.chaos_enabled,
        budget=budget,
        site=site,
    )
    return cast("Strategy | None", module.build(ctx))


# The recorder of a stack that calls its function directly: never asked, never rebound.
_UNHEARD = events.Recorder(CallFinished, "")
# Patterns other than retry that draw on the service's retry budget.
_DRAWS_ON_BUDGET = frozenset({"hedging"})
# The patterns that may answer a call in its place, and say how in its CallFinished outcome.
_ANSWERING = frozenset({"fallback", "cache"})


class _Compiled:
    """A policy compiled for one function and one settings snapshot."""

    __slots__ = ("answers", "calls", "chain", "direct", "snapshot")

    def __init__(
        self,
        snapshot: config.Snapshot,
        chain: Any,
        calls: events.Recorder,
        *,
        direct: bool,
        answers: bool = False,
    ) -> None:
        self.snapshot = snapshot  # the one thing a call checks: is it still the one in force?
        self.chain = chain  # the patterns
        self.calls = calls  # where the call's CallFinished goes (record is None: nowhere)
        self.direct = direct  # switched off: call the function itself
        # A pattern may answer in the call's place (fallback, cache, deferral): the call's
        # outcome is what it says (_context.answered), not "success".
        self.answers = answers


# The locks a stack compiles under: one of these per stack rather than a lock each (a stack
# compiles on its first call and after a reload; two stacks that share one wait for each other
# then, never on a call). Reentrant: a stack may compile while another one does on its thread.
_COMPILING = tuple(threading.RLock() for _ in range(16))


class _Bound:
    """A policy applied to one function: knows the services and compiles per settings snapshot.

    A compiled stack is used while ``config.SNAPSHOT`` is the snapshot it was compiled for. The
    registry invalidates it (:meth:`invalidate`) when a claim adds a code argument to a shared
    instance it uses, and only then: a new service does not touch the stacks of other services.
    """

    __slots__ = (
        "__weakref__",
        "_number",
        "_stale",
        "compiled",
        "fn",
        "is_async",
        "policy",
        "service",
    )

    def __init__(self, policy: Policy, fn: Callable[..., Any], *, is_async: bool) -> None:
        self.policy = policy
        self.fn = fn
        self.is_async = is_async
        site = _site(fn, policy)
        self.service = policy.service or registry.service_name(_qualified_name(fn))
        # The number of this call site's own state: its key (see keys()) is made when asked, a
        # string per stack costing more than this number (most stacks keep nothing under it).
        self._number = next(_private_keys)
        self._stale = False
        self.compiled = _STALE
        registry.depend(self)
        private = False  # whether an instance will be kept under this call site's own key
        for spec, service, _, named in self.keys():
            if spec.pattern in registry.SHARED_PATTERNS:
                if named:  # a shared instance of a named service
                    registry.claim(spec.pattern, service, spec.code_args, site, self)
                else:
                    private = True
            elif spec.pattern in registry.CALL_SITE_PATTERNS:
                private = True
            if spec.pattern == "retry" and named and "budget" in spec.code_args:
                # The retry budget is the service's, whatever the call site: claimed as the
                # shared instances' arguments are, so two sites cannot give it two values.
                registry.claim("retry", service, {"budget": spec.code_args["budget"]}, site, self)
        if private:
            # Private state lives as long as the decorated function: a function decorated per
            # request (a closure, a lambda) must not leave a breaker or a cache behind for each.
            weakref.finalize(self, registry.forget, self._private)

    @property
    def _private(self) -> str:
        """The key of this call site's own state: the same string each time it is made."""
        return f"{self.service}#{self._number}"

    def keys(self) -> Iterator[tuple[Spec, str, str, bool]]:
        """``(spec, service, key, named)`` for each spec, outermost first.

        A spec that names no service shares the stack's service when the stack names one
        (``named``); a shared pattern of a named service is keyed by the service, anything else
        by this call site's private key (when nothing in the stack is named, its state is private
        to this call site). Worked out again when asked (at decoration and at each compile)
        rather than kept per call site.
        """
        policy = self.policy
        private = self._private
        for spec in policy.specs:
            service = spec.service or self.service
            named = bool(spec.service or policy.service)
            shared = named and spec.pattern in registry.SHARED_PATTERNS
            yield spec, service, service if shared else private, named

    def invalidate(self) -> None:
        """Compile again before the next call (a shared instance's code arguments changed)."""
        self._stale = True
        self.compiled = _STALE

    def compile(self) -> _Compiled:
        snapshot = config.SNAPSHOT
        with _COMPILING[hash(self) % len(_COMPILING)]:
            current = self.compiled
            if current.snapshot is snapshot:
                return current
            self._stale = False
            compiled = self._compile(snapshot)
            self.compiled = compiled
            if self._stale:  # invalidated while compiling: the next call compiles again
                self.compiled = _STALE
            return compiled

    def _compile(self, snapshot: config.Snapshot) -> _Compiled:
        if not snapshot.enabled:
            return _Compiled(snapshot, None, _UNHEARD, direct=True)
        # The code arguments of each service's retry budget: claimed by every call site of a
        # named service, else those of this stack's retry.
        site = _qualified_name(self.fn)
        local = next(
            (
                {"budget": spec.code_args["budget"]}
                for spec, _, _, _ in self.keys()
                if spec.pattern == "retry" and "budget" in spec.code_args
            ),
            {},
        )
        strategies = [
            strategy
            for spec, service, key, named in self.keys()
            if (
                strategy := _build(
                    spec,
                    service,
                    key,
                    snapshot,
                    registry.code_args("retry", service) if named else local,
                    site=site,
                )
            )
            is not None
        ]
        view = snapshot.service(self.service)
        if not strategies and not view.enabled:
            return _Compiled(snapshot, None, _UNHEARD, direct=True)
        # Whether a pattern of the chain may answer in the call's place (see _context.answered).
        answers = any(getattr(s, "pattern", None) in _ANSWERING for s in strategies)
        calls = events.recorder(CallFinished, self.service)
        outermost = strategies[0] if strategies else None
        if (
            not answers
            and view.rollout >= 1.0
            and getattr(outermost, "final", False)
            and outermost.breaker.service == self.service  # type: ignore[union-attr]
        ):
            # The breaker is outermost and nothing can answer in the call's place, so its
            # rejection ends the call: its step records the call (the wrapper records nothing),
            # and a rejection is one pre-bound record with no catch on its way out.
            inner = strategies[1:]
            rest = self._chain_async(inner) if self.is_async else self._chain_sync(inner)
            chain = _final(outermost, calls, rest, is_async=self.is_async)
            return _Compiled(snapshot, chain, _UNHEARD, direct=False)
        chain = self._chain_async(strategies) if self.is_async else self._chain_sync(strategies)
        if view.rollout < 1.0:
            chain = self._rollout(chain, view)
        return _Compiled(snapshot, chain, calls, direct=False, answers=answers)

    def _chain_sync(self, strategies: list[Strategy]) -> Call:
        # The common steps (the final step, a held gate, a scoped recovery, the innermost call)
        # are module functions bound to a tuple of what they read, ``MethodType(_held, (admit,
        # release, bulkhead, call))``: a method object is 64 bytes, where a function
        # made per stack is 152 plus its closure cells (48 bytes a value) or defaults; a stack is
        # a handful of steps per call site. A strategy's hooks are kept as their class's function
        # and object (see _split). Unpacked into locals, they cost a call nothing more.
        # Steps are only ever called (args, kwargs).
        step: Call = types.MethodType(_innermost, self.fn)
        for strategy in reversed(strategies):
            step = link(strategy, step)
        return step

    def _chain_async(self, strategies: list[Strategy]) -> AsyncCall:
        step: AsyncCall = types.MethodType(_innermost, self.fn)
        for strategy in reversed(strategies):
            step = alink(strategy, step)
        return step

    def _rollout(self, run: Any, view: config.ServiceView) -> Any:
        fn = self.fn
        sample = view.sample
        if self.is_async:

            async def rolled_out_async(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if sample():
                    return await run(args, kwargs)
                return await fn(*args, **kwargs)

            return rolled_out_async

        def rolled_out(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if sample():
                return run(args, kwargs)
            return fn(*args, **kwargs)

        return rolled_out


def _innermost(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The last step of every chain, bound to its function (``MethodType(_innermost, fn)``): a
    method object is 64 bytes where a function of its own, with ``fn`` in its defaults, is 200.
    For an ``async def`` function it returns the awaitable, which the step above awaits."""
    return fn(*args, **kwargs)


# -- the two drivers -------------------------------------------------------------------------------
# Everything that waits is below, once for threads and once for tasks. A gate with nothing to give
# back costs no try/finally, and the common answer (no effect) costs one ``is not None``.


class _ThreadWaiter(Waiter):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def wake(self) -> bool:
        self.event.set()
        return True


class _TaskWaiter(Waiter):
    __slots__ = ("future", "loop", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.thread = threading.get_ident()

    def wake(self) -> bool:
        try:
            if threading.get_ident() == self.thread:
                # Woken from the waiter's own thread: resolve directly, no self-pipe write.
                _resolve(self.future)
            else:
                self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its loop was closed under it; that task will never run again
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def settle(effect: Any) -> Any:
    """Perform ``effect`` and those that follow it, for a thread; return what ends the chain.

    That is a token for the call, or a :class:`Return` (or :class:`TryAlternatives`) for the
    step to answer with.
    """
    while True:
        if isinstance(effect, Sleep):
            try:
                _clock.sleep(effect.seconds)
            except BaseException:
                effect.abandon()
                raise
            effect = effect.resume()
        elif isinstance(effect, WaitForSlot):
            waiter = _ThreadWaiter()
            if effect.queue(waiter):
                try:
                    _clock.wait(waiter.event, effect.bound)
                except BaseException:
                    effect.abandon(waiter)
                    raise
            effect = effect.resume(waiter)
        elif isinstance(effect, AskStore):
            try:
                reply = effect.transport.call(effect.request)
            except Exception as exc:  # noqa: BLE001 - no reply: the pattern decides without it
                effect = effect.failed(exc)
            except BaseException:
                effect.abandon()
                raise
            else:
                effect = effect.resume(reply)
        else:
            return effect


async def asettle(effect: Any) -> Any:
    """Perform ``effect`` and those that follow it, for a task; return what ends the chain."""
    while True:
        if isinstance(effect, Sleep):
            try:
                await _clock.asleep(effect.seconds)
            except BaseException:
                effect.abandon()
                raise
            effect = effect.resume()
        elif isinstance(effect, WaitForSlot):
            waiter = _TaskWaiter(asyncio.get_running_loop())
            if effect.queue(waiter):
                try:
                    async with _clock.timeout(effect.bound):
                        await waiter.future
                except TimeoutError:
                    pass  # out of time: resume() tells a slot granted in that instant from none
                except BaseException:
                    effect.abandon(waiter)
                    raise
            effect = effect.resume(waiter)
        elif isinstance(effect, AskStore):
            try:
                reply = await effect.transport.acall(effect.request)
            except Exception as exc:  # noqa: BLE001 - no reply: the pattern decides without it
                effect = effect.failed(exc)
            except BaseException:
                effect.abandon()
                raise
            else:
                effect = effect.resume(reply)
        else:
            return effect


def _answer(
    effect: Any, failure: Exception, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Answer ``failure`` of ``call`` as a recovery's effect says, for a thread."""
    if isinstance(effect, RetryAfter):
        while True:
            _clock.sleep(effect.seconds)
            effect.attempting()
            try:
                result = call(args, kwargs)
            except Exception as exc:  # noqa: BLE001 - the effect decides, and re-raises
                failure = exc
            else:
                effect.succeeded()
                return result
            # Reported outside the except block, so one attempt's failure does not chain onto
            # the next.
            effect = effect.failed(failure)
            if isinstance(effect, Return):  # gave up with a value (a rejected result)
                return effect.value
    if isinstance(effect, Return):
        return effect.value
    errors: list[tuple[Callable[..., Any], Exception]] = []
    for alternative, label in effect.alternatives:
        try:
            result = alternative(failure, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the next alternative takes over
            errors.append((alternative, error))
            continue
        effect.answered(label)
        return result
    return effect.exhausted(errors)


async def _aanswer(
    effect: Any, failure: Exception, call: AsyncCall, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Answer ``failure`` of ``call`` as a recovery's effect says, for a task."""
    if isinstance(effect, RetryAfter):
        while True:
            await _clock.asleep(effect.seconds)
            effect.attempting()
            try:
                result = await call(args, kwargs)
            except Exception as exc:  # noqa: BLE001 - the effect decides, and re-raises
                failure = exc
            else:
                effect.succeeded()
                return result
            effect = effect.failed(failure)
            if isinstance(effect, Return):  # gave up with a value (a rejected result)
                return effect.value
    if isinstance(effect, Return):
        return effect.value
    errors: list[tuple[Callable[..., Any], Exception]] = []
    for alternative, label in effect.alternatives:
        try:
            result = alternative(failure, *args, **kwargs)
            if inspect.isawaitable(result):  # an async def caller's handler may be either
                result = await result
        except Exception as error:  # noqa: BLE001 - the next alternative takes over
            errors.append((alternative, error))
            continue
        effect.answered(label)
        return result
    return effect.exhausted(errors)


def _bounded(strategy: Any, call: Call) -> Call:
    """Run under a deadline, for a thread: on a worker, waiting for it at most the limit."""
    service = strategy.service
    limit_of, exceeded, finished = strategy.limit, strategy.exceeded, strategy.finished
    # As in _abounded: the strategy's TimedCallFinished recorder called inline where it has one.
    recorded: events.Recorder | None = getattr(strategy, "recorded", None)
    pool = _deadline.POOL
    refused = (
        f" (not started: all {pool.per_service} worker threads {service!r} may hold are "
        "still running calls abandoned at their deadline)"
    )
    deadline_var = _context.deadline
    own_io = _context.bounds_own_io

    def on_worker(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        start = _clock.monotonic()
        limit = limit_of(start)
        deadline = start + limit
        # The worker runs in a copy of the caller's context so retry attempt numbers, the
        # idempotency key and this deadline are visible there; the caller's own is untouched.
        context = contextvars.copy_context()
        context.run(deadline_var.set, deadline)
        job = _deadline.Job(call, args, kwargs, context=context, service=service, deadline=deadline)
        job.parent = _deadline.worker.job
        if not pool.submit(job):
            finished(0.0, timed_out=True)
            raise exceeded(limit, 0.0, refused)
        try:
            wait = deadline - _clock.monotonic()
            if wait > 0:
                _clock.wait(job.done, wait)
        except BaseException:
            pool.settle(job)  # interrupted (KeyboardInterrupt): the worker is abandoned too
            raise
        state = pool.settle(job)
        if state == _deadline.DONE:
            error = job.error
            if error is None:
                finished(job.finished_at - start, timed_out=False)
                return job.result
            if type(error) is not _deadline.NotStartedError:
                finished(job.finished_at - start, timed_out=False)
                try:
                    raise error
                finally:
                    del error, job  # break the frame <-> traceback cycle
            # It waited inside (for a bulkhead slot) until this very deadline: our timeout.
        elapsed = _clock.monotonic() - start
        finished(elapsed, timed_out=True)
        raise exceeded(limit, elapsed, _deadline.DETAILS.get(state, ""))

    def timed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not own_io.get():
            # The hand-off to a worker costs far more than this frame: the frame is spent here,
            # not on the inline path below, which an integration's every attempt takes.
            return on_worker(args, kwargs)
        # The call bounds its own I/O by the deadline (an integration's client timeouts): no
        # worker. An error once the deadline has passed is that deadline's doing: a timeout.
        start = _clock.monotonic()
        limit = limit_of(start)
        token = deadline_var.set(start + limit)
        inner = own_io.set(False)  # for the call's own calls, which bound nothing themselves
        try:
            result = call(args, kwargs)
        except Exception as exc:
            elapsed = _clock.monotonic() - start
            if elapsed < limit and type(exc) is not _deadline.NotStartedError:
                finished(elapsed, timed_out=False)
                raise
            finished(elapsed, timed_out=True)
            raise exceeded(limit, elapsed) from exc
        finally:
            own_io.reset(inner)
            deadline_var.reset(token)
        if recorded is None:
            finished(_clock.monotonic() - start, timed_out=False)
        else:
            record = recorded.record
            if record is not None:  # the clock read only when somebody listens
                try:
                    record(_clock.monotonic() - start, False)  # noqa: FBT003 - (elapsed, timed_out)
                except Exception:  # noqa: BLE001 - a subscriber must never break the call
                    events.failed(record)
        return result

    return timed


def _abounded(strategy: Any, call: AsyncCall) -> AsyncCall:
    """Run under a deadline, for a task: a timer on its loop cancels it when the time is up."""
    limit_of, exceeded, finished = strategy.limit, strategy.exceeded, strategy.finished
    deadline_var = _context.deadline
    # The strategy's TimedCallFinished recorder (TimeoutStrategy.recorded): its record called
    # here, inline, and the clock read for it only when somebody listens. Without one (another
    # bounded strategy), finished() is told every end.
    recorded: events.Recorder | None = getattr(strategy, "recorded", None)

    async def timed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        start = _clock.monotonic()
        limit = limit_of(start)
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - awaited outside a task: nothing to cancel
            raise RuntimeError("with_timeout needs to run inside an asyncio task")
        # What asyncio.timeout does, inline: cancel the task at the deadline, then tell that
        # cancellation (ours) from one requested by anybody else (theirs: it propagates).
        cancelling = task.cancelling()
        expiry = _deadline.Expiry()
        expiry.task = task
        handle = _clock.call_later(limit, expiry.fire)
        token = deadline_var.set(start + limit)
        timed_out = False
        try:
            return await call(args, kwargs)
        except asyncio.CancelledError as exc:
            if expiry.fired:
                expiry.fired = False
                if task.uncancel() <= cancelling:
                    timed_out = True
                    raise exceeded(limit, _clock.monotonic() - start) from exc
            raise
        except _deadline.NotStartedError as exc:
            # A wait inside (for a bulkhead slot) saw this deadline pass before our timer did:
            # the same timeout, reported once, by this scope, as if the timer had fired.
            timed_out = True
            raise exceeded(limit, _clock.monotonic() - start) from exc
        finally:
            handle.cancel()
            if expiry.fired:
                # The deadline passed, but the call ended without seeing the cancellation:
                # withdraw it so it does not hit the caller's next await.
                task.uncancel()
            deadline_var.reset(token)
            if recorded is None:
                finished(_clock.monotonic() - start, timed_out)
            else:
                record = recorded.record
                if record is not None:
                    try:
                        record(_clock.monotonic() - start, timed_out)
                    except Exception:  # noqa: BLE001 - a subscriber must never break the call
                        events.failed(record)

    return timed


def _checked(check: Callable[[Any], None], call: Call) -> Call:
    # A recovery that treats some returned values as failures (retry_on_result): its check
    # raises for them, inside the recovery, so only that recovery sees a failure.
    def checked(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = call(args, kwargs)
        check(result)
        return result

    return checked


def _achecked(check: Callable[[Any], None], call: AsyncCall) -> AsyncCall:
    async def checked(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = await call(args, kwargs)
        check(result)
        return result

    return checked


def link(strategy: Any, call: Call) -> Call:
    """The step that runs ``call`` under ``strategy`` for a ``def`` caller."""
    if hasattr(strategy, "recover"):
        for alternative, _ in strategy.alternatives:
            if inspect.iscoroutinefunction(alternative):
                raise TypeError(
                    f"with_{strategy.pattern}: handler {_callable_name(alternative)} is async but "
                    "the protected function is not; give a def handler"
                )
        if hasattr(strategy, "replay_through"):
            strategy.replay_through(call, is_async=False)  # deferred calls run this step later
        check = getattr(strategy, "check_result", None)
        if check is not None:
            call = _checked(check, call)
        if hasattr(strategy, "scope"):
            return _scoped_recovery(
                strategy.scope, strategy.new_scope, strategy.recover, strategy.succeeded, call
            )
        return _recovery(strategy.recover, strategy.succeeded, call)
    if hasattr(strategy, "judge"):
        return _judged(strategy.before, strategy.judge, call)
    if hasattr(strategy, "enter"):
        return _keyed(strategy.enter, strategy.returned, strategy.raised, call)
    if hasattr(strategy, "before"):
        if hasattr(strategy, "finish"):
            return _learning(strategy.before, strategy.finish, call)
        return _gate(strategy.before, strategy.after, call)
    if hasattr(strategy, "limit"):
        return _bounded(strategy, call)
    raise _unknown_shape(strategy)


def alink(strategy: Any, call: AsyncCall) -> AsyncCall:
    """The step that runs ``call`` under ``strategy`` for an ``async def`` caller."""
    if hasattr(strategy, "recover"):
        if hasattr(strategy, "replay_through"):
            strategy.replay_through(call, is_async=True)
        check = getattr(strategy, "check_result", None)
        if check is not None:
            call = _achecked(check, call)
        if hasattr(strategy, "scope"):
            return _ascoped_recovery(
                strategy.scope, strategy.new_scope, strategy.recover, strategy.succeeded, call
            )
        return _arecovery(strategy.recover, strategy.succeeded, call)
    if hasattr(strategy, "judge"):
        return _ajudged(strategy.before, strategy.judge, call)
    if hasattr(strategy, "enter"):
        return _akeyed(strategy.enter, strategy.returned, strategy.raised, call)
    if hasattr(strategy, "before"):
        if hasattr(strategy, "finish"):
            return _alearning(strategy.before, strategy.finish, call)
        return _agate(strategy.before, strategy.after, call)
    if hasattr(strategy, "limit"):
        return _abounded(strategy, call)
    raise _unknown_shape(strategy)


def _unknown_shape(strategy: Any) -> TypeError:
    # Refused when the policy links its chain (its first call), naming the pattern, rather than
    # failing later inside a call with an AttributeError.
    name = getattr(strategy, "pattern", type(strategy).__qualname__)
    return TypeError(
        f"{name}: the strategy {type(strategy).__qualname__} has no known shape (gate, judge, "
        "judged gate, keyed, recovery or bounded; see buttress.patterns._base)"
    )


# A pattern's own entry points (the circuit breaker's pybreaker-facing API) perform effects
# through these same drivers.
DRIVERS.settle = settle
DRIVERS.asettle = asettle
DRIVERS.link = link
DRIVERS.alink = alink


def _gate(before: Callable[[], Any], after: Callable[[Any], None] | None, call: Call) -> Call:
    if after is None:

        def gated(
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            before: Callable[[], Any] = before,
            call: Call = call,
        ) -> Any:
            token = before()
            if token is not None:
                token = settle(token)
                if isinstance(token, Return):
                    return token.value
                if isinstance(token, Hedge):
                    return _hedge(token, call, args, kwargs)
            return call(args, kwargs)

        return gated

    return types.MethodType(_held, (*_hooks(before, after), call))


def _split(hook: Callable[..., Any]) -> tuple[Callable[..., Any], Any]:
    """``(function, owner)`` that a step calls as ``function(owner, ...)`` for ``hook(...)``.

    A strategy's hooks are most often methods (a bulkhead's ``admit`` and ``release``, a retry
    budget's ``new_scope``): a step keeps the object and the class's function rather than a
    method object of its own (64 bytes each, per stack), and calling the function on the
    object costs the same. Any other callable is called through ``operator.call``, which costs
    what calling it directly does.
    """
    if isinstance(hook, types.MethodType):
        return hook.__func__, hook.__self__
    return operator.call, hook


def _hooks(
    before: Callable[[], Any], after: Callable[[Any], None]
) -> tuple[Callable[[Any], Any], Callable[[Any, Any], None], Any]:
    """A held gate's ``(before, after, owner)``, called as ``before(owner)`` and ``after(owner,
    token)``: for two methods of one object (every held gate of the patterns), their class's
    functions and the object, as :func:`_split` does for one hook, with one owner for both (a
    fifth item to unpack measured ≈ 6 ns a call); other hooks through :func:`_first` and
    :func:`_second`."""
    if (
        isinstance(before, types.MethodType)
        and isinstance(after, types.MethodType)
        and before.__self__ is after.__self__
    ):
        return before.__func__, after.__func__, before.__self__
    return _first, _second, (before, after)


def _first(hooks: tuple[Callable[[], Any], Callable[[Any], None]]) -> Any:
    return hooks[0]()


def _second(hooks: tuple[Callable[[], Any], Callable[[Any], None]], token: Any) -> None:
    hooks[1](token)


def _held(
    state: tuple[Callable[[Any], Any], Callable[[Any, Any], None], Any, Call],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A gate that holds what it admitted for the length of the call (see _chain_sync)."""
    before, after, owner, call = state  # (see _hooks)
    token = before(owner)
    if token is not None and isinstance(token, Effect):
        token = settle(token)
        if isinstance(token, Return):
            return token.value
    try:
        return call(args, kwargs)
    finally:
        after(owner, token)


def _agate(
    before: Callable[[], Any], after: Callable[[Any], None] | None, call: AsyncCall
) -> AsyncCall:
    if after is None:

        async def gated(
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            before: Callable[[], Any] = before,
            call: AsyncCall = call,
        ) -> Any:
            token = before()
            if token is not None:
                token = await asettle(token)
                if isinstance(token, Return):
                    return token.value
                if isinstance(token, Hedge):
                    return await _ahedge(token, call, args, kwargs)
            return await call(args, kwargs)

        return gated

    return types.MethodType(_aheld, (*_hooks(before, after), call))


async def _aheld(
    state: tuple[Callable[[Any], Any], Callable[[Any, Any], None], Any, AsyncCall],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """:func:`_held` for ``async def`` callers."""
    before, after, owner, call = state  # (see _hooks)
    token = before(owner)
    if token is not None and isinstance(token, Effect):
        token = await asettle(token)
        if isinstance(token, Return):
            return token.value
    try:
        return await call(args, kwargs)
    finally:
        after(owner, token)


Admit = Callable[[Call, tuple[Any, ...], dict[str, Any]], Any]
Judged = Callable[[Any, float, BaseException | None, Any], Any]


def _judged(before: Admit, judge: Judged, call: Call) -> Call:
    def judged(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = before(call, args, kwargs)
        if isinstance(token, Effect):
            token = settle(token)
        started = _clock.monotonic()
        try:
            result = call(args, kwargs)
        except BaseException as exc:
            effect = judge(token, started, exc, None)
            if effect is not None:
                settle(effect)
            raise
        effect = judge(token, started, None, result)
        if effect is not None:
            settle(effect)
        return result

    return judged


def _final(strategy: Any, calls: events.Recorder, call: Any, *, is_async: bool) -> Any:
    """The outermost step of a chain whose breaker's rejection ends the call (see _compile).

    It admits, judges and records the call's CallFinished itself (``calls``), so the wrapper
    has nothing to record: a rejection (``breaker.before_final`` records RejectedCall) leaves with
    no ``except`` on its way, and the common success is judged and recorded by one call of the
    breaker's (``breaker.succeeded`` records SucceededCall). One ``try`` for both jobs. It keeps
    the breaker and calls its methods, rather than keeping four bound methods (0.25 KB a stack;
    a method looked up on the breaker costs a call no more).
    """

    succeeded_calls = events.recorder(SucceededCall, calls.service)
    step = _afinal_step if is_async else _final_step
    return types.MethodType(step, (strategy.breaker, succeeded_calls, calls, call))


def _final_step(
    state: tuple[Any, events.Recorder, events.Recorder, Call],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The final step (see :func:`_final`)."""
    breaker, succeeded_calls, calls, call = state  # (breaker: a CircuitBreaker)
    token = breaker.before_final(call, args, kwargs)
    # From here: before()'s own work is a local check (a rejection records no duration);
    # with state in Redis, the round trip is settled below and counts.
    began = started = _clock.monotonic()
    if isinstance(token, Effect):  # state in Redis: its rejection comes from settling
        try:
            token = settle(token)
        except RejectedError as exc:
            breaker.ended(exc)
            raise
        started = _clock.monotonic()  # the breaker times the call, not the round trip
    try:
        result = call(args, kwargs)
    except BaseException as exc:
        effect = breaker.judge(token, started, exc, None)
        if effect is not None:
            settle(effect)
        if isinstance(exc, Exception):
            record = calls.record
            if record is not None:
                _finished(record, exc, _clock.monotonic() - began)
        raise
    if breaker.succeeded(token, started, succeeded_calls):  # the common success: one call
        return result
    effect = breaker.judge(token, started, None, result)
    if effect is not None:
        settle(effect)
    record = calls.record
    if record is not None:
        try:
            record("success", _clock.monotonic() - began, None)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            events.failed(record)
    return result


async def _afinal_step(
    state: tuple[Any, events.Recorder, events.Recorder, AsyncCall],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """The final step for ``async def`` callers (see :func:`_final`)."""
    breaker, succeeded_calls, calls, call = state  # (breaker: a CircuitBreaker)
    token = breaker.before_final(call, args, kwargs)
    began = started = _clock.monotonic()
    if isinstance(token, Effect):
        try:
            token = await asettle(token)
        except RejectedError as exc:
            breaker.ended(exc)
            raise
        started = _clock.monotonic()
    try:
        result = await call(args, kwargs)
    except BaseException as exc:
        effect = breaker.judge(token, started, exc, None)
        if effect is not None:
            await asettle(effect)
        if isinstance(exc, Exception):
            record = calls.record
            if record is not None:
                _finished(record, exc, _clock.monotonic() - began)
        raise
    if breaker.succeeded(token, started, succeeded_calls):
        return result
    effect = breaker.judge(token, started, None, result)
    if effect is not None:
        await asettle(effect)
    record = calls.record
    if record is not None:
        try:
            record("success", _clock.monotonic() - began, None)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            events.failed(record)
    return result


Finish = Callable[[Any, BaseException | None], None]


def _learning(before: Callable[[], Any], finish: Finish, call: Call) -> Call:
    """A gate told how the call ended (``finish(token, None)`` or ``finish(token, exc)``).

    For the patterns that learn from outcomes and latency (the adaptive bulkhead and throttle).
    """

    def judged(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = before()
        if token is not None and isinstance(token, Effect):
            token = settle(token)
            if isinstance(token, Return):
                return token.value
        try:
            result = call(args, kwargs)
        except BaseException as exc:
            finish(token, exc)
            raise
        finish(token, None)
        return result

    return judged


def _ajudged(before: Admit, judge: Judged, call: AsyncCall) -> AsyncCall:
    async def judged(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = before(call, args, kwargs)
        if isinstance(token, Effect):
            token = await asettle(token)
        started = _clock.monotonic()
        try:
            result = await call(args, kwargs)
        except BaseException as exc:
            effect = judge(token, started, exc, None)
            if effect is not None:
                await asettle(effect)
            raise
        effect = judge(token, started, None, result)
        if effect is not None:
            await asettle(effect)
        return result

    return judged


def _alearning(before: Callable[[], Any], finish: Finish, call: AsyncCall) -> AsyncCall:
    async def judged(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = before()
        if token is not None and isinstance(token, Effect):
            token = await asettle(token)
            if isinstance(token, Return):
                return token.value
        try:
            result = await call(args, kwargs)
        except BaseException as exc:
            finish(token, exc)
            raise
        finish(token, None)
        return result

    return judged


_NO_DEADLINE = float("inf")


def _hedge(effect: Hedge, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Race copies of ``call`` as ``effect`` says, for a thread.

    Every copy runs on a worker of the timeout pool (in the service's share): the caller's thread
    only waits, so it can answer as soon as any copy does. A losing copy is left to finish on its
    worker; nobody reads its outcome. Copies start only while one is still running: hedging
    answers slowness; a failure with nothing else running is the answer.
    """
    ended = threading.Event()  # set by every copy as it ends
    jobs: list[_deadline.Job] = []
    parent = _deadline.worker.job

    def start() -> bool:
        job = _deadline.Job(
            call,
            args,
            kwargs,
            context=contextvars.copy_context(),
            service=effect.service,
            deadline=_NO_DEADLINE,
        )
        job.done = ended
        job.parent = parent
        if not _deadline.POOL.submit(job):
            return False  # the service's share of the pool is all abandoned timeouts
        jobs.append(job)
        return True

    launched_at = _clock.monotonic()
    if not start():
        # No worker to race on: the call runs on the caller's thread, unhedged.
        result = call(args, kwargs)
        effect.over(0)
        return result
    failed: set[int] = set()
    last = 0
    while True:
        ended.clear()
        for copy, job in enumerate(jobs):
            if copy in failed or job.state != _deadline.DONE:
                continue
            if job.error is None:
                effect.over(copy)
                return job.result
            failed.add(copy)
            last = copy
        if len(failed) == len(jobs):
            effect.over(None)
            error = jobs[last].error
            try:
                raise cast("BaseException", error)
            finally:
                del error  # break the frame <-> traceback cycle
        if effect.delay is None:
            _clock.wait(ended, None)
            continue
        left = launched_at + effect.delay - _clock.monotonic()
        if left > 0 and _clock.wait(ended, left):
            continue
        if effect.launch():
            launched_at = _clock.monotonic()
            if not start():
                effect.delay = None  # no worker free for a copy: the race goes on as it is


async def _ahedge(
    effect: Hedge, call: AsyncCall, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Race copies of ``call`` as ``effect`` says, for a task; the losers are cancelled."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []
    running: set[asyncio.Task[Any]] = set()

    def start() -> None:
        task = loop.create_task(_awaited(call, args, kwargs))
        task.add_done_callback(_consume)
        tasks.append(task)
        running.add(task)

    launched_at = _clock.monotonic()
    start()
    try:
        while True:
            due: asyncio.Future[None] | None = None
            timer = None
            waiting: set[asyncio.Future[Any]] = set(running)
            if effect.delay is not None:
                due = loop.create_future()
                left = max(launched_at + effect.delay - _clock.monotonic(), 0.0)
                timer = _clock.call_later(left, functools.partial(_resolve, due))
                waiting.add(due)
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if timer is not None:
                    timer.cancel()
            failure: BaseException | None = None
            for copy, task in enumerate(tasks):
                if task not in running or not task.done():
                    continue
                running.discard(task)
                error = asyncio.CancelledError() if task.cancelled() else task.exception()
                if error is None:
                    effect.over(copy)
                    return task.result()
                failure = error
            if not running:
                effect.over(None)
                raise cast("BaseException", failure)
            if due is not None and due.done() and effect.launch():
                launched_at = _clock.monotonic()
                start()
    finally:
        for task in running:
            task.cancel()


async def _awaited(call: AsyncCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return await call(args, kwargs)


def _consume(task: asyncio.Task[Any]) -> None:
    # A cancelled loser may still end with an error of its own: read it, so asyncio does not log
    # "exception was never retrieved" for a copy nobody waits for any more.
    if not task.cancelled():
        task.exception()


Recover = Callable[[Exception, tuple[Any, ...], dict[str, Any]], Any]
Succeeded = Callable[[tuple[Any, ...], dict[str, Any], Any], None]


def _recovery(recover: Recover, succeeded: Succeeded | None, call: Call) -> Call:
    if succeeded is None:

        def recovering(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            try:
                return call(args, kwargs)
            except Exception as exc:  # noqa: BLE001 - the strategy re-raises what it does not answer
                failure = exc
            # Answered outside the except block, so a failing alternative does not chain onto it.
            return _answer(recover(failure, args, kwargs), failure, call, args, kwargs)

        return recovering

    def noting(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            result = call(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the strategy re-raises what it does not answer
            failure = exc
        else:
            succeeded(args, kwargs, result)
            return result
        return _answer(recover(failure, args, kwargs), failure, call, args, kwargs)

    return noting


def _arecovery(recover: Recover, succeeded: Succeeded | None, call: AsyncCall) -> AsyncCall:
    if succeeded is None:

        async def recovering(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            try:
                return await call(args, kwargs)
            except Exception as exc:  # noqa: BLE001 - the strategy re-raises what it does not answer
                failure = exc
            return await _aanswer(recover(failure, args, kwargs), failure, call, args, kwargs)

        return recovering

    async def noting(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            result = await call(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the strategy re-raises what it does not answer
            failure = exc
        else:
            succeeded(args, kwargs, result)
            return result
        return await _aanswer(recover(failure, args, kwargs), failure, call, args, kwargs)

    return noting


def _scoped_recovery(
    scope: ContextVar[Any],
    new_scope: Callable[[], Any],
    recover: Recover,
    succeeded: Succeeded | None,
    call: Call,
) -> Call:
    return types.MethodType(_scoped, (scope, *_split(new_scope), *_split(recover), succeeded, call))


_ScopedState = tuple[ContextVar[Any], Callable[[Any], Any], Any, Callable[..., Any], Any, Any, Any]


def _scoped(state: _ScopedState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A recovery with a scope of its own around the call and its answer (retry's attempt
    count, a deferring fallback's idempotency key), set here inline: no hook call on the
    success path (see _chain_sync). ``new_scope`` and ``recover`` are split (see _split)."""
    scope, new_scope, scoping, recover, recovering, succeeded, call = state
    token = scope.set(new_scope(scoping))
    try:
        try:
            result = call(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the strategy re-raises what it does not answer
            failure = exc
        else:
            if succeeded is not None:
                succeeded(args, kwargs, result)
            return result
        return _answer(recover(recovering, failure, args, kwargs), failure, call, args, kwargs)
    finally:
        scope.reset(token)


def _ascoped_recovery(
    scope: ContextVar[Any],
    new_scope: Callable[[], Any],
    recover: Recover,
    succeeded: Succeeded | None,
    call: AsyncCall,
) -> AsyncCall:
    return types.MethodType(
        _ascoped, (scope, *_split(new_scope), *_split(recover), succeeded, call)
    )


async def _ascoped(state: _ScopedState, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """:func:`_scoped` for ``async def`` callers."""
    scope, new_scope, scoping, recover, recovering, succeeded, call = state
    token = scope.set(new_scope(scoping))
    try:
        try:
            result = await call(args, kwargs)
        except Exception as exc:  # noqa: BLE001 - the strategy re-raises what it does not answer
            failure = exc
        else:
            if succeeded is not None:
                succeeded(args, kwargs, result)
            return result
        return await _aanswer(
            recover(recovering, failure, args, kwargs), failure, call, args, kwargs
        )
    finally:
        scope.reset(token)


# -- keyed strategies (cache, coalescing) and the shared run of a Join ---------------------------
Enter = Callable[[tuple[Any, ...], dict[str, Any]], Any]
Returned = Callable[[Any, Any], None]
Raised = Callable[[Any, Exception], Any]


def _keyed(enter: Enter, returned: Returned | None, raised: Raised | None, call: Call) -> Call:
    def keyed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = enter(args, kwargs)
        if token is not None and isinstance(token, Effect):
            if isinstance(token, Return):
                return token.value  # answered without running the call
            return _join(token, call, args, kwargs)
        try:
            result = call(args, kwargs)
        except Exception as exc:
            if raised is None:
                raise
            failure = exc
        else:
            if returned is not None:
                returned(token, result)
            return result
        return _answer(raised(token, failure), failure, call, args, kwargs)

    return keyed


def _akeyed(
    enter: Enter, returned: Returned | None, raised: Raised | None, call: AsyncCall
) -> AsyncCall:
    async def keyed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = enter(args, kwargs)
        if token is not None and isinstance(token, Effect):
            if isinstance(token, Return):
                return token.value
            return await _ajoin(token, call, args, kwargs)
        try:
            result = await call(args, kwargs)
        except Exception as exc:
            if raised is None:
                raise
            failure = exc
        else:
            if returned is not None:
                returned(token, result)
            return result
        return await _aanswer(raised(token, failure), failure, call, args, kwargs)

    return keyed


def _join(effect: Any, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Share one run of ``call`` with identical calls, for a thread (see :class:`Join`)."""
    while True:
        if effect.leads:
            # The leading thread runs the call itself: nothing but an interpreter exit or a
            # KeyboardInterrupt stops a thread, and the others then start over.
            try:
                result = call(args, kwargs)
            except BaseException as exc:
                effect.settle(None, exc)
                raise
            effect.settle(result, None)
            return result
        waiter = _ThreadWaiter()
        if effect.wait(waiter):
            try:
                _clock.wait(waiter.event, None)
            except BaseException:
                effect.leave(waiter)
                raise
        effect = effect.outcome(waiter)
        if isinstance(effect, Return):
            return effect.value


# The shared runs of async callers, held until they end: the loop keeps only weak references.
_shared_runs: set[asyncio.Task[Any]] = set()


async def _ajoin(
    effect: Any, call: AsyncCall, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Share one run of ``call`` with identical calls, for a task (see :class:`Join`)."""
    while True:
        loop = asyncio.get_running_loop()
        if effect.leads:
            # A task of its own (in a copy of the leader's context): cancelling any caller,
            # the leader included, only ends that caller's wait.
            run = loop.create_task(_run_shared(call, args, kwargs))
            _shared_runs.add(run)
            run.add_done_callback(functools.partial(_shared_run_ended, effect))
        waiter = _TaskWaiter(loop)
        if effect.wait(waiter):
            try:
                await waiter.future
            except BaseException:
                effect.leave(waiter)
                raise
        effect = effect.outcome(waiter)
        if isinstance(effect, Return):
            return effect.value


async def _run_shared(call: AsyncCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return await call(args, kwargs)


def _shared_run_ended(effect: Any, run: asyncio.Task[Any]) -> None:
    _shared_runs.discard(run)
    if run.cancelled():
        effect.settle(None, asyncio.CancelledError())
        return
    error = run.exception()
    effect.settle(None if error is not None else run.result(), error)


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class _NoSnapshot:
    """Sentinel snapshot: never the current one, so the first call compiles."""


_NO_SNAPSHOT = cast("config.Snapshot", _NoSnapshot())
# What a stack holds before its first call and after it is invalidated: never current.
_STALE = _Compiled(_NO_SNAPSHOT, None, _UNHEARD, direct=True)


class Policy:
    """An immutable stack of patterns, outermost first; also a decorator.

    ``policy(fn)`` decorates; ``policy.call(fn, *args, **kwargs)`` and
    ``await policy.acall(fn, *args, **kwargs)`` run one call through it. The calls of one policy
    object share one compiled stack whatever ``fn`` is (a fresh lambda per call costs nothing
    extra and keeps nothing): when no spec names a service, that state is private to the policy.
    """

    __slots__ = ("_acall_runner", "_call_runner", "service", "specs")

    def __init__(self, *specs: Spec) -> None:
        if not specs:
            raise ValueError("a Policy needs at least one pattern")
        for spec in specs:
            if not isinstance(spec, Spec):
                raise TypeError(f"Policy takes Spec objects, got {spec!r}")
        specs = tuple(_shared_spec(spec) for spec in specs)
        # Immutable: attributes are set once here, through object.__setattr__.
        init = object.__setattr__
        init(self, "specs", specs)
        init(self, "service", next((s.service for s in specs if s.service), None))
        # What call() and acall() run: made at the first of each (most policies only decorate).
        init(self, "_call_runner", None)
        init(self, "_acall_runner", None)

    def __repr__(self) -> str:
        return self._text(repr)

    def _text(self, shown: Callable[[Any], str]) -> str:
        """The policy as its repr writes it, each code argument's value written by ``shown``."""
        inner = ", ".join(
            f"{s.pattern}({s.service or ''}{', ' if s.service and s.code_args else ''}"
            + ", ".join(f"{k}={shown(v)}" for k, v in s.code_args.items())
            + ")"
            for s in self.specs
        )
        return f"Policy({inner})"

    specs: tuple[Spec, ...]
    service: str | None
    _call_runner: Callable[..., Any] | None
    _acall_runner: Callable[..., Any] | None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Policy is immutable: cannot set {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        # A policy is its specs: the compiled runners and their lock are rebuilt on first use.
        return (Policy, self.specs)

    def then(self, other: Policy) -> Policy:
        """A policy with ``other``'s patterns inside this one's."""
        return Policy(*self.specs, *other.specs)

    @overload
    def __call__(self, fn: staticmethod[P, R]) -> staticmethod[P, R]: ...
    @overload
    def __call__(self, fn: classmethod[T, P, R]) -> classmethod[T, P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Any) -> Any:
        # Placed above @staticmethod or @classmethod in a class body: protect the function inside
        # and re-wrap it, or the wrapper (a plain function) would bind the instance as an
        # argument of a static method, and a classmethod object is not even callable.
        if isinstance(fn, staticmethod):
            return staticmethod(self(fn.__func__))
        if isinstance(fn, classmethod):
            return classmethod(self(fn.__func__))
        _check_decoratable(fn)
        inner = _bound_of(fn)
        if inner is not None:
            # Fuse with the policy already on fn: one wrapper for the whole stack.
            return Policy(*self.specs, *inner.policy.specs)(inner.fn)
        if _is_async(fn):
            return _wrap_async(self, fn)
        return _wrap_sync(self, fn)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` through the policy (``fn`` must be a ``def`` function)."""
        if _is_async(fn):
            raise TypeError("Policy.call() runs def functions; use `await policy.acall(...)`")
        _refuse_generator(fn)
        token = _call_target.set(fn)
        try:
            return cast("T", self._runner(is_async=False)(*args, **kwargs))
        finally:
            _call_target.reset(token)

    async def acall(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` through the policy."""
        _refuse_generator(fn)
        token = _call_target.set(fn)
        try:
            return cast("T", await self._runner(is_async=True)(*args, **kwargs))
        finally:
            _call_target.reset(token)

    def _runner(self, *, is_async: bool) -> Callable[..., Any]:
        runner = self._acall_runner if is_async else self._call_runner
        if runner is None:
            # One lock for every policy: it is taken once per policy and kind of call.
            with _runners_lock:
                name = "_acall_runner" if is_async else "_call_runner"
                runner = getattr(self, name)
                if runner is None:
                    # Decorated by an equal policy, not this one: the runner would hold this
                    # policy, which holds the runner, a cycle only a garbage collection frees (a
                    # policy made per call would keep its state until then).
                    runner = Policy(*self.specs)(_target_runner(is_async=is_async))
                    object.__setattr__(self, name, runner)
        return runner


_runners_lock = threading.RLock()  # (reentrant: a runner is made by decorating)


# The function Policy.call()/acall() is running (in _context: a cache key includes it).
_call_target = _context.call_target


def _target_runner(*, is_async: bool) -> Callable[..., Any]:
    if is_async:

        async def policy_acall(*args: Any, **kwargs: Any) -> Any:
            awaitable = _call_target.get()(*args, **kwargs)
            if not inspect.isawaitable(awaitable):
                raise TypeError(
                    "Policy.acall() needs a function that returns an awaitable "
                    f"(got {type(awaitable).__name__}); use policy.call(...) for a def function"
                )
            return await awaitable

        # The qualified name is the service label of an unnamed policy's acall: keep it short.
        policy_acall.__qualname__ = "policy_acall"
        return policy_acall

    def policy_call(*args: Any, **kwargs: Any) -> Any:
        return _call_target.get()(*args, **kwargs)

    policy_call.__qualname__ = "policy_call"
    return policy_call


# What a wrapper copies from the function it wraps: functools.wraps's list plus the defaults, which
# readers of fn.__defaults__ expect to see. They change nothing in how the wrapper binds its
# arguments: it has no named parameters for them to apply to (it takes *args, **kwargs).
_ASSIGNED = (*functools.WRAPPER_ASSIGNMENTS, "__defaults__", "__kwdefaults__")


def _wrap_sync(policy: Policy, fn: Callable[P, R]) -> Callable[P, R]:
    bound = _Bound(policy, fn, is_async=False)

    @functools.wraps(fn, assigned=_ASSIGNED)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        compiled = bound.compiled
        if compiled.snapshot is not config.SNAPSHOT:
            compiled = bound.compile()
        if compiled.direct:
            return fn(*args, **kwargs)
        # Annotated rather than cast(): typing.cast is a real call, on every call.
        result: R
        record = compiled.calls.record
        if record is None:
            result = compiled.chain(args, kwargs)
            return result
        if compiled.answers:
            result = _answering(compiled.chain, record, args, kwargs)
            return result
        # Somebody listens to CallFinished: time the call and hand its outcome to the recorder
        # (pre-bound series; no event is built unless a plain handler wants one).
        started = _clock.monotonic()
        try:
            result = compiled.chain(args, kwargs)
        except RejectedError as exc:
            # _finished's first case inline: while a circuit is open, every call comes here.
            try:
                record("rejected", _clock.monotonic() - started, type(exc).__name__)
            except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
                events.failed(record)
            raise
        except Exception as exc:
            _finished(record, exc, _clock.monotonic() - started)
            raise
        try:
            record("success", _clock.monotonic() - started, None)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            events.failed(record)
        return result

    if isinstance(fn, functools.partial):
        _name_after(wrapper, fn)
    _mark(wrapper, policy)
    return wrapper


def _wrap_async(policy: Policy, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    bound = _Bound(policy, fn, is_async=True)

    @functools.wraps(fn, assigned=_ASSIGNED)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        compiled = bound.compiled
        if compiled.snapshot is not config.SNAPSHOT:
            compiled = bound.compile()
        if compiled.direct:
            return await fn(*args, **kwargs)
        result: R
        record = compiled.calls.record
        if record is None:
            result = await compiled.chain(args, kwargs)
            return result
        if compiled.answers:
            result = await _aanswering(compiled.chain, record, args, kwargs)
            return result
        started = _clock.monotonic()
        try:
            result = await compiled.chain(args, kwargs)
        except RejectedError as exc:
            # _finished's first case inline: while a circuit is open, every call comes here.
            try:
                record("rejected", _clock.monotonic() - started, type(exc).__name__)
            except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
                events.failed(record)
            raise
        except Exception as exc:
            _finished(record, exc, _clock.monotonic() - started)
            raise
        try:
            record("success", _clock.monotonic() - started, None)
        except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
            events.failed(record)
        return result

    if isinstance(fn, functools.partial):
        _name_after(wrapper, fn)
    _mark(wrapper, policy)
    return wrapper


def _answering(
    chain: Call, record: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A recorded call of a chain that may answer in the call's place (fallback, cache,
    deferral): the outcome is what the pattern notes in the call's cell (_context.answered).

    Apart from the wrappers, so that the other chains pay nothing for it.
    """
    started = _clock.monotonic()
    cell = ["success"]
    scope = answered_as.set(cell)
    try:
        result = chain(args, kwargs)
    except Exception as exc:
        _finished(record, exc, _clock.monotonic() - started)
        raise
    finally:
        answered_as.reset(scope)
    try:
        record(cell[0], _clock.monotonic() - started, None)
    except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
        events.failed(record)
    return result


async def _aanswering(
    chain: AsyncCall,
    record: Callable[..., object],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """:func:`_answering` for ``async def`` callers."""
    started = _clock.monotonic()
    cell = ["success"]
    scope = answered_as.set(cell)
    try:
        result = await chain(args, kwargs)
    except Exception as exc:
        _finished(record, exc, _clock.monotonic() - started)
        raise
    finally:
        answered_as.reset(scope)
    try:
        record(cell[0], _clock.monotonic() - started, None)
    except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
        events.failed(record)
    return result


def _finished(record: Callable[..., object], exc: Exception, elapsed: float) -> None:
    """Record the CallFinished of a call that raised ``exc`` (a failing subscriber is reported).

    One frame, the outcome worked out inline: while a circuit is open, every call comes here.
    """
    if isinstance(exc, RejectedError):
        outcome = "rejected"
    elif isinstance(exc, TimeoutExceededError):
        outcome = "timeout"
    else:
        outcome = "failure"
    try:
        record(outcome, elapsed, type(exc).__name__)
    except Exception:  # noqa: BLE001 - a subscriber must never break the protected call
        events.failed(record)


# The code of the wrappers buttress makes: fusion recognises one by it, never by the
# __buttress_policy__ attribute (functools.wraps copies a function's __dict__, so a third-party
# decorator stacked over a buttress wrapper carries that too, and fusing past it would drop it).
# Its policy and target are those of the _Bound in its closure: nothing is kept per wrapper for
# this (a table of wrappers cost ≈ 0.2 KB a stack).
_WRAPPER_CODES = tuple(
    next(c for c in maker.__code__.co_consts if getattr(c, "co_name", None) == "wrapper")
    for maker in (_wrap_sync, _wrap_async)
)
_BOUND_CELL = {code: code.co_freevars.index("bound") for code in _WRAPPER_CODES}


def _bound_of(fn: object) -> _Bound | None:
    """The _Bound of ``fn`` when ``fn`` is a wrapper buttress made, else None."""
    if type(fn) is not types.FunctionType:
        return None
    cell = _BOUND_CELL.get(fn.__code__)
    if cell is None:
        return None
    return cast("_Bound", fn.__closure__[cell].cell_contents)  # type: ignore[index] # has cells


def _name_after(wrapper: Callable[..., Any], partial: functools.partial[Any]) -> None:
    """Name the wrapper of a partial after the function it calls (functools.wraps finds no
    name on a partial, and the module it finds is functools'): what a traceback, a log and
    ``config show`` print."""
    fn: Any = partial
    while isinstance(fn, functools.partial):
        fn = fn.func
    for name in ("__module__", "__name__", "__qualname__"):
        value = getattr(fn, name, None)
        if isinstance(value, str):
            setattr(wrapper, name, value)


def _mark(wrapper: Callable[..., Any], policy: Policy) -> None:
    setattr(wrapper, _POLICY_ATTR, policy)


def _is_async(fn: object) -> bool:
    """``async def`` functions, and objects whose ``__call__`` is one (inspect misses those)."""
    return inspect.iscoroutinefunction(fn) or (
        callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)
    )


def _check_decoratable(fn: object) -> None:
    if isinstance(fn, type):
        raise TypeError(
            f"buttress decorates functions and methods, not classes: got class {fn.__qualname__}"
        )
    if not callable(fn):
        raise TypeError(f"buttress decorates callables, got {type(fn).__name__}: {fn!r}")
    call = type(fn).__call__  # a callable object's generator __call__ counts too
    if any(inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (fn, call)):
        raise _generator_error(fn)


def _generator_error(fn: Callable[..., Any]) -> TypeError:
    return TypeError(
        f"{_qualified_name(fn)} is a generator function: its body runs while the caller "
        "iterates, after the protected call has returned, so no pattern could cover it. "
        "Protect a function that returns the collected results instead."
    )


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def _refuse_generator(fn: Callable[..., Any]) -> None:
    """What a decorator refuses, for ``Policy.call()``/``acall()``, which run per call: read from
    the code of a function or method only (one attribute; inspect's checks of every callable
    would cost a call half again)."""
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_flags & _GENERATOR_FLAGS:
        raise _generator_error(fn)


def _qualified_name(fn: Callable[..., Any]) -> str:
    # A partial is named by the function it calls, not "functools.partial": the name is an
    # unnamed stack's service, and a deferring function's queue (and durable stream).
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None) or "<unknown>"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


# The code of what Policy.call() and acall() decorate: one for every policy, so not a site.
_RUNNER_CODES = frozenset(
    c for c in _target_runner.__code__.co_consts if isinstance(c, types.CodeType)
)


def _site_value(value: Any) -> str:
    """A code argument's value in a policy's site: a function as its kind only, so that a policy
    made per call with a ``lambda`` predicate is one site each time (data is written in full:
    two policies that give it two values are two sites)."""
    if isinstance(value, tuple):
        return f"({', '.join(_site_value(each) for each in value)}{',' * (len(value) == 1)})"
    if callable(value) and not isinstance(value, type):
        return f"<{type(value).__name__}>"
    return repr(value)


def _site(fn: Callable[..., Any], policy: Policy) -> registry.Site:
    """What identifies ``fn``'s call site in the registry's claims: the code of the function it
    wraps (shared by every decoration of one ``def``, so a function decorated per request never
    conflicts with itself), described only when a conflict is reported (see registry.describe);
    a callable without code is its qualified name, and ``policy.call()``/``acall()`` the
    policy (every policy's runner has one code: two policies that give one argument two values
    must still conflict, and a conflict must name the policy, not buttress's runner)."""
    code = getattr(fn, "__code__", None)
    if code in _RUNNER_CODES:
        return f"{policy._text(_site_value)}.{code.co_name.removeprefix('policy_')}()"
    target = fn
    while isinstance(target, functools.partial):  # the site of the function it calls
        target = target.func
    code = getattr(inspect.unwrap(target), "__code__", None)
    return code if isinstance(code, types.CodeType) else _qualified_name(fn)
