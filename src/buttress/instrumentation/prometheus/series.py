"""Series: where the values of the catalog's families live, bound once per label set.

In a single process, counters and histograms are this module's own series (:class:`LocalFamilies`,
read by the collector at scrape time); in multiprocess mode they are ``prometheus_client``
metrics, whose values live in files (:func:`create`, :func:`children`). Either way a handler
finds a ready, bound ``inc``/``observe``/``set`` by a dict lookup: never ``.labels()`` per call.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from bisect import bisect_left
from collections.abc import Callable
from threading import get_ident
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from buttress.instrumentation.prometheus.catalog import CATALOG, FAMILIES, Family

__all__ = [
    "DEFAULT_MAX_SERVICES",
    "OTHER_SERVICE",
    "CounterSeries",
    "HistogramSeries",
    "Inc",
    "Lazy",
    "LocalFamilies",
    "Observe",
    "ServiceLabels",
    "ServiceSeries",
    "children",
    "create",
    "label_values",
    "layout",
    "multiprocess_mode",
]

Inc = Callable[[], object]
Observe = Callable[[float], None]

# The cardinality guard: the services that get a ``service`` label of their own, in the order they
# are first seen; later ones share OTHER_SERVICE. It bounds a scrape (and the process's series)
# however many services a process names; see docs/metrics.md.
DEFAULT_MAX_SERVICES = 500
OTHER_SERVICE = "_other"


class ServiceLabels:
    """The ``service`` label value of each service, fixed the first time the service is seen.

    The first ``limit`` services keep their name; every later one is ``_other`` (``None``: no
    limit). Looked up when a series is bound (once per service and label set), never per call.
    """

    __slots__ = ("_labels", "_limit", "_lock", "_named")

    def __init__(self, limit: int | None = DEFAULT_MAX_SERVICES) -> None:
        self._labels: dict[str, str] = {}
        self._lock = threading.Lock()
        self._named = 0
        self._limit: int | None = None
        self.limit = limit

    @property
    def limit(self) -> int | None:
        """How many services keep their name (``None``: all). Raising it names the services seen
        from then on; those already counted under ``_other`` stay there."""
        return self._limit

    @limit.setter
    def limit(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise ValueError(f"max_services must be at least 1 (or None), got {limit!r}")
        self._limit = limit

    def __call__(self, service: str) -> str:
        label = self._labels.get(service)
        if label is not None:
            return label
        with self._lock:
            label = self._labels.get(service)
            if label is None:
                if self._limit is None or self._named < self._limit:
                    label = service
                    self._named += 1
                else:
                    label = OTHER_SERVICE
                self._labels[service] = label
            return label

    def labels(self, family: Family, values: tuple[str, ...]) -> tuple[str, ...]:
        """``values`` of ``family`` with the service replaced by its label (if it has one)."""
        if family.labels[:1] == ("service",):
            return (self(values[0]), *values[1:])
        return values


def multiprocess_mode() -> bool:
    """Whether ``prometheus_client`` keeps values in files (``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def create(family: Family, registry: CollectorRegistry | None) -> Any:
    if family.kind == "counter":
        return Counter(family.name, family.help, family.labels, registry=registry)
    if family.kind == "histogram":
        return Histogram(
            family.name, family.help, family.labels, registry=registry, buckets=family.buckets or ()
        )
    return Gauge(
        family.name,
        family.help,
        family.labels,
        registry=registry,
        multiprocess_mode=family.multiprocess_mode or "all",  # type: ignore[arg-type]
    )


K = TypeVar("K")
V = TypeVar("V")


class Lazy(dict[K, V], Generic[K, V]):
    """A dict that builds a missing entry with ``factory(key)``.

    Two threads may both build the same entry; ``setdefault`` keeps the first, and the loser only
    bound the same series again (both kinds of series store hand out one object per label set).
    """

    __slots__ = ("_factory",)

    def __init__(self, factory: Callable[[K], V]) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, key: K) -> V:
        return self.setdefault(key, self._factory(key))


class ServiceSeries(dict[str, "HistogramSeries"]):
    """One service's series of a histogram family by their last label (a call's outcome), each
    made at its first use: what a ``Lazy`` with a closure over the three would do, in one object.

    The success series is found, never kept here: it is looked up only by the functions that
    bind it (and keep it), where every other outcome is looked up here on its calls. A service
    that only ever succeeded keeps an empty dict (no table: ≈ 120 bytes less).
    """

    __slots__ = ("family", "local", "service")

    def __init__(self, local: LocalFamilies, family: Family, service: str) -> None:
        super().__init__()
        self.local = local
        self.family = family
        self.service = service

    def __missing__(self, key: str) -> HistogramSeries:
        # child() hands out one series per label set, so a success looked up again is the same.
        series: HistogramSeries = self.local.child(self.family, (self.service, key))
        if key == "success":
            return series
        return self.setdefault(key, series)


def children(
    metric: Any, method: str | None, family: Family, service_labels: ServiceLabels
) -> Lazy[Any, Any]:
    """Children of ``metric`` by label values (a tuple, or one string), or their ``method``."""

    def bind(labels: Any) -> Any:
        values = service_labels.labels(family, labels if isinstance(labels, tuple) else (labels,))
        child = metric.labels(*values)
        return child if method is None else getattr(child, method)

    return Lazy(bind)


# Reads of the series (scrapes) are serialised; writes (calls) never wait for anything.
_read_lock = threading.Lock()
_zeros_lock = threading.Lock()  # a histogram series' count of zeros is made once
# A thread's first cell of a histogram series is made under this (once per thread and series).
_cells_lock = threading.Lock()
# The ``cells`` of every histogram series that only one thread has observed: always empty, never
# written to (a series gets a dict of its own when a second thread makes a cell).
_NO_CELLS: dict[int, list[float]] = {}
# A thread's id, one int object for every series that thread observes first (an id is a 32-byte
# int: kept once per thread rather than once per series). Ids are reused as threads come and go,
# so the table is emptied when it reaches _IDENTS_KEPT (an id then is merely not shared).
_IDENTS: dict[int, int] = {}
_IDENTS_KEPT = 64


def _interned(ident: int) -> int:
    """``ident`` as the one int object kept for it (the caller holds ``_cells_lock``)."""
    kept = _IDENTS.get(ident)
    if kept is None:
        if len(_IDENTS) >= _IDENTS_KEPT:
            _IDENTS.clear()
        kept = _IDENTS[ident] = ident
    return kept


# ``itertools.count`` is generic to type checkers only (not subscriptable at run time).
if TYPE_CHECKING:
    _Count = itertools.count[int]
else:
    _Count = itertools.count


class CounterSeries(_Count):
    """One series of a counter, kept in this process (a single process's fast path).

    Lock-free: ``inc`` is the series' ``__next__`` (an ``itertools.count``'s), one C call that the
    interpreter runs whole, so threads never queue on a lock here (a lock per series made the
    cost per call grow with the number of threads). A read advances the count too; ``_reads``
    takes those out. The series is the count itself: one object, not a count held by another
    (40 bytes less a series).
    """

    __slots__ = ("_reads",)

    def __init__(self) -> None:
        super().__init__()
        self._reads = 0

    @property
    def inc(self) -> Callable[[], int]:
        """What a handler binds (once per series): the count's ``__next__``."""
        return self.__next__

    def read(self) -> float:
        with _read_lock:
            value = next(self) - self._reads
            self._reads += 1
        return float(value)


class HistogramSeries:
    """One series of a histogram, kept in this process: per-bucket counts and the sum.

    Per-thread accumulation: each thread writes only its own cell (bucket counts, then the sum),
    so no two threads ever write the same value and no lock is taken on the hot path. A read adds
    the cells up. The first thread's cell is ``first`` (its thread id ``ident``); ``cells`` is
    ``_NO_CELLS`` until a second thread makes one, then a dict by thread id of every thread's
    cell, the first's too (a series only one thread observes, as most are, keeps no dict of its
    own: ≈ 0.25 KB). The per-call recorders of the subscriber inline :meth:`observe` (``first``,
    ``ident``, ``cells``, ``bounds``, :meth:`cell`, :meth:`mine`, :func:`layout`): one frame less
    on every call.
    """

    __slots__ = ("_zeros", "bounds", "cells", "first", "ident")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.cells = _NO_CELLS
        self.first: list[float] | None = None
        self.ident = 0  # no thread's id
        self._zeros: CounterSeries | None = None

    def zeros(self) -> Inc:
        """An ``inc`` that observes 0: a count of its own, added to the first bucket at read.

        For the calls an open circuit rejects (recorded with no duration): one C call each,
        where an observation finds the thread's cell and searches the buckets.
        """
        with _zeros_lock:
            if self._zeros is None:
                self._zeros = CounterSeries()
            return self._zeros.inc

    def observe(self, amount: float) -> None:
        ident = get_ident()
        cell = self.first if ident == self.ident else self.cells.get(ident)
        if cell is None:
            cell = self.cell()
        cell[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: Prometheus's le
        cell[-1] += amount

    def cell(self) -> list[float]:
        """The calling thread's cell: found, or made if it has none yet.

        Made under a lock (once per thread and series): the first thread's in ``first``; the
        second's makes the dict, with the first's in it, and publishes it whole.
        """
        ident = get_ident()
        with _cells_lock:
            if ident == self.ident and self.first is not None:
                return self.first
            cells = self.cells
            found = cells.get(ident)
            if found is not None:
                return found
            # Not cumulative; the last bucket is +Inf; the sum comes after it.
            cell: list[float] = [0] * (len(self.bounds) + 1) + [0.0]
            if self.first is None:
                self.first = cell
                self.ident = _interned(ident)  # after the cell: an ident that matches has it
            elif cells is _NO_CELLS:
                self.cells = {self.ident: self.first, ident: cell}
            else:
                cells[ident] = cell
            return cell

    def mine(self) -> tuple[int, list[float]]:
        """The calling thread's id and cell (made if it has none yet).

        What a bound function keeps, to find the cell of the thread that bound it (the one
        likeliest to call it: a recorder binds on its first event, then records it) with one
        comparison instead of a lookup. Another thread with that id later is a thread that
        reused the id of one that ended, and takes its cell over, as it would by lookup.
        """
        cell = self.cell()
        ident = get_ident()
        # The first thread's id is the series' own int (an id is a 32-byte int): kept once.
        return (self.ident if ident == self.ident else ident), cell

    def read(self) -> tuple[list[int], float]:
        by_thread, first = self.cells, self.first
        if by_thread is _NO_CELLS:  # one thread's cell at most (the dict, once made, has it too)
            cells = [] if first is None else [first]
        else:
            cells = list(by_thread.values())  # one C-level copy: safe while threads add cells
        buckets = [0] * (len(self.bounds) + 1)
        total = 0.0
        for cell in cells:
            for index, count in enumerate(cell[:-1]):
                buckets[index] += int(count)
            total += cell[-1]
        if self._zeros is not None:
            buckets[bisect_left(self.bounds, 0.0)] += int(self._zeros.read())
        return buckets, total


def layout(bounds: tuple[float, ...]) -> tuple[float, int]:
    """Where an observation goes in a cell of a histogram with ``bounds``, for code that inlines
    :meth:`HistogramSeries.observe`: the first bound, and the index of the sum.

    An amount at most the first bound counts in bucket 0 with one comparison, no search: the
    common case of the call and timeout histograms, whose first bound (1 ms) is above most
    in-process and loopback calls; any other amount costs that comparison more than a
    search. The sum's index is positive, which CPython indexes a list with faster than ``-1``.
    With no bounds the only bucket is +Inf (index 0), which every amount, NaN too, falls in.
    """
    return (bounds[0] if bounds else math.inf), len(bounds) + 1


def label_values(key: str | tuple[str, ...]) -> tuple[str, ...]:
    """The label values of a key of :attr:`LocalFamilies.series` (one label's is the value)."""
    return (key,) if isinstance(key, str) else key


class LocalFamilies:
    """The counters and histograms of a single process, by family and label values.

    ``prometheus_client``'s own metric objects take a lock per write (about 0.4 us per counter
    increment and 0.9 us per histogram observation); these series take none and cost a fraction
    of that, which matters for the few events of every successful call. The collector exposes
    them at scrape time. In multiprocess mode the values must live in ``prometheus_client``'s
    files instead.
    """

    def __init__(self, service_labels: ServiceLabels | None = None) -> None:
        self._lock = threading.Lock()
        self.service_labels = ServiceLabels() if service_labels is None else service_labels
        # By family, then by label values: a family of one label by the value itself (a tuple
        # of one kept for every series would cost 48 bytes each), see :func:`label_values`.
        self.series: dict[str, dict[str | tuple[str, ...], Any]] = {
            family.name: {} for family in CATALOG if family.kind != "gauge"
        }

    def child(self, family: Family, labels: tuple[str, ...]) -> Any:
        labels = self.service_labels.labels(family, labels)
        key = labels[0] if len(labels) == 1 else labels
        with self._lock:
            by_labels = self.series[family.name]
            series = by_labels.get(key)
            if series is None:
                if family.kind == "counter":
                    series = CounterSeries()
                else:
                    series = HistogramSeries(family.buckets or ())
                by_labels[key] = series
            return series

    def binder(self, name: str, method: str) -> Lazy[Any, Any]:
        family = FAMILIES[name]

        def bind(labels: Any) -> Any:
            values = labels if isinstance(labels, tuple) else (labels,)
            return getattr(self.child(family, values), method)

        return Lazy(bind)
