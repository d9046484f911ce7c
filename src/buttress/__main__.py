"""``python -m buttress``: inspect and check settings, run the demo.

::

    python -m buttress config show [--service NAME] [--format text|json] [--config FILE]
    python -m buttress config check [--config FILE]
    python -m buttress demo [ARGS...]

Exit codes: 0 success, 1 invalid settings, 2 wrong usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from buttress import config
from buttress.exceptions import ConfigurationError

__all__ = ["main"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "demo" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        return _demo(rest)
    if args.command == "config" and args.action == "show":
        return _show(args.service, args.format, args.config, sys.stdout, sys.stderr)
    if args.command == "config" and args.action == "check":
        return _check(args.config, sys.stdout, sys.stderr)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m buttress", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    config_cmd = commands.add_parser("config", help="inspect or check settings")
    actions = config_cmd.add_subparsers(dest="action", required=True)
    file_help = "config file (default: $BUTTRESS_CONFIG_FILE)"
    show = actions.add_parser("show", help="print the effective settings and their sources")
    show.add_argument("--service", help="only this service")
    show.add_argument("--format", choices=("text", "json"), default="text")
    show.add_argument("--config", help=file_help)
    check = actions.add_parser("check", help="validate settings; exit 1 with the errors")
    check.add_argument("--config", help=file_help)
    commands.add_parser("demo", help="run the demo (no external service needed)", add_help=False)
    return parser


def _load(config_file: str | None, err: TextIO) -> config.Settings | None:
    try:
        return config.load_settings(config_file=config_file)
    except ConfigurationError as exc:
        print(exc, file=err)
        return None


def _check(config_file: str | None, out: TextIO, err: TextIO) -> int:
    settings = _load(config_file, err)
    if settings is None:
        return EXIT_INVALID
    where = f"file {settings.config_file}" if settings.config_file else "no config file"
    names = ", ".join(sorted(settings.services)) or "none"
    state = "on" if settings.enabled else "OFF (kill switch)"
    print(f"settings ok ({where}); patterns {state}; services: {names}", file=out)
    return EXIT_OK


def _show(service: str | None, fmt: str, config_file: str | None, out: TextIO, err: TextIO) -> int:
    settings = _load(config_file, err)
    if settings is None:
        return EXIT_INVALID
    described = config.describe(settings, service)
    if fmt == "json":
        json.dump(described, out, indent=2, default=repr)
        out.write("\n")
        return EXIT_OK
    out.write(_as_text(described))
    return EXIT_OK


def _as_text(described: dict[str, Any]) -> str:
    """TOML-shaped text with the source of each value as a trailing comment."""
    lines = ["# effective buttress settings: value  # source"]
    if described["config_file"]:
        lines.append(f"# config file: {described['config_file']}")
    lines.append(_line("enabled", described["enabled"]))
    sections = [("defaults", described["defaults"])] if "defaults" in described else []
    sections += [(f"services.{name}", body) for name, body in described["services"].items()]
    for title, body in sections:
        lines.append("")
        lines.append(f"[{title}]")
        nested = []
        for key, value in body.items():
            if "source" in value:
                lines.append(_line(key, value))
            else:
                nested.append((key, value))
        for pattern, fields in nested:
            lines.append("")
            lines.append(f"[{title}.{pattern}]")
            lines.extend(_line(key, value) for key, value in fields.items())
    return "\n".join(lines) + "\n"


def _line(key: str, item: dict[str, Any]) -> str:
    value = item["value"]
    shown = "(unset)" if value is None else json.dumps(value, default=repr)
    return f"{key} = {shown}".ljust(44) + f"  # {item['source']}"


def _demo(argv: list[str]) -> int:
    # Imported only when asked for: the demo pulls in optional dependencies (matplotlib, redis).
    demo = importlib.import_module("buttress.demo")
    result: int = demo.main(argv)
    return result


if __name__ == "__main__":
    sys.exit(main())
