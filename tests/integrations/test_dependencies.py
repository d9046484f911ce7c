"""What an integration imports while it sends: nothing retried per request, nothing undeclared.

A failed import is not remembered: Python searches ``sys.path`` again on every attempt. httpcore
asks for ``sniffio`` on every async request and falls back quietly when it is missing (≈ 0.2 ms
of CPU a request), and httpx (0.28 on) and anyio no longer bring it: the ``httpx`` extra must.
Two checks, per client and for the sync and async flavour where the client has both:

- in this process, a finder at the front of ``sys.meta_path`` sees every import that is not
  already in ``sys.modules``; once warm, repeated requests must ask it nothing;
- in a fresh interpreter, every distribution whose modules a request imports (lazily, on its
  first requests) must be one that installing ``buttress[<extra>]`` brings (pyproject.toml's
  requirements, then the installed distributions' own, followed to the end).
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
METHOD = "/test.Echo/Call"


class Lookups(importlib.abc.MetaPathFinder):
    """Records the name of every import that reached the finders (it finds nothing itself)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        self.names.append(fullname)
        return None


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Lookups:
    finder = Lookups()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    return finder


def test_the_finder_sees_an_import_retried_per_call(lookups: Lookups) -> None:
    # The detector itself: a missing module is looked for again on every import statement.
    for _ in range(3):
        with pytest.raises(ImportError):
            import buttress_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert lookups.names.count("buttress_no_such_module") == 3


def grpc_server() -> Any:
    import grpc

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(handle)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def senders(client: str, url: str, target: str) -> Callable[[int], None]:
    """A function that sends ``n`` requests through ``client``'s integration (closed after)."""

    if client == "httpx":
        import httpx

        from buttress.integrations.httpx import ResilientTransport

        def send(n: int) -> None:
            with httpx.Client(transport=ResilientTransport("deps-httpx")) as c:
                for _ in range(n):
                    c.get(url).raise_for_status()

    elif client == "httpx-async":
        import httpx

        from buttress.integrations.httpx import AsyncResilientTransport

        async def go(n: int) -> None:
            transport = AsyncResilientTransport("deps-httpx-async")
            async with httpx.AsyncClient(transport=transport) as c:
                for _ in range(n):
                    (await c.get(url)).raise_for_status()

        def send(n: int) -> None:
            asyncio.run(go(n))

    elif client == "requests":
        import requests

        from buttress.integrations.requests import ResilientAdapter

        def send(n: int) -> None:
            with requests.Session() as session:
                session.mount("http://", ResilientAdapter("deps-requests"))
                for _ in range(n):
                    session.get(url, timeout=5).raise_for_status()

    elif client == "aiohttp":
        import aiohttp

        from buttress.integrations.aiohttp import ResilientSession

        async def ago(n: int) -> None:
            async with aiohttp.ClientSession() as raw:
                session = ResilientSession("deps-aiohttp", raw)
                for _ in range(n):
                    async with session.get(url) as response:
                        response.raise_for_status()
                        await response.read()

        def send(n: int) -> None:
            asyncio.run(ago(n))

    elif client == "grpc":
        import grpc

        from buttress.integrations.grpc import ResilientInterceptor

        def send(n: int) -> None:
            with grpc.insecure_channel(target) as channel:
                call = grpc.intercept_channel(channel, ResilientInterceptor("deps-grpc"))
                unary = call.unary_unary(METHOD)
                for _ in range(n):
                    assert unary(b"ping", timeout=5) == b"ping"

    else:  # grpc-aio
        import grpc.aio

        from buttress.integrations.grpc import AsyncResilientInterceptor

        async def go_aio(n: int) -> None:
            interceptor = AsyncResilientInterceptor("deps-grpc-aio")
            async with grpc.aio.insecure_channel(target, interceptors=[interceptor]) as channel:
                unary = channel.unary_unary(METHOD)
                for _ in range(n):
                    assert await unary(b"ping", timeout=5) == b"ping"

        def send(n: int) -> None:
            asyncio.run(go_aio(n))

    return send


CLIENTS = {
    "httpx": "httpx",
    "httpx-async": "httpx",
    "requests": "requests",
    "aiohttp": "aiohttp",
    "grpc": "grpc",
    "grpc-aio": "grpc",
}


@pytest.fixture
def grpc_target() -> Iterator[str]:
    server, target = grpc_server()
    yield target
    server.stop(None).wait(5)


@pytest.mark.parametrize("client", CLIENTS)
def test_no_import_is_retried_request_after_request(
    client: str, upstream: Any, grpc_target: str, lookups: Lookups
) -> None:
    send = senders(client, upstream.url + "/", grpc_target)
    send(3)  # lazy imports happen once, here
    lookups.names.clear()
    send(5)
    # A new client (and for the async clients a new event loop) per batch: what a program that
    # makes one per task or per request pays too.
    assert lookups.names == []


# Run in a fresh interpreter: the top-level modules that sending requests adds to those that
# importing the client and its integration loaded. Only these are imported on the request path,
# so only these are looked for again on every request when missing; an optional import at a
# library's import time (pybreaker's redis, httpx's click) is tried once.
SCRIPT = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.path[:0] = {paths!r}
from test_dependencies import grpc_server, senders

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    def log_message(self, *args):
        pass

http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=http.serve_forever, daemon=True).start()
grpc, target = grpc_server() if {client!r}.startswith("grpc") else (None, "")
send = senders({client!r}, "http://127.0.0.1:%d/" % http.server_address[1], target)
before = {{name.partition(".")[0] for name in sys.modules}}
send(2)
print(json.dumps(sorted({{name.partition(".")[0] for name in sys.modules}} - before)))
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_closure(extra: str) -> set[str]:
    """The distributions ``pip install buttress[extra]`` brings, as installed here."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = normalize(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            nested = Requirement(line)
            wanted = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
            if nested.marker is None or any(nested.marker.evaluate(env) for env in wanted):
                todo.append(nested)
    return seen


@pytest.mark.parametrize("client", CLIENTS)
def test_every_distribution_a_request_imports_is_declared(client: str) -> None:
    paths = [str(Path(__file__).parent), *sys.path]
    script = SCRIPT.format(paths=paths, client=client)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    imported = json.loads(out.stdout.splitlines()[-1])
    providers = importlib.metadata.packages_distributions()
    declared = installed_closure(CLIENTS[client]) | {"buttress"}
    undeclared = {
        module: dists
        for module in imported
        if (dists := {normalize(d) for d in providers.get(module, [])}) and not dists & declared
    }
    assert undeclared == {}, f"imported on the {client} path but not brought by its extra"


class Hidden(importlib.abc.MetaPathFinder):
    """Makes one module missing, as in an environment that does not have it installed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == self.name:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def test_without_sniffio_httpx_looks_for_it_on_every_async_request(
    upstream: Any, lookups: Lookups, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Why the httpx extra declares sniffio: without it, httpcore's import is retried per request.
    monkeypatch.setattr(sys, "meta_path", [lookups, Hidden("sniffio"), *sys.meta_path[1:]])
    monkeypatch.delitem(sys.modules, "sniffio", raising=False)
    send = senders("httpx-async", upstream.url + "/", "")
    send(2)
    lookups.names.clear()
    send(5)
    assert lookups.names.count("sniffio") >= 5
