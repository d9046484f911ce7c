"""Every Python example in ``docs/`` runs, and every test example passes.

The blocks of one page run top to bottom in one namespace (later examples may use earlier ones),
in a temporary directory, in testing mode (no real backoff), with settings read from a clean
environment and no shared state left from elsewhere. Top-level ``await`` is allowed.

An HTML comment on the line just before a block changes what happens to it (documented for
writers in ``docs/testing.md``):

* ``<!-- docs: pytest -->``: the block is a test module, run with pytest and the buttress plugin;
  every test in it must pass.
* ``<!-- docs: no-run -->``: the block is not run.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import inspect
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from buttress import config, registry, testing

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs:\s*(?P<kind>[\w-]+)\s*-->\s*$")
MARKERS = ("pytest", "no-run")
PYTHON = ("python", "py")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the first line of code, 1-based
    source: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(DOCS.parent)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The fenced Python blocks of ``page``, with the marker written just before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].split(maxsplit=1)[0].lower() if opening["info"] else ""
        body_start = index + 1
        index = body_start
        while index < len(lines):
            closing = lines[index].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            index += 1
        body = lines[body_start:index]
        index += 1
        if language not in PYTHON:
            continue
        marker = _marker_before(lines, body_start - 1, page)
        source = textwrap.dedent("\n".join(line.removeprefix(indent) for line in body))
        blocks.append(Block(page, body_start + 1, source, marker))
    return blocks


def _marker_before(lines: list[str], fence_index: int, page: Path) -> str | None:
    previous = fence_index - 1
    while previous >= 0 and not lines[previous].strip():
        previous -= 1
    if previous < 0:
        return None
    found = _MARKER.match(lines[previous])
    if found is None:
        return None
    if found["kind"] not in MARKERS:
        raise ValueError(
            f"{page}:{previous + 1}: unknown docs marker {found['kind']!r}; known: {MARKERS}"
        )
    return found["kind"]


def _plugin_args() -> list[str]:
    installed = any(
        ep.value == "buttress.pytest_plugin"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "buttress.pytest_plugin"]


def _clean_environment(patch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(("BUTTRESS_", "FF_ENABLE_")):
            patch.delenv(name)


def _restore_environment(saved: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(saved)


def _forget_shared_state() -> None:
    # Pages are independent: a service one page names may be configured differently on another.
    testing.reset()
    registry.clear_claims()


def run_blocks(blocks: list[Block]) -> None:
    """Run plain blocks in order, in one namespace, like a reader pasting them into a session."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    loop = asyncio.new_event_loop()
    try:
        for block in blocks:
            # Padded so that a traceback points at the line of the page.
            code = compile(
                "\n" * (block.line - 1) + block.source,
                str(block.page),
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            )
            if code.co_flags & inspect.CO_COROUTINE:
                loop.run_until_complete(eval(code, namespace))
            else:
                exec(code, namespace)
    finally:
        loop.close()


def run_test_blocks(pytester: pytest.Pytester, blocks: list[Block]) -> None:
    for number, block in enumerate(blocks):
        pytester.makepyfile(**{f"test_docs_example_{number}": block.source})
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    expected = sum(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
        for block in blocks
        for node in ast.parse(block.source).body
    )
    result = pytester.runpytest_inprocess(
        *_plugin_args(), "-p", "no:cacheprovider", "-p", "no:hypothesispytest"
    )
    where = ", ".join(block.where for block in blocks)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == expected, f"{where}\n{result.stdout.str()}"
    assert result.ret == 0, f"{where}\n{result.stdout.str()}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_examples_of_page_run(page, pytester):
    blocks = python_blocks(page)
    plain = [b for b in blocks if b.marker is None]
    tests = [b for b in blocks if b.marker == "pytest"]
    if not plain and not tests:
        pytest.skip("no Python example on this page")
    saved_environment = dict(os.environ)  # examples may set variables themselves
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(pytester.path)
        _clean_environment(patch)
        config.reload_settings()
        _forget_shared_state()
        clean_environment = dict(os.environ)
        try:
            with testing.testing_mode():
                run_blocks(plain)
            # The test modules start from the clean state too, whatever the examples changed.
            _restore_environment(clean_environment)
            config.reload_settings()
            _forget_shared_state()
            if tests:
                run_test_blocks(pytester, tests)
        finally:
            _forget_shared_state()
            patch.undo()
            _restore_environment(saved_environment)
            config.reload_settings()


def test_the_block_parser_reads_markers_indentation_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            # Title

            ```python
            x = 1
            ```

            <!-- docs: no-run -->
            ```python
            import does_not_exist
            ```

            - a list item:

              ```python
              y = x + 1
              ```

            ```toml
            [not] = "python"
            ```

            <!-- docs: pytest -->

            ```py title="test_me.py"
            def test_ok(): pass
            ```
            """
        )
    )
    blocks = python_blocks(page)
    assert [(b.line, b.marker) for b in blocks] == [
        (4, None),
        (9, "no-run"),
        (15, None),
        (25, "pytest"),
    ]
    assert blocks[2].source.strip() == "y = x + 1"
    run_blocks([b for b in blocks if b.marker is None])


def test_an_unknown_marker_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unknown docs marker 'skip'"):
        python_blocks(page)


def test_a_failing_example_points_at_its_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Intro.\n\n```python\nvalue = 1\nassert value == 2\n```\n")
    with pytest.raises(AssertionError) as failure:
        run_blocks(python_blocks(page))
    frame = failure.traceback[-1]
    assert (Path(str(frame.path)).name, frame.lineno + 1) == ("page.md", 5)
