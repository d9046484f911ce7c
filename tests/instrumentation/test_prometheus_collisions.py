"""A registry that already has a metric of one of buttress's names (the application's own).

``import buttress`` must not fail for it: the Prometheus subscriber stays off, with a warning
that says why and what to do. An explicit ``configure(prometheus=registry)`` that cannot register
raises, and changes nothing: the subscriber that was on stays on, and nothing of buttress's is
left half-registered in the registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from buttress import circuit_breaker, instrumentation
from buttress.instrumentation.prometheus import CATALOG, PrometheusSubscriber
from buttress.instrumentation.prometheus.catalog import KILL_SWITCH

SRC = Path(__file__).resolve().parents[2] / "src"


def test_import_buttress_succeeds_when_the_default_registry_has_one_of_its_names() -> None:
    script = textwrap.dedent(
        """
        import warnings
        from prometheus_client import REGISTRY, Counter

        mine = Counter("buttress_calls", "the application's own", ["x"])
        mine.labels("1").inc()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import buttress
            from buttress import instrumentation

        assert "prometheus" not in instrumentation.installed(), instrumentation.installed()
        assert {"otel", "logging"} <= set(instrumentation.installed())
        [warning] = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        text = str(warning.message)
        assert "buttress_calls" in text and "configure(prometheus=" in text, text

        @buttress.circuit_breaker(name="svc")
        def call():
            return "ok"

        assert call() == "ok"
        assert REGISTRY.get_sample_value("buttress_calls_total", {"x": "1"}) == 1.0
        print("fine")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fine"


def test_configure_with_a_colliding_registry_raises_and_keeps_the_subscriber_on(
    mode, restore_subscribers
) -> None:
    first = CollectorRegistry()
    instrumentation.configure(prometheus=first, otel=False, logging=False)
    protected = circuit_breaker(name="collide")(mode.define())
    mode.run(protected)

    taken = CollectorRegistry()
    Histogram("buttress_call_duration_seconds", "the application's own", registry=taken)
    with pytest.raises(ValueError, match="buttress_call_duration_seconds"):
        instrumentation.configure(prometheus=taken)

    assert instrumentation.installed()["prometheus"] is first
    mode.run(protected)  # still counted where it was
    labels = {"service": "collide", "outcome": "success"}
    assert first.get_sample_value("buttress_calls_total", labels) == 2.0
    assert taken.get_sample_value("buttress_calls_total", labels) is None


def test_a_multiprocess_subscriber_that_cannot_register_leaves_none_of_its_families() -> None:
    registry = CollectorRegistry()
    last = [f for f in CATALOG if f.kind == "counter"][-1]
    mine = Counter(last.name.removesuffix("_total"), "the application's own", registry=registry)

    with pytest.raises(ValueError, match=last.name.removesuffix("_total")):
        PrometheusSubscriber(registry, multiprocess=True)

    # Only the application's metric: once it is gone, buttress registers every family.
    assert [metric.name for metric in registry.collect()] == [mine._name]
    registry.unregister(mine)
    PrometheusSubscriber(registry, multiprocess=True)
    exposed = {metric.name for metric in registry.collect()}
    # (The kill switch's gauge is created when first written, in multiprocess mode.)
    assert {f.name.removesuffix("_total") for f in CATALOG if f.name != KILL_SWITCH} == exposed
