"""Policy: an immutable, ordered stack of patterns, and the two drivers that run a call through it.

A :class:`Policy` is a tuple of :class:`Spec` (which pattern, for which service, with which code
arguments), outermost first. It decides nothing at decoration time beyond validating arguments:
settings are read when a call happens. The first call (and the first call after
``reload_settings()``) *compiles* the stack: it resolves each pattern's options for its service,
builds the strategies and chains their ``wrap`` (sync) or ``awrap`` (async) steps into one
callable. Every later call only checks that the settings snapshot is still the same object.

Stacked decorators fuse: decorating a function that buttress already decorated adds the new
pattern to the existing policy instead of wrapping a wrapper, so a four-decorator stack costs one
wrapper, and ``FF_ENABLE_RESILIENCE_PATTERNS=false`` costs one flag check.

Service names: a spec without a ``name`` takes the service of the stack it is part of (the first
named spec), else the function's qualified name. Specs that share a service share its breaker,
bulkhead and rate limiter.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ParamSpec, TypeVar, cast, overload

from buttress import _clock, config, events, registry
from buttress._values import RedisURL
from buttress.events import CallFinished
from buttress.exceptions import ConfigurationError, RejectedError, TimeoutExceededError
from buttress.patterns._base import AsyncCall, BuildContext, Call, Strategy

__all__ = ["Policy", "Spec"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_POLICY_ATTR = "__buttress_policy__"
# Numbers the decorations whose state is private (no service named anywhere in the stack).
_private_keys = itertools.count(1)
# The wrappers buttress made, with their policy and target. Fusion trusts only this, never the
# __buttress_policy__ attribute: functools.wraps copies a function's __dict__, so a third-party
# decorator stacked over a buttress wrapper carries it too, and fusing past it would drop it.
_wrappers: weakref.WeakKeyDictionary[Callable[..., Any], tuple[Policy, Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


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
        if self.pattern not in config.PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {config.PATTERNS}")
        service: object = self.service  # checked at run time for untyped callers
        if service is not None and (not isinstance(service, str) or service == ""):
            raise TypeError(f"name must be a non-empty string, got {self.service!r}")
        if self.service is not None:
            # Names are case-insensitive: one spelling for instances, labels and settings.
            object.__setattr__(self, "service", registry.service_name(self.service))
        # Validate now so a misuse fails at decoration time, naming the argument.
        try:
            validated = config.options_model(self.pattern).model_validate(dict(self.code_args))
        except ValueError as exc:
            raise _argument_error(self.pattern, exc) from None
        # A URL that may hold a password is kept in its validated form, whose repr masks it, so
        # no repr of this spec, its policy or a conflict between call sites shows the secret.
        code_args = {
            name: value if not isinstance(kept := getattr(validated, name), RedisURL) else kept
            for name, value in self.code_args.items()
        }
        object.__setattr__(self, "code_args", MappingProxyType(code_args))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be pickled: rebuild from a plain dict (validated again on load).
        return (Spec, (self.pattern, self.service, dict(self.code_args), self.preset))


def _argument_error(pattern: str, exc: ValueError) -> ConfigurationError:
    from pydantic import ValidationError  # noqa: PLC0415 - only on the error path

    if isinstance(exc, ValidationError):
        problems = tuple(
            (
                ".".join(str(p) for p in err["loc"]) or pattern,
                "code",
                str(err["msg"]).removeprefix("Value error, "),
            )
            for err in exc.errors()
        )
        detail = "; ".join(f"{loc or pattern}: {msg}" for loc, _, msg in problems)
        return ConfigurationError(f"invalid argument for {pattern}: {detail}", errors=problems)
    return ConfigurationError(f"invalid argument for {pattern}: {exc}")


def _build(spec: Spec, service: str, key: str, snapshot: config.Snapshot) -> Strategy | None:
    view = snapshot.service(service)
    if not view.enabled or not view.pattern_enabled(spec.pattern):
        return None
    # A shared instance is configured by the code arguments of every call site of its service.
    code_args = registry.code_args(spec.pattern, key) if key == service else spec.code_args
    options = view.options(spec.pattern, code_args, spec.preset)
    if not getattr(options, "enabled", True):
        return None
    module = importlib.import_module(f"buttress.patterns.{spec.pattern}")
    ctx = BuildContext(service=service, options=options, key=key, mode=view.mode)
    return cast("Strategy | None", module.build(ctx))


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, RejectedError):
        return "rejected"
    if isinstance(exc, TimeoutExceededError):
        return "timeout"
    return "failure"


class _Compiled:
    """A policy compiled for one function and one settings snapshot."""

    __slots__ = ("chain", "direct", "epoch", "observed", "snapshot")

    def __init__(
        self,
        snapshot: config.Snapshot,
        epoch: object,
        chain: Any,
        observed: Any,
        *,
        direct: bool,
    ) -> None:
        self.snapshot = snapshot
        self.epoch = epoch
        self.chain = chain  # the patterns, for calls nobody observes
        self.observed = observed  # the same, emitting CallFinished
        self.direct = direct


class _Bound:
    """A policy applied to one function: knows the services and compiles per settings snapshot."""

    def __init__(self, policy: Policy, fn: Callable[..., Any], *, is_async: bool) -> None:
        self.policy = policy
        self.fn = fn
        self.is_async = is_async
        site = _site(fn)
        self.service = policy.service or registry.service_name(_qualified_name(fn))
        # A spec that names no service shares the stack's service when the stack names one; when
        # nothing in the stack is named, its state is private to this call site.
        self.keys: list[tuple[Spec, str, str]] = []
        private = f"{self.service}#{next(_private_keys)}"
        # Private state lives as long as the decorated function: a function decorated per
        # request (a closure, a lambda) must not leave a breaker behind for each one.
        weakref.finalize(self, registry.forget, private)
        for spec in policy.specs:
            service = spec.service or self.service
            if spec.pattern in registry.SHARED_PATTERNS and (spec.service or policy.service):
                registry.claim(spec.pattern, service, spec.code_args, site)
                self.keys.append((spec, service, service))
            else:
                self.keys.append((spec, service, private))
        self._lock = threading.Lock()
        self.compiled = _Compiled(_NO_SNAPSHOT, None, None, None, direct=True)

    def compile(self, snapshot: config.Snapshot) -> _Compiled:
        with self._lock:
            epoch = registry.EPOCH
            current = self.compiled
            if current.snapshot is snapshot and current.epoch is epoch:
                return current
            compiled = self._compile(snapshot, epoch)
            self.compiled = compiled
            return compiled

    def _compile(self, snapshot: config.Snapshot, epoch: object) -> _Compiled:
        if not snapshot.enabled:
            return _Compiled(snapshot, epoch, None, None, direct=True)
        strategies = [
            strategy
            for spec, service, key in self.keys
            if (strategy := _build(spec, service, key, snapshot)) is not None
        ]
        view = snapshot.service(self.service)
        if not strategies and not view.enabled:
            return _Compiled(snapshot, epoch, None, None, direct=True)
        chain = self._chain_async(strategies) if self.is_async else self._chain_sync(strategies)
        if view.rollout < 1.0:
            chain = self._rollout(chain, view)
        observed = (
            _observe_async(chain, self.service)
            if self.is_async
            else _observe_sync(chain, self.service)
        )
        return _Compiled(snapshot, epoch, chain, observed, direct=False)

    def _chain_sync(self, strategies: list[Strategy]) -> Call:
        fn = self.fn

        def innermost(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return fn(*args, **kwargs)

        step: Call = innermost
        for strategy in reversed(strategies):
            step = strategy.wrap(step)
        return step

    def _chain_async(self, strategies: list[Strategy]) -> AsyncCall:
        fn = self.fn

        def innermost(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Awaitable[Any]:
            return cast("Awaitable[Any]", fn(*args, **kwargs))

        step: AsyncCall = innermost
        for strategy in reversed(strategies):
            step = strategy.awrap(step)
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


def _observe_sync(chain: Call, service: str) -> Call:
    """``chain`` plus one ``CallFinished`` per call (used only while somebody listens)."""

    def observed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        handlers = events.ROUTES.get(CallFinished)
        if not handlers:
            return chain(args, kwargs)
        started = _clock.monotonic()
        try:
            result = chain(args, kwargs)
        except Exception as exc:
            elapsed = _clock.monotonic() - started
            events.dispatch(
                handlers, CallFinished(service, _outcome(exc), elapsed, type(exc).__name__)
            )
            raise
        events.dispatch(
            handlers, CallFinished(service, "success", _clock.monotonic() - started, None)
        )
        return result

    return observed


def _observe_async(chain: AsyncCall, service: str) -> AsyncCall:
    """``chain`` plus one ``CallFinished`` per call (used only while somebody listens)."""

    async def observed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        handlers = events.ROUTES.get(CallFinished)
        if not handlers:
            return await chain(args, kwargs)
        started = _clock.monotonic()
        try:
            result = await chain(args, kwargs)
        except Exception as exc:
            elapsed = _clock.monotonic() - started
            events.dispatch(
                handlers, CallFinished(service, _outcome(exc), elapsed, type(exc).__name__)
            )
            raise
        events.dispatch(
            handlers, CallFinished(service, "success", _clock.monotonic() - started, None)
        )
        return result

    return observed


class _NoSnapshot:
    """Sentinel snapshot: never the current one, so the first call compiles."""


_NO_SNAPSHOT = cast("config.Snapshot", _NoSnapshot())


class Policy:
    """An immutable stack of patterns, outermost first; also a decorator.

    ``policy(fn)`` decorates; ``policy.call(fn, *args, **kwargs)`` and
    ``await policy.acall(fn, *args, **kwargs)`` run one call through it. The calls of one policy
    object share one compiled stack whatever ``fn`` is (a fresh lambda per call costs nothing
    extra and keeps nothing): when no spec names a service, that state is private to the policy.
    """

    __slots__ = ("_runners", "_runners_lock", "service", "specs")

    def __init__(self, *specs: Spec) -> None:
        if not specs:
            raise ValueError("a Policy needs at least one pattern")
        for spec in specs:
            if not isinstance(spec, Spec):
                raise TypeError(f"Policy takes Spec objects, got {spec!r}")
        # Immutable: attributes are set once here, through object.__setattr__.
        init = object.__setattr__
        init(self, "specs", specs)
        init(self, "service", next((s.service for s in specs if s.service), None))
        init(self, "_runners", {})
        init(self, "_runners_lock", threading.Lock())

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{s.pattern}({s.service or ''}{', ' if s.service and s.code_args else ''}"
            + ", ".join(f"{k}={v!r}" for k, v in s.code_args.items())
            + ")"
            for s in self.specs
        )
        return f"Policy({inner})"

    specs: tuple[Spec, ...]
    service: str | None
    _runners: dict[bool, Callable[..., Any]]
    _runners_lock: threading.Lock

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
        inner = _wrappers.get(fn) if fn in _wrappers else None  # `in`: fn may not be weakrefable
        if inner is not None:
            # Fuse with the policy already on fn: one wrapper for the whole stack.
            inner_policy, target = inner
            return Policy(*self.specs, *inner_policy.specs)(target)
        if _is_async(fn):
            return _wrap_async(self, fn)
        return _wrap_sync(self, fn)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` through the policy (``fn`` must be a ``def`` function)."""
        if _is_async(fn):
            raise TypeError("Policy.call() runs def functions; use `await policy.acall(...)`")
        token = _call_target.set(fn)
        try:
            return cast("T", self._runner(is_async=False)(*args, **kwargs))
        finally:
            _call_target.reset(token)

    async def acall(self, fn: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` through the policy."""
        token = _call_target.set(fn)
        try:
            return cast("T", await self._runner(is_async=True)(*args, **kwargs))
        finally:
            _call_target.reset(token)

    def _runner(self, *, is_async: bool) -> Callable[..., Any]:
        runner = self._runners.get(is_async)
        if runner is None:
            with self._runners_lock:
                runner = self._runners.get(is_async)
                if runner is None:
                    runner = self(_target_runner(is_async=is_async))
                    self._runners[is_async] = runner
        return runner


# The function Policy.call()/acall() is running: a context variable, so it follows the call into
# the worker thread of a sync timeout and across the attempts of a retry, while the arguments
# the patterns see (fallback handlers, the fallback cache) stay the caller's own.
_call_target: ContextVar[Callable[..., Any]] = ContextVar("buttress_call_target")


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
        snapshot = config.SNAPSHOT
        if compiled.snapshot is not snapshot or compiled.epoch is not registry.EPOCH:
            compiled = bound.compile(snapshot)
        if compiled.direct:
            return fn(*args, **kwargs)
        if CallFinished in events.ROUTES:
            return cast("R", compiled.observed(args, kwargs))
        return cast("R", compiled.chain(args, kwargs))

    _mark(wrapper, policy, fn)
    return wrapper


def _wrap_async(policy: Policy, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    bound = _Bound(policy, fn, is_async=True)

    @functools.wraps(fn, assigned=_ASSIGNED)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        compiled = bound.compiled
        snapshot = config.SNAPSHOT
        if compiled.snapshot is not snapshot or compiled.epoch is not registry.EPOCH:
            compiled = bound.compile(snapshot)
        if compiled.direct:
            return await fn(*args, **kwargs)
        if CallFinished in events.ROUTES:
            return cast("R", await compiled.observed(args, kwargs))
        return cast("R", await compiled.chain(args, kwargs))

    _mark(wrapper, policy, fn)
    return wrapper


def _mark(wrapper: Callable[..., Any], policy: Policy, fn: Callable[..., Any]) -> None:
    setattr(wrapper, _POLICY_ATTR, policy)
    _wrappers[wrapper] = (policy, fn)


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
        raise TypeError(
            f"{_qualified_name(fn)} is a generator function: its body runs while the caller "
            "iterates, after the protected call has returned, so no pattern could cover it. "
            "Decorate a function that returns the collected results instead."
        )


def _qualified_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "<unknown>"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


def _site(fn: Callable[..., Any]) -> str:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return _qualified_name(fn) + where
