"""docs/guarantees.md points every promise at a test: each test it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guarantees.md"


def _references() -> list[tuple[str, str | None]]:
    """``(file, test name or None)`` for each reference; ``::name`` reuses the previous file."""
    found: list[tuple[str, str | None]] = []
    for row in PAGE.read_text().splitlines():
        if not row.startswith("|") or row.startswith("|---"):
            continue
        last = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", row):
            path, _, name = ref.partition("::")
            path = path or last
            assert path is not None, f"{ref} has no file before it: {row}"
            last = path
            found.append((path, name or None))
    return found


def test_every_test_the_guarantees_page_names_exists():
    references = _references()
    assert len(references) > 40
    for path, name in references:
        source = (ROOT / path).read_text()
        if name is not None:
            assert re.search(rf"^(?:async )?def {name}\(", source, re.M), f"{path}::{name}"


def test_every_page_row_points_at_a_test():
    for row in PAGE.read_text().splitlines():
        if row.startswith("|") and not row.startswith(("|---", "| promise")):
            assert "`tests/" in row, row
