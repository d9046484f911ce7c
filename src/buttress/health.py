"""Health snapshot (placeholder until the observability work lands)."""

from __future__ import annotations

from typing import Any


def health() -> dict[str, Any]:
    raise NotImplementedError
