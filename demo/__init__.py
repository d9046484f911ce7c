"""``python -m demo`` (``make demo``): watch buttress save a service from a failing dependency.

A flaky HTTP upstream starts on a free loopback port and moves through five phases (healthy, hard
outage, slow, rate limited, recovery). Two clients call it at the same pace from ``def`` and
``async def`` call sites: one protected by buttress (settings from ``demo/buttress.toml``), one not.
While it runs, ``/metrics`` and ``/health`` are served on loopback. At the end it prints a
side-by-side report and writes a PNG timeline. Two more clients show degraded service
(:mod:`demo.degraded`): an LLM-style assistant answered from its cache, and notifications deferred
during the outage and sent once the circuit closes; every figure comes from what was recorded during
the run (calls, buttress events, requests the upstream received).

Nothing outside the machine is needed, except a Redis server when ``--redis`` is given.

This module only parses the command line and checks that the demo's own dependencies (httpx,
matplotlib) are installed before importing the rest (:mod:`demo.runner`).

The demo is not part of the buttress wheel: it runs from a clone of the repository, whose root
``make demo`` puts on the path.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_INVALID: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # the shell's convention for SIGINT

MIN_DURATION: Final = 5.0
_NEEDS: Final = ("httpx", "matplotlib")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="A flaky upstream, two clients, one protected by buttress: the difference, "
        "measured.",
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of traffic (default 60, minimum 5)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="the same seed gives the same phases (default 1)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes driving the clients (default 1)"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="keep the protected circuit in Redis so all workers share it (redis://host:port/db)",
    )
    parser.add_argument("--no-chaos", action="store_true", help="inject no network faults")
    parser.add_argument(
        "--config", type=Path, default=None, help="settings file (default demo/buttress.toml)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("buttress-demo.png"),
        help="where to write the timeline PNG (default ./buttress-demo.png)",
    )
    parser.add_argument("--json", type=Path, help="also write the report's figures as JSON here")
    parser.add_argument(
        "--port", type=int, default=0, help="port of /metrics and /health (default: a free one)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.duration < MIN_DURATION:
        parser.error(f"--duration must be at least {MIN_DURATION:g} seconds")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.redis is not None and not args.redis.startswith(("redis://", "rediss://")):
        parser.error("--redis takes a redis:// or rediss:// URL")
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"the demo needs {', '.join(missing)}: pip install -e '.[demo]' (or: make demo)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    # Imported only now: the runner imports httpx and the rest of the demo.
    from buttress.exceptions import ConfigurationError  # noqa: PLC0415
    from demo import runner  # noqa: PLC0415

    options = runner.DemoOptions(
        duration=args.duration,
        seed=args.seed,
        workers=args.workers,
        redis=args.redis,
        chaos=not args.no_chaos,
        config_file=args.config if args.config is not None else runner.default_config(),
        output=args.output,
        json=args.json,
        port=args.port,
    )
    try:
        runner.run(options, out=sys.stdout)
    except ConfigurationError as exc:
        print(f"demo settings are invalid:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    except FileNotFoundError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK
