"""aiohttp: :class:`ResilientSession` (aiohttp 3.9.1+) and :class:`ResilientMiddleware` (3.12+).

``ResilientSession("billing", session)`` wraps a ``ClientSession``: its ``request``/``get``/...
run the ``billing`` service's whole policy from settings around each attempt. On aiohttp 3.12
and later, ``ClientSession(middlewares=[ResilientMiddleware("billing")])`` does the same from
inside the session. See ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Mapping
from types import TracebackType
from typing import Any, Unpack

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from buttress import _context
from buttress.integrations._core import Edge, EdgeOptions, Exchange, repeatable

__all__ = ["ResilientMiddleware", "ResilientSession"]

Send = Callable[[CIMultiDict[str]], Awaitable[aiohttp.ClientResponse]]


def _host(url: URL) -> str:
    return f"{url.host}" if url.explicit_port is None else f"{url.host}:{url.port}"


def _error(response: aiohttp.ClientResponse) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(
        response.request_info,
        response.history,
        status=response.status,
        message=f"{response.reason} (buttress: no attempt left)",
        headers=response.headers,
    )


async def _run(edge: Edge, method: str, url: URL, headers: CIMultiDict[str], send: Send) -> Any:
    """The policy around one request: shared by the session wrapper and the middleware."""
    with edge.exchange(method, _host(url), repeatable(method, headers), _error) as ex:
        ex.answer = await ex.run(ex, headers, send)
    return ex.answer


async def _attempt(ex: Exchange, headers: CIMultiDict[str], send: Send) -> aiohttp.ClientResponse:
    ex.outbound(headers)
    with ex.attempt() as span:
        response = await send(headers)
        status = response.status
        if not ex.transient(span, status, response.headers):
            return response
        # Read in full (which frees the connection); the body stays on the response, so the
        # last one is returned readable.
        await response.read()
        raise ex.failure(response, status, response.headers)


class ResilientSession:
    """A ``ClientSession`` wrapper whose requests run ``service``'s policy per attempt.

    Args:
        service: the service name (its settings, metric label and shared state).
        session: the session that sends (default: a new ``aiohttp.ClientSession()``, closed
            by :meth:`close`; a given one is the caller's to close).
        per_host, max_hosts, on_exhausted, deadline_header, idempotency_key, tracer_provider:
            as for :class:`buttress.integrations.httpx.ResilientTransport`;
            ``on_exhausted="raise"`` raises ``aiohttp.ClientResponseError``.

    ``await wrapper.get(url)`` and ``async with wrapper.get(url) as response`` both work, as on
    a session. A transient response that is retried is read and released; the one returned
    has its body read already when it was transient.
    """

    def __init__(
        self,
        service: str,
        session: aiohttp.ClientSession | None = None,
        **options: Unpack[EdgeOptions],
    ) -> None:
        self._edge = Edge(service, _attempt, **options)
        self._owned = session is None
        self._session = session

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session that sends (made on first use when none was given)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def request(self, method: str, url: str | URL, **kwargs: Any) -> _Pending:
        """Send ``method url`` (``session.request``'s keyword arguments) through the policy."""
        return _Pending(self._send(method.upper(), URL(url), kwargs))

    def get(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("GET", url, **kwargs)

    def head(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("HEAD", url, **kwargs)

    def options(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("OPTIONS", url, **kwargs)

    def post(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("POST", url, **kwargs)

    def put(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str | URL, **kwargs: Any) -> _Pending:
        return self.request("DELETE", url, **kwargs)

    async def _send(self, method: str, url: URL, kwargs: dict[str, Any]) -> Any:
        session = self.session
        given: Mapping[str, str] | None = kwargs.pop("headers", None)
        headers: CIMultiDict[str] = CIMultiDict(given or {})

        def send(headers: CIMultiDict[str]) -> Awaitable[aiohttp.ClientResponse]:
            left = _context.remaining()
            options = dict(kwargs)
            if left is not None and "timeout" not in options:
                options["timeout"] = aiohttp.ClientTimeout(total=left)
            return session.request(method, url, headers=headers, **options)

        return await _run(self._edge, method, url, headers, send)

    async def close(self) -> None:
        """Close the session if this wrapper made it."""
        if self._owned and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> ResilientSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Pending:
    """A request under way: awaitable, or an async context manager that releases the response."""

    def __init__(self, coro: Awaitable[aiohttp.ClientResponse]) -> None:
        self._coro = coro
        self._response: aiohttp.ClientResponse | None = None

    def __await__(self) -> Generator[Any, None, aiohttp.ClientResponse]:
        return self._coro.__await__()

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self._response = await self._coro
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._response is not None:
            self._response.release()


class ResilientMiddleware:
    """An aiohttp (3.12+) client middleware that runs ``service``'s policy per attempt.

    ``aiohttp.ClientSession(middlewares=[ResilientMiddleware("billing")])``; same arguments as
    :class:`ResilientSession` without ``session``. It sends through the handler it is given, so
    middlewares listed after it run on every attempt.
    """

    def __init__(self, service: str, **options: Unpack[EdgeOptions]) -> None:
        self._edge = Edge(service, _attempt, **options)

    async def __call__(self, request: Any, handler: Any) -> Any:
        async def send(headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
            request.headers.update(headers)
            return await handler(request)  # type: ignore[no-any-return]

        headers: CIMultiDict[str] = CIMultiDict(request.headers)
        return await _run(self._edge, request.method, request.url, headers, send)
