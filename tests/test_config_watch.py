"""Settings follow the config file: ``config.watch_settings()`` and its one look, ``check()``.

The file is laid out as Kubernetes mounts a ConfigMap: ``buttress.toml`` is a symlink into
``..data``, itself a symlink to a timestamped directory that the kubelet replaces with an atomic
rename. Checks are called directly (no time has to pass); one real-time test runs the thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from buttress import config, events
from buttress.exceptions import ConfigurationError
from buttress.testing import capture_events


class ConfigMap:
    """A directory laid out like a mounted ConfigMap; :meth:`publish` swaps in a new version."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0
        self.path = root / "buttress.toml"

    def publish(self, text: str) -> None:
        self.versions += 1
        version = self.root / f"..2026_12_05_{self.versions:02d}"
        version.mkdir()
        (version / "buttress.toml").write_text(text, encoding="utf-8")
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.root / "..data")  # the kubelet's atomic swap
        if not self.path.is_symlink():
            self.path.symlink_to("..data/buttress.toml")

    @property
    def env(self) -> dict[str, str]:
        return {config.CONFIG_FILE_VARIABLE: str(self.path)}


def attempts(text: int) -> str:
    return f"[services.pay.retry]\nmax_attempts = {text}\n"


@pytest.fixture
def configmap(tmp_path: Path) -> Iterator[ConfigMap]:
    mounted = ConfigMap(tmp_path)
    mounted.publish(attempts(3))
    config.reload_settings(env=mounted.env)
    yield mounted
    config.reload_settings()


def max_attempts() -> int:
    return config.resolve("pay", "retry").max_attempts


def test_a_configmap_swap_reloads_the_settings(configmap: ConfigMap) -> None:
    watcher = config.SettingsWatcher(5.0, configmap.env)
    assert watcher.check() is False  # nothing changed yet
    configmap.publish(attempts(7))
    with capture_events([events.SettingsReloaded]) as reloads:
        assert watcher.check() is True
    assert max_attempts() == 7
    assert [r.ok for r in reloads] == [True]
    assert watcher.check() is False  # once per change


def test_an_invalid_file_keeps_the_settings_and_says_why(
    configmap: ConfigMap, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = config.SettingsWatcher(5.0, configmap.env)
    configmap.publish("[services.pay.retry]\nmax_attempts = 0\n")
    with capture_events([events.SettingsReloaded]) as reloads, caplog.at_level(logging.WARNING):
        assert watcher.check() is False
        assert watcher.check() is False  # not tried again until the file changes again
    assert max_attempts() == 3
    assert [(r.ok, "services.pay.retry.max_attempts" in (r.error or "")) for r in reloads] == [
        (False, True)
    ]
    assert "buttress.settings.reload_failed" in caplog.text
    configmap.publish(attempts(4))
    assert watcher.check() is True
    assert max_attempts() == 4


def test_an_edit_in_place_and_a_file_gone_for_a_moment(configmap: ConfigMap) -> None:
    watcher = config.SettingsWatcher(5.0, configmap.env)
    real = configmap.path.resolve()
    real.unlink()
    assert watcher.check() is False  # gone (mid-swap): nothing to read, the settings stay
    real.write_text(attempts(12), encoding="utf-8")
    assert watcher.check() is True
    assert max_attempts() == 12


def test_the_interval_is_bounded_and_a_file_must_be_named(configmap: ConfigMap) -> None:
    for interval in (0.01, 301.0):
        with pytest.raises(ConfigurationError, match=r"between 0\.1 and 300 seconds"):
            config.watch_settings(interval, env=configmap.env)
    with pytest.raises(ConfigurationError, match="BUTTRESS_CONFIG_FILE names no config file"):
        config.watch_settings(env={})


@pytest.mark.realtime
def test_the_watcher_thread_reloads_on_its_own(configmap: ConfigMap) -> None:
    reloaded = threading.Event()
    undo = events.subscribe(lambda e: reloaded.set(), [events.SettingsReloaded])
    watcher = config.watch_settings(0.1, env=configmap.env)
    try:
        configmap.publish(attempts(9))
        assert reloaded.wait(1.5)
    finally:
        watcher.stop()
        undo()
    assert max_attempts() == 9
