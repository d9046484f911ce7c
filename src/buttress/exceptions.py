"""The exceptions buttress raises.

Callers only ever see these or their own exceptions; pybreaker's and tenacity's never escape::

    ButtressError(Exception)
    ├── RejectedError                      the call was not attempted; .service, .retry_after
    │   ├── CircuitOpenError               retry_after = seconds the circuit stays open
    │   ├── BulkheadFullError
    │   └── RateLimitedError
    ├── TimeoutExceededError(ButtressError, TimeoutError)   .seconds, .service
    └── ConfigurationError(ButtressError, ValueError)       names the setting and its source
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
    "ConfigurationError",
    "RateLimitedError",
    "RejectedError",
    "TimeoutExceededError",
]


class ButtressError(Exception):
    """Base class of every exception buttress raises on its own behalf.

    Every one survives ``pickle`` and ``copy`` with its attributes (a process pool sends a child's
    exception back pickled).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as ``cls(*args)`` plus ``__dict__``, but the keyword-only arguments
        # (service, retry_after, seconds, errors) are not in ``args``, so ``cls(*args)`` fails.
        # Rebuild without calling __init__; the attributes come back with ``__dict__``.
        return (_rebuild, (type(self), self.args), self.__dict__)


def _rebuild(cls: type[ButtressError], args: tuple[Any, ...]) -> ButtressError:
    exc = cls.__new__(cls, *args)
    exc.args = args  # OSError's __new__ (TimeoutError's) leaves args to an overridden __init__
    return exc


class RejectedError(ButtressError):
    """The call was not attempted: a pattern refused it to protect the dependency or the caller.

    Attributes:
        service: the service whose pattern rejected the call.
        retry_after: seconds after which a new call may be admitted, or ``None`` when unknown.
    """

    def __init__(self, message: str, *, service: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.service = service
        self.retry_after = retry_after


class CircuitOpenError(RejectedError):
    """The service's circuit is open (or its half-open trial slots are taken)."""


class BulkheadFullError(RejectedError):
    """Every slot of the bulkhead is busy and the queue is full or waiting took too long."""


class RateLimitedError(RejectedError):
    """No rate-limit token became available within ``max_wait``."""


class TimeoutExceededError(ButtressError, TimeoutError):
    """The call did not finish within ``seconds``.

    Attributes:
        seconds: the time limit that was exceeded.
        service: the service whose timeout fired.
    """

    def __init__(self, message: str, *, service: str, seconds: float) -> None:
        super().__init__(message)
        self.service = service
        self.seconds = seconds


class ConfigurationError(ButtressError, ValueError):
    """A setting or decorator argument is invalid; the message names the key path and its source.

    Attributes:
        errors: one ``(key_path, source, message)`` triple per problem found.
    """

    def __init__(self, message: str, *, errors: tuple[tuple[str, str, str], ...] = ()) -> None:
        super().__init__(message)
        self.errors = errors


def set_note(exc: BaseException, prefix: str, note: str) -> None:
    """Add ``note`` (which starts with ``prefix``) to ``exc``, replacing one an earlier call left.

    The same exception object may be raised again and again (a module-level constant, a cached
    error); appending on every call would grow its ``__notes__`` without bound.
    """
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes[:] = [n for n in notes if not (isinstance(n, str) and n.startswith(prefix))]
    exc.add_note(note)
