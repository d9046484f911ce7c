"""buttress.health(): degradation level and status, and the ASGI/WSGI apps with admin actions."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest

import buttress
from buttress import (
    circuit_breaker,
    config,
    instrumentation,
    registry,
    with_bulkhead,
    with_fallback,
    with_rate_limit,
)
from buttress.events import CircuitStateChanged, CircuitTrialStarted
from buttress.exceptions import ConfigurationError
from buttress.health_app import asgi_app, bulkheads, circuits, degradation_level, wsgi_app
from buttress.health_app import reset as forget_fallbacks
from buttress.health_app import snapshot as state_snapshot
from buttress.testing import capture_events

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(autouse=True)
def _no_fallbacks_seen():
    forget_fallbacks()
    yield
    forget_fallbacks()


@pytest.fixture
def criticality():
    """Declare services' criticality through settings (environment), restored afterwards."""

    def declare(**levels: str) -> None:
        env = {f"BUTTRESS_SERVICES__{s.upper()}__CRITICALITY": c for s, c in levels.items()}
        config.reload_settings(env=env)

    yield declare
    config.reload_settings()


@pytest.fixture
def restore_subscribers():
    before = instrumentation.installed()
    yield
    instrumentation.configure(
        prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
        otel=before.get("otel", False),  # type: ignore[arg-type]
        logging=before.get("logging", False),  # type: ignore[arg-type]
    )


def tripped(service: str, *, fail_max: int = 1):
    """A sync call site of ``service`` whose circuit is now open."""

    @circuit_breaker(name=service, fail_max=fail_max, timeout=60)
    def call(fail: bool = True) -> str:
        if fail:
            raise ConnectionError("down")
        return "ok"

    for _ in range(fail_max):
        with pytest.raises(ConnectionError):
            call()
    return call


def breaker(service: str):
    return registry.instances("circuit_breaker")[service]


# --- the rule ------------------------------------------------------------------------------------


def test_no_circuit_means_healthy(clock):
    snapshot = buttress.health()
    assert snapshot == {
        "status": "healthy",
        "degradation_level": 0,
        "enabled": True,
        "circuits": {},
        "bulkheads": {},
        "fallbacks": {},
        "deferred": {},
        "rate_limiters": {},
    }


@pytest.mark.parametrize(
    ("declared", "level", "status"),
    [
        ("low", 1, "degraded"),
        ("normal", 2, "degraded"),
        ("high", 3, "degraded"),
        ("critical", 4, "critical"),
    ],
)
def test_an_open_circuit_degrades_by_its_services_criticality(
    criticality, clock, declared, level, status
):
    criticality(payments=declared)
    tripped("payments")
    snapshot = buttress.health()
    assert (snapshot["degradation_level"], snapshot["status"]) == (level, status)
    circuit = snapshot["circuits"]["payments"]
    assert circuit["state"] == "open"
    assert circuit["criticality"] == declared
    assert circuit["failures"] == 1
    assert circuit["seconds_left_open"] == 60


def test_the_level_is_the_worst_service_and_half_open_counts_as_one(criticality, clock):
    criticality(search="low", ledger="high")
    tripped("search")
    assert buttress.health()["degradation_level"] == 1
    tripped("ledger")
    assert buttress.health()["degradation_level"] == 3
    breaker("ledger").reset()
    breaker("search").half_open()
    snapshot = buttress.health()
    assert snapshot["circuits"]["search"]["state"] == "half_open"
    assert (snapshot["degradation_level"], snapshot["status"]) == (1, "degraded")


def test_an_open_circuit_whose_time_ran_out_is_ready_to_probe_not_critical(
    mode, criticality, clock
):
    # An instance its load balancer dropped gets no calls, so nothing moves the breaker: health
    # must not stay 503 for ever. Reading it changes nothing and takes no trial slot.
    criticality(auth="critical")

    def down():
        raise ConnectionError("down")

    fn = circuit_breaker(name="auth", fail_max=1, timeout=30, half_open_max_calls=1)(
        mode.define(lambda: "ok")
    )
    failing = circuit_breaker(name="auth", fail_max=1, timeout=30, half_open_max_calls=1)(
        mode.define(down)
    )
    assert isinstance(mode.outcome(failing), ConnectionError)
    assert (buttress.health()["status"], breaker("auth").state_label) == ("critical", "open")
    clock.advance(29.9)
    assert buttress.health()["circuits"]["auth"]["seconds_left_open"] == pytest.approx(0.1)
    with capture_events([CircuitStateChanged, CircuitTrialStarted]) as seen:
        clock.advance(0.1)
        for _ in range(3):
            snapshot = buttress.health()
            assert (snapshot["status"], snapshot["degradation_level"]) == ("degraded", 1)
            circuit = snapshot["circuits"]["auth"]
            assert (circuit["state"], circuit["seconds_left_open"]) == ("half_open", None)
            assert circuit["trials_in_flight"] == 0
        assert breaker("auth").state_label == "half_open"
        assert breaker("auth").current_state == "open"  # pybreaker's state: not moved
        assert seen == []
        assert mode.run(fn) == "ok"  # the one trial slot was still free
    assert [e.new_state for e in seen.of(CircuitStateChanged)] == ["half_open", "closed"]
    assert seen.of(CircuitStateChanged)[0].reason == "timeout_elapsed"
    assert len(seen.of(CircuitTrialStarted)) == 1
    assert buttress.health()["status"] == "healthy"


def test_the_apps_answer_200_once_the_open_time_ran_out(app_kind, criticality, clock):
    criticality(auth="critical")
    tripped("auth")
    client = Client(app_kind, admin_token="")
    assert client.request("GET", "/").status_code == 503
    clock.advance(60)
    response = client.request("GET", "/")
    assert response.status_code == 200
    assert response.json()["circuits"]["auth"]["state"] == "half_open"
    assert breaker("auth").current_state == "open"


def test_forced_states_count_like_the_state_they_force(clock):
    tripped("a")
    breaker("a").force_closed()
    assert buttress.health()["degradation_level"] == 0
    breaker("a").force_open()
    assert buttress.health()["degradation_level"] == 2
    breaker("a").disable()
    assert buttress.health()["status"] == "healthy"


def test_degradation_level_of_plain_pairs():
    assert degradation_level([]) == 0
    assert degradation_level([("x", "closed"), ("y", "disabled")]) == 0
    assert degradation_level([("x", "half_open"), ("y", "forced_open")]) == 2


def test_a_fallback_served_recently_degrades_the_status_for_a_minute(
    restore_subscribers, clock, mode
):
    instrumentation.install_defaults()

    def down():
        raise ConnectionError("down")

    fn = with_fallback("cached", name="prices")(mode.define(down))
    assert mode.run(fn) == "cached"
    snapshot = buttress.health()
    assert (snapshot["status"], snapshot["degradation_level"]) == ("degraded", 0)
    assert snapshot["fallbacks"] == {"prices": 0.0}
    clock.advance(59)
    assert buttress.health()["fallbacks"] == {"prices": 59.0}
    clock.advance(2)
    assert buttress.health()["status"] == "healthy"
    assert buttress.health()["fallbacks"] == {}


def test_bulkheads_show_active_queued_limit_and_utilization(mode, clock):
    seen = {}

    def inside():
        seen.update(buttress.health()["bulkheads"]["db"])
        return "ok"

    fn = with_bulkhead(name="db", limit=4)(mode.define(inside))
    assert mode.run(fn) == "ok"
    assert seen == {"service": "db", "active": 1, "queued": 0, "limit": 4, "utilization": 0.25}
    assert buttress.health()["bulkheads"]["db"]["active"] == 0


def test_the_kill_switch_is_shown(clock):
    config.reload_settings(env={"FF_ENABLE_RESILIENCE_PATTERNS": "false"})
    try:
        assert buttress.health()["enabled"] is False
    finally:
        config.reload_settings()


# --- the state snapshot (what the Prometheus collector reads) -------------------------------------


def test_the_state_snapshot_holds_every_shared_instance_and_the_settings(clock):
    tripped("payments")
    seen = {}

    def inside():
        seen.update(state_snapshot())
        return "ok"

    fn = with_bulkhead(name="db", limit=2)(with_rate_limit(name="quota", rate=1, burst=3)(inside))
    assert fn() == "ok"
    assert seen["circuits"] == {"payments": dict(breaker("payments").snapshot())}
    assert seen["circuits"]["payments"]["state"] == "open"
    assert seen["bulkheads"] == {
        "db": {"service": "db", "active": 1, "queued": 0, "limit": 2, "utilization": 0.5}
    }
    limiter = registry.instances("rate_limit")["quota"]
    assert seen["rate_limiters"] == {"quota": dict(limiter.snapshot())}
    assert seen["rate_limiters"]["quota"]["tokens"] == 2
    assert set(seen["worker_pool"]) == {"threads", "idle", "pending", "abandoned"}
    assert seen["settings"] is config.SNAPSHOT
    assert circuits() == seen["circuits"]
    assert bulkheads()["db"]["active"] == 0


def test_the_state_snapshot_has_no_settings_while_they_are_invalid(monkeypatch, clock):
    for name in list(os.environ):
        if name.upper().startswith(("BUTTRESS_", "FF_ENABLE_")):
            monkeypatch.delenv(name)
    monkeypatch.delattr(config, "SNAPSHOT", raising=False)
    monkeypatch.setenv("BUTTRESS_SERVICES__OPENFGA__RETRY__MAX_ATEMPTS", "3")
    state = state_snapshot()
    assert state["settings"] is None
    assert (state["circuits"], state["bulkheads"], state["rate_limiters"]) == ({}, {}, {})


# --- the apps ------------------------------------------------------------------------------------


class Client:
    """One HTTP client over either app, so every route is tested on ASGI and on WSGI."""

    def __init__(self, kind: str, **options: str) -> None:
        self.kind = kind
        self.app = asgi_app(**options) if kind == "asgi" else wsgi_app(**options)

    def request(self, method: str, path: str, token: str | None = None, *, scheme: str = "Bearer"):
        headers = {"authorization": f"{scheme} {token}"} if token is not None else {}
        if self.kind == "wsgi":
            transport = httpx.WSGITransport(app=self.app)
            with httpx.Client(transport=transport, base_url="http://health") as client:
                return client.request(method, path, headers=headers)

        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://health") as client:
                return await client.request(method, path, headers=headers)

        return asyncio.run(send())


@pytest.fixture(params=["asgi", "wsgi"])
def app_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_get_serves_the_snapshot_as_json_with_200_while_degraded(app_kind, clock):
    tripped("openfga")
    response = Client(app_kind, admin_token="").request("GET", "/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body == json.loads(json.dumps(buttress.health()))
    assert (body["status"], body["circuits"]["openfga"]["state"]) == ("degraded", "open")


def test_critical_is_503(app_kind, criticality, clock):
    criticality(auth="critical")
    tripped("auth")
    response = Client(app_kind, admin_token="").request("GET", "/")
    assert response.status_code == 503
    assert response.json()["status"] == "critical"


def test_invalid_settings_answer_503_with_the_reason_not_500(app_kind, monkeypatch, clock):
    # A fresh process whose settings fail to load with the kill switch on: every protected call
    # raises ConfigurationError, so the instance is down; health still answers, saying why.
    for name in list(os.environ):
        if name.upper().startswith(("BUTTRESS_", "FF_ENABLE_")):
            monkeypatch.delenv(name)
    monkeypatch.delattr(config, "SNAPSHOT", raising=False)
    monkeypatch.setenv("BUTTRESS_SERVICES__OPENFGA__RETRY__MAX_ATEMPTS", "3")
    response = Client(app_kind, admin_token="").request("GET", "/")
    assert response.status_code == 503
    body = response.json()
    assert (body["status"], body["degradation_level"]) == ("critical", 4)
    assert "services.openfga.retry.max_atempts" in body["settings_error"]
    assert "BUTTRESS_SERVICES__OPENFGA__RETRY__MAX_ATEMPTS" in body["settings_error"]


def test_head_has_the_status_and_no_body(app_kind, clock):
    response = Client(app_kind, admin_token="").request("HEAD", "/")
    assert (response.status_code, response.content) == (200, b"")


def test_other_methods_and_paths_are_refused(app_kind):
    client = Client(app_kind, admin_token="")
    assert client.request("POST", "/").status_code == 405
    assert client.request("DELETE", "/").headers["allow"] == "GET, HEAD"
    assert client.request("GET", "/nothing").status_code == 404


def test_without_a_token_the_admin_actions_do_not_exist(app_kind, monkeypatch, clock):
    monkeypatch.delenv("BUTTRESS_ADMIN_TOKEN", raising=False)
    tripped("openfga")
    client = Client(app_kind)
    for action in ("reset", "force_open", "force_closed"):
        response = client.request("POST", f"/circuits/openfga/{action}", TOKEN)
        assert response.status_code == 404
    assert breaker("openfga").snapshot()["state"] == "open"


@pytest.mark.parametrize(
    ("given", "scheme"),
    [
        (None, "Bearer"),
        ("wrong-token-of-some-length", "Bearer"),
        (TOKEN[:-1] + "X", "Bearer"),  # same length, last character differs
        (TOKEN, "Basic"),
        ("", "Bearer"),
    ],
)
def test_a_missing_or_wrong_token_is_refused(app_kind, clock, given, scheme):
    tripped("openfga")
    client = Client(app_kind, admin_token=TOKEN)
    response = client.request("POST", "/circuits/openfga/reset", given, scheme=scheme)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert breaker("openfga").snapshot()["state"] == "open"


def test_admin_actions_with_the_token(app_kind, clock):
    tripped("openfga")
    client = Client(app_kind, admin_token=TOKEN)
    response = client.request("POST", "/circuits/openfga/reset", TOKEN)
    assert response.status_code == 200
    assert response.json()["circuit"]["state"] == "closed"
    assert breaker("openfga").snapshot()["state"] == "closed"
    response = client.request("POST", "/circuits/openfga/force_open", TOKEN)
    assert (response.status_code, response.json()["action"]) == (200, "force_open")
    assert breaker("openfga").snapshot()["state"] == "forced_open"
    client.request("POST", "/circuits/openfga/force_closed", TOKEN)
    assert breaker("openfga").snapshot()["state"] == "forced_closed"
    assert client.request("POST", "/circuits/nobody/reset", TOKEN).status_code == 404
    assert client.request("GET", "/circuits/openfga/reset", TOKEN).status_code == 405
    assert client.request("POST", "/circuits/openfga/explode", TOKEN).status_code == 404


def test_admin_overrides_take_a_ttl_and_end_by_themselves(app_kind, clock):
    tripped("openfga")
    client = Client(app_kind, admin_token=TOKEN)
    response = client.request("POST", "/circuits/openfga/force_open?ttl=30", TOKEN)
    assert (response.status_code, response.json()["ttl"]) == (200, 30.0)
    assert breaker("openfga").snapshot()["state"] == "forced_open"
    clock.advance(30)
    assert breaker("openfga").snapshot()["state"] != "forced_open"
    response = client.request("POST", "/circuits/openfga/disable?ttl=5", TOKEN)
    assert response.json()["circuit"]["state"] == "disabled"
    for bad in ("0", "-1", "nan", "soon", "1e9"):
        response = client.request("POST", f"/circuits/openfga/force_closed?ttl={bad}", TOKEN)
        assert response.status_code == 400, bad
        assert "ttl" in response.json()["error"]
    assert breaker("openfga").snapshot()["state"] == "disabled"  # a refused action did nothing


@pytest.mark.parametrize(
    ("action", "query"),
    [
        # Each was an override for ever: the query was read for ttl alone, a blank value dropped.
        ("force_open", "ttl="),  # a script's unset variable: ?ttl=$TTL
        ("force_open", "TTL=30"),
        ("force_closed", "tll=30"),
        ("disable", "ttl=30&force=1"),
        ("reset", "ttl=30"),  # reset ends overrides; it has none of its own to time
    ],
)
def test_an_admin_query_other_than_a_ttl_is_refused_and_changes_nothing(
    app_kind, clock, action, query
):
    tripped("openfga")
    client = Client(app_kind, admin_token=TOKEN)
    response = client.request("POST", f"/circuits/openfga/{action}?{query}", TOKEN)
    assert response.status_code == 400
    assert response.json()["error"]
    assert breaker("openfga").snapshot()["state"] == "open"


def test_the_token_can_come_from_the_environment(app_kind, monkeypatch, clock):
    tripped("openfga")
    monkeypatch.setenv("BUTTRESS_ADMIN_TOKEN", TOKEN)
    client = Client(app_kind)
    disabled = Client(app_kind, admin_token="")  # an explicit empty token wins over the variable
    monkeypatch.delenv("BUTTRESS_ADMIN_TOKEN")
    assert client.request("POST", "/circuits/openfga/force_open", TOKEN).status_code == 200
    assert disabled.request("POST", "/circuits/openfga/reset", TOKEN).status_code == 404
    assert breaker("openfga").snapshot()["state"] == "forced_open"


def test_the_token_variable_is_read_in_any_case_as_the_settings_read_it(
    app_kind, monkeypatch, clock
):
    # The settings take buttress_admin_token for BUTTRESS_ADMIN_TOKEN (no "unknown key" error):
    # the app ran without admin routes instead, and an operator's force_open answered 404.
    tripped("openfga")
    monkeypatch.delenv("BUTTRESS_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("buttress_admin_token", TOKEN)
    client = Client(app_kind)
    assert client.request("POST", "/circuits/openfga/force_open", TOKEN).status_code == 200
    assert breaker("openfga").snapshot()["state"] == "forced_open"


def test_a_token_outside_ascii_matches_when_sent_in_utf8(app_kind, clock):
    # The header arrives as latin-1 text; it was encoded again as UTF-8, so the right token
    # (sent as UTF-8 bytes) never matched.
    token = "clé-très-secrète-ünd-lang"
    tripped("openfga")
    app = asgi_app(admin_token=token) if app_kind == "asgi" else wsgi_app(admin_token=token)
    sent = f"Bearer {token}".encode()
    status, _ = _raw_post(app_kind, app, "/circuits/openfga/force_open", sent)
    assert status == 200
    assert breaker("openfga").snapshot()["state"] == "forced_open"
    status, _ = _raw_post(app_kind, app, "/circuits/openfga/reset", b"Bearer cl\xe9-wrong")
    assert status == 401


def _raw_post(kind, app, path, authorization: bytes):
    """POST with the Authorization header's exact bytes (httpx would refuse non-ASCII text)."""
    if kind == "wsgi":
        got: list[str] = []
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "HTTP_AUTHORIZATION": authorization.decode("latin-1"),
        }
        body = b"".join(app(environ, lambda status, headers: got.append(status)))
        return int(got[0].split()[0]), body
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", authorization)],
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_a_short_token_is_a_configuration_error(app_kind):
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        Client(app_kind, admin_token="short")


def test_the_asgi_app_routes_below_its_mount_point(clock):
    tripped("openfga")
    app = asgi_app(admin_token=TOKEN)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/ops/health/circuits/openfga/reset",
        "root_path": "/ops/health",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert breaker("openfga").snapshot()["state"] == "closed"


def test_the_asgi_app_answers_lifespan_messages():
    app = asgi_app(admin_token="")
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message["type"])

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --- served for real, and under the frameworks the docs show ------------------------------------


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on the test's output."""


@contextmanager
def served(app: Any) -> Iterator[str]:
    """``app`` served by wsgiref on a free loopback port, from a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def mounted_at_health(environ: Any, start_response: Any) -> Any:
    """What werkzeug's DispatcherMiddleware does for ``{"/health": wsgi_app()}`` (docs)."""
    path = environ["PATH_INFO"]
    if path != "/health" and not path.startswith("/health/"):
        start_response("404 Not Found", [("content-type", "text/plain")])
        return [b"not here"]
    environ["SCRIPT_NAME"] += "/health"
    environ["PATH_INFO"] = path.removeprefix("/health")
    return HEALTH_WSGI(environ, start_response)


HEALTH_WSGI = wsgi_app(admin_token="")


def test_a_served_health_endpoint_leaves_503_without_any_call(criticality, clock):
    # The load balancer's view: it stopped sending traffic on 503, and polls only /health.
    criticality(auth="critical")
    tripped("auth")
    with served(mounted_at_health) as base:
        status, body = get(base + "/health")
        assert (status, body["status"]) == (503, "critical")
        assert get(base + "/health/")[0] == 503
        clock.advance(60)
        status, body = get(base + "/health")
        assert (status, body["status"], body["circuits"]["auth"]["state"]) == (
            200,
            "degraded",
            "half_open",
        )
    assert breaker("auth").current_state == "open"


def _starlette() -> Any:
    try:
        import starlette
    except ImportError:
        message = "starlette is not installed (dev dependency: the documented mount is checked)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return starlette


def test_under_a_starlette_mount_the_health_url_ends_with_a_slash(clock):
    # Starlette's router answers /health with a 307 to /health/ before the app is reached; the
    # docs give /health/ as the URL to probe.
    _starlette()
    from starlette.applications import Starlette
    from starlette.routing import Mount

    tripped("openfga")
    app = Starlette(routes=[Mount("/health", app=asgi_app(admin_token=TOKEN))])

    async def requests() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return [
                await client.get("/health"),
                await client.get("/health/"),
                await client.post(
                    "/health/circuits/openfga/force_open",
                    headers={"authorization": f"Bearer {TOKEN}"},
                ),
            ]

    redirect, snapshot, admin = asyncio.run(requests())
    assert (redirect.status_code, redirect.headers["location"]) == (307, "http://svc/health/")
    assert (snapshot.status_code, snapshot.json()["circuits"]["openfga"]["state"]) == (200, "open")
    assert (admin.status_code, admin.json()["circuit"]["state"]) == (200, "forced_open")
