"""Deferred calls are replayed through the function they were made to, when several deferring
functions of one service carry the same name: two lambdas of one module, partials
(``functools.partial``), two instances of one callable class, a function decorated per request.

Their queue is found by the service and the function's qualified name (what a durable stream is
named by); each call queued in this process remembers the stack it came through.
"""

from __future__ import annotations

import functools
from typing import Any

from tests.patterns.test_deferral import replayed

from buttress import circuit_breaker, with_fallback
from buttress.testing import FakeClock, force_circuit_state


def deferring(fn: Any) -> Any:
    return with_fallback(name="mail", defer=True)(circuit_breaker(name="mail", timeout=30)(fn))


def test_two_functions_of_one_name_each_replay_their_own_calls(mode, clock: FakeClock) -> None:
    ran: list[str] = []
    # Both named "op" in one module, as two lambdas would be.
    email = deferring(mode.define(lambda to: ran.append(f"email {to}") or "emailed"))
    charge = deferring(mode.define(lambda to: ran.append(f"charge {to}") or "charged"))
    force_circuit_state("mail", "forced_open")
    handles = [mode.run(email, "ann"), mode.run(charge, "bob")]
    force_circuit_state("mail", "closed")

    assert [replayed(mode, handle) for handle in handles] == ["emailed", "charged"]
    assert ran == ["email ann", "charge bob"]


def test_partials_and_callable_objects_replay_their_own_calls(mode, clock: FakeClock) -> None:
    ran: list[str] = []

    def send(kind: str, to: str) -> str:
        ran.append(f"{kind} {to}")
        return kind

    class Sender:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def __call__(self, to: str) -> str:
            return send(self.kind, to)

    if mode.is_async:

        class Sender(Sender):  # type: ignore[no-redef]
            async def __call__(self, to: str) -> str:  # type: ignore[override]
                return send(self.kind, to)

        async def asend(kind: str, to: str) -> str:
            return send(kind, to)

        target = asend
    else:
        target = send
    stacks = [
        deferring(functools.partial(target, "sms")),
        deferring(functools.partial(target, "fax")),
        deferring(Sender("push")),
        deferring(Sender("post")),
    ]
    force_circuit_state("mail", "forced_open")
    handles = [mode.run(stack, "ann") for stack in stacks]
    force_circuit_state("mail", "closed")

    assert [replayed(mode, handle) for handle in handles] == ["sms", "fax", "push", "post"]
    # (The partials and the objects have a queue each, drained side by side.)
    assert sorted(ran) == ["fax ann", "post ann", "push ann", "sms ann"]


def test_a_function_decorated_per_request_replays_its_own_request(mode, clock: FakeClock) -> None:
    ran: list[str] = []

    def handle_request(user: str) -> Any:
        # A closure over the request's state, decorated per request.
        return deferring(mode.define(lambda: ran.append(user) or user))

    force_circuit_state("mail", "forced_open")
    handles = [mode.run(handle_request(user)) for user in ("ann", "bob", "cy")]
    force_circuit_state("mail", "closed")

    assert [replayed(mode, handle) for handle in handles] == ["ann", "bob", "cy"]
    assert ran == ["ann", "bob", "cy"]
