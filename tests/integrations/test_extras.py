"""The integrations package imports no client library: each submodule needs only its own extra."""

from __future__ import annotations

import subprocess
import sys

CLIENTS = ("httpx", "requests", "aiohttp", "grpc")


def imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {CLIENTS!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()


def test_the_package_imports_no_client() -> None:
    assert imported_after("import buttress.integrations") == []
    assert imported_after("import buttress.integrations.asgi, buttress.integrations.wsgi") == []


def test_each_client_module_imports_its_own_client_only() -> None:
    assert imported_after("import buttress.integrations.requests") == ["requests"]
    assert imported_after("import buttress.integrations.grpc") == ["grpc"]
