"""Running a call under a deadline: the worker pool of sync timeouts and the timer of async ones.

Beside ``_clock``: what the drivers in :mod:`buttress.policy` use to perform "run under a
deadline". A ``def`` call cannot be interrupted safely from outside, so it runs on a worker thread
of a small daemon pool while the caller waits for at most the time limit; when the limit passes
the caller gets :class:`~buttress.TimeoutExceededError` and the worker is *abandoned*: left to
finish on its own, counted, and reported when it does. Each service may hold at most a quarter of
the pool's threads, so one hung dependency cannot starve the sync timeouts of the others. An
``async def`` call is cancelled by a timer on its event loop (:class:`Expiry`).

Patterns ask it two things after a wait of their own (a bulkhead slot, a rate-limit token):
whether the caller of the sync timeout running them has given up (:func:`caller_gave_up`), and for
the error of a call that never started (:func:`not_started`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypedDict

from buttress import _clock, events
from buttress.exceptions import TimeoutExceededError

__all__ = [
    "ABANDONED",
    "DETAILS",
    "DONE",
    "MAX_WORKERS",
    "MAX_WORKERS_PER_SERVICE",
    "POOL",
    "Expiry",
    "Job",
    "NotStartedError",
    "WorkerPool",
    "WorkerPoolSnapshot",
    "caller_gave_up",
    "not_started",
    "worker",
    "worker_pool_snapshot",
]

# A step of a policy's chain (as in buttress.patterns._base, which this leaf does not import).
Call = Callable[[tuple[Any, ...], dict[str, Any]], Any]

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
_PENDING, _RUNNING, DONE, _DROPPED, ABANDONED, _LATE, _PARKED = range(7)


class Job:
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
        self.parent: Job | None = None
        # Whether it holds a place in its service's share of the pool (see WorkerPool).
        self.counted = False


class _Worker(threading.local):
    """What a worker thread is running (see ``caller_gave_up``).

    A thread attribute rather than a context variable: setting it costs no extra frame on the
    call path, and the context (which the job keeps) never points back at the job.
    """

    job: Job | None = None


worker = _Worker()


def caller_gave_up() -> bool:
    """Whether the caller of the sync ``with_timeout`` running this code has stopped waiting.

    Patterns that make a call wait (bulkhead slot, rate-limit token) ask it once the wait is
    over, on the thread that waited: an abandoned call must not start. Always ``False`` outside
    a sync timeout's worker thread.
    """
    job = worker.job
    while job is not None:
        if job.state == ABANDONED:
            return True
        job = job.parent
    return False


class NotStartedError(TimeoutExceededError):
    """A wait for capacity ended at the deadline, or after the caller gave up: never started.

    The enclosing ``with_timeout`` reports it as its own timeout (its service, its limit, its
    events), so a caller sees the same error whichever of the two noticed the deadline first.
    """


def not_started(service: str, seconds: float, waiting_for: str) -> TimeoutExceededError:
    """The error of a call that waited for ``waiting_for`` until its deadline, and never ran."""
    return NotStartedError(
        f"call to {service!r} was not started: its deadline passed (or its caller gave up) "
        f"while it waited for {waiting_for}",
        service=service,
        seconds=max(seconds, 0.0),
    )


class WorkerPool:
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
        self._names = itertools.count(1)
        self._empty()
        # A forked child has none of the parent's threads, only their bookkeeping: idle workers
        # that would never take its jobs. It starts with an empty pool (held weakly: a test's
        # throwaway pool may go).
        reset = weakref.WeakMethod(self._empty)
        os.register_at_fork(after_in_child=functools.partial(_forked, reset))

    def _empty(self) -> None:
        """No thread, no job (a new pool, or the child of a fork)."""
        # A new lock too: another thread of the parent may have held the old one at the fork.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._jobs: deque[Job] = deque()
        self._threads = 0
        self._idle = 0
        # (The parent's abandoned workers do not run in a child: none holds its service's share.)
        self._abandoned: dict[str, int] = {}
        # Per service: its jobs in ``_jobs``, running or abandoned (at most ``per_service``) ...
        self._held: dict[str, int] = {}
        # ... and its jobs waiting for one of those to end, oldest first.
        self._parked: dict[str, deque[Job]] = {}

    def submit(self, job: Job) -> bool:
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

    def _queue(self, job: Job) -> bool:
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

    def _leave(self, job: Job) -> Job | None:
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

    def settle(self, job: Job) -> int:
        """Decide the fate of ``job`` once its caller stops waiting; return its state.

        ``DONE`` only if it finished by its deadline. A job that finished later is still late, even
        if the caller looked after it ended: the verdict depends on when it finished, never on when
        the caller happened to look. ``DROPPED`` and ``PARKED``: it never ran, and never will
        (``PARKED``: it was waiting for a thread of its service's share).
        """
        spawn = False
        with self._lock:
            state = job.state
            if state == DONE:
                return DONE if job.finished_at <= job.deadline else _LATE
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
                job.state = ABANDONED
                count = self._abandoned.get(job.service, 0) + 1
                self._abandoned[job.service] = count
        if state == _PENDING:
            if spawn:
                self._spawn()
            return _DROPPED
        handlers = events.ROUTES.get(events.WorkerAbandoned)
        if handlers:
            events.dispatch(handlers, events.WorkerAbandoned(job.service, count))
        return ABANDONED

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

    def _take(self, job: Job) -> Job | None:
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

    def _run(self, job: Job) -> None:
        worker.job = job
        try:
            job.result = job.context.run(job.call, job.args, job.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread and re-raised there
            job.error = exc
        worker.job = None
        finished_at = _clock.monotonic()
        with self._lock:
            abandoned = job.state == ABANDONED
            job.state = DONE
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


def _forked(empty: weakref.WeakMethod[Callable[[], None]]) -> None:
    method = empty()
    if method is not None:
        method()


POOL = WorkerPool(MAX_WORKERS, per_service=MAX_WORKERS_PER_SERVICE)


def worker_pool_snapshot() -> WorkerPoolSnapshot:
    """Threads, idle threads, calls waiting for a worker, and abandoned workers per service."""
    return POOL.snapshot()


DETAILS: Final = {
    _DROPPED: " (no worker thread was free in time)",
    _PARKED: " (no worker thread of its service's share was free in time)",
}


class Expiry:
    """The deadline of one async call: cancels its task when it fires.

    Made per call as ``Expiry()`` and given its ``task``: no ``__init__`` frame on every call;
    ``fired`` reads the class's ``False`` until it fires.
    """

    fired = False
    task: asyncio.Task[Any]

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()
