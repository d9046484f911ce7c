"""What a fleet-wide rate limit costs per call, and how many acquisitions one Redis serves.

``@with_rate_limit(rate=..., state_url=...)`` takes each token with one script call on Redis
(GCRA on Redis time). It is measured beside what it is built on and what a user would otherwise
write, against the same loopback redis-server, interleaved in rounds (a slow-down of the host hits
all alike; each ratio is the median of the per-round ratios):

- ``PING``: one redis-py round trip, the floor of any shared decision;
- a hand-written fixed-window limiter: ``INCR`` + ``EXPIRE`` in one pipeline (one round trip,
  coarser: a window boundary lets up to twice the rate through);
- the process-local ``with_rate_limit`` (no Redis), for scale.

The rate is set far above what the loop can reach, so no call waits: the figure is the cost of
taking a token. Redis's own CPU per acquisition (``INFO commandstats``) gives the sizing figure:
how many acquisitions per second one Redis core serves.

Usage: ``python bench/bench_rate_redis.py [--rounds N] [--url redis://127.0.0.1:6379/0]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from bench_redis import (  # a sibling: run as python bench/<this file>
    redis_client,
    redis_server,
    timed,
)

SAMPLE_CALLS = 300
RATE = 1e9  # never reached: no call waits for a token


def f() -> int:
    return 1


def script_usec_per_call(client: Any) -> float:
    """Redis's own CPU per EVALSHA so far (µs), from ``INFO commandstats``."""
    stats = client.info("commandstats")
    entry = stats.get("cmdstat_evalsha") or stats.get("cmdstat_eval") or {}
    return float(entry.get("usec_per_call", 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="samples per case (default 15)")
    parser.add_argument("--url", help="an existing Redis (default: start one on a free port)")
    args = parser.parse_args()
    if args.url:
        return measure(args.url, args.rounds)
    with redis_server() as url:
        return measure(url, args.rounds)


def measure(url: str, rounds: int) -> int:
    from buttress import with_rate_limit

    client = redis_client(url)
    fleet = with_rate_limit(name="bench-fleet-rate", rate=RATE, burst=1000, state_url=url)(f)
    local = with_rate_limit(name="bench-local-rate", rate=RATE, burst=1000)(f)

    def fixed_window() -> None:
        pipe = client.pipeline(transaction=False)
        pipe.incr("bench-fixed-window")
        pipe.expire("bench-fixed-window", 1)
        pipe.execute()

    cases = [
        ("redis-py PING (one round trip)", timed(client.ping)),
        ("hand-written INCR+EXPIRE pipeline", timed(fixed_window)),
        ("buttress fleet rate limit", timed(fleet)),
        ("buttress local rate limit", timed(local)),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _, run in cases:
        run(50)  # connect, load the script
    client.config_resetstat()
    for _ in range(rounds):
        for name, run in cases:
            samples[name].append(run(SAMPLE_CALLS))
    server_usec = script_usec_per_call(client)
    client.close()

    print(f"\n{'case':<36} {'median us/call':>15}")
    for name, values in samples.items():
        print(f"{name:<36} {statistics.median(values) / 1000:>15.1f}")

    def ratio(ours: str, theirs: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[ours], samples[theirs], strict=True))

    print(
        f"\nfleet rate limit vs one PING round trip: "
        f"{ratio('buttress fleet rate limit', 'redis-py PING (one round trip)'):.2f}x"
    )
    print(
        f"fleet rate limit vs hand-written INCR+EXPIRE pipeline: "
        f"{ratio('buttress fleet rate limit', 'hand-written INCR+EXPIRE pipeline'):.2f}x"
    )
    if server_usec:
        print(f"Redis CPU per acquisition (EVALSHA): {server_usec:.2f} us, so one Redis core "
              f"serves about {1e6 / server_usec:,.0f} acquisitions/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
