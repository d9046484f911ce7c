"""httpx: :class:`ResilientTransport` and :class:`AsyncResilientTransport` wrap any transport.

``httpx.Client(transport=ResilientTransport("billing"))`` runs the ``billing`` service's whole
policy from settings around each attempt the transport makes. See ``docs/integrations.md``.
Every decision is :class:`~buttress.integrations._core.Exchange`'s; these classes only send.
"""

from __future__ import annotations

from typing import Unpack

import httpx

from buttress.integrations._core import Edge, EdgeOptions, Exchange, repeatable

__all__ = ["AsyncResilientTransport", "ResilientTransport"]

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _exchange(edge: Edge, request: httpx.Request) -> Exchange:
    host = None
    if edge.needs_host():  # reading it decodes the URL's host: only when something uses it
        url = request.url
        host = url.host if url.port is None else f"{url.host}:{url.port}"

    def error(response: httpx.Response) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError(
            f"{request.method} {request.url} answered {response.status_code} "
            "(buttress: no attempt left)",
            request=request,
            response=response,
        )

    return edge.exchange(request.method, host, repeatable(request.method, request.headers), error)


def _prepare(ex: Exchange, request: httpx.Request) -> None:
    """Per attempt: the headers to send, and the time left as the I/O timeouts."""
    seconds = ex.outbound(request.headers)
    if seconds is not None:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: seconds if given.get(key) is None else min(given[key], seconds)
            for key in _TIMEOUT_KEYS
        }


def _kept(response: httpx.Response, raw: bytes) -> httpx.Response:
    # The body as received (still encoded), so the client decodes it as it would have.
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
    )


def _send(transport: httpx.BaseTransport, ex: Exchange, request: httpx.Request) -> httpx.Response:
    """One attempt: the only I/O of the sync transport."""
    _prepare(ex, request)
    with ex.attempt() as span:
        response = transport.handle_request(request)
        status = response.status_code
        if not ex.transient(span, status, response.headers):
            return response
        try:
            raw = b"".join(response.iter_raw())
        finally:
            response.close()
        raise ex.failure(_kept(response, raw), status, response.headers)


async def _asend(
    transport: httpx.AsyncBaseTransport, ex: Exchange, request: httpx.Request
) -> httpx.Response:
    """One attempt: the only I/O of the async transport."""
    _prepare(ex, request)
    with ex.attempt() as span:
        response = await transport.handle_async_request(request)
        status = response.status_code
        if not ex.transient(span, status, response.headers):
            return response
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        raise ex.failure(_kept(response, raw), status, response.headers)


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
        **options: Unpack[EdgeOptions],
    ) -> None:
        self.edge = Edge(service, _send, **options)
        self.transport = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with _exchange(self.edge, request) as ex:
            ex.answer = ex.call(self.transport, ex, request)
        return ex.answer  # type: ignore[no-any-return]

    def close(self) -> None:
        self.transport.close()


class AsyncResilientTransport(httpx.AsyncBaseTransport):
    """The ``httpx.AsyncClient`` counterpart of :class:`ResilientTransport` (same arguments).

    ``transport`` defaults to ``httpx.AsyncHTTPTransport()``.
    """

    def __init__(
        self,
        service: str,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Unpack[EdgeOptions],
    ) -> None:
        self.edge = Edge(service, _asend, **options)
        self.transport = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _exchange(self.edge, request) as ex:
            ex.answer = await ex.run(self.transport, ex, request)
        return ex.answer  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.transport.aclose()
