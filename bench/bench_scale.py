"""Cost per service: memory at rest, decoration and first call, and a scrape of many services.

Each service is the sync stack of every benchmark (breaker + retry + bulkhead) under its own name,
decorated and called once, with the default subscribers on. Memory is what ``tracemalloc`` sees
allocated for the services added after a warm-up, divided by their number; inside that range it
is also given for 400 services that keep their own Prometheus ``service`` label and 400 past the
cardinality guard (which share ``_other``). A scrape is
``prometheus_client.generate_latest()`` of the default registry, timed several times (a full
garbage collection of a large heap lands in some of them: the median and the slowest are both
printed).

Usage: ``python bench/bench_scale.py [--services N] [--scrapes N]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable


def service(i: int) -> Callable[[], int]:
    from buttress import circuit_breaker, retry_with_backoff, with_bulkhead

    @circuit_breaker(name=f"scale-{i}", fail_max=5, timeout=60)
    @retry_with_backoff(max_attempts=3, exponential_base=2)
    @with_bulkhead(limit=50)
    def call() -> int:
        return 1

    call()
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--measured", type=int, default=1_000, help="services traced for memory")
    parser.add_argument("--scrapes", type=int, default=7)
    args = parser.parse_args()
    import prometheus_client

    kept = [service(i) for i in range(50)]  # warm-up: first-use costs of the modules
    gc.collect()
    tracemalloc.start()
    # Memory at each checkpoint (services made so far): the whole measured range, and inside it
    # 400 services that keep their own Prometheus ``service`` label (50..449: the cardinality
    # guard admits DEFAULT_MAX_SERVICES) and 400 past the guard (600..999), when it covers them.
    checkpoints = sorted({50, 450, 600, 1000, 50 + args.measured})
    memory = {50: tracemalloc.get_traced_memory()[0]}
    made = 50
    for checkpoint in checkpoints[1:]:
        if checkpoint > 50 + args.measured:
            break
        kept += [service(i) for i in range(made, checkpoint)]
        made = checkpoint
        gc.collect()
        memory[checkpoint] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_service = (memory[made] - memory[50]) / args.measured
    started = time.perf_counter()
    rest = range(50 + args.measured, args.services)
    kept += [service(i) for i in rest]
    per_decoration = (time.perf_counter() - started) / max(len(rest), 1)
    scrapes = []
    size = 0
    for _ in range(args.scrapes):
        started = time.perf_counter()
        size = len(prometheus_client.generate_latest())
        scrapes.append(time.perf_counter() - started)
    print(f"bytes per service at rest (tracemalloc)  {per_service:10,.0f}")
    for label, first, last in (("  own label", 50, 450), ("  past the guard", 600, 1000)):
        if first in memory and last in memory:
            window = (memory[last] - memory[first]) / (last - first)
            print(f"{label + f' ({first}..{last - 1})':40} {window:10,.0f}")
    print(f"decoration + first call per service     {per_decoration * 1e6:10,.0f} us")
    print(
        f"scrape of {len(kept):,} services            {statistics.median(scrapes):10.3f} s median, "
        f"{max(scrapes):.3f} s slowest, {size / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
