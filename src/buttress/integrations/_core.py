"""What every client integration shares: its policies, the request's safety, the deadline header.

An integration protects one client call the way ``resilient(service)`` protects a function: the
service's whole stack from settings, with the *attempt* innermost, so retry repeats the breaker,
rate limit, timeout and bulkhead around each send. An attempt that gets a transient answer raises
:class:`~buttress.patterns._transient.FailedResponse` inside the policy (so the breaker counts
it and retry tries again without the caller raising), and :meth:`Exchange.exhausted` turns the
last one back into the client's own answer at the edge.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any, Literal, TypedDict

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, ProxyTracerProvider, Span, SpanKind, TracerProvider

from buttress import _clock, _context, registry
from buttress.decorators import CANONICAL_ORDER
from buttress.exceptions import ConfigurationError
from buttress.patterns._transient import (
    GRPC_TRANSIENT,
    IDEMPOTENT_METHODS,
    FailedResponse,
    server_delay,
    should_retry,
)
from buttress.policy import Policy, Spec

__all__ = [
    "DEFAULT_DEADLINE_HEADER",
    "DEFAULT_MAX_HOSTS",
    "OVERFLOW_HOST",
    "Edge",
    "EdgeOptions",
    "Exchange",
    "OnExhausted",
    "header_name",
    "note_error",
    "note_outcome",
    "repeatable",
    "transient_status",
]

# The header that carries the time the caller has left, in whole milliseconds, relative (no
# clock agreement needed between hosts). Outbound integrations send it; the inbound middleware
# reads it. gRPC uses its own ``grpc-timeout``.
DEFAULT_DEADLINE_HEADER = "X-Buttress-Deadline-Ms"
# How many hosts ``per_host=True`` gives their own breaker and bulkhead; later hosts share one.
DEFAULT_MAX_HOSTS = 64
# The host part of the instance that hosts past ``max_hosts`` share: ``service[*]``.
OVERFLOW_HOST = "*"
# Patterns whose instance is per host with ``per_host=True``: what one bad host must not spoil
# for the others. Retry, rate limit, timeout and fallback stay the service's.
_PER_HOST = frozenset({"circuit_breaker", "bulkhead"})
# Patterns an integration does not run, whatever the service's settings say: a response is a
# stream its one caller reads (and the request's arguments are live client objects, no key), so
# one answer cannot be handed to other callers. Cache or coalesce a function of your own that
# returns the parsed result instead (docs/integrations.md).
_NOT_AT_THE_EDGE = frozenset({"cache", "coalescing"})

OnExhausted = Literal["return", "raise"]


class EdgeOptions(TypedDict, total=False):
    """The keyword arguments every HTTP integration takes (see :class:`Edge`)."""

    per_host: bool
    max_hosts: int
    on_exhausted: OnExhausted
    deadline_header: str | None
    idempotency_key: bool
    tracer_provider: TracerProvider | None


_tracer_scope = "buttress.integrations"


def repeatable(method: str, headers: Mapping[str, str]) -> bool:
    """Whether an HTTP request may be sent again after it may have reached the server.

    RFC 9110's idempotent methods, or any request carrying an ``Idempotency-Key`` header.
    """
    return method.upper() in IDEMPOTENT_METHODS or bool(headers.get("Idempotency-Key"))


def transient_status(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an HTTP answer is a failure: 408, 429, 5xx, or whatever says ``x-should-retry``.

    ``x-should-retry: true`` makes any 4xx a (retryable) failure; ``false`` keeps a 5xx a
    failure the breaker counts, which :meth:`Edge.failed` marks as not retryable.
    """
    if status in (408, 429) or 500 <= status <= 599:
        return True
    # Only an error answer is asked (as the OpenAI and Anthropic SDKs do): the header lookup
    # stays off the success path.
    return status >= 400 and should_retry(headers) is True


def _argument_error(name: str, expected: str, value: object) -> ConfigurationError:
    return ConfigurationError(
        f"invalid argument for the integration: {name}: must be {expected}, got {value!r}",
        errors=((name, "code", f"must be {expected}"),),
    )


# RFC 9110's token characters: what a field name may be made of.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def header_name(value: object, argument: str = "deadline_header") -> str:
    """``value``, checked to be an HTTP header name (RFC 9110's token), for ``argument``.

    Raises:
        ConfigurationError: anything else (also a ``ValueError``), when the object is made:
            ``""`` would never match and a space or a non-ASCII letter would break the wire.
    """
    if not isinstance(value, str) or not value or not _TOKEN.issuperset(value):
        raise _argument_error(argument, "a header name (letters, digits, '-' and the like)", value)
    return value


class Edge:
    """The policies and options of one integration object.

    Args:
        service: the service name: settings section, metric label, shared-state key.
        per_host: give each host its own breaker and bulkhead (``service[host]``), the rest of
            the stack staying the service's.
        max_hosts: how many hosts get their own; the hosts seen after that share
            ``service[*]``.
        on_exhausted: when the last attempt got a transient response: ``"return"`` it (the
            default), or ``"raise"`` the client's own error for it.
        deadline_header: the header that carries the time left (``None``: send none).
        idempotency_key: send ``buttress.idempotency_key()`` as ``Idempotency-Key`` on requests
            whose method is not idempotent (and that carry no key yet), which makes them safe to
            retry: only for servers that honour the header.
        tracer_provider: where the span of each attempt goes (``None``: the global provider).
    """

    def __init__(
        self,
        service: str,
        attempt: Callable[..., Any],
        *,
        per_host: bool = False,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        on_exhausted: OnExhausted = "return",
        deadline_header: str | None = DEFAULT_DEADLINE_HEADER,
        idempotency_key: bool = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        name: object = service  # checked at run time for untyped callers
        if not isinstance(name, str) or not name or "[" in name:
            raise TypeError(f"a service name (a non-empty string without '['), got {service!r}")
        # Checked as strictly as a decorator's arguments (docs/configuration.md#validation):
        # ``per_host="no"`` is a typed API misused, not a truthy value.
        bound: object = max_hosts
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise _argument_error("max_hosts", "a positive integer", max_hosts)
        if on_exhausted not in ("return", "raise"):
            raise _argument_error("on_exhausted", '"return" or "raise"', on_exhausted)
        for flag, value in (("per_host", per_host), ("idempotency_key", idempotency_key)):
            if not isinstance(value, bool):
                raise _argument_error(flag, "True or False", value)
        if deadline_header is not None:
            header_name(deadline_header)
        self.service = registry.service_name(service)
        self.per_host = per_host
        self.max_hosts = max_hosts
        self.on_exhausted = on_exhausted
        self.deadline_header = deadline_header
        self.idempotency_key = idempotency_key
        self.tracer = trace.get_tracer(_tracer_scope, tracer_provider=tracer_provider)
        self.traced = tracer_provider is not None
        self._attempt = attempt
        self.service_runner = self._build(None)
        self._hosts: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def _build(self, host: str | None) -> Callable[..., Any]:
        # The adapter's attempt function decorated once (per host): a request runs the
        # compiled stack directly, with none of Policy.call's per-call checks.
        policy = Policy(
            *(
                Spec(
                    pattern,
                    f"{self.service}[{host}]"
                    if host is not None and pattern in _PER_HOST
                    else self.service,
                )
                for pattern in CANONICAL_ORDER
                if pattern not in _NOT_AT_THE_EDGE
            )
        )
        return policy(self._attempt)

    def runner(self, host: str | None) -> Callable[..., Any]:
        """The attempt under the policy for ``host``: the service's, or the host's."""
        if not self.per_host or not host:
            return self.service_runner
        host = host.lower()
        runner = self._hosts.get(host)
        if runner is not None:
            return runner
        with self._lock:
            runner = self._hosts.get(host)
            if runner is None:
                if len(self._hosts) >= self.max_hosts:
                    # Past the bound every new host shares one instance, so the number of
                    # breakers, bulkheads and metric series stays bounded.
                    runner = self._hosts.get(OVERFLOW_HOST) or self._build(OVERFLOW_HOST)
                    self._hosts.setdefault(OVERFLOW_HOST, runner)
                else:
                    runner = self._build(host)
                    self._hosts[host] = runner
        return runner

    def exchange(
        self,
        method: str,
        host: str | None,
        repeatable: bool,
        error: Callable[[Any], BaseException] | None = None,
        *,
        traced: bool | None = None,
    ) -> Exchange:
        """The decisions of one request to ``host`` (see :class:`Exchange`).

        ``traced``: :meth:`tracing`'s answer when the adapter already asked it for this request.
        """
        if traced is None:
            traced = self.tracing()
        return Exchange(
            self, method, host, self.idempotency_key or repeatable, error, traced=traced
        )

    def failed(
        self, response: Any, status: int | str, method: str, headers: Mapping[str, str] | None
    ) -> FailedResponse:
        """The failure that carries a transient ``response`` through the policy."""
        retryable, delay = True, None
        if headers is not None:
            told = should_retry(headers)
            retryable = told is not False
            delay = server_delay(headers, _clock.wall())
        return FailedResponse(response, status, method=method, retryable=retryable, delay=delay)

    def tracing(self) -> bool:
        """Whether an attempt's span could be recorded: a provider given, or a global one set.

        Without one, no span machinery runs at all. Asked once per request, so it reads
        opentelemetry-api's global directly: ``trace.get_tracer_provider()`` looks up an
        environment variable on every call while no provider is set (≈ 0.8 µs), and the global
        is set at most once and never unset, so a provider once seen is kept. (A provider named
        by ``OTEL_PYTHON_TRACER_PROVIDER`` is loaded by ``get_tracer()`` in the constructor;
        tests/integrations/test_traces.py pins the global's name on every supported version.)
        """
        if self.traced:
            return True
        provider = trace._TRACER_PROVIDER  # private, read on purpose: see the docstring
        if provider is None or isinstance(provider, ProxyTracerProvider):
            return False
        self.traced = True
        return True

    def attempt_span(self, name: str, host: str | None) -> Any:
        """A span for one attempt (a child of the caller's current span): its context manager."""
        attributes: dict[str, Any] = {"buttress.service": self.service}
        resend = _context.attempt() - 1
        if resend:
            attributes["http.request.resend_count"] = resend
        if host:
            attributes["server.address"] = host
        return self.tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
        )


def note_outcome(span: Span, status: int | str, failed: bool) -> None:
    """Put an attempt's answer on its span."""
    if not span.is_recording():
        return
    if isinstance(status, int):
        span.set_attribute("http.response.status_code", status)
    else:
        span.set_attribute("rpc.grpc.status_code", status)
    if failed:
        span.set_attribute("error.type", str(status))
        span.set_status(trace.StatusCode.ERROR)


def note_error(span: Span, exc: BaseException) -> None:
    """An attempt that raised: the error's type on its span (never its message)."""
    if span.is_recording():
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(trace.StatusCode.ERROR)


class Exchange:
    """The decisions of one request, sans-IO: the client adapter does only the sending between.

    Used as ``return edge.exchange(...).call(...)`` (or ``await ....acall(...)``): the edge's
    attempt function runs under the policy with the request marked repeatable (or not) for retry,
    and a transient response that escaped the policy becomes the caller's answer
    (:meth:`exhausted`, with ``error`` building the client's own error for
    ``on_exhausted="raise"``). Inside each attempt the adapter asks :meth:`outbound` what to
    send, sends, and asks :meth:`transient` whether the answer is a failure.
    """

    __slots__ = ("edge", "error", "host", "method", "repeatable", "run", "traced")

    def __init__(
        self,
        edge: Edge,
        method: str,
        host: str | None,
        repeatable: bool,
        error: Callable[[Any], BaseException] | None,
        *,
        traced: bool,
    ) -> None:
        self.edge = edge
        self.method = method
        self.host = host
        self.repeatable = repeatable
        self.error = error
        self.traced = traced
        # The per-host lookup only where there are hosts to look up.
        self.run = edge.runner(host) if edge.per_host else edge.service_runner

    def exhausted(self, failed: FailedResponse) -> Any:
        """The caller's answer when the last attempt got a transient response: it, or the error."""
        if self.edge.on_exhausted == "return" or self.error is None:
            return failed.response
        raise self.error(failed.response) from None

    def outbound(self, headers: MutableMapping[str, str]) -> float | None:
        """Per attempt: put the time left and the idempotency key in ``headers``.

        Returns the seconds left before the deadline (``None``: no deadline), which the
        adapter gives its client as I/O timeouts.
        """
        edge = self.edge
        left = _deadline.get()  # _context.remaining(), inline: this runs on every attempt
        if left is not None:
            left = max(0.0, left - _clock.monotonic())
            if edge.deadline_header is not None:
                headers[edge.deadline_header] = str(math.floor(left * 1000))
        if edge.idempotency_key and "Idempotency-Key" not in headers:
            key = _context.idempotency_key()
            if key is not None and not repeatable(self.method, headers):
                headers["Idempotency-Key"] = key
        # Not rounded down like the header: a client timeout of exactly the time left fires at
        # the deadline, not before it, so the timeout tells it from the caller's own timeout.
        return left

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """Run a sync client's attempts through the policy, each bounded by its client's timeouts.

        The client's I/O timeouts are set to the time left (:meth:`outbound`), so the policy's
        timeout sets the deadline and runs the attempt inline rather than on a worker thread.
        """
        repeat = _repeatable.set(self.repeatable)
        own_io = _bounds_own_io.set(True)
        try:
            return self.run(*args, **kwargs)
        except FailedResponse as failed:
            return self.exhausted(failed)
        finally:
            _bounds_own_io.reset(own_io)
            _repeatable.reset(repeat)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """The async :meth:`call`: the policy's timeout bounds each attempt with a loop timer."""
        repeat = _repeatable.set(self.repeatable)
        try:
            return await self.run(*args, **kwargs)
        except FailedResponse as failed:
            return self.exhausted(failed)
        finally:
            _repeatable.reset(repeat)

    def attempt(self) -> _Attempt | _Untraced:
        """The span of one attempt (a context manager); an error the client raised goes on it.

        Without a tracer that could record it, a shared no-op: nothing is built per attempt.
        """
        if not self.traced:
            return _UNTRACED
        return _Attempt(self.edge.attempt_span(self.method, self.host))

    def transient(self, span: Span, status: int | str, headers: Mapping[str, str]) -> bool:
        """Whether an answer is a failure (an HTTP status, or a gRPC code's name); on the span."""
        if isinstance(status, int):
            # Below 400 nothing (not even x-should-retry) makes an answer a failure.
            failed = status >= 400 and transient_status(status, headers)
        else:
            failed = status in GRPC_TRANSIENT
        if self.traced:
            note_outcome(span, status, failed)
        return failed

    def failure(
        self, response: Any, status: int | str, headers: Mapping[str, str] | None
    ) -> FailedResponse:
        """The failure that carries a transient ``response`` through the policy."""
        return self.edge.failed(response, status, self.method, headers)


# Set or read on every request; module names for them save attribute look-ups.
_repeatable = _context.repeatable
_bounds_own_io = _context.bounds_own_io
_deadline = _context.deadline


class _Untraced:
    """The attempt's span scope when nothing records spans: one shared object, no work."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


_UNTRACED = _Untraced()


class _Attempt:
    """The span of one attempt around the adapter's sending (a plain class: it is per attempt)."""

    __slots__ = ("_scope", "_span")

    def __init__(self, scope: Any) -> None:
        self._scope = scope
        self._span: Span = INVALID_SPAN

    def __enter__(self) -> Span:
        self._span = self._scope.__enter__()
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, FailedResponse):
            note_error(self._span, exc)
        self._scope.__exit__(exc_type, exc, traceback)
