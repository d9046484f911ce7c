"""The breaker's vocabulary: states, outcomes and their pybreaker names, defined once.

The state and outcome names are also the event and metric labels (``events``), the values the
Redis script stores and answers (``circuit.lua``), and what health checks report.
"""

from __future__ import annotations

from typing import Final

import pybreaker

__all__ = [
    "CLOSED",
    "DISABLED",
    "FAILURE",
    "FORCED_CLOSED",
    "FORCED_OPEN",
    "FROM_PYBREAKER",
    "HALF_OPEN",
    "IGNORED",
    "OPEN",
    "SUCCESS",
    "TO_PYBREAKER",
]

# The phases every storage knows.
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
# The manual overrides, which stay in one process and sit on top of a phase.
FORCED_OPEN: Final = "forced_open"
FORCED_CLOSED: Final = "forced_closed"
DISABLED: Final = "disabled"

# What a call that ended counts as.
SUCCESS: Final = "success"
FAILURE: Final = "failure"
IGNORED: Final = "ignored"

# pybreaker spells half-open with a hyphen.
TO_PYBREAKER: Final = {
    CLOSED: pybreaker.STATE_CLOSED,
    OPEN: pybreaker.STATE_OPEN,
    HALF_OPEN: pybreaker.STATE_HALF_OPEN,
}
FROM_PYBREAKER: Final = {name: state for state, name in TO_PYBREAKER.items()}
