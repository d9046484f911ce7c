"""gRPC: client interceptors for ``grpc`` (:class:`ResilientInterceptor`) and ``grpc.aio``.

``grpc.intercept_channel(channel, ResilientInterceptor("inventory"))`` or
``grpc.aio.insecure_channel(target, interceptors=[AsyncResilientInterceptor("inventory")])`` run
the ``inventory`` service's whole policy from settings around each attempt of a unary-unary
call. UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED answers are failures (retried,
counted by the breaker); the last call is returned when no attempt is left, so the caller sees
gRPC's own ``RpcError``. The time left travels as the call's timeout (``grpc-timeout``). See
``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc
import grpc.aio
from opentelemetry.trace import TracerProvider

from buttress import _context
from buttress.integrations._core import Edge, Exchange

__all__ = ["AsyncResilientInterceptor", "ResilientInterceptor"]

Idempotent = bool | Callable[[str], bool]


class _Details(
    NamedTuple(
        "_Details",
        [
            ("method", str),
            ("timeout", float | None),
            ("metadata", Any),
            ("credentials", Any),
            ("wait_for_ready", Any),
            ("compression", Any),
        ],
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    """Call details with the timeout the deadline allows (grpc's own class is abstract)."""


def _timeout(timeout: float | None) -> float | None:
    left = _context.remaining()
    if left is None:
        return timeout
    return left if timeout is None else min(timeout, left)


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def _pairs(metadata: Any) -> dict[str, str]:
    # Sync gRPC gives (key, value) tuples and grpc.aio a Metadata that iterates as the same
    # pairs; dict(metadata) would read its keys(), which grpcio 1.62 also yields as pairs.
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _has_key(metadata: Sequence[tuple[str, Any]] | None) -> bool:
    return any(key.lower() == "idempotency-key" for key, _ in metadata or ())


class _Shared:
    """The one constructor and decisions of both interceptors (they differ only in sending)."""

    _attempt: Callable[..., Any]  # each interceptor's one attempt (a static method)

    def __init__(
        self,
        service: str,
        *,
        idempotent: Idempotent = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        # gRPC carries the deadline itself (grpc-timeout): no header of ours.
        self.edge = Edge(
            service, self._attempt, deadline_header=None, tracer_provider=tracer_provider
        )
        self.idempotent = idempotent

    def exchange(self, details: Any) -> Exchange:
        # A gRPC method says nothing about its effects: repeatable when the caller says so
        # (for every method, or per method name) or the call carries an idempotency key.
        method = _method(details)
        idempotent = self.idempotent
        told = idempotent(method) if callable(idempotent) else idempotent
        return self.edge.exchange(method, None, told or _has_key(details.metadata))


class ResilientInterceptor(_Shared, grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Runs ``service``'s policy around each attempt of a unary-unary call (sync ``grpc``).

    Args:
        service: the service name (its settings, metric label and shared state).
        idempotent: ``True`` if every method of the channel is safe to repeat after the server
            may have run it, or a predicate on the full method name (``"/pkg.Svc/Get"``);
            otherwise only calls with ``idempotency-key`` metadata are retried (an answer of
            UNAVAILABLE or RESOURCE_EXHAUSTED included: gRPC cannot tell whether it ran).
        tracer_provider: where the span of each attempt goes (default: the global provider).
    """

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        with self.exchange(client_call_details) as ex:
            ex.answer = ex.call(ex, continuation, client_call_details, request)
        return ex.answer

    @staticmethod
    def _attempt(ex: Exchange, continuation: Any, details: Any, request: Any) -> Any:
        details = _Details(
            details.method,
            _timeout(details.timeout),
            details.metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )
        with ex.attempt() as span:
            outcome = continuation(details, request)
            code = outcome.code().name
            if not ex.transient(span, code, {}):
                return outcome
            raise ex.failure(outcome, code, _pairs(outcome.trailing_metadata()))


class AsyncResilientInterceptor(_Shared, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The ``grpc.aio`` twin of :class:`ResilientInterceptor` (same arguments)."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        with self.exchange(client_call_details) as ex:
            ex.answer = await ex.run(ex, continuation, client_call_details, request)
        return ex.answer

    @staticmethod
    async def _attempt(ex: Exchange, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(timeout=_timeout(details.timeout))
        with ex.attempt() as span:
            call = await continuation(details, request)
            code = (await call.code()).name
            if not ex.transient(span, code, {}):
                return call
            raise ex.failure(call, code, _pairs(await call.trailing_metadata()))
