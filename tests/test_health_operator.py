"""The health app's operator routes: recent events, their stream (SSE), the effective settings.

They exist only with an admin token and answer only requests carrying it, like the admin
actions. Every route runs on the ASGI and the WSGI app; the streams are driven through each
protocol directly (the app's own messages), so a test controls when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest

import buttress
from buttress import config, events, with_rate_limit
from buttress.health_app import RECENT_EVENTS, asgi_app, recent_events, wsgi_app

TOKEN = "correct-horse-battery-staple"
SECRET_URL = "redis://ops:hunter2@127.0.0.1:6390/0"


@pytest.fixture(params=["asgi", "wsgi"])
def app_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def request(kind: str, path: str, token: str | None = TOKEN, method: str = "GET") -> Any:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    if kind == "wsgi":
        transport = httpx.WSGITransport(app=wsgi_app(admin_token=TOKEN if token else ""))
        with httpx.Client(transport=transport, base_url="http://health") as client:
            return client.request(method, path, headers=headers)

    async def send() -> httpx.Response:
        app = asgi_app(admin_token=TOKEN if token else "")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://health") as client:
            return await client.request(method, path, headers=headers)

    return asyncio.run(send())


def reload_failed(error: str) -> None:
    events.emit(events.SettingsReloaded(ok=False, generation=1, error=error))


def test_without_a_token_the_operator_routes_do_not_exist(app_kind: str) -> None:
    for path in ("/events", "/events/stream", "/settings"):
        assert request(app_kind, path, token=None).status_code == 404


def test_a_missing_or_wrong_token_is_refused(app_kind: str) -> None:
    asgi_app(admin_token=TOKEN)  # recording starts with the first app
    for path in ("/events", "/events/stream", "/settings"):
        assert request(app_kind, path, token="wrong-token-of-enough-length").status_code == 401
    assert request(app_kind, "/events", method="POST").status_code == 405


def test_recent_events_are_kept_with_secrets_masked(app_kind: str, clock: Any) -> None:
    wsgi_app(admin_token=TOKEN)
    reload_failed(f"cannot reach {SECRET_URL}")
    response = request(app_kind, "/events")
    assert response.status_code == 200
    (item,) = response.json()["events"]
    assert item["type"] == "SettingsReloaded"
    assert item["ok"] is False
    assert "hunter2" not in response.text
    assert item["error"] == "cannot reach redis://***@127.0.0.1:6390/0"
    assert item["at"] == clock.wall()


def test_the_ring_buffer_is_bounded(clock: Any) -> None:
    wsgi_app(admin_token=TOKEN)
    for n in range(RECENT_EVENTS + 10):
        reload_failed(f"reload {n}")
    kept = recent_events()
    assert len(kept) == RECENT_EVENTS
    assert kept[0]["error"] == "reload 10"  # the oldest went first


def test_per_call_events_are_not_kept(mode: Any, clock: Any) -> None:
    asgi_app(admin_token=TOKEN)
    call = with_rate_limit("quota", rate=0.01, burst=1)(mode.define())
    mode.run(call)
    mode.outcome(call)  # a CallRejected: per call, not an operator's event
    assert recent_events() == []


def test_the_effective_settings_with_secrets_masked(app_kind: str) -> None:
    env = {"BUTTRESS_SERVICES__PAY__CIRCUIT_BREAKER__STATE_URL": SECRET_URL}
    config.reload_settings(env=env)
    try:
        response = request(app_kind, "/settings")
    finally:
        config.reload_settings()
    assert response.status_code == 200
    assert "hunter2" not in response.text
    described = response.json()
    assert described["services"]["pay"]["circuit_breaker"]["state_url"]["value"] == (
        "redis://ops:***@127.0.0.1:6390/0"
    )


def test_health_lists_the_rate_limiters(mode: Any, clock: Any) -> None:
    call = with_rate_limit("quota", rate=2, burst=3)(mode.define())
    mode.run(call)
    assert buttress.health()["rate_limiters"] == {
        "quota": {"service": "quota", "tokens": 2.0, "rate": 2.0, "burst": 3}
    }


# --- the stream -------------------------------------------------------------------------------


def frames(chunks: list[bytes]) -> list[dict[str, Any]]:
    """The events in the SSE frames sent so far (heartbeats skipped)."""
    out = []
    for frame in b"".join(chunks).decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        if "data" in lines:
            item = json.loads(lines["data"])
            assert (lines["id"], lines["event"]) == (str(item["id"]), item["type"])
            out.append(item)
    return out


def test_the_asgi_stream_sends_the_backlog_then_each_event_until_the_client_leaves() -> None:
    app = asgi_app(admin_token=TOKEN)
    reload_failed("first")
    reload_failed("second")

    async def run() -> tuple[list[Any], list[bytes]]:
        left = asyncio.Event()
        starts: list[Any] = []
        chunks: list[bytes] = []
        arrived = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not starts:
                starts.append(None)
                return {"type": "http.request", "body": b"", "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                starts.append(message)
            else:
                chunks.append(message["body"])
                arrived.set()

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/events/stream",
            "headers": [
                (b"authorization", f"Bearer {TOKEN}".encode()),
                (b"last-event-id", str(recent_events()[0]["id"]).encode()),
            ],
        }
        serving = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(arrived.wait(), 1)
        arrived.clear()
        # An event from another thread reaches the stream through the loop.
        threading.Thread(target=reload_failed, args=("third",)).start()
        await asyncio.wait_for(arrived.wait(), 1)
        left.set()
        await asyncio.wait_for(serving, 1)
        return starts, chunks

    starts, chunks = asyncio.run(run())
    headers = dict(starts[1]["headers"])
    assert (starts[1]["status"], headers[b"content-type"]) == (
        200,
        b"text/event-stream; charset=utf-8",
    )
    # After Last-Event-ID: the second event, then the third as it happened.
    assert [item["error"] for item in frames(chunks)] == ["second", "third"]
    reload_failed("after")  # nobody follows any more: nothing to deliver, nothing raised


def test_the_wsgi_stream_sends_the_backlog_then_each_event_until_closed() -> None:
    app = wsgi_app(admin_token=TOKEN)
    reload_failed("first")
    started: list[Any] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/events/stream",
        "HTTP_AUTHORIZATION": f"Bearer {TOKEN}",
    }
    body = iter(app(environ, lambda status, headers: started.append((status, headers))))
    assert started[0][0] == "200 OK"
    assert dict(started[0][1])["content-type"] == "text/event-stream; charset=utf-8"
    chunks = [next(body)]
    threading.Thread(target=reload_failed, args=("second",)).start()
    chunks.append(next(body))
    body.close()  # what the server does when the client went away  # type: ignore[attr-defined]
    assert [item["error"] for item in frames(chunks)] == ["first", "second"]
    reload_failed("after")
