"""The public decorators: each is thin sugar over a one-pattern :class:`~buttress.Policy`.

Every argument defaults to ``None``, meaning "not set here": the value then comes from settings,
the preset, or the built-in default (see ``docs/configuration.md``). Arguments are validated when
the decorator is applied, strictly (``fail_max="5"`` or ``fail_max=True`` is refused: only settings
are read from text), so ``with_bulkhead(limit=0)`` fails at import time, naming ``limit``. A list
stands for a tuple, one exception class for a tuple of it (``config.code_arguments``).
Stacked decorators fuse into one policy (see :mod:`buttress.policy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from buttress.exceptions import ConfigurationError
from buttress.patterns import PATTERNS
from buttress.patterns._keys import KeyFunction
from buttress.patterns.chaos import ExceptionSpec
from buttress.patterns.circuit_breaker import ExcludeSpec
from buttress.patterns.fallback import MISSING, DeferOptions
from buttress.patterns.retry import RetryOn
from buttress.policy import Policy, Spec

__all__ = [
    "circuit_breaker",
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
]


# resilient() stacks every pattern in the canonical order, outermost first (design §3); chaos
# sits innermost so every other pattern meets an injected fault as it would a real one.
CANONICAL_ORDER = PATTERNS


def _given(**kwargs: Any) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if value is not None}


def _one(pattern: str, name: str | None, code_args: Mapping[str, Any]) -> Policy:
    return Policy(Spec(pattern, name, code_args))


def circuit_breaker(
    name: str | None = None,
    *,
    fail_max: int | None = None,
    timeout: float | None = None,
    reset_timeout: float | None = None,
    open_backoff: float | None = None,
    max_timeout: float | None = None,
    honor_retry_after: bool | None = None,
    success_threshold: int | None = None,
    half_open_max_calls: int | None = None,
    failure_rate_threshold: float | None = None,
    minimum_calls: int | None = None,
    window: Literal["time", "count"] | None = None,
    window_seconds: float | None = None,
    window_size: int | None = None,
    slow_call_duration: float | None = None,
    slow_call_rate_threshold: float | None = None,
    exclude: tuple[ExcludeSpec, ...] | list[ExcludeSpec] | None = None,
    failure_on_result: Callable[[Any], object] | None = None,
    count_throttled: bool | None = None,
    state_url: str | None = None,
    near_cache_ttl: float | None = None,
    min_reporters: int | None = None,
) -> Policy:
    """Stop calling a failing dependency for a while, then probe it.

    Args:
        name: the service; call sites with the same name share one breaker.
        fail_max: consecutive failures that open the circuit (default 5).
        timeout: seconds the circuit stays open (default 60); ``reset_timeout`` is an alias.
        open_backoff: each trip that follows another without a close multiplies the open time
            by this (default 1: no growth).
        max_timeout: cap on the open time (default 10 x ``timeout``).
        honor_retry_after: a failure that opens the circuit with a server's Retry-After keeps it
            open at least that long, capped by ``max_timeout`` (default True).
        success_threshold: successful half-open trials that close it (default 1).
        half_open_max_calls: concurrent trial calls while half-open (default 1).
        failure_rate_threshold: also open when this fraction of the calls in the window failed.
        minimum_calls: calls in the window before a rate counts (default 10).
        window: ``"time"`` (the last ``window_seconds``) or ``"count"`` (the last
            ``window_size`` calls) for the rates.
        window_seconds: length of the time window (default 60).
        window_size: calls in the count window (default 100).
        slow_call_duration: seconds after which a call counts as slow.
        slow_call_rate_threshold: also open when this fraction of the window's calls were slow.
        exclude: exception types or predicates that are neither success nor failure.
        failure_on_result: a predicate on the returned value: true counts the call as a failure
            (the value is still returned).
        count_throttled: count an HTTP 429 Too Many Requests as a failure (by default it is
            neither success nor failure: the dependency is up and asking callers to slow down).
        state_url: ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
            ``redis+cluster://`` URL (``valkey`` forms too) to share the circuit across processes.
        near_cache_ttl: with ``state_url``, seconds a closed (or open) state read from Redis
            decides this process's calls without asking Redis again; transitions arrive sooner
            through pub/sub (default 1; 0 asks Redis on every call).
        min_reporters: with ``state_url``, how many processes' own rate windows must trip
            before a rate-based trip opens the fleet's circuit (default 1); below it only the
            reporting process opens. A vote stands ``window_seconds``, or with
            ``window="count"`` the voter's open time (``timeout``).

    Raises:
        ConfigurationError: an argument is invalid (also a ``ValueError``).
    """
    if timeout is not None and reset_timeout is not None and timeout != reset_timeout:
        raise ConfigurationError(
            "circuit_breaker: give timeout or reset_timeout (its alias), not two different values"
        )
    return _one(
        "circuit_breaker",
        name,
        _given(
            fail_max=fail_max,
            timeout=timeout if timeout is not None else reset_timeout,
            open_backoff=open_backoff,
            max_timeout=max_timeout,
            honor_retry_after=honor_retry_after,
            success_threshold=success_threshold,
            half_open_max_calls=half_open_max_calls,
            failure_rate_threshold=failure_rate_threshold,
            minimum_calls=minimum_calls,
            window=window,
            window_seconds=window_seconds,
            window_size=window_size,
            slow_call_duration=slow_call_duration,
            slow_call_rate_threshold=slow_call_rate_threshold,
            exclude=exclude,
            failure_on_result=failure_on_result,
            count_throttled=count_throttled,
            state_url=state_url,
            near_cache_ttl=near_cache_ttl,
            min_reporters=min_reporters,
        ),
    )


def retry_with_backoff(
    name: str | None = None,
    *,
    max_attempts: int | None = None,
    initial: float | None = None,
    exponential_base: float | None = None,
    max_delay: float | None = None,
    jitter: Literal["none", "full", "equal", "decorrelated"] | None = None,
    retry_on: RetryOn | list[type[BaseException]] | type[BaseException] | None = None,
    idempotent: bool | None = None,
    respect_retry_after: bool | None = None,
    retry_rejected: bool | None = None,
    budget: Mapping[str, Any] | Literal[False] | None = None,
    retry_on_result: Callable[[Any], bool] | None = None,
) -> Policy:
    """Retry transient failures with exponential backoff and jitter.

    Args:
        name: the service (settings section and metric label).
        max_attempts: attempts including the first call (default 3).
        initial: seconds before the first retry, before jitter (default 0.1).
        exponential_base: growth factor of the delay (default 2).
        max_delay: cap on any single delay, Retry-After included (default 30).
        jitter: ``"full"`` (default), ``"equal"``, ``"decorrelated"`` or ``"none"``.
        retry_on: ``"transient"`` (default), ``"network"``, exception types, or a predicate.
        idempotent: ``True``: the call is safe to repeat. ``False``: repeat only a call that
            never reached the dependency (connection refused or timed out). Unset (default): an
            HTTP request that is not idempotent (POST, PATCH, ... without an ``Idempotency-Key``
            header) is treated as ``False``, anything else as ``True``.
        respect_retry_after: a server's ``Retry-After`` sets the next delay (default true).
        retry_rejected: retry a ``RejectedError`` carrying ``retry_after`` (default false).
        budget: the service's retry budget, ``{"ratio": 0.2, "min_per_second": 10,
            "window_seconds": 10}`` by default; ``False`` switches it off for the service
            (see ``docs/patterns/retry-budget.md``).
        retry_on_result: a predicate on the returned value: ``True`` retries the call as if it
            had failed; when no attempt is left, the last value is returned (code only).
    """
    return _one(
        "retry",
        name,
        _given(
            max_attempts=max_attempts,
            initial=initial,
            exponential_base=exponential_base,
            max_delay=max_delay,
            jitter=jitter,
            retry_on=retry_on,
            idempotent=idempotent,
            respect_retry_after=respect_retry_after,
            retry_rejected=retry_rejected,
            budget=budget,
            retry_on_result=retry_on_result,
        ),
    )


def with_timeout(name: str | None = None, *, seconds: float | None = None) -> Policy:
    """Give up on a call after ``seconds`` with ``TimeoutExceededError``.

    ``async def`` calls are cancelled. A ``def`` call runs on a worker thread that cannot be
    killed: the caller gets the error on time, and ``buttress.remaining()`` lets the function
    stop its own work early.
    """
    return _one("timeout", name, _given(seconds=seconds))


def with_bulkhead(
    name: str | None = None,
    *,
    limit: int | None = None,
    max_queue: int | None = None,
    queue_timeout: float | None = None,
    adaptive: Literal["aimd", "gradient2"] | None = None,
    min_limit: int | None = None,
    max_limit: int | None = None,
) -> Policy:
    """Allow at most ``limit`` concurrent calls; ``max_queue`` more wait up to ``queue_timeout``.

    With no ``limit`` and no ``adaptive`` (here, in settings or from a preset) the pattern is off.

    Args:
        adaptive: ``"aimd"`` or ``"gradient2"``: the limit adapts to observed latency and drops
            (timeouts, refusals), from ``limit`` (default 20) within ``min_limit`` (default 1)
            and ``max_limit`` (default 200). See ``docs/patterns/bulkhead.md``.
    """
    return _one(
        "bulkhead",
        name,
        _given(
            limit=limit,
            max_queue=max_queue,
            queue_timeout=queue_timeout,
            adaptive=adaptive,
            min_limit=min_limit,
            max_limit=max_limit,
        ),
    )


def with_hedging(
    name: str | None = None,
    *,
    delay: float | str | None = None,
    max_hedges: int | None = None,
    idempotent: bool | None = None,
) -> Policy:
    """When a call has not answered after ``delay``, send a copy; the first answer wins.

    Args:
        name: the service (settings section, metric label, and the retry budget hedges draw on).
        delay: seconds, or a percentile of the service's recent latency such as ``"p95"``.
        max_hedges: copies sent besides the call (default 1).
        idempotent: must be ``True``: a copy runs while the call is still running, so only a
            call that is safe to repeat may be hedged (refused at decoration time otherwise).

    Losing copies are cancelled (``async def``) or left to finish unobserved (``def``, whose
    copies run on worker threads). See ``docs/patterns/hedging.md``.
    """
    return _one(
        "hedging",
        name,
        _given(delay=delay, max_hedges=max_hedges, idempotent=idempotent),
    )


def with_adaptive_throttle(
    name: str | None = None,
    *,
    k: float | None = None,
    window_seconds: float | None = None,
    seed: int | None = None,
) -> Policy:
    """Refuse calls locally in proportion to how many the dependency refuses (Google SRE).

    Each call is refused here with probability ``max(0, (requests - k * accepts) /
    (requests + 1))`` over the last ``window_seconds`` (default 120), with a
    ``RejectedError``. See ``docs/patterns/adaptive-throttle.md``.

    Args:
        name: the service (settings section and metric label).
        k: calls let through per accepted call (default 2; 1.1 is stricter).
        window_seconds: the sliding window of requests and accepts.
        seed: makes the refusals repeatable (tests).
    """
    return _one(
        "adaptive_throttle",
        name,
        _given(enabled=True, k=k, window_seconds=window_seconds, seed=seed),
    )


def with_rate_limit(
    name: str | None = None,
    *,
    rate: float | None = None,
    burst: int | None = None,
    max_wait: float | None = None,
    state_url: str | None = None,
    expected_pods: int | None = None,
) -> Policy:
    """Pace calls with a token bucket: ``rate`` per second, bursts of ``burst``.

    With ``state_url`` (a Redis URL, Sentinel and Cluster forms too) the rate and burst are the
    whole fleet's; while Redis is unreachable each process takes its fair share
    (``expected_pods``, or the pods Redis counted).
    """
    given = _given(
        rate=rate,
        burst=burst,
        max_wait=max_wait,
        state_url=state_url,
        expected_pods=expected_pods,
    )
    return _one("rate_limit", name, given)


def with_fallback(
    value: Any = MISSING,
    *,
    name: str | None = None,
    handler: Callable[..., Any] | None = None,
    chain: tuple[Callable[..., Any], ...] | list[Callable[..., Any]] | None = None,
    cache_ttl: float | None = None,
    defer: bool | DeferOptions | None = None,
    on: tuple[type[BaseException], ...]
    | list[type[BaseException]]
    | type[BaseException]
    | Callable[[BaseException], bool]
    | None = None,
) -> Policy:
    """Answer with something useful when the call fails with one of the ``on`` exceptions.

    Args:
        value: returned instead of the failure.
        name: the service (settings section and metric label).
        handler: called as ``handler(exc, *args, **kwargs)``; its result is returned.
        chain: handlers tried in order until one succeeds.
        cache_ttl: serve the last good result for the same arguments within this many seconds.
        defer: queue a rejected call (circuit open, rate limited, bulkhead full) and answer with
            a :class:`~buttress.patterns.fallback.Deferred` handle; the call is replayed when
            the dependency takes calls again. ``True``, or :class:`DeferOptions` for its bounds
            and an optional Redis stream.
        on: exceptions (types or a predicate) that trigger it; default ``ButtressError`` and
            transient errors.
    """
    code_args = _given(
        handler=handler,
        chain=chain,
        cache_ttl=cache_ttl,
        defer=defer,
        on=on,
    )
    if value is not MISSING:
        code_args["value"] = value
    if not code_args.keys() & {"value", "handler", "chain", "cache_ttl", "defer"}:
        raise TypeError("with_fallback needs a value, a handler, a chain, a cache_ttl or defer")
    return _one("fallback", name, code_args)


def with_cache(
    name: str | None = None,
    *,
    ttl: float,
    stale_ttl: float | None = None,
    max_entries: int | None = None,
    key: KeyFunction | None = None,
) -> Policy:
    """Answer identical calls from a recent result without calling (read-through).

    Args:
        name: the service (settings section and metric label).
        ttl: seconds a result answers identical calls.
        stale_ttl: seconds past ``ttl`` a result may still answer a call that failed with one
            of buttress's errors (open circuit, timeout...) or a transient error; ``None``: never.
        max_entries: results kept (default 1024), the least recently used dropped first.
        key: ``key(*args, **kwargs)`` returning what makes two calls the same (default: the
            arguments; see docs/patterns/cache.md for the rule).
    """
    return _one(
        "cache",
        name,
        _given(ttl=ttl, stale_ttl=stale_ttl, max_entries=max_entries, key=key),
    )


def with_coalescing(name: str | None = None, *, key: KeyFunction | None = None) -> Policy:
    """Identical concurrent calls share one run and its result or error (single-flight).

    Args:
        name: the service (settings section and metric label).
        key: ``key(*args, **kwargs)`` returning what makes two calls the same (default: the
            arguments; see docs/patterns/coalescing.md for the rule).
    """
    return _one("coalescing", name, _given(enabled=True, key=key))


def with_chaos(
    name: str | None = None,
    *,
    enabled: bool | None = None,
    exception_rate: float | None = None,
    exception: ExceptionSpec | None = None,
    latency_rate: float | None = None,
    latency_seconds: float | None = None,
    result_rate: float | None = None,
    result: Any = None,
    seed: int | None = None,
) -> Policy:
    """Inject faults on purpose: exceptions, latency and wrong results, each at a rate.

    Off unless both this pattern is ``enabled`` (here or in ``services.<name>.chaos``) and the
    process armed it with ``FF_ENABLE_CHAOS_INJECTION=true``. See ``docs/chaos.md``.

    Args:
        name: the service (settings section and metric label).
        enabled: inject for this call site (default false).
        exception_rate: fraction of calls that raise ``exception`` instead of running.
        exception: exception class or zero-argument factory (default ``InjectedConnectionError``).
        latency_rate: fraction of calls delayed by ``latency_seconds`` first.
        latency_seconds: the added delay (default 1).
        result_rate: fraction of calls answered with ``result`` instead of running.
        result: the wrong answer (``None`` unless given).
        seed: seed of the draws: the same seed gives the same faults.
    """
    code_args = _given(
        enabled=enabled,
        exception_rate=exception_rate,
        exception=exception,
        latency_rate=latency_rate,
        latency_seconds=latency_seconds,
        result_rate=result_rate,
        seed=seed,
    )
    if result is not None:
        code_args["result"] = result
    return _one("chaos", name, code_args)


def resilient(
    name: str,
    *,
    preset: Literal["api", "ai", "database", "external", "critical"] | None = None,
    fallback: Mapping[str, Any] | None = None,
    cache: Mapping[str, Any] | None = None,
    coalescing: Mapping[str, Any] | None = None,
    retry: Mapping[str, Any] | None = None,
    hedging: Mapping[str, Any] | None = None,
    circuit_breaker: Mapping[str, Any] | None = None,
    adaptive_throttle: Mapping[str, Any] | None = None,
    rate_limit: Mapping[str, Any] | None = None,
    timeout: Mapping[str, Any] | None = None,
    bulkhead: Mapping[str, Any] | None = None,
    chaos: Mapping[str, Any] | None = None,
) -> Policy:
    """The whole stack for service ``name``, from settings, in the canonical order.

    fallback → cache → coalescing → retry → hedging → circuit breaker → adaptive throttle → rate
    limit → timeout (per attempt) → bulkhead → chaos → call.
    ``name`` is case-insensitive: ``"OpenFGA"`` and ``"openfga"`` are one service, ``openfga``.
    Each mapping gives code defaults for one pattern that settings may override; ``preset``
    names a set of defaults. Cache, coalescing, hedging, adaptive throttle, bulkhead, rate limit,
    fallback and chaos act only when configured (a ``ttl``, coalescing enabled, a ``delay``, the
    throttle enabled, a ``limit`` or ``adaptive``, a ``rate``, something to fall back to, chaos
    enabled and armed).
    """
    service: object = name  # checked at run time for untyped callers
    if not isinstance(service, str) or service == "":
        raise TypeError(f"resilient() needs a service name, got {name!r}")
    given = {
        "fallback": fallback,
        "cache": cache,
        "coalescing": coalescing,
        "retry": retry,
        "hedging": hedging,
        "circuit_breaker": circuit_breaker,
        "adaptive_throttle": adaptive_throttle,
        "rate_limit": rate_limit,
        "timeout": timeout,
        "bulkhead": bulkhead,
        "chaos": chaos,
    }
    return Policy(
        *(Spec(pattern, name, dict(given[pattern] or {}), preset) for pattern in CANONICAL_ORDER)
    )
