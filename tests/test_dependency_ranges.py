"""Dependencies: every one has a tested range, and the lowest run tests exactly its lower bounds.

CI runs the suite twice: against the newest versions pyproject.toml allows (`make test`) and
against the lower bounds pinned in constraints/lowest.txt (`make test-lowest`). These tests keep
the two honest: a dependency without a range, or a constraints file that no longer matches
pyproject.toml, fails here instead of leaving a range nobody ran.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_TEXT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
PROJECT = tomllib.loads(PYPROJECT_TEXT)["project"]
# Test runner, linters, type stubs and the docs toolchain: they only need a floor.
TOOLS_EXTRA = "dev"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lowest", ROOT / "constraints" / "lowest.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lowest = load_generator()


def shipped_requirements() -> list[str]:
    """What a user's install may pull in: the dependencies and every extra but the tools."""
    found = list(PROJECT["dependencies"])
    for extra, requirements in PROJECT["optional-dependencies"].items():
        if extra != TOOLS_EXTRA:
            found.extend(requirements)
    return found


@pytest.mark.parametrize("requirement", shipped_requirements())
def test_every_runtime_and_optional_dependency_has_a_tested_range(requirement):
    _, specs = lowest.parse(requirement)
    assert ">=" in specs, f"{requirement!r} has no lower bound: the lowest run cannot test it"
    assert "<" in specs, f"{requirement!r} has no upper bound: a new major would go untested"


def test_a_package_declared_in_several_extras_is_declared_the_same_everywhere():
    every = list(PROJECT["dependencies"])
    for requirements in PROJECT["optional-dependencies"].values():
        every.extend(requirements)
    specs: dict[str, dict[str, str]] = {}
    for requirement in every:
        name, spec = lowest.parse(requirement)
        assert specs.setdefault(name, spec) == spec, f"{name}: {specs[name]} and {spec}"


def test_the_committed_constraints_are_generated_from_pyproject():
    committed = (ROOT / "constraints" / "lowest.txt").read_text(encoding="utf-8")
    assert committed == lowest.render(PYPROJECT_TEXT), (
        "constraints/lowest.txt is stale: run `python3 constraints/lowest.py > "
        "constraints/lowest.txt` and commit it"
    )


def test_every_lower_bound_is_pinned_once():
    text = lowest.render(
        """
[project]
dependencies = ["Foo_Bar>=1.2,<2", "baz"]
[project.optional-dependencies]
one = ["qux[extra]>=0.5,<1"]
two = ["foo-bar>=1.2,<2"]
"""
    )
    assert text.splitlines()[-2:] == ["foo-bar==1.2", "qux==0.5"]


@pytest.mark.parametrize(
    "requirement",
    ['redis>=5; python_version < "3.12"', "redis @ https://example.invalid/r.whl", "redis>=5,>=6"],
)
def test_the_generator_refuses_what_it_cannot_pin(requirement):
    with pytest.raises(ValueError, match="unsupported"):
        lowest.parse(requirement)


def test_two_lower_bounds_for_one_package_are_refused():
    with pytest.raises(ValueError, match="two lower bounds"):
        lowest.render('[project]\ndependencies = ["redis>=5.0,<9", "redis>=6.0,<9"]\n')


def test_the_extras_the_install_docs_name_exist():
    named = set()
    for page in ("README.md", "docs/quickstart.md"):
        for extras in re.findall(r"buttress\[([\w,]+)\]", (ROOT / page).read_text("utf-8")):
            named.update(extras.split(","))
    assert named
    assert named <= set(PROJECT["optional-dependencies"])


# --- nothing imported at run time is missing ---------------------------------------------------


class MissingImports:
    """A last meta-path finder: it is only asked for a module no other finder could find."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)


@pytest.fixture
def missing_imports() -> Iterator[MissingImports]:
    finder = MissingImports()
    sys.meta_path.append(finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)


async def test_the_demo_http_client_imports_nothing_that_is_not_installed(missing_imports):
    # httpx's async transport looks for sniffio on every request; without it each request
    # retries the failed import (a scan of sys.path), so the extras that bring httpx declare it.
    httpx = pytest.importorskip("httpx")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed its connection
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await http.get("/")  # imports whatever a first request needs
            missing_imports.names.clear()
            response = await http.get("/")
    finally:
        server.close()
        await server.wait_closed()
    assert response.text == "ok"
    assert missing_imports.names == []
