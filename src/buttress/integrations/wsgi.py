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
from buttress.integrations._core import DEFAULT_DEADLINE_HEADER, header_name
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
        self.deadline_header = header_name(deadline_header)
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
        body = _Body(context, start_response)
        try:
            body.start(context.run(self.app, environ, body.starting))
        except RejectedError as exc:
            if body.started:
                raise
            return _answer(start_response, *rejection(exc))
        return body


class _Body:
    """The app's body, iterated (and closed) inside the request's context.

    An app whose body is a generator may run (and be rejected) only when the server iterates
    it: a rejection before the answer started still becomes a 503/429 answer then.
    """

    def __init__(self, context: contextvars.Context, start_response: StartResponse) -> None:
        self._context = context
        self._start_response = start_response
        self._body: Iterable[bytes] = ()
        self._chunks: Iterator[bytes] = iter(())
        self.started = False

    def starting(self, *args: Any) -> Any:
        self.started = True
        return self._start_response(*args)

    def start(self, body: Iterable[bytes]) -> None:
        self._body = body
        self._chunks = self._context.run(iter, body)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return self._context.run(next, self._chunks)
        except RejectedError as exc:
            if self.started:
                raise
            self.started = True
            self._chunks = iter(_answer(self._start_response, *rejection(exc)))
            return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)
