"""Timeout: give up on a call that takes too long (async: cancelled; sync: abandoned, counted).

An ``async def`` call is cancelled when its time is up, by a timer on its event loop (through
``_clock.call_later``), with the bookkeeping of ``asyncio.timeout`` done inline: it costs half as
much, and the deadline is paid on every call.

A ``def`` call cannot be interrupted safely from outside, so it runs on a worker thread of a
small daemon pool while the caller waits for at most the time limit; when the limit passes the
caller gets :class:`~buttress.TimeoutExceededError` and the worker is *abandoned*: left to finish
on its own, counted, and reported when it does. Each service may hold at most a quarter of the
pool's threads, so one hung dependency cannot starve the sync timeouts of the others.

Both publish the call's deadline (``buttress.remaining()``), the tighter of the enclosing deadline
and ``now + seconds``, so cooperative code can pass it down as an I/O timeout, and a nested timeout
or a retry never waits past it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
from collections import deque
from typing import Any, ClassVar, Final, TypedDict

from pydantic import Field

from buttress import _clock, _context, events
from buttress._values import PositiveSeconds
from buttress.exceptions import TimeoutExceededError
from buttress.patterns._base import AsyncCall, BuildContext, Call, Mode, Options, Strategy

__all__ = [
    "MAX_WORKERS",
    "MAX_WORKERS_PER_SERVICE",
    "PATTERN",
    "TimeoutOptions",
    "TimeoutStrategy",
    "WorkerPoolSnapshot",
    "build",
    "caller_gave_up",
    "not_started",
    "worker_pool_snapshot",
]

PATTERN = "timeout"

# Process-wide cap on worker threads for sync timeouts. Abandoned work keeps its thread until it
# ends, so the cap is what stops a hung dependency from growing threads without bound; past it a
# call waits (within its own deadline) for a worker to free up. See docs/patterns/timeout.md.
MAX_WORKERS: Final = 256

# The share of one service: worker threads it may hold at once (serving callers, abandoned, or
# queued for a thread). A hung dependency holds at most this many; its further calls wait for one
# of its own workers within their deadline, or fail at once when all of them are abandoned. A
# quarter, so that even three hung services leave a quarter of the pool to everybody else.
MAX_WORKERS_PER_SERVICE: Final = MAX_WORKERS // 4

# An idle worker thread exits after this long (real time: thread housekeeping, not a duration any
# caller observes, so it deliberately bypasses the fakeable clock).
_IDLE_SECONDS: Final = 30.0


class TimeoutOptions(Options):
    """Options of ``with_timeout`` (and of ``services.<name>.timeout``)."""

    enabled: bool = True
    seconds: PositiveSeconds = Field(30.0, description="time limit of one attempt")


class WorkerPoolSnapshot(TypedDict):
    """The sync-timeout worker pool at one instant."""

    threads: int  # worker threads alive
    idle: int  # of which waiting for work
    pending: int  # calls waiting for a free worker (or for one of their service's share)
    abandoned: dict[str, int]  # per service: workers still running after their caller gave up


# --- the worker pool of sync timeouts -------------------------------------------------------------

# Job states. A job moves PENDING -> RUNNING -> DONE; the caller may give up on it first, turning
# PENDING into DROPPED (removed from the queue, never runs) or RUNNING into ABANDONED (it finishes
# unobserved). A job whose service already holds its share of the pool starts PARKED, in its
# service's own line, and becomes PENDING when one of the service's workers frees up. A worker
# that takes a job at or after its deadline drops it instead of running it. LATE is only a
# verdict: the job is DONE, but finished after its deadline.
_PENDING, _RUNNING, _DONE, _DROPPED, _ABANDONED, _LATE, _PARKED = range(7)


class _Job:
    __slots__ = (
        "args",
        "call",
        "context",
        "counted",
        "deadline",
        "done",
        "error",
        "finished_at",
        "kwargs",
        "parent",
        "result",
        "service",
        "state",
    )

    def __init__(
        self,
        call: Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        context: contextvars.Context,
        service: str,
        deadline: float,
    ) -> None:
        self.call = call
        self.args = args
        self.kwargs = kwargs
        self.context = context
        self.service = service
        self.deadline = deadline
        self.done = threading.Event()
        self.state = _PENDING
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        # The job whose worker submitted this one (nested sync timeouts): its caller giving up
        # means nobody waits for this one either.
        self.parent: _Job | None = None
        # Whether it holds a place in its service's share of the pool (see _WorkerPool).
        self.counted = False


_deadline = _context.deadline


class _Worker(threading.local):
    """What a worker thread is running (see ``caller_gave_up``).

    A thread attribute rather than a context variable: setting it costs no extra frame on the
    call path, and the context (which the job keeps) never points back at the job.
    """

    job: _Job | None = None


_worker = _Worker()


def caller_gave_up() -> bool:
    """Whether the caller of the sync ``with_timeout`` running this code has stopped waiting.

    Patterns that make a call wait (bulkhead slot, rate-limit token) ask it once the wait is
    over, on the thread that waited: an abandoned call must not start. Always ``False`` outside
    a sync timeout's worker thread.
    """
    job = _worker.job
    while job is not None:
        if job.state == _ABANDONED:
            return True
        job = job.parent
    return False


class _NotStartedError(TimeoutExceededError):
    """A wait for capacity ended at the deadline, or after the caller gave up: never started.

    The enclosing ``with_timeout`` reports it as its own timeout (its service, its limit, its
    events), so a caller sees the same error whichever of the two noticed the deadline first.
    """


def not_started(service: str, seconds: float, waiting_for: str) -> TimeoutExceededError:
    """The error of a call that waited for ``waiting_for`` until its deadline, and never ran."""
    return _NotStartedError(
        f"call to {service!r} was not started: its deadline passed (or its caller gave up) "
        f"while it waited for {waiting_for}",
        service=service,
        seconds=max(seconds, 0.0),
    )


class _WorkerPool:
    """Daemon worker threads, started on demand up to ``max_workers``, retired when idle.

    Not a ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one abandoned call
    stuck in I/O would keep the process from exiting.

    Each service may hold ``per_service`` of the threads at once (a quarter of them unless told):
    its jobs queued for a thread, running, or abandoned. Past that its jobs wait in a line of their
    own for one of its workers to free up, so the FIFO queue of runnable jobs never fills with one
    service's calls; and when every job it holds is abandoned (its dependency hangs), its new jobs
    are refused at once.
    """

    def __init__(
        self,
        max_workers: int,
        idle_seconds: float = _IDLE_SECONDS,
        per_service: int | None = None,
    ) -> None:
        self._max_workers = max_workers
        self.per_service = max(1, max_workers // 4) if per_service is None else per_service
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._jobs: deque[_Job] = deque()
        self._threads = 0
        self._idle = 0
        self._abandoned: dict[str, int] = {}
        # Per service: its jobs in ``_jobs``, running or abandoned (at most ``per_service``) ...
        self._held: dict[str, int] = {}
        # ... and its jobs waiting for one of those to end, oldest first.
        self._parked: dict[str, deque[_Job]] = {}
        self._names = itertools.count(1)

    def submit(self, job: _Job) -> bool:
        """Queue ``job`` for a worker; ``False``: refused, its service's share is all abandoned."""
        service = job.service
        parent = job.parent
        if parent is not None and parent.service == service:
            # A nested timeout of the same service, submitted by a worker that blocks until it
            # ends: it runs in its parent's place. Waiting for the share here could deadlock, with
            # every place held by parents waiting for children.
            with self._lock:
                spawn = self._queue(job)
            if spawn:
                self._spawn()
            return True
        with self._lock:
            held = self._held.get(service, 0)
            if held >= self.per_service:
                if self._abandoned.get(service, 0) >= held:
                    return False
                job.state = _PARKED
                line = self._parked.get(service)
                if line is None:
                    line = self._parked[service] = deque()
                line.append(job)
                return True
            self._held[service] = held + 1
            job.counted = True
            spawn = self._queue(job)
        if spawn:
            self._spawn()
        return True

    def _queue(self, job: _Job) -> bool:
        """Append ``job`` for the workers (lock held); return whether a thread must be started."""
        self._jobs.append(job)
        if len(self._jobs) > self._idle and self._threads < self._max_workers:
            self._threads += 1
            return True
        self._work.notify()
        return False

    def _spawn(self) -> None:
        name = f"buttress-timeout-{next(self._names)}"
        try:
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        except RuntimeError:
            # The process is out of threads. The job stays queued for a busy worker; if none
            # frees up before the deadline, the caller times out without the call starting.
            with self._lock:
                self._threads -= 1

    def _leave(self, job: _Job) -> _Job | None:
        """``job`` ended or was dropped (lock held): its place in the share goes on.

        The oldest parked job of its service takes the place (returned, PENDING, for the caller
        to queue); else the service holds one thread fewer.
        """
        if not job.counted:
            return None
        service = job.service
        line = self._parked.get(service)
        if line:
            promoted = line.popleft()
            if not line:
                del self._parked[service]
            promoted.state = _PENDING
            promoted.counted = True
            return promoted
        held = self._held[service] - 1
        if held:
            self._held[service] = held
        else:
            del self._held[service]
        return None

    def settle(self, job: _Job) -> int:
        """Decide the fate of ``job`` once its caller stops waiting; return its state.

        ``DONE`` only if it finished by its deadline. A job that finished later is still late, even
        if the caller looked after it ended: the verdict depends on when it finished, never on when
        the caller happened to look. ``DROPPED`` and ``PARKED``: it never ran, and never will
        (``PARKED``: it was waiting for a thread of its service's share).
        """
        spawn = False
        with self._lock:
            state = job.state
            if state == _DONE:
                return _DONE if job.finished_at <= job.deadline else _LATE
            if state == _DROPPED:  # a worker took it at its deadline and dropped it
                return _DROPPED
            if state == _PARKED:
                job.state = _DROPPED
                line = self._parked[job.service]
                line.remove(job)
                if not line:
                    del self._parked[job.service]
                return _PARKED
            if state == _PENDING:
                job.state = _DROPPED
                self._jobs.remove(job)
                promoted = self._leave(job)
                spawn = promoted is not None and self._queue(promoted)
            else:
                job.state = _ABANDONED
                count = self._abandoned.get(job.service, 0) + 1
                self._abandoned[job.service] = count
        if state == _PENDING:
            if spawn:
                self._spawn()
            return _DROPPED
        handlers = events.ROUTES.get(events.WorkerAbandoned)
        if handlers:
            events.dispatch(handlers, events.WorkerAbandoned(job.service, count))
        return _ABANDONED

    def snapshot(self) -> WorkerPoolSnapshot:
        with self._lock:
            return WorkerPoolSnapshot(
                threads=self._threads,
                idle=self._idle,
                pending=len(self._jobs) + sum(len(line) for line in self._parked.values()),
                abandoned={service: n for service, n in self._abandoned.items() if n},
            )

    def _serve(self) -> None:
        while True:
            with self._lock:
                job = None
                while job is None:
                    while not self._jobs:
                        self._idle += 1
                        woken = self._work.wait(self._idle_seconds)
                        self._idle -= 1
                        if not woken and not self._jobs:
                            self._threads -= 1
                            return
                    job = self._take(self._jobs.popleft())
            self._run(job)

    def _take(self, job: _Job) -> _Job | None:
        """Start ``job`` on this worker (lock held), or drop it if its deadline has come.

        Its caller is giving up on it in this very instant (its wait ends at the deadline): a call
        that started now would run with nobody waiting for it.
        """
        if job.deadline > _clock.monotonic():
            job.state = _RUNNING
            return job
        job.state = _DROPPED
        promoted = self._leave(job)
        if promoted is not None:
            self._jobs.append(promoted)  # this worker is about to look for the next job itself
        job.done.set()
        return None

    def _run(self, job: _Job) -> None:
        _worker.job = job
        try:
            job.result = job.context.run(job.call, job.args, job.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread and re-raised there
            job.error = exc
        _worker.job = None
        finished_at = _clock.monotonic()
        with self._lock:
            abandoned = job.state == _ABANDONED
            job.state = _DONE
            job.finished_at = finished_at
            if abandoned:
                count = self._abandoned[job.service] - 1
                self._abandoned[job.service] = count
            promoted = self._leave(job)
            if promoted is not None:
                # The service's place goes to its oldest waiting job; this worker, about to look
                # for its next job, serves the queue, so nobody needs waking.
                self._jobs.append(promoted)
        job.done.set()
        if abandoned:
            # Nobody will read the outcome; drop it so a large result or a traceback is not kept.
            job.result = job.error = None
            handlers = events.ROUTES.get(events.WorkerFinishedLate)
            if handlers:
                overran = finished_at - job.deadline
                events.dispatch(handlers, events.WorkerFinishedLate(job.service, count, overran))


_POOL = _WorkerPool(MAX_WORKERS, per_service=MAX_WORKERS_PER_SERVICE)


def worker_pool_snapshot() -> WorkerPoolSnapshot:
    """Threads, idle threads, calls waiting for a worker, and abandoned workers per service."""
    return _POOL.snapshot()


# --- the strategy ---------------------------------------------------------------------------------


class TimeoutStrategy:
    """``with_timeout`` for one call site: ``seconds`` per call, within any enclosing deadline."""

    pattern: ClassVar[str] = PATTERN

    def __init__(self, service: str, seconds: float, mode: Mode = "enforce") -> None:
        self.service = service
        self.seconds = seconds
        self.mode = mode

    def _limit(self, start: float) -> float:
        """Seconds this call may take: ``seconds``, or less when an enclosing deadline is nearer."""
        enclosing = _deadline.get()
        if enclosing is not None and enclosing - start < self.seconds:
            return enclosing - start
        return self.seconds

    def _exceeded(self, limit: float, elapsed: float, detail: str = "") -> TimeoutExceededError:
        handlers = events.ROUTES.get(events.TimeoutExceeded)
        if handlers:
            events.dispatch(handlers, events.TimeoutExceeded(self.service, limit, elapsed))
        return TimeoutExceededError(
            f"call to {self.service!r} did not finish within {max(limit, 0.0):g} s{detail}",
            service=self.service,
            seconds=max(limit, 0.0),
        )

    def _finished(self, elapsed: float, timed_out: bool) -> None:
        handlers = events.ROUTES.get(events.TimedCallFinished)
        if handlers:
            events.dispatch(handlers, events.TimedCallFinished(self.service, elapsed, timed_out))

    def _shadow(self, limit: float, elapsed: float) -> None:
        if elapsed > limit:
            handlers = events.ROUTES.get(events.ShadowDecision)
            if handlers:
                events.dispatch(handlers, events.ShadowDecision(self.service, PATTERN, "timeout"))
        self._finished(elapsed, timed_out=False)

    # -- sync ------------------------------------------------------------------------------------
    def wrap(self, call: Call) -> Call:
        if self.mode == "shadow":
            return self._wrap_shadow(call)
        service = self.service
        pool = _POOL
        refused = (
            f" (not started: all {pool.per_service} worker threads {service!r} may hold are "
            "still running calls abandoned at their deadline)"
        )

        def timed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            start = _clock.monotonic()
            limit = self._limit(start)
            if limit <= 0:
                self._finished(0.0, timed_out=True)
                raise self._exceeded(limit, 0.0, " (the enclosing deadline had already passed)")
            deadline = start + limit
            # The worker runs in a copy of the caller's context so retry attempt numbers, the
            # idempotency key and this deadline are visible there; the caller's own is untouched.
            context = contextvars.copy_context()
            context.run(_deadline.set, deadline)
            job = _Job(call, args, kwargs, context=context, service=service, deadline=deadline)
            job.parent = _worker.job
            if not pool.submit(job):
                self._finished(0.0, timed_out=True)
                raise self._exceeded(limit, 0.0, refused)
            try:
                wait = deadline - _clock.monotonic()
                if wait > 0:
                    _clock.wait(job.done, wait)
            except BaseException:
                pool.settle(job)  # interrupted (KeyboardInterrupt): the worker is abandoned too
                raise
            state = pool.settle(job)
            if state == _DONE:
                error = job.error
                if error is None:
                    self._finished(job.finished_at - start, timed_out=False)
                    return job.result
                if type(error) is not _NotStartedError:
                    self._finished(job.finished_at - start, timed_out=False)
                    try:
                        raise error
                    finally:
                        del error, job  # break the frame <-> traceback cycle
                # It waited inside (for a bulkhead slot) until this very deadline: our timeout.
            elapsed = _clock.monotonic() - start
            self._finished(elapsed, timed_out=True)
            raise self._exceeded(limit, elapsed, _DETAILS.get(state, ""))

        return timed

    def _wrap_shadow(self, call: Call) -> Call:
        def observed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            start = _clock.monotonic()
            limit = self._limit(start)
            try:
                return call(args, kwargs)
            finally:
                self._shadow(limit, _clock.monotonic() - start)

        return observed

    # -- async -----------------------------------------------------------------------------------
    def awrap(self, call: AsyncCall) -> AsyncCall:
        if self.mode == "shadow":
            return self._awrap_shadow(call)

        async def timed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            start = _clock.monotonic()
            limit = self._limit(start)
            if limit <= 0:
                self._finished(0.0, timed_out=True)
                raise self._exceeded(limit, 0.0, " (the enclosing deadline had already passed)")
            task = asyncio.current_task()
            if task is None:  # pragma: no cover - awaited outside a task: nothing to cancel
                raise RuntimeError("with_timeout needs to run inside an asyncio task")
            # What asyncio.timeout does, inline: cancel the task at the deadline, then tell that
            # cancellation (ours) from one requested by anybody else (theirs: it propagates).
            cancelling = task.cancelling()
            expiry = _Expiry(task)
            handle = _clock.call_later(limit, expiry.fire)
            token = _deadline.set(start + limit)
            timed_out = False
            try:
                return await call(args, kwargs)
            except asyncio.CancelledError as exc:
                if expiry.fired:
                    expiry.fired = False
                    if task.uncancel() <= cancelling:
                        timed_out = True
                        raise self._exceeded(limit, _clock.monotonic() - start) from exc
                raise
            except _NotStartedError as exc:
                # A wait inside (for a bulkhead slot) saw this deadline pass before our timer did:
                # the same timeout, reported once, by this scope, as if the timer had fired.
                timed_out = True
                raise self._exceeded(limit, _clock.monotonic() - start) from exc
            finally:
                handle.cancel()
                if expiry.fired:
                    # The deadline passed, but the call ended without seeing the cancellation:
                    # withdraw it so it does not hit the caller's next await.
                    task.uncancel()
                _deadline.reset(token)
                self._finished(_clock.monotonic() - start, timed_out)

        return timed

    def _awrap_shadow(self, call: AsyncCall) -> AsyncCall:
        async def observed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            start = _clock.monotonic()
            limit = self._limit(start)
            try:
                return await call(args, kwargs)
            finally:
                self._shadow(limit, _clock.monotonic() - start)

        return observed


_DETAILS: Final = {
    _DROPPED: " (no worker thread was free in time)",
    _PARKED: " (no worker thread of its service's share was free in time)",
}


class _Expiry:
    """The deadline of one async call: cancels its task when it fires."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


def build(ctx: BuildContext) -> Strategy | None:
    """A :class:`TimeoutStrategy` from ``ctx.options`` (a :class:`TimeoutOptions`)."""
    options: TimeoutOptions = ctx.options
    if not options.enabled:
        return None
    return TimeoutStrategy(ctx.service, options.seconds, ctx.mode)
