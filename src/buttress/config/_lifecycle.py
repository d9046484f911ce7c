"""The settings in force: ``config.SNAPSHOT``, loaded on first use and replaced by a reload.

``SNAPSHOT`` lives in the package's namespace, where every call reads it as a plain module global
(and tests replace or delete it); this module is the only one that assigns it. ``reload_settings()``
validates new settings completely and then replaces the snapshot in one assignment, so a call sees
either the old settings or the new ones, never a mix. The first snapshot is loaded on first use,
not at import, so a bad variable cannot make ``import buttress`` (or ``python -m buttress config
check``) fail. Invalid settings then fail every protected call, except while the kill switch reads
off: the settings in force are then the switch alone, and calls go straight to their functions (an
emergency switch that a typo elsewhere could block would not be one).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from buttress import config as package
from buttress import events
from buttress.config._models import (
    CONFIG_FILE_VARIABLE,
    DEFAULT_WATCH_INTERVAL,
    KILL_SWITCH_VARIABLES,
    WATCH_INTERVAL_BOUNDS,
    Settings,
)
from buttress.config._sources import (
    find_variable,
    load_settings,
    locate_file,
    read_file,
    truth,
)
from buttress.config._view import Snapshot
from buttress.exceptions import ConfigurationError
from buttress.patterns._base import Options

# The name the warning has always been logged under (operators filter on it).
_log = logging.getLogger("buttress.config")
_lock = threading.Lock()
_generations = itertools.count()


def current() -> Snapshot:
    """The snapshot in force, loading the first one (``config.SNAPSHOT`` before it exists)."""
    snapshot: Snapshot | None = vars(package).get("SNAPSHOT")
    if snapshot is not None:
        return snapshot
    with _lock:
        loaded: Snapshot | None = vars(package).get("SNAPSHOT")
        error: ConfigurationError | None = None
        if loaded is None:
            settings, error = _load(None, None)
            if settings is None:
                assert error is not None  # noqa: S101 - _load gives settings, an error, or both
                raise error
            loaded = Snapshot(next(_generations), settings)
            package.SNAPSHOT = loaded
            _follow(settings)
    if error is not None:
        _warn_switched_off(error)  # outside the lock: a log handler may read the settings
    return loaded


def _load(
    env: Mapping[str, str] | None, config_file: str | os.PathLike[str] | None
) -> tuple[Settings | None, ConfigurationError | None]:
    """The settings to put in force, and the error that made them the kill switch alone."""
    try:
        return load_settings(env, config_file), None
    except ConfigurationError as exc:
        return _switched_off(env, config_file), exc


def _warn_switched_off(error: ConfigurationError) -> None:
    # Once per load (the first, or a reload): calls go straight through, so nothing else says it.
    _log.warning(
        "buttress.settings.invalid_while_switched_off: the kill switch is off, so every call "
        "goes straight to its function; the settings are invalid and were not applied:\n%s",
        error,
    )


def get_settings() -> Settings:
    """The settings in force (loaded from the environment and file on first use).

    Raises:
        ConfigurationError: the settings are invalid; never while the kill switch is off, when
            the settings in force are the switch alone (and a warning is logged).
    """
    return current().settings


def reload_settings(
    *, env: Mapping[str, str] | None = None, config_file: str | os.PathLike[str] | None = None
) -> Settings:
    """Read settings again, validate them, and swap them in atomically.

    The next call through any decorator obeys the new settings; nothing is re-decorated.
    Emits :class:`buttress.events.SettingsReloaded` either way: on success with the new
    generation, on failure with the generation still in force (``-1`` if none was loaded yet).

    Args:
        env: the environment variables to read (default ``os.environ``).
        config_file: the config file (default ``BUTTRESS_CONFIG_FILE`` from ``env``).

    Raises:
        ConfigurationError: the new settings are invalid; the old ones stay in force, unless the
            new sources turn the kill switch off: the switch then takes effect on its own.
    """
    with _lock:
        settings, error = _load(env, config_file)
        if settings is not None:
            package.SNAPSHOT = Snapshot(next(_generations), settings)
            if env is None and config_file is None:
                _follow(settings)  # settings from the process's own environment and file
        in_force: Snapshot | None = vars(package).get("SNAPSHOT")
    generation = in_force.generation if in_force is not None else -1
    if error is not None:
        if settings is not None:
            _warn_switched_off(error)
        events.emit(events.SettingsReloaded(ok=False, generation=generation, error=str(error)))
        raise error
    assert settings is not None  # noqa: S101 - no error means it loaded
    events.emit(events.SettingsReloaded(ok=True, generation=generation, error=None))
    return settings


def resolve(
    service: str,
    pattern: str,
    code_args: Mapping[str, Any] | None = None,
    preset: str | None = None,
) -> Options:
    """The options ``pattern`` of ``service`` resolves to now, for given code arguments."""
    return current().service(service).options(pattern, code_args or {}, preset)


def _switched_off(
    env: Mapping[str, str] | None, config_file: str | os.PathLike[str] | None
) -> Settings | None:
    """The kill switch alone, when the sources that failed to load still turn it off clearly.

    Invalid settings must never stop ``FF_ENABLE_RESILIENCE_PATTERNS=false`` from working: the
    switch is read the way the settings would read it (a kill switch variable, the FF_ one
    first, else ``enabled`` at the top of the config file) and, when it says off, the settings in
    force are "off" and nothing else. ``None`` when the switch is on, unset or unreadable.
    """
    environ = os.environ if env is None else env
    for variable in KILL_SWITCH_VARIABLES:
        found = find_variable(environ, variable)
        if found is not None:
            name, value = found
            return _off(f"env {name}") if truth(value) is False else None
    file_name, path_source = locate_file(environ, config_file)
    if file_name is not None:
        raw, _ = read_file(Path(file_name), path_source, [])
        if raw.get("enabled") is False:
            settings = _off(f"file {file_name}")
            # Still followed: turning the switch back on in the file must take effect on its own.
            settings._config_file = file_name
            settings._watch_interval = DEFAULT_WATCH_INTERVAL
            return settings
    return None


def _off(source: str) -> Settings:
    settings = Settings(enabled=False)
    settings._sources = {("enabled",): source}
    return settings


# --- watching the config file ---------------------------------------------------------------------


class SettingsWatcher:
    """Reloads the settings when the config file changes; :func:`watch_settings` starts one.

    It polls (one ``stat`` of the file and one ``realpath`` per interval): portable, no new
    dependency, and it sees what inotify misses on a mounted Kubernetes ConfigMap, where the
    kubelet swaps the ``..data`` symlink to a new directory and the file named never changes
    itself. A change is the resolved path, inode, size or modification time differing from the
    last look. A changed file is validated first, as :func:`reload_settings` does: an invalid
    one keeps the settings in force, emits ``SettingsReloaded(ok=False)`` and logs why
    (``buttress.settings.reload_failed``); it is not tried again until it changes again.
    """

    def __init__(self, interval: float, env: Mapping[str, str] | None) -> None:
        low, high = WATCH_INTERVAL_BOUNDS
        if not low <= interval <= high:
            raise ConfigurationError(
                f"watch_settings: interval must be between {low:g} and {high:g} seconds, "
                f"not {interval!r}"
            )
        self.interval = interval
        self._env = env
        file_name, _ = locate_file(os.environ if env is None else env, None)
        if file_name is None:
            raise ConfigurationError(
                f"watch_settings: {CONFIG_FILE_VARIABLE} names no config file to watch"
            )
        self.path = file_name
        self._seen = self._signature()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _signature(self) -> tuple[str, int, int, int, int] | None:
        try:
            real = os.path.realpath(self.path)
            stat = os.stat(real)
        except OSError:
            return None  # gone for now (mid-swap, or unmounted): a change when it comes back
        return real, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def check(self) -> bool:
        """Look at the file once; reload if it changed. Whether new settings took effect."""
        seen = self._signature()
        if seen == self._seen or seen is None:
            return False
        self._seen = seen
        try:
            reload_settings(env=self._env)
        except ConfigurationError as exc:  # reported by the event too; the old settings stay
            _log.warning(
                "buttress.settings.reload_failed: %s changed but is invalid; the settings in "
                "force stay:\n%s",
                self.path,
                exc,
            )
            return False
        _log.info("buttress.settings.reloaded: %s changed", self.path)
        return True

    def start(self) -> SettingsWatcher:
        """Poll on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="buttress-settings", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # A real-time wait: the file's changes happen in real time, whatever clock calls use.
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a watcher dying silently is worse than a log line
                _log.exception("buttress.settings.watch_failed")

    def stop(self) -> None:
        """Stop polling (and wait for the thread to end)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


# The process's own watcher: started when settings in force come from a file named by
# BUTTRESS_CONFIG_FILE, replaced when a reload names another file or interval, stopped when none.
# Guarded by _lock (every caller holds it).
_following: SettingsWatcher | None = None


def _follow(settings: Settings) -> None:
    """Follow the file ``settings`` were read from, as ``BUTTRESS_CONFIG_WATCH_INTERVAL`` says."""
    global _following
    path, interval = settings.config_file, settings._watch_interval
    watcher = _following
    if watcher is not None and watcher.path == path and watcher.interval == interval:
        return
    if watcher is not None:
        # Not joined: its thread may be waiting for the lock this caller holds, to reload.
        watcher._stop.set()
        _following = None
    if path is not None and interval > 0:
        _following = SettingsWatcher(interval, None).start()


def _follow_again_after_fork() -> None:
    # A forked child has no copy of the parent's thread: a new watcher, on the same file.
    global _following
    watcher = _following
    if watcher is not None:
        _following = SettingsWatcher(watcher.interval, None).start()


os.register_at_fork(after_in_child=_follow_again_after_fork)


def watch_settings(
    interval: float = 5.0, *, env: Mapping[str, str] | None = None
) -> SettingsWatcher:
    """Reload the settings whenever the file named by ``BUTTRESS_CONFIG_FILE`` changes.

    Starts a daemon thread polling the file every ``interval`` seconds (0.1 to 300). Settings
    read from a file named by ``BUTTRESS_CONFIG_FILE`` are followed on their own already (every
    ``BUTTRESS_CONFIG_WATCH_INTERVAL`` seconds, 5 by default); this starts a watcher of your own
    besides, for another interval or another environment, and :meth:`SettingsWatcher.stop` ends it.
    It is not carried into a forked child.

    Args:
        interval: seconds between two looks at the file.
        env: the environment to read settings from (default ``os.environ``).

    Raises:
        ConfigurationError: the interval is out of bounds, or no config file is named.
    """
    return SettingsWatcher(interval, env).start()
