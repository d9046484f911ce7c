"""ASGI: :class:`ResilienceMiddleware` reads the caller's deadline and answers rejections.

``app = ResilienceMiddleware(app)``. For each HTTP request it reads the time the caller has left
from the deadline header (``X-Buttress-Deadline-Ms`` by default) and sets it as the deadline
that ``buttress.remaining()``, retries, timeouts and the outbound integrations obey; a request
whose deadline has passed is answered 504 without running the app. A ``RejectedError`` that
escapes the app before it started its answer becomes a 503 (429 for a rate limit) with
``Retry-After``. See ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from buttress import _context
from buttress.exceptions import RejectedError
from buttress.integrations._core import DEFAULT_DEADLINE_HEADER, header_name
from buttress.integrations._inbound import EXPIRED_BODY, EXPIRED_STATUS, budget, rejection

__all__ = ["ResilienceMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _answer(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ResilienceMiddleware:
    """Inbound deadline and rejection answers for an ASGI app.

    Args:
        app: the ASGI application.
        deadline_header: the header carrying the caller's time left, in milliseconds.
    """

    def __init__(self, app: ASGIApp, *, deadline_header: str = DEFAULT_DEADLINE_HEADER) -> None:
        self.app = app
        self.deadline_header = header_name(deadline_header)
        self._key = deadline_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Every line of the header, joined as a WSGI server joins them: a request that says its
        # deadline twice gets the same answer from both twins (none read), not the first line
        # here and nothing there.
        values = [
            v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == self._key
        ]
        seconds = budget(",".join(values) if values else None)
        if seconds is not None and seconds <= 0:
            await _answer(
                send, EXPIRED_STATUS, [("content-type", "text/plain; charset=utf-8")], EXPIRED_BODY
            )
            return
        token = _context.within(seconds) if seconds is not None else None
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except RejectedError as exc:
            if started:
                raise
            await _answer(send, *rejection(exc))
        finally:
            if token is not None:
                _context.deadline.reset(token)
