"""With an OpenTelemetry SDK: one span per attempt under the caller's span, decisions on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from buttress import instrumentation
from buttress.integrations.httpx import AsyncResilientTransport, ResilientTransport
from buttress.testing import FakeClock


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = instrumentation.installed()
    instrumentation.configure(prometheus=False, otel=provider, logging=False)
    yield provider, exporter
    instrumentation.configure(
        prometheus=before.get("prometheus", False),  # type: ignore[arg-type]
        otel=before.get("otel", False),  # type: ignore[arg-type]
        logging=before.get("logging", False),  # type: ignore[arg-type]
    )


@pytest.fixture(params=["sync", "async"])
def get(request: pytest.FixtureRequest, traced: Any) -> Any:
    provider, _ = traced
    tracer = provider.get_tracer("tests")

    def sync_get(url: str) -> int:
        with tracer.start_as_current_span("checkout"):
            transport = ResilientTransport("billing", tracer_provider=provider)
            with httpx.Client(transport=transport) as client:
                return client.get(url).status_code

    def async_get(url: str) -> int:
        async def go() -> int:
            with tracer.start_as_current_span("checkout"):
                transport = AsyncResilientTransport("billing", tracer_provider=provider)
                async with httpx.AsyncClient(transport=transport) as client:
                    return (await client.get(url)).status_code

        return asyncio.run(go())

    return sync_get if request.param == "sync" else async_get


def test_a_span_per_attempt_under_the_callers_span(
    get: Any, traced: Any, upstream: Any, clock: FakeClock
) -> None:
    _, exporter = traced
    upstream.then(503).then(429).then(200)
    assert get(upstream.url + "/pay") == 200
    spans = exporter.get_finished_spans()
    (checkout,) = [s for s in spans if s.name == "checkout"]
    attempts = [s for s in spans if s.name == "GET"]
    assert [s.parent.span_id for s in attempts] == [checkout.context.span_id] * 3
    assert [s.attributes.get("http.request.resend_count") for s in attempts] == [None, 1, 2]
    assert [s.attributes["http.response.status_code"] for s in attempts] == [503, 429, 200]
    assert [s.attributes.get("error.type") for s in attempts] == ["503", "429", None]
    assert {s.attributes["server.address"] for s in attempts} == {f"127.0.0.1:{upstream.port}"}
    # The decisions land on the caller's span.
    retries = [e for e in checkout.events if e.name == "buttress.retry"]
    assert [e.attributes["buttress.retry.attempt"] for e in retries] == [1, 2]
