"""requests: :class:`ResilientAdapter`, mounted on a ``requests.Session``.

``session.mount("https://", ResilientAdapter("billing"))`` runs the ``billing`` service's whole
policy from settings around each attempt the adapter sends. See ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack
from urllib.parse import urlsplit

import requests
from requests.adapters import DEFAULT_POOLBLOCK, DEFAULT_POOLSIZE, HTTPAdapter

from buttress.integrations._core import Edge, EdgeOptions, Exchange, repeatable

__all__ = ["ResilientAdapter"]


def _within(timeout: Any, seconds: float) -> Any:
    """``timeout`` (a number, a ``(connect, read)`` pair or ``None``) no longer than ``seconds``."""
    if timeout is None:
        return seconds
    if isinstance(timeout, tuple):
        return tuple(seconds if part is None else min(part, seconds) for part in timeout)
    if isinstance(timeout, int | float):
        return min(timeout, seconds)
    return timeout  # a urllib3 Timeout object: the caller's own, left alone


def _send(
    adapter: HTTPAdapter,
    ex: Exchange,
    request: requests.PreparedRequest,
    *args: Any,
    **kwargs: Any,
) -> requests.Response:
    """One attempt: the only I/O of the adapter (``HTTPAdapter.send``)."""
    seconds = ex.outbound(request.headers)
    if seconds is not None:
        kwargs["timeout"] = _within(kwargs.get("timeout"), seconds)
    with ex.attempt() as span:
        response = HTTPAdapter.send(adapter, request, *args, **kwargs)
        status = response.status_code
        if not ex.transient(span, status, response.headers):
            return response
        _ = response.content  # read now: the connection goes back to the pool
        raise ex.failure(response, status, response.headers)


class ResilientAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that runs ``service``'s policy around each attempt it sends.

    Takes the arguments of :class:`buttress.integrations.httpx.ResilientTransport` (but no
    inner transport), plus ``HTTPAdapter``'s pool arguments (``pool_connections``,
    ``pool_maxsize``, ``pool_block``).
    ``on_exhausted="raise"`` raises ``requests.HTTPError`` for the last transient response.
    urllib3's own retries stay off (``max_retries=0``), so one layer retries.
    """

    def __init__(
        self,
        service: str,
        *,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        pool_block: bool = DEFAULT_POOLBLOCK,
        **options: Unpack[EdgeOptions],
    ) -> None:
        self.edge = Edge(service, _send, **options)
        super().__init__(
            pool_connections=pool_connections, pool_maxsize=pool_maxsize, pool_block=pool_block
        )

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        method = request.method or "GET"
        host = urlsplit(request.url or "").netloc.rpartition("@")[2]

        def error(response: requests.Response) -> requests.HTTPError:
            return requests.HTTPError(
                f"{method} {request.url} answered {response.status_code} "
                "(buttress: no attempt left)",
                response=response,
                request=request,
            )

        headers: Mapping[str, str] = request.headers
        with self.edge.exchange(method, host, repeatable(method, headers), error) as ex:
            ex.answer = ex.call(self, ex, request, *args, **kwargs)
        return ex.answer  # type: ignore[no-any-return]
