"""WSGI: :class:`ResilienceMiddleware`, the twin of :mod:`buttress.integrations.asgi`.

``app = ResilienceMiddleware(app)``: the caller's deadline header sets the deadline of the
request (for the app call and the iteration of its body), an expired one is answered 504, and
a ``RejectedError`` escaping before the answer started becomes 503 (429 for a rate limit) with
``Retry-After``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from buttress import _context
from buttress.exceptions import RejectedError
from buttress.integrations._core import DEFAULT_DEADLINE_HEADER
from buttress.integrations._inbound import EXPIRED_BODY, EXPIRED_STATUS, budget, rejection

__all__ = ["ResilienceMiddleware"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {429: "Too Many Requests", 503: "Service Unavailable", 504: "Gateway Timeout"}


def _answer(
    start_response: StartResponse, status: int, headers: list[tuple[str, str]], body: bytes
) -> list[bytes]:
    start_response(f"{status} {_REASONS[status]}", [*headers, ("content-length", str(len(body)))])
    return [body]


class ResilienceMiddleware:
    """Inbound deadline and rejection answers for a WSGI app (see the ASGI one for the rules).

    Args:
        app: the WSGI application.
        deadline_header: the header carrying the caller's time left, in milliseconds.
    """

    def __init__(self, app: WSGIApp, *, deadline_header: str = DEFAULT_DEADLINE_HEADER) -> None:
        self.app = app
        self.deadline_header = deadline_header
        self._key = "HTTP_" + deadline_header.upper().replace("-", "_")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        seconds = budget(environ.get(self._key))
        if seconds is not None and seconds <= 0:
            return _answer(
                start_response,
                EXPIRED_STATUS,
                [("content-type", "text/plain; charset=utf-8")],
                EXPIRED_BODY,
            )
        # The app and the iteration of its body run in a context of their own that holds the
        # deadline: a server may iterate the body after this call returned.
        context = contextvars.copy_context()
        if seconds is not None:
            context.run(_context.within, seconds)
        started = False

        def starting(*args: Any) -> Any:
            nonlocal started
            started = True
            return start_response(*args)

        try:
            body = context.run(self.app, environ, starting)
        except RejectedError as exc:
            if started:
                raise
            return _answer(start_response, *rejection(exc))
        return _Body(body, context)


class _Body:
    """The app's body, iterated (and closed) inside the request's context."""

    def __init__(self, body: Iterable[bytes], context: contextvars.Context) -> None:
        self._body = body
        self._chunks: Iterator[bytes] = iter(body)
        self._context = context

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return self._context.run(next, self._chunks)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)
