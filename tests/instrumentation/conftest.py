"""Instrumentation test fixtures: a fresh metrics registry; subscribers restored afterwards."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry

from buttress import instrumentation
from buttress.health_app import reset as forget_fallbacks


class Metrics:
    """A fresh ``CollectorRegistry`` that buttress's Prometheus subscriber writes to."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name{labels}``, or ``None`` when it does not exist."""
        return self.registry.get_sample_value(name, labels)

    def samples(self, family: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample named exactly ``family``, by sorted label pairs."""
        out = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == family:
                    out[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def names(self) -> set[str]:
        """The sample names that have at least one sample."""
        return {s.name for m in self.registry.collect() for s in m.samples}


@pytest.fixture(autouse=True)
def _no_fallbacks_seen() -> Iterator[None]:
    forget_fallbacks()
    yield
    forget_fallbacks()


@pytest.fixture
def restore_subscribers() -> Iterator[None]:
    """Whatever a test configures, the subscribers in force before it come back afterwards."""
    before = instrumentation.installed()
    yield
    instrumentation.configure(
        prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
        otel=before.get("otel", False),  # type: ignore[arg-type]
        logging=before.get("logging", False),  # type: ignore[arg-type]
    )


@pytest.fixture
def metrics(restore_subscribers: None) -> Metrics:
    """Only the Prometheus subscriber, writing to a fresh registry."""
    registry = CollectorRegistry()
    instrumentation.configure(prometheus=registry, otel=False, logging=False)
    return Metrics(registry)


@pytest.fixture(scope="session")
def scenarios() -> ModuleType:
    """``scenarios.py`` beside this file (tests are not a package, so it is loaded by path)."""
    path = Path(__file__).with_name("scenarios.py")
    spec = importlib.util.spec_from_file_location("buttress_test_scenarios", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
