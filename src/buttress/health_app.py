"""Health: one snapshot of every circuit and bulkhead, a degradation level, and an app serving it.

``buttress.health()`` returns a JSON-ready dict. :func:`asgi_app` and :func:`wsgi_app` serve it
with no web framework: ``GET`` answers 200 while healthy or degraded and 503 when critical, so a
load balancer can poll it. Admin actions (reset, force open, force closed, disable a circuit;
``?ttl=<seconds>`` for an override that ends by itself, fleet-wide for a circuit shared through
Redis) exist only when a token is configured and are refused without it.

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

**Operator routes** (only with an admin token, and only for requests carrying it, like the admin
actions): ``GET <mount>/events`` the recent events (a bounded ring buffer of the operational
kinds in :data:`RECENT_KINDS`), ``GET <mount>/events/stream`` the same as a server-sent event
stream (``text/event-stream``: the buffer first, or what followed ``Last-Event-ID``, then each
event as it happens), ``GET <mount>/settings`` the effective settings with their sources,
secrets masked (``config.describe()``).

Import the apps with ``from buttress.health_app import asgi_app``. The snapshot function is
public as ``buttress.health``, a name that belongs to the function alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import json
import logging
import os
import queue
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from http import HTTPStatus
from typing import Any, Literal, NotRequired, TypedDict
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from buttress import _clock, _deferral, config, events, registry
from buttress._values import redact_text
from buttress.config._sources import variable_value
from buttress.events import CacheServedStale, DeferralQueued, FallbackUsed
from buttress.exceptions import ConfigurationError
from buttress.patterns.timeout import WorkerPoolSnapshot, worker_pool_snapshot

__all__ = [
    "CRITICALITY_LEVELS",
    "FALLBACK_WINDOW_SECONDS",
    "RECENT_EVENTS",
    "RECENT_KINDS",
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
    "recent_events",
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
MAX_OVERRIDE_SECONDS = 7 * 24 * 3600.0  # an override a week long is a config change
ADMIN_ACTIONS = {
    "reset": "reset",
    "force_open": "force_open",
    "force_closed": "force_closed",
    "disable": "disable",
}
# The actions that take ``?ttl=<seconds>`` (an override that ends by itself: for the whole fleet
# when the circuit is shared through Redis).
TIMED_ACTIONS = frozenset({"force_open", "force_closed", "disable"})
OPERATOR_ROUTES = frozenset({"/events", "/events/stream", "/settings"})
RECENT_EVENTS = 256  # events the ring buffer keeps (the oldest go first)
# What an operator asks "what just happened?" about: transitions, reloads, store faults, workers
# left running, adaptive limits. Not the per-call kinds: a busy service would push everything
# else out of the buffer within a second, and subscribing to them would cost every call.
RECENT_KINDS: tuple[type[Any], ...] = (
    events.CircuitStateChanged,
    events.SettingsReloaded,
    events.StateStoreError,
    events.WorkerAbandoned,
    events.BulkheadLimitChanged,
    events.DeferralQueued,
)
STREAM_QUEUE = 1024  # events a slow stream reader may fall behind by before it loses some
HEARTBEAT_SECONDS = 15.0  # a comment line on an idle stream, so proxies keep it open

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
        rate_limiters: by registry key: service, tokens, rate, burst; a fleet limiter adds
            ``shared`` (``redis``, or ``local`` while it takes its fair share) and ``pods``.
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
    rate_limiters: dict[str, dict[str, Any]]
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
    """Forget the fallbacks and events seen so far (with ``registry.clear()``: a fresh start)."""
    with _fallbacks_lock:
        _fallbacks.clear()
    _recent.clear()


class _Recent:
    """The ring buffer of recent events, and the streams following it (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._ids = itertools.count(1)
        self._streams: list[Callable[[dict[str, Any]], None]] = []
        self._undo: Callable[[], None] | None = None

    def start(self) -> None:
        """Record from now on (once per process: the apps call it when made)."""
        with self._lock:
            if self._undo is None:
                self._undo = events.subscribe(self.record, RECENT_KINDS)

    def record(self, event: Any) -> None:
        fields = {
            name: redact_text(value) if isinstance(value, str) else value
            for name, value in event._asdict().items()
        }
        with self._lock:
            item = {"id": next(self._ids), "at": _clock.wall(), "type": type(event).__name__}
            item.update(fields)
            self._items.append(item)
            streams = tuple(self._streams)
        for push in streams:
            push(item)

    def items(self, after: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [item for item in self._items if item["id"] > after]

    def follow(self, push: Callable[[dict[str, Any]], None], after: int) -> list[dict[str, Any]]:
        """Have ``push`` get each new event; return those after ``after`` already kept."""
        with self._lock:  # one step, so no event falls between the backlog and the stream
            self._streams.append(push)
            return [item for item in self._items if item["id"] > after]

    def unfollow(self, push: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._streams.remove(push)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_recent = _Recent()


def recent_events() -> list[dict[str, Any]]:
    """The events kept in the ring buffer, oldest first (recorded once an app was made)."""
    return _recent.items()


def _sse(item: dict[str, Any]) -> bytes:
    data = json.dumps(item, sort_keys=True, default=str)
    return f"id: {item['id']}\nevent: {item['type']}\ndata: {data}\n\n".encode()


def _last_event_id(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


_STREAM_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),  # nginx: pass each event on as it comes
]
_HEARTBEAT = b": keep-alive\n\n"


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
        rate_limiters=_snapshots("rate_limit"),
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
        rate_limiters={},
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


def _ttl(query: str) -> float | str | None:
    """``ttl`` of an admin action's query string: seconds, None when absent, or the error.

    Anything else in the query is an error too: an override without its ttl is for ever, so
    ``?ttl=`` (a script's unset variable) or ``?TTL=30`` (a typo) must not become one.
    """
    parsed = urllib.parse.parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(parsed) - {"ttl"})
    if unknown:
        return f"unknown query parameter {unknown[0]!r}: only ttl=<seconds> is understood"
    values = parsed.get("ttl")
    if not values:
        return None
    try:
        ttl = float(values[-1])
    except ValueError:
        return "ttl must be a number of seconds"
    if not 0 < ttl <= MAX_OVERRIDE_SECONDS:
        return f"ttl must be more than 0 and at most {MAX_OVERRIDE_SECONDS:g} seconds"
    return ttl


def _admin_token(admin_token: str | None) -> bytes | None:
    if admin_token is None:
        # Any case, as the settings read every variable: they accept buttress_admin_token as
        # this one, so the app must not then run without the token it names.
        token = variable_value(os.environ, config.ADMIN_TOKEN_VARIABLE) or ""
    else:
        token = admin_token
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

    def __call__(
        self, method: str, path: str, authorization: str | None, query: str = ""
    ) -> Response | None:
        """The response; ``None``: an authorized ``GET /events/stream`` (the app streams)."""
        path = path.rstrip("/")
        if not path:
            if method not in {"GET", "HEAD"}:
                return _json(405, {"error": "use GET"}, ("allow", "GET, HEAD"))
            snapshot = health()
            return _json(503 if snapshot["status"] == "critical" else 200, snapshot)
        if self._token is not None:
            if path.startswith("/circuits/"):
                return self._admin(method, path.removeprefix("/circuits/"), authorization, query)
            if path in OPERATOR_ROUTES:
                return self._operator(method, path, authorization)
        return _json(404, {"error": "not found"})

    def _operator(self, method: str, path: str, authorization: str | None) -> Response | None:
        if method != "GET":
            return _json(405, {"error": "use GET"}, ("allow", "GET"))
        if not self._authorized(authorization):
            _log.warning("buttress.admin.refused", extra={"service": "", "action": path})
            return _json(401, {"error": "unauthorized"}, ("www-authenticate", "Bearer"))
        if path == "/events/stream":
            return None
        if path == "/events":
            return _json(200, {"events": _recent.items()})
        try:
            described = config.describe()
        except ConfigurationError as exc:
            return _json(503, {"settings_error": str(exc)})
        return _json(200, described)

    def _admin(
        self, method: str, rest: str, authorization: str | None, query: str = ""
    ) -> Response:
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
        ttl = _ttl(query)
        if isinstance(ttl, str):
            return _json(400, {"error": ttl})
        if ttl is not None and action not in TIMED_ACTIONS:
            return _json(400, {"error": f"{action} takes no ttl: it ends no override of its own"})
        if ttl is None:
            getattr(breaker, ADMIN_ACTIONS[action])()
        else:
            getattr(breaker, ADMIN_ACTIONS[action])(ttl=ttl)
        _log.warning("buttress.admin.action", extra={"service": key, "action": action, "ttl": ttl})
        body: dict[str, Any] = {
            "service": key,
            "action": action,
            "circuit": dict(breaker.snapshot()),
        }
        if ttl is not None:
            body["ttl"] = ttl
        return _json(200, body)

    def _authorized(self, authorization: str | None) -> bool:
        assert self._token is not None  # noqa: S101 - admin routes exist only with a token
        scheme, _, given = (authorization or "").partition(" ")
        # Compared in constant time, whatever the scheme, so timing reveals nothing of the token.
        # Both apps hand the header over as its bytes decoded one character each (latin-1), so
        # those bytes are compared: a token with letters outside ASCII, sent in UTF-8, matches.
        wire = given.strip().encode("latin-1", errors="replace")
        matches = hmac.compare_digest(wire, self._token)
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
        admin_token: enables ``POST <mount>/circuits/<service>/{reset,force_open,force_closed,
            disable}`` (the last three with an optional ``?ttl=<seconds>``)
            for requests carrying ``Authorization: Bearer <token>``. ``None`` reads
            ``BUTTRESS_ADMIN_TOKEN``; empty (the default when neither is set) disables them.

    Raises:
        ConfigurationError: the token is shorter than 16 characters.
    """
    handle = _Handler(admin_token)
    _recent.start()

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
        query = scope.get("query_string", b"").decode("latin-1")
        response = handle(method, path, authorization, query)
        if response is None:
            last = next(
                (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"last-event-id"),
                None,
            )
            await _astream(receive, send, _last_event_id(last))
            return
        status, headers, body = response
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


async def _astream(receive: Receive, send: Send, after: int) -> None:
    """Serve the event stream until the client goes away (ASGI)."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Queue[dict[str, Any]] = asyncio.Queue(STREAM_QUEUE)

    def offer(item: dict[str, Any]) -> None:
        if not pending.full():  # a reader that fell this far behind loses events, not memory
            pending.put_nowait(item)

    def push(item: dict[str, Any]) -> None:  # from any thread
        # RuntimeError: the loop closed under a stream not yet unfollowed.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(offer, item)

    backlog = _recent.follow(push, after)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in _STREAM_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for item in backlog:
            await send({"type": "http.response.body", "body": _sse(item), "more_body": True})
        while not gone.done():
            getter = asyncio.ensure_future(pending.get())
            await asyncio.wait(
                {getter, gone}, timeout=HEARTBEAT_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if getter.done():
                chunk = _sse(getter.result())
            else:
                getter.cancel()
                if gone.done():
                    break
                chunk = _HEARTBEAT
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        _recent.unfollow(push)
        gone.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _wsgi_text(path: str) -> str:
    """A PEP 3333 path (the URL's bytes, one character each) as text, as the ASGI app gets it:
    a service named in UTF-8 is found by its name. Bytes that are no UTF-8 stay as given."""
    try:
        return path.encode("latin-1").decode()
    except UnicodeError:
        return path


def wsgi_app(*, admin_token: str | None = None) -> WSGIApplication:
    """A WSGI app serving :func:`health`; same routes and token rules as :func:`asgi_app`."""
    handle = _Handler(admin_token)
    _recent.start()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        response = handle(
            method,
            _wsgi_text(environ.get("PATH_INFO", "")),
            environ.get("HTTP_AUTHORIZATION"),
            environ.get("QUERY_STRING", ""),
        )
        if response is None:
            start_response("200 OK", list(_STREAM_HEADERS))
            return _stream(_last_event_id(environ.get("HTTP_LAST_EVENT_ID")))
        status, headers, body = response
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [] if method == "HEAD" else [body]

    return app


def _stream(after: int) -> Iterator[bytes]:
    """The event stream for a WSGI server: it holds one of the server's threads while open.

    It ends when the server closes it (the client went away: a write failed).
    """
    pending: queue.Queue[dict[str, Any]] = queue.Queue(STREAM_QUEUE)

    def push(item: dict[str, Any]) -> None:
        # Full: a reader that fell this far behind loses events, not memory.
        with contextlib.suppress(queue.Full):
            pending.put_nowait(item)

    backlog = _recent.follow(push, after)
    try:
        for item in backlog:
            yield _sse(item)
        while True:
            try:
                yield _sse(pending.get(timeout=HEARTBEAT_SECONDS))
            except queue.Empty:
                yield _HEARTBEAT
    finally:
        _recent.unfollow(push)
