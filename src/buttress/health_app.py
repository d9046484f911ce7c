"""Health: one snapshot of every circuit and bulkhead, a degradation level, and an app serving it.

``buttress.health()`` returns a JSON-ready dict. :func:`asgi_app` and :func:`wsgi_app` serve it
with no web framework: ``GET`` answers 200 while healthy or degraded and 503 when critical, so a
load balancer can poll it. Admin actions (reset, force open, force closed a circuit) exist only
when a token is configured and are refused without it.

**Degradation level** (0 normal ... 4 critical), from the circuits and the criticality each
service declares in settings (``services.<name>.criticality``: ``low``, ``normal``, ``high``,
``critical``; ``normal`` when not declared):

* a circuit that is ``open`` or ``forced_open`` puts the level at least at its service's
  criticality: low 1, normal 2, high 3, critical 4;
* a ``half_open`` circuit (recovery under trial) puts it at least at 1;
* the level is the highest of these; 0 when no circuit is open or half-open.

**Status**: ``critical`` at level 4 (HTTP 503); ``degraded`` at levels 1-3, or while any service
served a fallback (a handler, a value, a stale cache entry, a deferral) in the last
:data:`FALLBACK_WINDOW_SECONDS`, or holds deferred calls not yet replayed (HTTP 200); else
``healthy``. A fresh cache hit is normal service, not degraded.

:func:`snapshot` is the one read of buttress's live state: every circuit, bulkhead and rate
limiter, the timeout's worker pool, the settings. The Prometheus collector reads only it;
:func:`health` reads its circuits and bulkheads (:func:`circuits`, :func:`bulkheads`).

Import the apps with ``from buttress.health_app import asgi_app``. The snapshot function is
public as ``buttress.health``, a name that belongs to the function alone.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any, Literal, NotRequired, TypedDict
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from buttress import _clock, _deferral, config, registry
from buttress.events import CacheServedStale, DeferralQueued, FallbackUsed
from buttress.exceptions import ConfigurationError
from buttress.patterns.timeout import WorkerPoolSnapshot, worker_pool_snapshot

__all__ = [
    "CRITICALITY_LEVELS",
    "FALLBACK_WINDOW_SECONDS",
    "ASGIApp",
    "HealthSnapshot",
    "StateSnapshot",
    "Status",
    "asgi_app",
    "bulkheads",
    "circuits",
    "criticality",
    "degradation_level",
    "health",
    "record_fallback",
    "reset",
    "snapshot",
    "wsgi_app",
]

Status = Literal["healthy", "degraded", "critical"]

CRITICALITY_LEVELS = {"low": 1, "normal": 2, "high": 3, "critical": 4}
CRITICAL_LEVEL = 4
DOWN_STATES = frozenset({"open", "forced_open"})
FALLBACK_WINDOW_SECONDS = 60.0
MIN_TOKEN_LENGTH = 16
ADMIN_ACTIONS = {"reset": "reset", "force_open": "force_open", "force_closed": "force_closed"}

_log = logging.getLogger("buttress.health")


class HealthSnapshot(TypedDict):
    """What ``buttress.health()`` returns.

    Attributes:
        status: ``healthy``, ``degraded`` or ``critical``.
        degradation_level: 0 normal ... 4 critical (see the module docstring).
        enabled: ``FF_ENABLE_RESILIENCE_PATTERNS``; when off, calls bypass every pattern.
        circuits: by registry key (the service name): the breaker's snapshot (service, state,
            failures, successes, trials_in_flight, seconds_left_open, failure_rate,
            slow_call_rate) plus the service's ``criticality``.
        bulkheads: by registry key: service, active, queued, limit, utilization.
        fallbacks: services that served a fallback recently (a stale cache entry and a deferral
            count): seconds since the last one.
        deferred: services holding deferred calls in this process: how many.
        settings_error: present only when the settings in force are invalid (and the kill
            switch is on): the error, naming key path and source. Every protected call fails
            then, so the status is ``critical``.
    """

    status: Status
    degradation_level: int
    enabled: bool
    circuits: dict[str, dict[str, Any]]
    bulkheads: dict[str, dict[str, Any]]
    fallbacks: dict[str, float]
    deferred: dict[str, int]
    settings_error: NotRequired[str]


class StateSnapshot(TypedDict):
    """What :func:`snapshot` returns: the live state of every shared instance, read in one place.

    :func:`health` and the Prometheus collector read buttress's state only through this, so
    neither reaches into the registry or a pattern module.

    Attributes:
        circuits: :func:`circuits`.
        bulkheads: :func:`bulkheads`.
        rate_limiters: by registry key: the limiter's snapshot (service, tokens, ...).
        worker_pool: the timeout's worker threads (threads, idle, pending, abandoned by service).
        settings: the settings in force; ``None`` while they are invalid (reading
            ``config.SNAPSHOT`` raises the error, naming key path and source).
    """

    circuits: dict[str, dict[str, Any]]
    bulkheads: dict[str, dict[str, Any]]
    rate_limiters: dict[str, dict[str, Any]]
    worker_pool: WorkerPoolSnapshot
    settings: config.Snapshot | None


def circuits() -> dict[str, dict[str, Any]]:
    """Every circuit breaker's snapshot, by registry key (sorted)."""
    return _snapshots("circuit_breaker")


def bulkheads() -> dict[str, dict[str, Any]]:
    """Every bulkhead's snapshot (service, active, queued, limit, utilization), by registry key."""
    return _snapshots("bulkhead")


def _snapshots(pattern: str) -> dict[str, dict[str, Any]]:
    return {key: dict(each.snapshot()) for key, each in sorted(registry.instances(pattern).items())}


def snapshot() -> StateSnapshot:
    """Every circuit, bulkhead and rate limiter, the worker pool, and the settings in force."""
    settings: config.Snapshot | None
    try:
        settings = config.SNAPSHOT
    except ConfigurationError:
        settings = None
    return StateSnapshot(
        circuits=circuits(),
        bulkheads=bulkheads(),
        rate_limiters=_snapshots("rate_limit"),
        worker_pool=worker_pool_snapshot(),
        settings=settings,
    )


def criticality(service: str) -> str:
    """The criticality ``service`` declares in settings (``normal`` unless declared)."""
    return config.SNAPSHOT.service(service).criticality


def degradation_level(states: Iterable[tuple[str, str]]) -> int:
    """The degradation level of circuits given as ``(service, state)`` pairs."""
    level = 0
    for service, state in states:
        if state in DOWN_STATES:
            level = max(level, CRITICALITY_LEVELS[criticality(service)])
        elif state == "half_open":
            level = max(level, 1)
    return level


# Service -> when it last served a fallback (on the buttress clock).
_fallbacks: dict[str, float] = {}
_fallbacks_lock = threading.Lock()


def record_fallback(event: FallbackUsed | CacheServedStale | DeferralQueued) -> None:
    """Event handler: remember that a service served a fallback (it is degraded for a while)."""
    with _fallbacks_lock:
        _fallbacks[event.service] = _clock.monotonic()


def reset() -> None:
    """Forget the fallbacks seen so far (with ``registry.clear()``: a fresh start for tests)."""
    with _fallbacks_lock:
        _fallbacks.clear()


def _recent_fallbacks() -> dict[str, float]:
    now = _clock.monotonic()
    with _fallbacks_lock:
        for service in [s for s, at in _fallbacks.items() if now - at > FALLBACK_WINDOW_SECONDS]:
            del _fallbacks[service]
        return {service: round(now - at, 3) for service, at in sorted(_fallbacks.items())}


def health() -> HealthSnapshot:
    """A snapshot of every circuit and bulkhead, the degradation level and the overall status."""
    try:
        enabled = config.SNAPSHOT.enabled
    except ConfigurationError as exc:
        # Invalid settings with the kill switch on: every protected call raises, so the
        # instance is down, but health must still answer (503 with the reason, not a 500).
        return _unusable_settings(exc)
    circuit_snapshots = circuits()
    for key, circuit in circuit_snapshots.items():
        circuit["criticality"] = criticality(circuit.get("service", key))
    bulkhead_snapshots = bulkheads()
    level = degradation_level(
        (circuit.get("service", key), circuit["state"])
        for key, circuit in circuit_snapshots.items()
    )
    fallbacks = _recent_fallbacks()
    deferred = _deferral.depths()
    status: Status
    if level >= CRITICAL_LEVEL:
        status = "critical"
    elif level > 0 or fallbacks or deferred:
        status = "degraded"
    else:
        status = "healthy"
    return HealthSnapshot(
        status=status,
        degradation_level=level,
        enabled=enabled,
        circuits=circuit_snapshots,
        bulkheads=bulkhead_snapshots,
        fallbacks=fallbacks,
        deferred=deferred,
    )


def _unusable_settings(exc: ConfigurationError) -> HealthSnapshot:
    return HealthSnapshot(
        status="critical",
        degradation_level=CRITICAL_LEVEL,
        enabled=True,
        circuits={},
        bulkheads={},
        fallbacks=_recent_fallbacks(),
        deferred=_deferral.depths(),
        settings_error=str(exc),
    )


# --- serving it -------------------------------------------------------------------------------

Response = tuple[int, list[tuple[str, str]], bytes]


def _json(status: int, body: object, *extra: tuple[str, str]) -> Response:
    payload = json.dumps(body, sort_keys=True, default=str).encode()
    headers = [
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
        ("content-length", str(len(payload))),
        *extra,
    ]
    return status, headers, payload


def _admin_token(admin_token: str | None) -> bytes | None:
    token = os.environ.get(config.ADMIN_TOKEN_VARIABLE, "") if admin_token is None else admin_token
    if not token:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        source = "admin_token" if admin_token is not None else config.ADMIN_TOKEN_VARIABLE
        raise ConfigurationError(
            f"{source}: the admin token must be at least {MIN_TOKEN_LENGTH} characters "
            "(it guards forcing circuits open)"
        )
    return token.encode()


class _Handler:
    """Routing shared by the ASGI and WSGI apps; the apps only translate the protocol."""

    def __init__(self, admin_token: str | None) -> None:
        self._token = _admin_token(admin_token)

    def __call__(self, method: str, path: str, authorization: str | None) -> Response:
        path = path.rstrip("/")
        if not path:
            if method not in {"GET", "HEAD"}:
                return _json(405, {"error": "use GET"}, ("allow", "GET, HEAD"))
            snapshot = health()
            return _json(503 if snapshot["status"] == "critical" else 200, snapshot)
        if self._token is not None and path.startswith("/circuits/"):
            return self._admin(method, path.removeprefix("/circuits/"), authorization)
        return _json(404, {"error": "not found"})

    def _admin(self, method: str, rest: str, authorization: str | None) -> Response:
        key, _, action = rest.rpartition("/")
        if not key or action not in ADMIN_ACTIONS:
            return _json(404, {"error": "not found"})
        if method != "POST":
            return _json(405, {"error": "use POST"}, ("allow", "POST"))
        if not self._authorized(authorization):
            _log.warning("buttress.admin.refused", extra={"service": key, "action": action})
            return _json(401, {"error": "unauthorized"}, ("www-authenticate", "Bearer"))
        breaker = _find_breaker(key)
        if breaker is None:
            return _json(404, {"error": f"no circuit for service {key!r}"})
        getattr(breaker, ADMIN_ACTIONS[action])()
        _log.warning("buttress.admin.action", extra={"service": key, "action": action})
        return _json(200, {"service": key, "action": action, "circuit": dict(breaker.snapshot())})

    def _authorized(self, authorization: str | None) -> bool:
        assert self._token is not None  # noqa: S101 - admin routes exist only with a token
        scheme, _, given = (authorization or "").partition(" ")
        # Compared in constant time, whatever the scheme, so timing reveals nothing of the token.
        matches = hmac.compare_digest(given.strip().encode(), self._token)
        return matches and scheme.lower() == "bearer"


def _find_breaker(service: str) -> Any:
    breakers = registry.instances("circuit_breaker")
    if service in breakers:
        return breakers[service]
    return next(
        (b for b in breakers.values() if b.snapshot().get("service") == service),
        None,
    )


# ASGI, typed structurally so no framework is needed.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def asgi_app(*, admin_token: str | None = None) -> ASGIApp:
    """An ASGI app serving :func:`health`; mount it anywhere (it routes below its mount point).

    Args:
        admin_token: enables ``POST <mount>/circuits/<service>/{reset,force_open,force_closed}``
            for requests carrying ``Authorization: Bearer <token>``. ``None`` reads
            ``BUTTRESS_ADMIN_TOKEN``; empty (the default when neither is set) disables them.

    Raises:
        ConfigurationError: the token is shorter than 16 characters.
    """
    handle = _Handler(admin_token)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        more = True
        while more:  # the body is not used, but a server expects it read
            message = await receive()
            more = message["type"] == "http.request" and bool(message.get("more_body"))
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method = scope["method"]
        authorization = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"),
            None,
        )
        status, headers, body = handle(method, path, authorization)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def wsgi_app(*, admin_token: str | None = None) -> WSGIApplication:
    """A WSGI app serving :func:`health`; same routes and token rules as :func:`asgi_app`."""
    handle = _Handler(admin_token)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        status, headers, body = handle(
            method, environ.get("PATH_INFO", ""), environ.get("HTTP_AUTHORIZATION")
        )
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [] if method == "HEAD" else [body]

    return app
