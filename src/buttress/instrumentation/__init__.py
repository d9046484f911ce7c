"""Where buttress's events go: Prometheus, OpenTelemetry and logging subscribers.

All three are on by default (``import buttress`` calls :func:`install_defaults`); :func:`configure`
turns each off or points it somewhere else, and :func:`suspended` removes them for a block. See
``docs/observability.md`` for use and ``docs/internals.md`` (Subscribers) for how they attach.
"""

from __future__ import annotations

import logging as _stdlib_logging
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from opentelemetry.trace import TracerProvider
from prometheus_client import REGISTRY, CollectorRegistry

from buttress import events
from buttress.instrumentation.logging import LoggingSubscriber
from buttress.instrumentation.otel import OTelSubscriber
from buttress.instrumentation.prometheus import PrometheusSubscriber
from buttress.instrumentation.prometheus.series import DEFAULT_MAX_SERVICES, ServiceLabels

__all__ = ["configure", "install_defaults", "installed", "suspended"]

_lock = threading.RLock()
# Subscriber name -> (its target, the function that unsubscribes it).
_installed: dict[str, tuple[object, Callable[[], None]]] = {}
# One subscriber per registry: its families can be registered in a registry only once, so turning
# Prometheus off and on again must reuse them. Weak, so a test's throwaway registry can go.
_prometheus: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusSubscriber] = (
    weakref.WeakKeyDictionary()
)
_GLOBAL_PROVIDER = object()  # target of otel=True: the global tracer provider, resolved lazily
_health_undo: Callable[[], None] | None = None
_max_services: int | None = DEFAULT_MAX_SERVICES


def install_defaults() -> None:
    """Switch on the three default subscribers, and health's tracking of fallbacks (idempotent).

    When the default registry already has a metric of one of buttress's names (the
    application's own), the Prometheus subscriber stays off with a warning that says so:
    ``import buttress`` calls this, and must not fail for it.
    """
    try:
        configure(prometheus=True)
    except ValueError as exc:  # prometheus_client's DuplicateTimeseries
        warnings.warn(
            f"buttress's Prometheus metrics are off: {exc}. Give buttress a registry of its own "
            "(buttress.instrumentation.configure(prometheus=CollectorRegistry())) or rename "
            "the application's metric.",
            RuntimeWarning,
            stacklevel=2,
        )
    configure(otel=True, logging=True)
    _track_fallbacks(on=True)


@contextmanager
def suspended() -> Iterator[None]:
    """No buttress subscriber at all inside the block; afterwards, the same ones as before.

    For tests and benchmarks of the path where nobody listens (no event is built there).
    """
    with _lock:
        before = installed()
        tracking = _health_undo is not None
        for name in list(_installed):
            _switch(name, None, _BUILDERS[name])
        _track_fallbacks(on=False)
    try:
        yield
    finally:
        with _lock:
            for name, target in before.items():
                _switch(name, target, _BUILDERS[name])
            _track_fallbacks(on=tracking)


def _track_fallbacks(*, on: bool) -> None:
    global _health_undo
    with _lock:
        if on and _health_undo is None:
            # Imported here: health imports the settings and the registry.
            from buttress.health_app import record_fallback  # noqa: PLC0415

            _health_undo = events.subscribe(
                record_fallback,
                [events.FallbackUsed, events.CacheServedStale, events.DeferralQueued],
            )
        elif not on and _health_undo is not None:
            _health_undo()
            _health_undo = None


def configure(
    *,
    prometheus: bool | CollectorRegistry | None = None,
    otel: bool | TracerProvider | None = None,
    logging: bool | _stdlib_logging.Logger | None = None,
    max_services: int | Literal["unchanged"] | None = "unchanged",
) -> None:
    """Turn subscribers on or off, or point them elsewhere; ``None`` leaves one as it is.

    Args:
        prometheus: ``True`` for the default registry, a ``CollectorRegistry`` for another one,
            ``False`` for none.
        max_services: the Prometheus cardinality guard, for every registry: how many services
            keep their own ``service`` label (default 500; ``None``: no limit). See
            docs/metrics.md.
        otel: ``True`` for the global tracer provider, a ``TracerProvider`` for another one (used
            only for the spans of state changes outside any span), ``False`` for none.
        logging: ``True`` for the ``buttress`` logger, a ``Logger`` for another one, ``False``
            for none.
    """
    global _max_services
    with _lock:
        if max_services != "unchanged":
            _max_services = ServiceLabels(max_services).limit  # validated
            for subscriber in _prometheus.values():
                subscriber.service_labels.limit = _max_services
        if prometheus is not None:
            registry = REGISTRY if prometheus is True else prometheus or None
            _switch("prometheus", registry, _BUILDERS["prometheus"])
        if otel is not None:
            provider = _GLOBAL_PROVIDER if otel is True else otel or None
            _switch("otel", provider, _BUILDERS["otel"])
        if logging is not None:
            logger = _stdlib_logging.getLogger("buttress") if logging is True else logging or None
            _switch("logging", logger, _BUILDERS["logging"])


def installed() -> dict[str, object]:
    """The target of each subscriber that is on: ``{"prometheus": registry, ...}``."""
    with _lock:
        return {name: target for name, (target, _) in _installed.items()}


def _switch(name: str, target: Any, build: Callable[[Any], Any]) -> None:
    current = _installed.get(name)
    if current is not None and current[0] is target:
        return
    # Built first: a target it cannot be built for (a registry that already has one of its
    # metric names) leaves the subscriber that was on as it was.
    subscriber = None if target is None else build(target)
    if current is not None:
        current[1]()
        del _installed[name]
    if subscriber is None:
        return
    binders = subscriber.binders() if hasattr(subscriber, "binders") else {}
    handlers = subscriber.handlers()
    undos = [
        events.subscribe(handler, [kind], binder=binders.get(kind))
        for kind, handler in handlers.items()
    ]
    for kind, (first, second) in events.FUSED.items():
        fused = binders.get(kind)
        if fused is not None:  # one bound function for the two records of one call
            undos.append(events.fuse(kind, handlers[first], handlers[second], fused))

    def undo() -> None:
        for each in reversed(undos):
            each()

    _installed[name] = (target, undo)


def _prometheus_subscriber(registry: CollectorRegistry) -> PrometheusSubscriber:
    subscriber = _prometheus.get(registry)
    if subscriber is None:
        subscriber = PrometheusSubscriber(registry, max_services=_max_services)
        _prometheus[registry] = subscriber
    return subscriber


def _otel_subscriber(provider: object) -> OTelSubscriber:
    return OTelSubscriber(None if provider is _GLOBAL_PROVIDER else provider)  # type: ignore[arg-type]


_BUILDERS: dict[str, Callable[[Any], Any]] = {
    "prometheus": _prometheus_subscriber,
    "otel": _otel_subscriber,
    "logging": LoggingSubscriber,
}
