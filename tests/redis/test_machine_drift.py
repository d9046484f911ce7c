"""Drift guard: the Python state machine and ``circuit.lua`` decide alike.

The same random sequence of admissions, outcomes (of any call still in flight, in any order),
time passing, forced moves and compare-and-set transitions runs through
:class:`~buttress.patterns.circuit_breaker._machine.Machine` and through the script on a real
redis-server; every step must give the same decision: state, admitted, trial, the transition it
made (if any), the counters and the time left open, which grows on repeated trips
(``open_backoff``, capped by ``max_timeout``) and may be held longer by a failure's Retry-After.

Redis's clock cannot be moved, so the script runs with one change: ``now`` is read from a key the
test sets instead of from ``TIME`` (the test checks that those are the script's lines, so the rest
is the script as shipped). Time moves in whole seconds, where the script's milliseconds and the
machine's float seconds compare exactly (and so do open times grown by a factor of 1.5 or 2).
Trial leases and key TTLs are longer than any sequence, so nothing expires (the local machine has
no leases: its own trials always report back).
"""

from __future__ import annotations

import itertools
import math
import random
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buttress.patterns.circuit_breaker._machine import Decision, Limits, Machine

CLOCK_LINES = (
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)
FAKE_CLOCK = "local now = tonumber(redis.call('GET', KEYS[1] .. ':now'))\n"
SCRIPT = (resources.files("buttress.patterns.circuit_breaker") / "circuit.lua").read_text()
START_MS = 1_000_000_000  # the script's generations follow its clock: start well above zero
FOREVER_MS = b"%d" % 10**12
STATES = ("closed", "open", "half_open")

_keys = itertools.count()


def test_the_clock_is_the_only_line_replaced():
    assert SCRIPT.count(CLOCK_LINES) == 1


def operations(seed: int, count: int = 40) -> list[tuple[Any, ...]]:
    """``count`` operations drawn from ``seed``: weighted so calls overlap and circuits trip.

    (Drawn from a seed rather than by hypothesis element by element: its small, simple first
    examples rarely keep several calls in flight, which is where the two machines could differ.)
    """
    rnd = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    for _ in range(count):
        kind = rnd.choices(
            ["admit", "record", "advance", "force", "transition"], weights=[5, 5, 2, 1, 1]
        )[0]
        if kind == "admit":
            ops.append(("admit",))
        elif kind == "record":
            outcome = rnd.choices(["success", "failure", "ignored"], weights=[4, 4, 1])[0]
            # A failure may carry a server's Retry-After (seconds): it holds a circuit it opens.
            hold = rnd.choice([0, 0, 0, 2, 7]) if outcome == "failure" else 0
            ops.append(("record", rnd.randrange(8), outcome, hold))
        elif kind == "advance":
            ops.append(("advance", rnd.randrange(4)))
        elif kind == "force":
            ops.append(("force", rnd.choice(STATES), rnd.random() < 0.5))
        else:
            ops.append(("transition", rnd.randrange(8), rnd.choice(STATES)))
    return ops


class Lua:
    """The script on one pair of keys, with the test's clock."""

    def __init__(self, client: Any, limits: Limits) -> None:
        n = next(_keys)
        self.client = client
        self.keys = (f"drift:{n}:circuit", f"drift:{n}:trials")
        self.limits = limits
        self.script = client.register_script(SCRIPT.replace(CLOCK_LINES, FAKE_CLOCK))
        self.leases = itertools.count()
        self.set_time(0)

    def set_time(self, seconds: int) -> None:
        self.client.set(self.keys[0] + ":now", START_MS + 1000 * seconds)

    def run(
        self,
        op: str,
        *,
        lease: str = "",
        gen: str = "",
        arg12: str = "",
        arg13: str = "",
        hold: int = 0,
    ):
        limits = self.limits
        argv = [
            op,
            FOREVER_MS,  # ttl
            b"%d" % (limits.reset_timeout * 1000),
            b"%d" % limits.half_open_max_calls,
            FOREVER_MS,  # trial lease
            b"%d" % limits.fail_max,
            b"%d" % limits.success_threshold,
            "",  # no deferred success to apply first
            "",
            lease,
            gen,
            arg12,
            arg13,
            "",  # no orphaned leases
            repr(limits.open_backoff),
            b"" if math.isinf(limits.max_timeout) else b"%d" % (limits.max_timeout * 1000),
            b"%d" % (hold * 1000),
        ]
        fields = self.script(keys=self.keys, args=argv).decode().split(" ")
        state = fields[0]
        gen_, seq, base, succ, since, now, admitted, trial = map(int, fields[1:9])
        change = fields[9] if fields[9] not in ("", "stale") else None
        retry_after = None
        if state == "open":  # the reply's last field: the open time it chose
            retry_after = max(0, since + int(fields[11]) - now) / 1000
        return {
            "state": state,
            "admitted": bool(admitted),
            "trial": bool(trial),
            "change": change,
            "failures": seq - base,
            "successes": succ,
            "retry_after": retry_after,
        }, (gen_, seq, fields[10])


def python(decision: Decision, *, retry_after: bool = True) -> dict[str, Any]:
    return {
        "state": decision.state,
        "admitted": decision.admitted,
        "trial": decision.trial,
        "change": decision.change,
        "failures": decision.failures,
        "successes": decision.successes,
        "retry_after": decision.retry_after if retry_after else None,
    }


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fail_max=st.integers(1, 3),
    reset_timeout=st.integers(1, 3),
    success_threshold=st.integers(1, 3),
    max_trials=st.integers(1, 2),
    open_backoff=st.sampled_from([1.0, 1.5, 2.0]),
    cap=st.integers(0, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_machine_and_the_script_decide_alike(
    redis_server, fail_max, reset_timeout, success_threshold, max_trials, open_backoff, cap, seed
):
    import redis

    ops = operations(seed)

    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    max_timeout = float(reset_timeout + cap)
    limits = Limits(
        fail_max, float(reset_timeout), success_threshold, max_trials, open_backoff, max_timeout
    )
    lua = Lua(client, limits)
    machine = Machine(0.0)
    now = 0
    # Calls in flight: (the machine's ticket, the script's (generation, seq, lease)).
    tickets: list[tuple[Decision, tuple[int, int, str]]] = []
    for step, operation in enumerate(ops):
        kind = operation[0]
        where = f"step {step} {operation} of {ops}"
        if kind == "advance":
            now += operation[1]
            lua.set_time(now)
            continue
        if kind == "admit":
            ours = machine.admit(limits, float(now))
            theirs, ticket = lua.run("admit", lease=f"lease-{next(lua.leases)}")
            if ours.admitted:
                tickets.append((ours, ticket))
            # The script answers an admission's retry_after; the machine too.
            assert python(ours) == theirs, where
            continue
        if kind in ("record", "transition") and not tickets:
            continue
        if kind == "record":
            ours_ticket, (gen, seq, lease) = tickets.pop(operation[1] % len(tickets))
            _, _, outcome, hold = operation
            ours = machine.record(
                ours_ticket.generation,
                ours_ticket.trial,
                outcome,
                limits._replace(hold=float(min(hold, max_timeout))),  # capped, as the breaker does
                float(now),
                upto=ours_ticket.seq,
            )
            theirs, _ = lua.run(
                "record",
                lease=lease,
                gen=str(gen),
                arg12=outcome,
                arg13=str(seq),
                hold=min(hold, int(max_timeout)),
            )
            # A record's reply carries the open time it chose: both must agree on it too.
            assert python(ours) == theirs, where
            continue
        if kind == "force":
            _, state, always = operation
            ours = machine.force(state, float(now), always=always)
            theirs, _ = lua.run("set", arg12=state, arg13="force" if always else "")
        else:
            ours_ticket, (gen, _, _) = tickets[operation[1] % len(tickets)]
            state = operation[2]
            ours = machine.force(state, float(now), always=False, expected=ours_ticket.generation)
            theirs, _ = lua.run("set", gen=str(gen), arg12=state)
        # After a record or a set the script's reply has no limits-derived retry_after.
        theirs["retry_after"] = None
        assert python(ours, retry_after=False) == theirs, where


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_a_record_after_a_move_changes_nothing_on_either_side(redis_server, outcome):
    import redis

    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    limits = Limits(1, 1.0, 1, 1)
    lua = Lua(client, limits)
    machine = Machine(0.0)
    ours_ticket = machine.admit(limits, 0.0)
    _, (gen, seq, lease) = lua.run("admit", lease="a")
    machine.force("open", 0.0, always=True)
    lua.run("set", arg12="open", arg13="force")
    ours = machine.record(ours_ticket.generation, False, outcome, limits, 0.0, upto=0)
    theirs, _ = lua.run("record", lease=lease, gen=str(gen), arg12=outcome, arg13=str(seq))
    theirs["retry_after"] = None
    assert python(ours, retry_after=False) == theirs
    assert theirs["change"] is None
    assert theirs["state"] == "open"


@pytest.mark.parametrize("seed", range(12))
def test_every_transition_the_script_makes_is_published_and_nothing_else(redis_server, seed):
    # The near-caches of the other processes learn transitions from these messages only: one per
    # transition, carrying the state the reply carries; none for a decision that moved nothing.
    import redis

    client = redis.Redis(port=redis_server.port, password=redis_server.password)
    limits = Limits(2, 1.0, 1, 1)
    lua = Lua(client, limits)
    channel = lua.keys[0] + ":changes"
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"
    now = 0
    tickets: list[tuple[int, int, str]] = []
    for operation in operations(seed):
        kind = operation[0]
        if kind == "advance":
            now += operation[1]
            lua.set_time(now)
            continue
        if kind == "admit":
            theirs, ticket = lua.run("admit", lease=f"lease-{next(lua.leases)}")
            if theirs["admitted"]:
                tickets.append(ticket)
        elif kind == "record" and tickets:
            gen, seq, lease = tickets.pop(operation[1] % len(tickets))
            theirs, _ = lua.run(
                "record", lease=lease, gen=str(gen), arg12=operation[2], arg13=str(seq)
            )
        elif kind == "force":
            theirs, _ = lua.run("set", arg12=operation[1], arg13="force" if operation[2] else "")
        else:
            continue
        if theirs["change"] is None:
            assert pubsub.get_message(timeout=0.01) is None, operation
        else:
            message = pubsub.get_message(timeout=1.0)
            assert message is not None, operation
            assert message["channel"].decode() == channel
            published = message["data"].decode().split(" ")
            assert (published[0], published[9]) == (theirs["state"], theirs["change"])
            assert published[7:9] == ["0", "0"]  # it admits nothing and grants no trial
    pubsub.close()
    client.close()
