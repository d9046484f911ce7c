import concurrent.futures
import copy
import importlib.util
import multiprocessing
import pickle

import pytest

import buttress
from buttress import (
    BulkheadFullError,
    CircuitOpenError,
    ConfigurationError,
    RateLimitedError,
    TimeoutExceededError,
)

EXPECTED = {
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
    "ConfigurationError",
    "DeferOptions",
    "Deferred",
    "Policy",
    "RateLimitedError",
    "RejectedError",
    "TimeoutExceededError",
    "attempt",
    "circuit_breaker",
    "get_settings",
    "health",
    "idempotency_key",
    "reload_settings",
    "remaining",
    "resilient",
    "retry_with_backoff",
    "with_adaptive_throttle",
    "with_bulkhead",
    "with_cache",
    "with_chaos",
    "with_coalescing",
    "with_fallback",
    "with_hedging",
    "with_rate_limit",
    "with_timeout",
}


def test_all_is_pinned_and_sorted():
    assert set(buttress.__all__) == EXPECTED
    assert list(buttress.__all__) == sorted(buttress.__all__)


def test_every_exported_name_exists_and_is_public():
    for name in buttress.__all__:
        member = getattr(buttress, name)
        assert not name.startswith("_")
        assert member is not None


def test_health_name_is_the_function_not_the_module():
    # One name, one thing: no module buttress.health exists to rebind the package attribute.
    import buttress.health_app

    assert importlib.util.find_spec("buttress.health") is None
    assert buttress.health is buttress.health_app.health
    assert not isinstance(buttress.health, type(buttress))
    assert callable(buttress.health_app.asgi_app)
    assert callable(buttress.health_app.wsgi_app)


def test_exception_tree():
    from buttress import (
        BulkheadFullError,
        ButtressError,
        CircuitOpenError,
        ConfigurationError,
        RateLimitedError,
        RejectedError,
        TimeoutExceededError,
    )

    assert issubclass(RejectedError, ButtressError)
    for rejected in (CircuitOpenError, BulkheadFullError, RateLimitedError):
        assert issubclass(rejected, RejectedError)
    assert issubclass(TimeoutExceededError, TimeoutError)
    assert issubclass(TimeoutExceededError, ButtressError)
    assert issubclass(ConfigurationError, ValueError)
    exc = CircuitOpenError("open", service="openfga", retry_after=3.5)
    assert (exc.service, exc.retry_after) == ("openfga", 3.5)
    timeout = TimeoutExceededError("late", service="llm", seconds=5)
    assert (timeout.service, timeout.seconds) == ("llm", 5)


def errors() -> list[Exception]:
    return [
        CircuitOpenError("circuit open", service="openfga", retry_after=3.5),
        BulkheadFullError("bulkhead full", service="db"),
        RateLimitedError("rate limited", service="llm", retry_after=0.25),
        TimeoutExceededError("too slow", service="llm", seconds=5.0),
        ConfigurationError(
            "invalid setting", errors=(("services.db.bulkhead.limit", "env", "must be > 0"),)
        ),
    ]


def attributes(exc: BaseException) -> tuple[object, ...]:
    return (type(exc), exc.args, str(exc), dict(vars(exc)))


@pytest.mark.parametrize("exc", errors(), ids=lambda e: type(e).__name__)
def test_every_error_survives_pickle_and_copy_with_its_attributes(exc):
    exc.add_note("a note the caller added")
    for clone in (
        pickle.loads(pickle.dumps(exc)),
        pickle.loads(pickle.dumps(exc, protocol=0)),
        copy.copy(exc),
        copy.deepcopy(exc),
    ):
        assert attributes(clone) == attributes(exc)
        assert clone.__notes__ == ["a note the caller added"]


def test_every_error_crosses_a_process_pool():
    # Raised in a child process, sent back pickled: a process pool used to break on them.
    raising = [
        "from buttress import CircuitOpenError as E; "
        "raise E('circuit open', service='openfga', retry_after=3.5)",
        "from buttress import BulkheadFullError as E; raise E('bulkhead full', service='db')",
        "from buttress import RateLimitedError as E; "
        "raise E('rate limited', service='llm', retry_after=0.25)",
        "from buttress import TimeoutExceededError as E; "
        "raise E('too slow', service='llm', seconds=5.0)",
        "from buttress import ConfigurationError as E; raise E('invalid setting', "
        "errors=(('services.db.bulkhead.limit', 'env', 'must be > 0'),))",
    ]
    context = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded test process
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        outcomes = [pool.submit(exec, code).exception(timeout=60) for code in raising]
        policy = buttress.resilient("payments", retry={"max_attempts": 2})
        seen_by_child = pool.submit(repr, policy).result(timeout=60)
    assert [attributes(exc) for exc in outcomes if exc is not None] == [
        attributes(exc) for exc in errors()
    ]
    assert seen_by_child == repr(policy)
