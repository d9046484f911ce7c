"""The effective settings as ``python -m buttress config show`` prints them, sources included."""

from __future__ import annotations

from typing import Any

from buttress import registry
from buttress.config._lifecycle import get_settings
from buttress.config._models import Settings
from buttress.config._view import ServiceView


def describe(settings: Settings | None = None, service: str | None = None) -> dict[str, Any]:
    """The effective settings of every configured service (or one), with the source of each value.

    Code arguments are not visible here (they live in the application's code); values they would
    override show their settings, preset or default source. Secrets in URLs are redacted.
    """
    settings = settings if settings is not None else get_settings()
    kill_switch = settings.source_of(("enabled",)) or "default"
    described: dict[str, Any] = {
        "config_file": settings.config_file,
        "enabled": {"value": settings.enabled, "source": kill_switch},
    }
    if service is None:
        # "*" is no configured service, so its view is exactly what defaults give.
        described["defaults"] = ServiceView("*", settings).explain()
        names = sorted(settings.services)
    else:
        names = [registry.service_name(service)]
    described["services"] = {name: ServiceView(name, settings).explain() for name in names}
    return described
