"""Chaos: inject faults into protected calls on purpose, to rehearse failures before they happen.

Three kinds of fault, each at its own rate (a fraction of calls, drawn independently):

* ``latency``: wait ``latency_seconds`` before the call (on the buttress clock, so an enclosing
  ``with_timeout`` sees it and a fake clock drives it in tests);
* ``exception``: raise instead of calling (default :class:`InjectedConnectionError`, so retry, the
  breaker and fallback treat it as the transient failure it imitates);
* ``result``: return ``result`` instead of calling (a wrong answer, not an error).

Chaos is off twice over: per service (``enabled`` defaults to false) and per process, behind its own
kill switch (``FF_ENABLE_CHAOS_INJECTION``, default false, read when settings load). A config file
that enables chaos therefore injects nothing in a process that was not armed, and switching the
kill switch off (plus ``reload_settings()``) stops every injection at once. A built policy whose
chaos is inactive carries no chaos step at all.

In the canonical order chaos sits innermost, right around the call, so every other pattern reacts
to an injected fault exactly as it would to a real one. Every injection emits
:class:`~buttress.events.ChaosInjected`; in shadow mode nothing is injected and
:class:`~buttress.events.ShadowDecision` says what would have been.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar, Final

from pydantic import Field, field_validator

from buttress import events
from buttress._values import PositiveSeconds
from buttress.patterns._base import BuildContext, Effect, Options, Return, Sleep

__all__ = [
    "KILL_SWITCH",
    "PATTERN",
    "ChaosOptions",
    "ChaosStrategy",
    "InjectedConnectionError",
    "build",
]

PATTERN = "chaos"

# The process-wide kill switch. Chaos injects only when it is true AND the service enables chaos.
# Named like FF_ENABLE_RESILIENCE_PATTERNS, the switch operators already know, and outside the
# BUTTRESS_ prefix, whose variables name settings keys.
KILL_SWITCH: Final = "FF_ENABLE_CHAOS_INJECTION"


class InjectedConnectionError(ConnectionError):
    """The default injected exception: a connection failure that buttress made up on purpose.

    A ``ConnectionError`` so that the default retry predicate, the breaker and the fallback handle
    it like the real failure it rehearses; its own class so that ``error_type`` labels, logs and
    tests tell an injected fault from a real one.
    """


ExceptionSpec = type[Exception] | Callable[[], Exception]


class ChaosOptions(Options):
    """Options of ``with_chaos`` (and of ``services.<name>.chaos``)."""

    code_only: ClassVar[frozenset[str]] = frozenset({"exception", "result"})

    enabled: bool = Field(
        default=False, description="inject faults for this service (also needs the kill switch)"
    )
    exception_rate: float = Field(0.0, ge=0, le=1, description="fraction of calls that raise")
    exception: ExceptionSpec = Field(
        InjectedConnectionError,
        description="exception class (called with a message) or zero-argument factory",
    )
    latency_rate: float = Field(0.0, ge=0, le=1, description="fraction of calls delayed")
    latency_seconds: PositiveSeconds = Field(1.0, description="delay added before a delayed call")
    result_rate: float = Field(
        0.0, ge=0, le=1, description="fraction of calls answered with `result` instead"
    )
    result: Any = Field(None, description="the wrong answer returned instead of calling")
    seed: int | None = Field(None, description="seed of the draws: the same seed, the same faults")

    @field_validator("exception")
    @classmethod
    def _exception_must_make_exceptions(cls, value: object) -> ExceptionSpec:
        if isinstance(value, type):
            if not issubclass(value, Exception):
                # BaseException-only classes (CancelledError, KeyboardInterrupt) are control flow,
                # not failures of a dependency; injecting them would break the caller, not rehearse.
                msg = f"must be an Exception subclass, got {value.__qualname__}"
                raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
            return value
        if not callable(value):
            msg = f"must be an exception class or a factory, got {value!r}"
            raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError, not TypeError
        return value  # a callable; what it returns is checked when it is used


class ChaosStrategy:
    """Draws, per call, whether to delay it, fail it or answer it wrongly; the driver does it."""

    pattern: ClassVar[str] = PATTERN
    after = None  # a gate that holds nothing during the call

    def __init__(self, service: str, options: ChaosOptions, *, shadow: bool = False) -> None:
        self.service = service
        self.shadow = shadow
        self.options = options
        self._random = random.Random(options.seed).random
        self._make_exception = _exception_factory(options.exception, service)

    def draw(self) -> tuple[bool, bool, bool]:
        """Which faults this call gets: (latency, exception, result).

        An exception wins over a result (both replace the call); latency comes first either way.
        Each kind with a rate above zero takes one draw, so a fixed seed gives a fixed sequence.
        """
        options = self.options
        rand = self._random
        latency = options.latency_rate > 0 and rand() < options.latency_rate
        exception = options.exception_rate > 0 and rand() < options.exception_rate
        result = options.result_rate > 0 and rand() < options.result_rate and not exception
        if self.shadow:
            for kind, hit in (("latency", latency), ("exception", exception), ("result", result)):
                if hit:
                    events.emit(events.ShadowDecision(self.service, PATTERN, kind))
            return False, False, False
        return latency, exception, result

    def _injected(self, kind: str) -> None:
        handlers = events.ROUTES.get(events.ChaosInjected)
        if handlers:
            events.dispatch(handlers, events.ChaosInjected(self.service, kind))

    def before(self) -> Effect | None:
        """This call's faults: a latency to sleep first, then an exception or a wrong answer."""
        latency, exception, result = self.draw()
        if latency:
            self._injected("latency")
            return _Latency(self, self.options.latency_seconds, exception=exception, result=result)
        return self._replace(exception=exception, result=result)

    def _replace(self, *, exception: bool, result: bool) -> Return | None:
        if exception:
            self._injected("exception")
            raise self._make_exception()
        if result:
            self._injected("result")
            return Return(self.options.result)
        return None


class _Latency(Sleep):
    """The injected delay; what else this call drew comes after it."""

    __slots__ = ("exception", "result", "strategy")

    def __init__(
        self, strategy: ChaosStrategy, seconds: float, *, exception: bool, result: bool
    ) -> None:
        super().__init__(seconds)
        self.strategy = strategy
        self.exception = exception
        self.result = result

    def resume(self) -> Return | None:
        return self.strategy._replace(exception=self.exception, result=self.result)


def _exception_factory(spec: ExceptionSpec, service: str) -> Callable[[], Exception]:
    if isinstance(spec, type):
        message = f"fault injected by buttress chaos (service {service!r})"
        return lambda: spec(message)

    def make() -> Exception:
        made: object = spec()
        if not isinstance(made, Exception):
            raise TypeError(f"chaos exception factory {spec!r} returned {made!r}, not an Exception")
        return made

    return make


def build(ctx: BuildContext) -> ChaosStrategy | None:
    """The chaos step for ``ctx.service``, or ``None`` when nothing would ever be injected."""
    options: ChaosOptions = ctx.options
    if not options.enabled or not ctx.armed:
        return None
    if options.exception_rate == 0 and options.latency_rate == 0 and options.result_rate == 0:
        return None
    return ChaosStrategy(ctx.service, options, shadow=ctx.mode == "shadow")
