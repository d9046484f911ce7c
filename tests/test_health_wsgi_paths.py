"""The WSGI health app reads a path as PEP 3333 hands it over: the URL's bytes, each one a
character (latin-1), so a service name in UTF-8 arrives as several characters per letter.

The admin routes name a service in the path; the ASGI app gets it decoded (tests/test_health.py
runs both apps through httpx, whose WSGI transport does not follow PEP 3333 here).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from buttress import circuit_breaker
from buttress.health_app import wsgi_app
from buttress.registry import breaker
from buttress.testing import FakeClock

TOKEN = "correct-horse-battery-staple"


def post(app: Any, path: str) -> tuple[str, dict[str, Any]]:
    """POST ``path`` (text) as a PEP 3333 server does: PATH_INFO is its UTF-8 bytes as latin-1."""
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path.encode().decode("latin-1"),
        "QUERY_STRING": "",
        "HTTP_AUTHORIZATION": f"Bearer {TOKEN}",
        "SERVER_NAME": "health",
        "SERVER_PORT": "80",
        "wsgi.input": io.BytesIO(),
        "wsgi.url_scheme": "http",
    }
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers: status.append(s)))
    return status[0], json.loads(body)


@pytest.mark.parametrize("service", ["zürich", "東京", "plain"])
def test_an_admin_action_reaches_a_service_whose_name_is_not_ascii(
    service: str, clock: FakeClock
) -> None:
    @circuit_breaker(name=service, fail_max=1, timeout=60)
    def call() -> str:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        call()
    assert breaker(service).current_state == "open"

    status, body = post(wsgi_app(admin_token=TOKEN), f"/circuits/{service}/reset")

    assert (status, body["service"]) == ("200 OK", service)
    assert breaker(service).current_state == "closed"
