"""Policy and the public decorators: decoration, fusion, errors at decoration time, stacking."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect

import pytest

import buttress
from buttress import (
    CircuitOpenError,
    ConfigurationError,
    Policy,
    circuit_breaker,
    registry,
    resilient,
    retry_with_backoff,
    with_bulkhead,
    with_cache,
    with_coalescing,
    with_fallback,
    with_rate_limit,
    with_timeout,
)
from buttress.policy import Spec, alink, link
from buttress.testing import capture_events


@retry_with_backoff(max_attempts=2)
@circuit_breaker(name="pickled-by-reference")
def module_level_lookup(key: str) -> str:
    return key.upper()


ALL_DECORATORS = [
    circuit_breaker(name="svc"),
    retry_with_backoff(max_attempts=2),
    with_timeout(seconds=5),
    with_bulkhead(limit=3),
    with_rate_limit(rate=10),
    with_fallback(0),
    resilient("svc"),
]


@pytest.mark.parametrize("decorator", ALL_DECORATORS, ids=repr)
def test_decorators_keep_name_doc_signature_and_kind(decorator, mode):
    def body(user: str, resource: str = "doc") -> bool:
        """Check a permission."""
        return True

    original = mode.define(body, name="check_permission")
    original.__doc__ = "Check a permission."
    decorated = decorator(original)
    assert decorated.__name__ == "check_permission"
    assert decorated.__doc__ == "Check a permission."
    assert inspect.signature(decorated) == inspect.signature(original)
    assert inspect.iscoroutinefunction(decorated) is mode.is_async
    assert mode.run(decorated, "alice") is True


@pytest.mark.parametrize("decorator", ALL_DECORATORS, ids=repr)
def test_decorators_keep_defaults_and_keyword_defaults(decorator, mode):
    def body(user: str, resource: str = "doc", *, level: int = 1) -> tuple[str, str, int]:
        return (user, resource, level)

    if mode.is_async:

        async def original(user: str, resource: str = "doc", *, level: int = 1) -> object:
            return body(user, resource, level=level)

    else:

        def original(user: str, resource: str = "doc", *, level: int = 1) -> object:  # type: ignore[misc]
            return body(user, resource, level=level)

    decorated = decorator(original)
    assert decorated.__defaults__ == ("doc",)
    assert decorated.__kwdefaults__ == {"level": 1}
    assert inspect.signature(decorated) == inspect.signature(original)
    # The wrapper takes *args/**kwargs: the copied defaults change nothing in how calls bind.
    own = inspect.signature(decorated, follow_wrapped=False).parameters.values()
    assert [p.kind for p in own] == [
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ]
    assert mode.run(decorated, "alice") == ("alice", "doc", 1)
    assert mode.run(decorated, "bob", "page", level=3) == ("bob", "page", 3)
    with pytest.raises(TypeError):
        mode.run(decorated)


def test_stacked_decorators_fuse_into_one_policy(mode):
    target = mode.define(name="fused")
    stacked = circuit_breaker(name="openfga", fail_max=5, timeout=60)(
        retry_with_backoff(max_attempts=3, exponential_base=2)(
            with_timeout(seconds=5)(with_bulkhead(limit=50)(target))
        )
    )
    policy = stacked.__buttress_policy__
    assert [spec.pattern for spec in policy.specs] == [
        "circuit_breaker",
        "retry",
        "timeout",
        "bulkhead",
    ]
    assert policy.service == "openfga"
    # One wrapper around the original function, whatever the depth of the stack.
    assert stacked.__wrapped__ is target
    assert mode.run(stacked) == "ok"


def test_adr_example_works_verbatim_on_async_def():
    import asyncio

    @circuit_breaker(name="openfga", fail_max=5, timeout=60)
    @retry_with_backoff(max_attempts=3, exponential_base=2)
    @with_timeout(seconds=5)
    @with_bulkhead(limit=50)
    async def check_permission(user: str, resource: str) -> bool:
        return user == "alice" and resource == "doc"

    assert inspect.iscoroutinefunction(check_permission)
    assert asyncio.run(check_permission("alice", "doc")) is True


def test_adr_example_works_verbatim_on_def():
    @circuit_breaker(name="openfga", fail_max=5, timeout=60)
    @retry_with_backoff(max_attempts=3, exponential_base=2)
    @with_timeout(seconds=5)
    @with_bulkhead(limit=50)
    def check_permission(user: str, resource: str) -> bool:
        return user == "alice" and resource == "doc"

    assert check_permission("alice", "doc") is True
    assert check_permission("bob", "doc") is False


def test_methods_are_decorated_like_functions(mode):
    calls = []

    if mode.is_async:

        class Client:
            @retry_with_backoff(max_attempts=2)
            async def get(self, key: str) -> str:
                calls.append((self, key))
                return key.upper()

    else:

        class Client:  # type: ignore[no-redef]
            @retry_with_backoff(max_attempts=2)
            def get(self, key: str) -> str:
                calls.append((self, key))
                return key.upper()

    client = Client()
    assert mode.run(client.get, "k") == "K"
    assert calls == [(client, "k")]


def test_policy_call_acall_and_decorator_share_the_breaker(mode):
    policy = Policy(Spec("circuit_breaker", "shared-svc", {"fail_max": 1, "timeout": 30}))

    def fail() -> None:
        raise ConnectionError("down")

    failing = mode.define(fail)
    first = (
        mode.outcome(policy.acall, failing) if mode.is_async else mode.outcome(policy.call, failing)
    )
    assert isinstance(first, ConnectionError)
    decorated = policy(mode.define(name="other"))
    # The same service, so the same (now open) breaker.
    assert isinstance(mode.outcome(decorated), CircuitOpenError)


def test_policy_call_rejects_the_wrong_kind_of_function():
    policy = Policy(Spec("retry"))

    async def coroutine_function() -> None:
        return None

    with pytest.raises(TypeError, match="acall"):
        policy.call(coroutine_function)


def test_policy_is_immutable():
    policy = Policy(Spec("retry"))
    with pytest.raises(AttributeError, match="immutable"):
        policy.specs = ()  # type: ignore[misc]


# --- misuse fails at decoration time -----------------------------------------------------------


def test_generator_functions_are_refused():
    def gen():
        yield 1

    async def agen():
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match="generator function"):
            retry_with_backoff()(fn)


def test_policy_call_refuses_generator_functions_before_running_anything():
    """As the decorators refuse them: a generator's body would run after the call returned."""
    policy = Policy(Spec("circuit_breaker", "gen-call"), Spec("retry", "gen-call"))

    class Feed:
        def items(self):
            yield 1

    def gen():
        yield 1

    async def agen():
        yield 1

    with capture_events() as seen:
        for fn in (gen, Feed().items, agen):
            with pytest.raises(TypeError, match="generator function"):
                policy.call(fn)
        with pytest.raises(TypeError, match="generator function"):
            asyncio.run(policy.acall(agen))  # type: ignore[arg-type]
    assert list(seen) == []  # refused before the stack ran: no call recorded


def test_classes_and_non_callables_are_refused():
    class Thing:
        pass

    with pytest.raises(TypeError, match="not classes"):
        with_timeout(seconds=1)(Thing)
    with pytest.raises(TypeError, match="callables"):
        with_timeout(seconds=1)(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: with_bulkhead(limit=0), "limit"),
        (lambda: with_timeout(seconds=-1), "seconds"),
        (lambda: with_timeout(seconds=0), "seconds"),
        (lambda: retry_with_backoff(max_attempts=0), "max_attempts"),
        (lambda: circuit_breaker(fail_max=0), "fail_max"),
        (lambda: circuit_breaker(timeout=-5), "timeout"),
        (lambda: with_rate_limit(rate=0), "rate"),
        (lambda: retry_with_backoff(initial=5, max_delay=1), "max_delay"),
        (lambda: retry_with_backoff(jitter="sometimes"), "jitter"),  # type: ignore[arg-type]
        (lambda: with_bulkhead(max_queue=-1), "max_queue"),
    ],
)
def test_impossible_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument) as info:
        make()
    assert isinstance(info.value, ConfigurationError)


def test_unnamed_service_must_be_a_string():
    with pytest.raises(TypeError, match="non-empty string"):
        circuit_breaker(name="")


def test_fallback_needs_something_to_fall_back_to():
    with pytest.raises(TypeError, match="needs a value"):
        with_fallback()


def test_conflicting_code_arguments_for_one_service_fail_at_decoration():
    @circuit_breaker(name="conflict", fail_max=5)
    def first() -> None: ...

    @circuit_breaker(name="conflict", fail_max=5)
    def same_values() -> None: ...

    with pytest.raises(ConfigurationError, match=r"conflict.*fail_max=5.*fail_max=10"):

        @circuit_breaker(name="conflict", fail_max=10)
        def different() -> None: ...


def test_unnamed_call_sites_do_not_share_state(mode):
    def fail() -> None:
        raise ConnectionError("down")

    one = circuit_breaker(fail_max=1)(mode.define(fail, name="same"))
    two = circuit_breaker(fail_max=1)(mode.define(name="same"))
    assert isinstance(mode.outcome(one), ConnectionError)
    assert isinstance(mode.outcome(one), CircuitOpenError)
    assert mode.run(two) == "ok"


def test_call_finished_event_per_logical_call(mode):
    def fail() -> None:
        raise ConnectionError("down")

    ok = with_bulkhead(name="events-svc", limit=2)(mode.define())
    bad = with_bulkhead(name="events-svc")(mode.define(fail))
    with capture_events([buttress.events.CallFinished]) as seen:
        mode.run(ok)
        mode.outcome(bad)
    assert [(e.service, e.outcome, e.error_type) for e in seen] == [
        ("events-svc", "success", None),
        ("events-svc", "failure", "ConnectionError"),
    ]
    assert all(e.duration >= 0 for e in seen)


def test_a_state_url_that_is_not_a_redis_url_fails_at_decoration_without_being_echoed():
    with pytest.raises(ConfigurationError, match=r"state_url: must be a redis://") as info:
        circuit_breaker(name="pay", state_url="s3cret")
    assert "s3cret" not in str(info.value)


def test_policy_call_with_fresh_lambdas_shares_one_stack_and_keeps_nothing(mode):
    policy = Policy(Spec("circuit_breaker", None, {"fail_max": 2, "timeout": 30}))

    def fail(n: int) -> None:
        raise ConnectionError(f"down {n}")

    outcomes = []
    for n in range(3):
        # A new function object every call: the usual shape of policy.call(lambda: ...).
        target = mode.define(lambda n=n: fail(n))
        runner = policy.acall if mode.is_async else policy.call
        outcomes.append(type(mode.outcome(runner, target)).__name__)
    # The policy is the call site: the failures of different lambdas trip its one breaker.
    assert outcomes == ["ConnectionError", "ConnectionError", "CircuitOpenError"]
    assert len(registry.instances("circuit_breaker")) == 1


def test_policy_call_passes_the_callers_arguments_to_fallback_handlers(mode):
    seen = []

    def handler(exc: BaseException, *args: object, **kwargs: object) -> str:
        seen.append((type(exc).__name__, args, kwargs))
        return "fallback"

    policy = Policy(Spec("fallback", "fb-args", {"handler": handler}))

    def fail(user: str, *, resource: str) -> str:
        raise ConnectionError("down")

    runner = policy.acall if mode.is_async else policy.call
    assert mode.run(runner, mode.define(fail), "alice", resource="doc") == "fallback"
    assert seen == [("ConnectionError", ("alice",), {"resource": "doc"})]


def test_policy_acall_takes_any_callable_returning_an_awaitable_and_refuses_others():
    import asyncio

    policy = Policy(Spec("retry", "acall-kinds"))

    async def coroutine_function(x: int) -> int:
        return x * 2

    async def scenario() -> int:
        return await policy.acall(lambda x: coroutine_function(x), 21)

    assert asyncio.run(scenario()) == 42

    async def wrong() -> None:
        await policy.acall(lambda: 42)

    with pytest.raises(TypeError, match="returns an awaitable"):
        asyncio.run(wrong())


def test_private_state_goes_with_the_function_decorated():
    import gc

    def decorate_and_call() -> None:
        @with_bulkhead(limit=2)
        def per_request() -> str:
            return "ok"

        assert per_request() == "ok"

    for _ in range(50):
        decorate_and_call()
    gc.collect()
    assert registry.instances("bulkhead") == {}


@pytest.mark.parametrize("name", [None, "per-request-cache"])
def test_a_cache_and_coalescing_go_with_the_function_decorated(mode, name):
    # Their state is the call site's own even in a named service: a function decorated per
    # request left a cache and a coalescing table behind on every request.
    import gc

    def handle(i: int) -> int:
        protected = with_cache(name=name, ttl=60)(
            with_coalescing(name=name)(mode.define(lambda: i))
        )
        return mode.run(protected)  # type: ignore[no-any-return]

    for i in range(200):
        assert handle(i) == i  # a fresh function each time: a fresh cache
    gc.collect()
    assert registry.instances("cache") == {}
    assert registry.instances("coalescing") == {}


# --- a foreign decorator in the stack ------------------------------------------------------------


def counting_decorator(mode, seen: list[str], label: str):
    """A well-behaved third-party decorator (``functools.wraps``) that records each call."""
    import functools

    def decorate(fn):
        if mode.is_async:

            @functools.wraps(fn)
            async def wrapper(*args, **kwargs):
                seen.append(label)
                return await fn(*args, **kwargs)

        else:

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                seen.append(label)
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def test_a_foreign_decorator_between_two_buttress_decorators_runs_once_per_call(mode, clock):
    seen: list[str] = []

    def body() -> str:
        seen.append("call")
        if seen.count("call") == 1:
            raise ConnectionError("down")
        return "ok"

    foreign = counting_decorator(mode, seen, "foreign")
    # wraps() copies the inner wrapper's attributes (its policy marker included) onto the foreign
    # wrapper: the outer decorator must still see a function it did not make, and not fuse past it.
    stacked = retry_with_backoff(max_attempts=2, jitter="none")(
        foreign(circuit_breaker(name="foreign-mid")(mode.define(body)))
    )
    assert mode.run(stacked) == "ok"
    # The retry is outside the foreign decorator, so it runs again with the second attempt.
    assert seen == ["foreign", "call", "foreign", "call"]
    assert [s.pattern for s in stacked.__buttress_policy__.specs] == ["retry"]


@pytest.mark.parametrize("where", ["top", "bottom", "middle"])
def test_a_foreign_decorator_anywhere_in_the_stack_keeps_its_place(mode, where):
    seen: list[str] = []
    foreign = counting_decorator(mode, seen, "foreign")
    target = mode.define(lambda: seen.append("call") or "ok")
    outer, inner = with_timeout(seconds=5), with_bulkhead(limit=3)
    if where == "top":
        stacked = foreign(outer(inner(target)))
    elif where == "bottom":
        stacked = outer(inner(foreign(target)))
    else:
        stacked = outer(foreign(inner(target)))
    for _ in range(3):
        assert mode.run(stacked) == "ok"
    assert seen == ["foreign", "call"] * 3
    assert inspect.iscoroutinefunction(stacked) is mode.is_async
    # Only buttress's own wrappers fuse: the two patterns are one policy unless the foreign
    # decorator sits between them.
    outermost = stacked.__wrapped__ if where == "top" else stacked
    fused = [s.pattern for s in outermost.__buttress_policy__.specs]
    assert fused == (["timeout"] if where == "middle" else ["timeout", "bulkhead"])


# --- pickling ------------------------------------------------------------------------------------


def test_a_policy_pickles_to_an_equal_stack():
    import pickle

    def shout(exc: BaseException, *args: object) -> str:
        return "fallback"

    policies = [
        retry_with_backoff(max_attempts=2, retry_on=(KeyError,)).then(circuit_breaker(name="db")),
        resilient("payments", preset="api", timeout={"seconds": 2}, fallback={"value": None}),
        with_fallback(handler=module_level_lookup, cache_ttl=5),
    ]
    for policy in policies:
        clone = pickle.loads(pickle.dumps(policy))
        assert clone.specs == policy.specs
        assert repr(clone) == repr(policy)
        assert clone.service == policy.service
    # Still a working decorator on the other side.
    clone = pickle.loads(pickle.dumps(retry_with_backoff(max_attempts=2)))
    assert clone(lambda: "ok")() == "ok"
    # A code argument that cannot be pickled (a local function) says so.
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(with_fallback(handler=shout))


def test_a_decorated_module_level_function_pickles_by_reference():
    import pickle

    assert pickle.loads(pickle.dumps(module_level_lookup)) is module_level_lookup
    assert module_level_lookup("a") == "A"


# --- what can be decorated -----------------------------------------------------------------------


def test_a_callable_object_with_an_async_call_is_protected_as_async(clock):
    import asyncio

    class Fetch:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, key: str) -> str:
            self.calls += 1
            if self.calls == 1:
                raise ConnectionError("down")
            return key.upper()

    fetch = Fetch()
    decorated = retry_with_backoff(max_attempts=2, jitter="none")(fetch)
    assert inspect.iscoroutinefunction(decorated)
    assert asyncio.run(decorated("k")) == "K"
    assert fetch.calls == 2
    with pytest.raises(TypeError, match="acall"):
        Policy(Spec("retry")).call(fetch, "k")


def test_a_callable_object_with_a_def_call_stays_sync(clock):
    class Lookup:
        def __call__(self, key: str) -> str:
            return key.upper()

    decorated = with_timeout(seconds=1)(Lookup())
    assert not inspect.iscoroutinefunction(decorated)
    assert decorated("k") == "K"


def test_a_callable_object_with_a_generator_call_is_refused():
    class Rows:
        def __call__(self):
            yield 1

    class AsyncRows:
        async def __call__(self):
            yield 1

    for rows in (Rows(), AsyncRows()):
        with pytest.raises(TypeError, match="generator function"):
            retry_with_backoff()(rows)


@pytest.mark.parametrize("kind", ["staticmethod", "classmethod"])
def test_a_decorator_above_staticmethod_or_classmethod(mode, kind):
    wrap = staticmethod if kind == "staticmethod" else classmethod
    calls = []

    def body(first: object, key: str) -> str:
        calls.append(first)
        if len(calls) == 1:
            raise ConnectionError("down")
        return key.upper()

    if mode.is_async:

        async def method(*args: object) -> str:
            return body(*args) if kind == "classmethod" else body(None, *args)

    else:

        def method(*args: object) -> str:  # type: ignore[misc]
            return body(*args) if kind == "classmethod" else body(None, *args)

    # Written in a class body as `@circuit_breaker(...)` over `@staticmethod`, fused with a retry.
    Client = type(
        "Client",
        (),
        {
            "get": circuit_breaker(name=f"above-{kind}")(
                retry_with_backoff(max_attempts=2, jitter="none")(wrap(method))
            )
        },
    )
    assert isinstance(Client.__dict__["get"], wrap)
    expected_first = None if kind == "staticmethod" else Client
    assert mode.run(Client().get, "a") == "A"
    assert mode.run(Client.get, "b") == "B"
    assert calls == [expected_first] * 3
    assert [s.pattern for s in Client.__dict__["get"].__func__.__buttress_policy__.specs] == [
        "circuit_breaker",
        "retry",
    ]


# -- sans-IO patterns: they decide, the two drivers in policy.py wait ------------------------------

SANS_IO_PATTERNS = (
    "adaptive_throttle",
    "bulkhead",
    "chaos",
    "fallback",
    "hedging",
    "rate_limit",
    "retry",
    "timeout",
)


@pytest.mark.parametrize("name", SANS_IO_PATTERNS)
def test_a_pattern_module_never_awaits_sleeps_or_blocks(name: str) -> None:
    module = importlib.import_module(f"buttress.patterns.{name}")
    tree = ast.parse(inspect.getsource(module))
    waits = {"sleep", "asleep", "wait", "timeout", "call_later"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncWith | ast.AsyncFor):
            found.append(f"line {node.lineno}: {type(node).__name__}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if "asyncio" in names or getattr(node, "module", None) == "asyncio":
                found.append(f"line {node.lineno}: imports asyncio")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in {"_clock", "time", "asyncio"}
            and node.attr in waits
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert found == [], f"buttress.patterns.{name} waits itself: {found}"


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_strategy_of_no_known_shape_is_refused_when_linked(is_async: bool) -> None:
    # The drivers know the shapes of patterns/_base.py only; anything else (a strategy that
    # wraps the next step itself) is refused at link time, naming the pattern.
    class Wrapping:
        pattern = "circuit_breaker"

        def wrap(self, call):
            return call

        def awrap(self, call):
            return call

    async def body(args, kwargs):
        return args[0] + 1

    linker = alink if is_async else link
    with pytest.raises(TypeError, match=r"circuit_breaker: the strategy .*Wrapping has no known"):
        linker(Wrapping(), body)


@pytest.mark.parametrize("name", ["", None, 5])
def test_registry_breaker_refuses_a_name_no_decorator_takes(name):
    # An empty name made a circuit no call site can reach, shown on /health.
    with pytest.raises(TypeError, match="non-empty string"):
        registry.breaker(name)


class _Slots:
    """A gate and a scoped recovery whose hooks are methods, as the patterns' are."""

    pattern = "bulkhead"

    def __init__(self, seen: list[object]) -> None:
        self.seen = seen

    def admit(self) -> str:
        self.seen.append("admit")
        return "slot"

    def release(self, token: object) -> None:
        self.seen.append(("release", token))


@pytest.mark.parametrize("hooks", ["methods", "functions"])
def test_a_held_gate_calls_its_hooks_on_their_objects_or_as_given(mode, hooks: str) -> None:
    # The step keeps a method hook as its class's function and its object (policy._split), any
    # other callable as it is: either way each hook is called as the strategy gave it, once per
    # call, the call's token handed back, on success and on failure.
    seen: list[object] = []
    owner = _Slots(seen)

    class Gate:
        pattern = "bulkhead"
        if hooks == "methods":
            before, after = owner.admit, owner.release
        else:
            before = staticmethod(lambda: owner.admit())
            after = staticmethod(lambda token: owner.release(token))

    def work(fail: bool) -> str:
        if fail:
            raise ConnectionError("down")
        return "done"

    protected = mode.chain(Gate(), mode.define(work))
    assert mode.run(protected, False) == "done"
    with pytest.raises(ConnectionError):
        mode.run(protected, True)
    assert seen == ["admit", ("release", "slot")] * 2


@pytest.mark.parametrize("budget", [True, False], ids=["budget", "no-budget"])
def test_a_retrying_call_gets_a_new_scope_each_time_from_its_budget_or_none(
    mode, clock, budget: bool
) -> None:
    # Retry's new_scope is its budget's method (the step keeps the budget: policy._split), or a
    # bare RetryScope with no budget: each logical call runs in a scope of its own either way,
    # and with a budget each counts as a first attempt.
    scopes: list[object] = []
    attempts = iter([ConnectionError("down"), "ok", "ok"])

    def work() -> str:
        scopes.append(buttress.attempt())
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    name = f"scoped-{mode.name}-{budget}"
    switched = {} if budget else {"budget": False}
    protected = retry_with_backoff(name=name, max_attempts=2, **switched)(mode.define(work))
    assert mode.run(protected) == "ok"
    assert mode.run(protected) == "ok"
    assert scopes == [1, 2, 1]  # the second call starts over: a new scope
    budgets = registry.instances("retry_budget")
    if budget:
        assert budgets[name].snapshot()["requests"] == 2
    else:
        assert name not in budgets


def test_specs_that_name_no_service_are_shared_by_the_policies_that_give_them() -> None:
    # The inner decorators of most stacks give the same spec at every service: one object for
    # all (a spec is immutable). A spec naming a service, a preset, or arguments that cannot be
    # shared (a list) stays its own; the policies behave as before.
    def stack(name: str) -> Policy:
        @circuit_breaker(name=name, fail_max=5)
        @retry_with_backoff(max_attempts=3, exponential_base=2)
        @with_bulkhead(limit=50)
        def call() -> int:
            return 1

        assert call() == 1
        return call.__buttress_policy__  # type: ignore[attr-defined, no-any-return]

    first, second = stack("spec-share-a"), stack("spec-share-b")
    assert first.specs[0] is not second.specs[0]  # each names its service
    assert first.specs[1] is second.specs[1]
    assert first.specs[2] is second.specs[2]
    assert first.specs[1:] == (
        Spec("retry", None, {"max_attempts": 3, "exponential_base": 2}),
        Spec("bulkhead", None, {"limit": 50}),
    )
    preset = Policy(Spec("retry", None, {"max_attempts": 3, "exponential_base": 2}, "api"))
    assert preset.specs[0] is not first.specs[1]
    listed = [Policy(Spec("fallback", None, {"value": [1]})) for _ in range(2)]
    assert listed[0].specs[0] is not listed[1].specs[0]
