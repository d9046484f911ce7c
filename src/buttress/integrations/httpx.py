"""httpx: :class:`ResilientTransport` and :class:`AsyncResilientTransport` wrap any transport.

``httpx.Client(transport=ResilientTransport("billing"))`` runs the ``billing`` service's whole
policy from settings around each attempt the transport makes. See ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Any

import httpx
from opentelemetry.trace import TracerProvider

from buttress import _context
from buttress.integrations._core import (
    DEFAULT_DEADLINE_HEADER,
    DEFAULT_MAX_HOSTS,
    Edge,
    OnExhausted,
    deadline_ms,
    note_error,
    note_outcome,
    repeatable,
    transient_status,
)
from buttress.patterns._transient import FailedResponse

__all__ = ["AsyncResilientTransport", "ResilientTransport"]

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _host(request: httpx.Request) -> str:
    url = request.url
    return url.host if url.port is None else f"{url.host}:{url.port}"


def _prepare(edge: Edge, request: httpx.Request) -> None:
    """Per attempt: the time left as a header and as the I/O timeouts, the idempotency key."""
    left = deadline_ms()
    if left is not None:
        if edge.deadline_header is not None:
            request.headers[edge.deadline_header] = str(left)
        seconds = left / 1000
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: seconds if given.get(key) is None else min(given[key], seconds)
            for key in _TIMEOUT_KEYS
        }
    if edge.idempotency_key and "Idempotency-Key" not in request.headers:
        key = _context.idempotency_key()
        if key is not None and not repeatable(request.method, request.headers):
            request.headers["Idempotency-Key"] = key


def _status_error(request: httpx.Request) -> Any:
    def error(response: httpx.Response) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError(
            f"{request.method} {request.url} answered {response.status_code} "
            "(buttress: no attempt left)",
            request=request,
            response=response,
        )

    return error


def _kept(response: httpx.Response, raw: bytes) -> httpx.Response:
    # The body as received (still encoded), so the client decodes it as it would have.
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
    )


class ResilientTransport(httpx.BaseTransport):
    """A transport that runs ``service``'s policy around each attempt of ``transport``.

    Args:
        service: the service name (its settings, metric label and shared state).
        transport: the transport that sends (default: ``httpx.HTTPTransport()``).
        per_host: a breaker and a bulkhead per host (``service[host]``); see ``max_hosts``.
        max_hosts: hosts with their own instances; later hosts share ``service[*]``.
        on_exhausted: ``"return"`` the last transient response (default) or ``"raise"``
            ``httpx.HTTPStatusError`` for it.
        deadline_header: the header that carries the time left (``None``: none sent).
        idempotency_key: send ``Idempotency-Key`` on non-idempotent requests (see the docs).
        tracer_provider: where the span of each attempt goes (default: the global provider).
    """

    def __init__(
        self,
        service: str,
        transport: httpx.BaseTransport | None = None,
        *,
        per_host: bool = False,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        on_exhausted: OnExhausted = "return",
        deadline_header: str | None = DEFAULT_DEADLINE_HEADER,
        idempotency_key: bool = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.edge = Edge(
            service,
            per_host=per_host,
            max_hosts=max_hosts,
            on_exhausted=on_exhausted,
            deadline_header=deadline_header,
            idempotency_key=idempotency_key,
            tracer_provider=tracer_provider,
        )
        self.transport = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        edge = self.edge
        host = _host(request)
        token = _context.repeatable.set(
            edge.idempotency_key or repeatable(request.method, request.headers)
        )
        try:
            return edge.policy(host).call(self._attempt, request, host)
        except FailedResponse as failure:
            return edge.unwrap(failure, _status_error(request))  # type: ignore[no-any-return]
        finally:
            _context.repeatable.reset(token)

    def _attempt(self, request: httpx.Request, host: str) -> httpx.Response:
        edge = self.edge
        _prepare(edge, request)
        with edge.attempt_span(f"{request.method}", host) as span:
            try:
                response = self.transport.handle_request(request)
            except Exception as exc:
                note_error(span, exc)
                raise
            status = response.status_code
            failed = transient_status(status, response.headers)
            note_outcome(span, status, failed)
            if not failed:
                return response
            try:
                raw = b"".join(response.iter_raw())
            finally:
                response.close()
            raise edge.failed(_kept(response, raw), status, request.method, response.headers)

    def close(self) -> None:
        self.transport.close()


class AsyncResilientTransport(httpx.AsyncBaseTransport):
    """The ``httpx.AsyncClient`` twin of :class:`ResilientTransport` (same arguments).

    ``transport`` defaults to ``httpx.AsyncHTTPTransport()``.
    """

    def __init__(
        self,
        service: str,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        per_host: bool = False,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        on_exhausted: OnExhausted = "return",
        deadline_header: str | None = DEFAULT_DEADLINE_HEADER,
        idempotency_key: bool = False,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.edge = Edge(
            service,
            per_host=per_host,
            max_hosts=max_hosts,
            on_exhausted=on_exhausted,
            deadline_header=deadline_header,
            idempotency_key=idempotency_key,
            tracer_provider=tracer_provider,
        )
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        edge = self.edge
        host = _host(request)
        token = _context.repeatable.set(
            edge.idempotency_key or repeatable(request.method, request.headers)
        )
        try:
            return await edge.policy(host).acall(self._attempt, request, host)
        except FailedResponse as failure:
            return edge.unwrap(failure, _status_error(request))  # type: ignore[no-any-return]
        finally:
            _context.repeatable.reset(token)

    async def _attempt(self, request: httpx.Request, host: str) -> httpx.Response:
        edge = self.edge
        _prepare(edge, request)
        with edge.attempt_span(f"{request.method}", host) as span:
            try:
                response = await self.transport.handle_async_request(request)
            except Exception as exc:
                note_error(span, exc)
                raise
            status = response.status_code
            failed = transient_status(status, response.headers)
            note_outcome(span, status, failed)
            if not failed:
                return response
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
            raise edge.failed(_kept(response, raw), status, request.method, response.headers)

    async def aclose(self) -> None:
        await self.transport.aclose()
