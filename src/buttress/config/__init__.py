"""Settings and feature flags, read when a call happens.

Where a value comes from, strongest first (design section 4)::

    environment  >  config file  >  code arguments  >  preset  >  built-in default

The environment and the file are *settings*: the ``BUTTRESS_*`` variables and the file named by
``BUTTRESS_CONFIG_FILE`` (TOML or YAML), each read as written, merge key by key into one
:class:`Settings` document with a ``defaults`` section and one ``services.<name>`` section per
service. Within settings a service's own section deep-merges onto ``defaults``, so a service key
beats a ``defaults`` key whichever of the two sources each came from. Code arguments are the
keyword arguments of the decorators; a preset (``api``, ``ai``, ``database``, ``external``,
``critical``) is named in code or in settings.

The rest of buttress reads one immutable :class:`Snapshot`, ``config.SNAPSHOT``, on every call.

The package's modules follow those sections: ``_models`` (settings models, presets), ``_sources``
(reading, checking and merging the environment and the file), ``_view`` (the snapshot and its
per-service view), ``_lifecycle`` (the snapshot in force: first load, reload, the kill switch
when settings are invalid) and ``_display`` (the effective settings with their sources). Import
from ``buttress.config``, not from them.
"""

from __future__ import annotations

from buttress._values import redact
from buttress.config._display import describe
from buttress.config._lifecycle import (
    SettingsWatcher,
    current,
    get_settings,
    reload_settings,
    resolve,
    watch_settings,
)
from buttress.config._models import (
    ADMIN_TOKEN_VARIABLE,
    CONFIG_FILE_VARIABLE,
    FLAGS,
    KILL_SWITCH_VARIABLES,
    OTHER_VARIABLES,
    PRESETS,
    SECTIONS,
    ServiceSettings,
    Settings,
    code_arguments,
    nested_fields,
    options_model,
)
from buttress.config._sources import load_settings
from buttress.config._view import CACHE_SIZE, ServiceView, Snapshot
from buttress.patterns import PATTERNS
from buttress.patterns.chaos import KILL_SWITCH as CHAOS_VARIABLE

__all__ = [
    "ADMIN_TOKEN_VARIABLE",
    "CACHE_SIZE",
    "CHAOS_VARIABLE",
    "CONFIG_FILE_VARIABLE",
    "FLAGS",
    "KILL_SWITCH_VARIABLES",
    "OTHER_VARIABLES",
    "PATTERNS",
    "PRESETS",
    "SECTIONS",
    "SNAPSHOT",
    "ServiceSettings",
    "ServiceView",
    "Settings",
    "SettingsWatcher",
    "Snapshot",
    "code_arguments",
    "describe",
    "get_settings",
    "load_settings",
    "nested_fields",
    "options_model",
    "redact",
    "reload_settings",
    "resolve",
    "watch_settings",
]

# Assigned on first access (see __getattr__) and by reload_settings(); a plain module global, so
# the per-call read ``config.SNAPSHOT`` is one dictionary lookup.
SNAPSHOT: Snapshot


def __getattr__(name: str) -> Snapshot:
    # PEP 562: reached only until SNAPSHOT exists as a module global; after that the attribute is
    # an ordinary global and this costs nothing.
    if name != "SNAPSHOT":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return current()
