import buttress

EXPECTED = {
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
    "ConfigurationError",
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
    "with_bulkhead",
    "with_chaos",
    "with_fallback",
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
    import buttress.health

    assert callable(buttress.health)
    assert not isinstance(buttress.health, type(buttress))


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
