"""Per-call cost of the sync stack as threads are added, default subscribers on and off.

The same number of calls is split over 1, 2, 4 and 16 threads that all call one decorated
function (one shared breaker and bulkhead, one set of series); the figure is the wall time per
call. With the GIL the calls run one at a time whatever the thread count, so the cost per call
should stay flat: a lock that threads queue on (a convoy) shows as growth. Rounds interleave the
cases; the ratio to one thread is the median of the same-round ratios.

Goal: with the default subscribers on, 16 threads cost at most 1.2x one thread per call.

Usage: ``python bench/bench_threads.py [--calls N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable

from _harness import buttress_stacks

GOAL = 1.2
THREADS = (1, 2, 4, 16)


def sample(call: Callable[[], int], threads: int, calls: int) -> float:
    """Seconds per call with ``calls`` split over ``threads`` threads started together."""
    each = calls // threads
    start = threading.Barrier(threads + 1)

    def run() -> None:
        start.wait()
        for _ in range(each):
            call()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - began) / (each * threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64_000, help="calls per sample")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from buttress import instrumentation

    stack, _ = buttress_stacks()
    stack()
    samples: dict[tuple[bool, int], list[float]] = {}
    for _ in range(args.rounds):
        for subscribers in (True, False):
            instrumentation.configure(prometheus=subscribers, otel=subscribers, logging=subscribers)
            for threads in THREADS:
                per_call = sample(stack, threads, args.calls)
                samples.setdefault((subscribers, threads), []).append(per_call)
    print(f"{'subscribers':<12} {'threads':>7} {'ns/call':>9} {'vs 1 thread':>12}")
    for subscribers in (True, False):
        one = samples[subscribers, 1]
        for threads in THREADS:
            mine = samples[subscribers, threads]
            ratio = statistics.median(a / b for a, b in zip(mine, one, strict=True))
            verdict = ""
            if subscribers and threads == max(THREADS):
                verdict = "ok" if ratio <= GOAL else "OVER GOAL"
            label = "default" if subscribers else "off"
            ns = statistics.median(mine) * 1e9
            print(f"{label:<12} {threads:>7} {ns:>9,.0f} {ratio:>11.2f}x  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
