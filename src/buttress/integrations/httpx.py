"""httpx: :class:`ResilientTransport` and :class:`AsyncResilientTransport` wrap any transport.

``httpx.Client(transport=ResilientTransport("billing"))`` runs the ``billing`` service's whole
policy from settings around each attempt the transport makes. See ``docs/integrations.md``.
Every decision is :class:`~buttress.integrations._core.Exchange`'s; these classes only send.
"""

from __future__ import annotations

from typing import Any, Unpack

import httpx
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span

from buttress.integrations._core import Edge, EdgeOptions, Exchange, repeatable
from buttress.patterns._transient import IDEMPOTENT_METHODS

__all__ = ["AsyncResilientTransport", "ResilientTransport"]

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _exchange(edge: Edge, request: httpx.Request) -> Exchange:
    # Edge.tracing() and repeatable() asked only where their answer is not plain: this runs on
    # every request, and a call costs more here, among httpx's own, than in a tight loop.
    traced = edge.traced or (trace._TRACER_PROVIDER is not None and edge.tracing())
    host = None
    if traced or edge.per_host:  # reading it decodes the URL's host: only when something uses it
        url = request.url
        host = url.host if url.port is None else f"{url.host}:{url.port}"

    def error(response: httpx.Response) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError(
            f"{request.method} {request.url} answered {response.status_code} "
            "(buttress: no attempt left)",
            request=request,
            response=response,
        )

    method = request.method  # upper case: httpx.Request made it so
    repeat = (
        edge.idempotency_key or method in IDEMPOTENT_METHODS or repeatable(method, request.headers)
    )
    return Exchange(edge, method, host, repeat, error, traced=traced)


def _bounded(given: Any, seconds: float) -> dict[str, float]:
    """The client's I/O timeouts (the request's "timeout" extension, ``httpx.Timeout.as_dict()``:
    seconds or ``None`` per key) no longer than ``seconds``; a key missing or ``None`` (no
    limit), or no extension at all, gets ``seconds``."""
    given = given or {}
    return {
        key: seconds if (value := given.get(key)) is None else min(value, seconds)
        for key in _TIMEOUT_KEYS
    }


def _prepare(ex: Exchange, request: httpx.Request) -> None:
    """Per attempt: the headers to send, and the time left as the I/O timeouts."""
    seconds = ex.outbound(request.headers)
    if seconds is not None:
        extensions = request.extensions
        given: Any = extensions.get("timeout")
        try:  # the common case, inline: the client's timeouts (5 s by default) are shorter
            if max(given["connect"], given["read"], given["write"], given["pool"]) <= seconds:
                return
        except (TypeError, KeyError):
            pass
        extensions["timeout"] = _bounded(given, seconds)


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
    if not ex.traced:  # no span scope to enter: this runs on every attempt
        response = transport.handle_request(request)
        # Below 400 nothing makes an answer a failure (Exchange.transient) and no span is there
        # to note it on: the common answer returns at once.
        return response if response.status_code < 400 else _answer(ex, INVALID_SPAN, response)
    with ex.attempt() as span:
        return _answer(ex, span, transport.handle_request(request))


def _answer(ex: Exchange, span: Span, response: httpx.Response) -> httpx.Response:
    """The response, or the failure that carries a transient one (read, its connection freed)."""
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
    if not ex.traced:
        response = await transport.handle_async_request(request)
        if response.status_code < 400:  # as in _send
            return response
        return await _aanswer(ex, INVALID_SPAN, response)
    with ex.attempt() as span:
        return await _aanswer(ex, span, await transport.handle_async_request(request))


async def _aanswer(ex: Exchange, span: Span, response: httpx.Response) -> httpx.Response:
    """:func:`_answer` for the async transport."""
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
        ex = _exchange(self.edge, request)
        return ex.call(self.transport, ex, request)  # type: ignore[no-any-return]

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
        ex = _exchange(self.edge, request)
        return await ex.acall(self.transport, ex, request)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.transport.aclose()
