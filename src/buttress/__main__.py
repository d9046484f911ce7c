"""``python -m buttress``: inspect and check settings.

::

    python -m buttress config show [--service NAME] [--format text|json] [--config FILE]
                                   [--module MODULE ...]
    python -m buttress config check [--config FILE] [--module MODULE ...]

Settings live in the environment and the config file, code arguments in the application: with
``--module`` the command imports those modules first and also shows (or checks) the call sites
they decorate, code arguments and presets included.

Exit codes: 0 success, 1 invalid settings (or a call site they make invalid), 2 wrong usage
(including a module that cannot be imported).

The demo is not part of the package: ``python -m buttress demo`` only says how to run it from a
clone of the repository (``make demo``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, NamedTuple, TextIO

from buttress import config, registry
from buttress.exceptions import ConfigurationError
from buttress.policy import Policy

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
        return _demo(sys.stderr)
    if args.command == "config" and args.action == "show":
        return _show(args, sys.stdout, sys.stderr)
    if args.command == "config" and args.action == "check":
        return _check(args.config, args.module, sys.stdout, sys.stderr)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m buttress", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    config_cmd = commands.add_parser("config", help="inspect or check settings")
    actions = config_cmd.add_subparsers(dest="action", required=True)
    file_help = "config file (default: $BUTTRESS_CONFIG_FILE)"
    module_help = "import this module first and include the call sites it decorates (repeatable)"
    show = actions.add_parser("show", help="print the effective settings and their sources")
    show.add_argument("--service", help="only this service")
    show.add_argument("--format", choices=("text", "json"), default="text")
    show.add_argument("--config", help=file_help)
    show.add_argument("--module", action="append", default=[], help=module_help)
    check = actions.add_parser("check", help="validate settings; exit 1 with the errors")
    check.add_argument("--config", help=file_help)
    check.add_argument("--module", action="append", default=[], help=module_help)
    commands.add_parser(
        "demo", help="how to run the demo (it ships with the repository)", add_help=False
    )
    return parser


def _load(config_file: str | None, err: TextIO) -> config.Settings | None:
    try:
        return config.load_settings(config_file=config_file)
    except ConfigurationError as exc:
        print(exc, file=err)
        return None


def _check(config_file: str | None, modules: list[str], out: TextIO, err: TextIO) -> int:
    settings = _load(config_file, err)
    if settings is None:
        return EXIT_INVALID
    sites = _import_sites(modules, err)
    if sites is None:
        return EXIT_USAGE
    for site in sites:
        try:
            _explain_site(site, settings)
        except ConfigurationError as exc:
            print(f"call site {site.name}: {exc}", file=err)
            return EXIT_INVALID
    where = f"file {settings.config_file}" if settings.config_file else "no config file"
    names = ", ".join(sorted(settings.services)) or "none"
    state = "on" if settings.enabled else "OFF (kill switch)"
    checked = f"; call sites: {len(sites)}" if modules else ""
    print(f"settings ok ({where}); patterns {state}; services: {names}{checked}", file=out)
    return EXIT_OK


def _show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    service: str | None = args.service
    modules: list[str] = args.module
    settings = _load(args.config, err)
    if settings is None:
        return EXIT_INVALID
    sites = _import_sites(modules, err)
    if sites is None:
        return EXIT_USAGE
    described = config.describe(settings, service)
    if modules:
        wanted = registry.service_name(service) if service is not None else None
        try:
            described["call_sites"] = {
                site.name: _explain_site(site, settings)
                for site in sites
                if wanted is None or site.service == wanted
            }
        except ConfigurationError as exc:
            print(exc, file=err)
            return EXIT_INVALID
    if args.format == "json":
        json.dump(described, out, indent=2, default=repr)
        out.write("\n")
        return EXIT_OK
    out.write(_as_text(described))
    return EXIT_OK


class _Site(NamedTuple):
    """A decorated function found in an imported module."""

    name: str
    service: str
    policy: Policy


def _import_sites(modules: list[str], err: TextIO) -> list[_Site] | None:
    """The call sites decorated in ``modules`` (imported now); ``None`` if one cannot be."""
    sites: dict[int, _Site] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ConfigurationError as exc:  # a decorator refused its arguments at import
            print(f"module {name}: {exc}", file=err)
            return None
        except ImportError as exc:
            print(f"module {name} cannot be imported: {exc}", file=err)
            return None
        except Exception as exc:  # noqa: BLE001 - any error of its own code at import
            # A traceback and exit 1 read as "invalid settings" to a deploy check.
            print(
                f"module {name} cannot be imported: it raised {type(exc).__name__}: {exc}",
                file=err,
            )
            return None
        for fn, policy in _decorated(module):
            qualified = f"{fn.__module__}.{fn.__qualname__}"
            service = policy.service or registry.service_name(qualified)
            sites.setdefault(id(fn), _Site(qualified, service, policy))
    return sorted(sites.values(), key=lambda site: site.name)


def _decorated(module: ModuleType) -> Iterator[tuple[Any, Policy]]:
    """Functions of ``module`` (and methods of its classes) that buttress decorated."""
    for value in list(vars(module).values()):
        candidates = [value]
        if isinstance(value, type) and value.__module__ == module.__name__:
            candidates += list(vars(value).values())
        for candidate in candidates:
            function = getattr(candidate, "__func__", candidate)  # staticmethod, classmethod
            policy = getattr(function, "__buttress_policy__", None)
            if isinstance(policy, Policy):
                yield function, policy


def _explain_site(site: _Site, settings: config.Settings) -> dict[str, Any]:
    """Every value one call site runs with, with its source (its code arguments included)."""
    body: dict[str, Any] = {"service": {"value": site.service, "source": "code"}}
    for spec in site.policy.specs:
        service = spec.service or site.service
        # A shared instance (breaker, bulkhead, limiter of a named service) is configured by the
        # code arguments of every call site of its service, merged; the rest by this site's own.
        named = spec.service is not None or site.policy.service is not None
        shared = spec.pattern in registry.SHARED_PATTERNS and named
        code_args = registry.code_args(spec.pattern, service) if shared else dict(spec.code_args)
        view = config.ServiceView(service, settings)
        body[spec.pattern] = view.explain({spec.pattern: code_args}, spec.preset)[spec.pattern]
    return body


def _as_text(described: dict[str, Any]) -> str:
    """TOML-shaped text with the source of each value as a trailing comment."""
    lines = ["# effective buttress settings: value  # source"]
    if described["config_file"]:
        lines.append(f"# config file: {described['config_file']}")
    else:
        lines.append(
            f"# config file: none ({config.CONFIG_FILE_VARIABLE} is not set; buttress never "
            "reads a file it was not pointed at)"
        )
    if "call_sites" not in described:
        lines.append(
            "# code arguments are not shown: they live in the application's code "
            "(--module MODULE imports it and shows its call sites)"
        )
    lines.append(_line("enabled", described["enabled"]))
    sections = [("defaults", described["defaults"])] if "defaults" in described else []
    sections += [(f"services.{name}", body) for name, body in described["services"].items()]
    sections += [
        (f"call_sites.{json.dumps(name)}", body)
        for name, body in described.get("call_sites", {}).items()
    ]
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
    if value is None:
        shown = "(unset)"
    elif isinstance(value, dict):  # a group option (retry.budget): a TOML inline table
        shown = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    else:
        shown = json.dumps(value, default=repr)
    return f"{key} = {shown}".ljust(44) + f"  # {item['source']}"


DEMO_MOVED = (
    "the demo is not part of the installed package; from a clone of the repository run "
    "`make demo` (or `python -m demo ARGS...` from its root)"
)


def _demo(err: TextIO) -> int:
    # Kept as a pointer for whoever learnt the old command; any arguments it got are the demo's.
    print(DEMO_MOVED, file=err)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
