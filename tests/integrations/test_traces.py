"""With an OpenTelemetry SDK: one span per attempt under the caller's span, decisions on it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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


# The global provider can be set once per process: this runs in a fresh interpreter. The
# integration reads opentelemetry-api's global (``trace._TRACER_PROVIDER``) once per request
# instead of calling get_tracer_provider(), so this also pins that name on the lowest and the
# newest opentelemetry-api.
GLOBAL_PROVIDER = """
import asyncio, httpx, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from buttress.integrations.httpx import AsyncResilientTransport, ResilientTransport

url = sys.argv[1]
sync = httpx.Client(transport=ResilientTransport("global-sync"))
async def aget():
    async with httpx.AsyncClient(transport=AsyncResilientTransport("global-async")) as client:
        return (await client.get(url)).status_code
assert sync.get(url).status_code == 200 and asyncio.run(aget()) == 200  # before: nothing to record
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
assert sync.get(url).status_code == 200 and asyncio.run(aget()) == 200
print(sorted(s.attributes["buttress.service"] for s in exporter.get_finished_spans()))
"""


def test_a_global_provider_set_after_the_transport_gets_the_attempts_spans(upstream: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER, upstream.url + "/"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split("\n")[-2] == "['global-async', 'global-sync']"
