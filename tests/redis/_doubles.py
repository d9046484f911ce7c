"""The dependency the Redis tests protect: counts the calls that reach it, fails while down."""

from __future__ import annotations


class Down(ConnectionError):
    """The dependency failed."""


class Dependency:
    """Counts the calls that reached it; fails while ``down``."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    def __call__(self) -> str:
        self.calls += 1
        if self.down:
            raise Down("dependency down")
        return "ok"
