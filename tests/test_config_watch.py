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
from buttress.config import _lifecycle
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


# --- following on its own: settings read from a file named by BUTTRESS_CONFIG_FILE --------------


@pytest.fixture
def followed(configmap: ConfigMap, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConfigMap]:
    """The configmap named in the process's environment, its watcher too slow to fire by itself."""
    monkeypatch.setenv(config.CONFIG_FILE_VARIABLE, str(configmap.path))
    monkeypatch.setenv("BUTTRESS_CONFIG_WATCH_INTERVAL", "300")
    config.reload_settings()
    yield configmap
    monkeypatch.delenv(config.CONFIG_FILE_VARIABLE)
    config.reload_settings()
    assert _lifecycle._following is None


def test_settings_read_from_a_named_file_follow_it_without_being_asked(followed: ConfigMap) -> None:
    watcher = _lifecycle._following
    assert watcher is not None
    assert (watcher.path, watcher.interval) == (str(followed.path), 300.0)
    followed.publish(attempts(6))
    assert watcher.check() is True
    assert max_attempts() == 6
    config.reload_settings()  # the same file, the same interval: the same watcher
    assert _lifecycle._following is watcher


def test_no_file_or_interval_zero_follows_nothing_and_a_change_stops_the_old_watcher(
    followed: ConfigMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _lifecycle._following
    assert first is not None
    monkeypatch.setenv("BUTTRESS_CONFIG_WATCH_INTERVAL", "0")
    config.reload_settings()
    assert _lifecycle._following is None
    assert first._stop.is_set()
    monkeypatch.setenv("BUTTRESS_CONFIG_WATCH_INTERVAL", "120")
    config.reload_settings()
    assert _lifecycle._following is not None
    assert _lifecycle._following.interval == 120.0


@pytest.mark.parametrize("value", ["0.01", "301", "soon", "nan", "-5"])
def test_a_bad_watch_interval_fails_at_load_with_its_variable(
    configmap: ConfigMap, value: str
) -> None:
    env = {**configmap.env, "BUTTRESS_CONFIG_WATCH_INTERVAL": value}
    with pytest.raises(ConfigurationError) as caught:
        config.load_settings(env)
    [problem] = caught.value.errors
    assert problem.path == "BUTTRESS_CONFIG_WATCH_INTERVAL"
    assert problem.source == "env BUTTRESS_CONFIG_WATCH_INTERVAL"
    assert "between 0.1 and 300 seconds" in problem.message


def test_a_file_that_switches_everything_off_is_still_followed(
    followed: ConfigMap,
) -> None:
    # enabled = false with a bad key: the kill switch alone is in force, and the file still
    # followed, so fixing the file turns buttress back on by itself.
    followed.publish("enabled = false\n[services.pay.retry]\nmax_attempts = 0\n")
    watcher = _lifecycle._following
    assert watcher is not None
    assert watcher.check() is False  # invalid, said so, but the switch in it took effect
    assert config.get_settings().enabled is False
    assert _lifecycle._following is not None
    followed.publish(attempts(5))
    assert _lifecycle._following.check() is True
    assert config.get_settings().enabled is True
    assert max_attempts() == 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_follows_the_file_with_a_thread_of_its_own(followed: ConfigMap) -> None:
    parent = _lifecycle._following
    assert parent is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it has a live watcher of its own, then leave
        child = _lifecycle._following
        ok = (
            child is not None
            and child is not parent
            and child._thread is not None
            and child._thread.is_alive()
            and child.path == parent.path
        )
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


@pytest.mark.realtime
def test_the_automatic_watcher_reloads_on_its_own(
    configmap: ConfigMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.CONFIG_FILE_VARIABLE, str(configmap.path))
    monkeypatch.setenv("BUTTRESS_CONFIG_WATCH_INTERVAL", "0.1")
    reloaded = threading.Event()
    undo = events.subscribe(lambda e: reloaded.set(), [events.SettingsReloaded])
    try:
        config.reload_settings()
        reloaded.clear()
        configmap.publish(attempts(8))
        assert reloaded.wait(1.5)
        assert max_attempts() == 8
    finally:
        undo()
        monkeypatch.delenv(config.CONFIG_FILE_VARIABLE)
        config.reload_settings()
