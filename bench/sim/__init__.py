"""A deterministic discrete-event simulation of buttress's overload controls (``make bench``).

N clients call a modelled dependency through the real patterns (``retry_with_backoff`` with its
budget, ``with_bulkhead(adaptive=...)``, ``with_hedging``), on an asyncio event loop whose clock
is virtual (:mod:`.virtual`): time jumps from one event to the next, nothing sleeps, and a seed
fixes every draw, so a run is the same every time. Beside each, in the same run, a baseline: a
tenacity-style client (tenacity's own ``AsyncRetrying``), fixed concurrency limits, no hedging.

``python -m bench.sim`` prints the three tables; ``--quick`` runs a shorter version (the one the
test suite checks, ``tests/test_simulation.py``). The figures are in ``docs/performance.md``.
"""
