"""A real ``redis-server`` per test, on a free loopback port, with its faults at hand.

The binary comes from the Debian package ``redis-server`` (``.ci/run`` installs it). Without it
the tests here are skipped locally, and fail when ``CI`` is set: a CI run that silently skipped
the shared-state tests would prove nothing.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = random.randrange(20000, 55000)
        with socket.socket() as one, socket.socket() as bus:
            try:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """One ``redis-server`` process: start, kill, freeze, thaw, restart (always empty)."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        password: str | None = None,
        unixsocket: Path | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.unixsocket = unixsocket
        self.extra = extra
        self.port = port or _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.unixsocket is not None:
            args += ["--unixsocket", str(self.unixsocket), "--unixsocketperm", "700"]
        args += self.extra
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if self.client().ping():
                    return
            except OSError:
                pass
            except Exception as exc:  # redis.ConnectionError while it boots
                if "onnect" not in type(exc).__name__ and "Loading" not in type(exc).__name__:
                    raise
            time.sleep(0.01)
        raise RuntimeError("redis-server did not answer within 10 s")

    def client(self) -> Any:
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
            decode_responses=True,
        )

    def counter(self) -> Callable[[], dict[str, int]]:
        """Start counting commands; the returned function gives the count since, by name.

        From ``INFO commandstats``, which also counts what scripts run inside Redis. The
        counting connection's own ``INFO`` is left out.
        """
        client = self.client()

        def calls() -> dict[str, int]:
            stats = client.info("commandstats")
            return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

        before = calls()

        def since() -> dict[str, int]:
            now = calls()
            ran = {name: n - before.get(name, 0) for name, n in now.items()}
            ran["info"] -= 1
            return {name: n for name, n in ran.items() if n}

        return since

    def kill(self) -> None:
        """SIGKILL: the port refuses connections until ``restart``."""
        if self.process is not None:
            if self.frozen:
                self.thaw()
            self.process.kill()
            self.process.wait(5)
            self.process = None

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    def restart(self) -> None:
        """Start again, empty, on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            if self.frozen:
                self.thaw()
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None


def _binary() -> str:
    if REDIS_SERVER is None:
        message = "redis-server is not installed (Debian package redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the shared-state tests")
        pytest.skip(message)
    return REDIS_SERVER


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for this test only; stopped afterwards."""
    server = RedisServer(_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def secured_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that requires a password (``requirepass``)."""
    server = RedisServer(_binary(), tmp_path, password="s3cr3t-p4ss")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def unix_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that also listens on a Unix socket (``.socket``; ``unix://`` URLs)."""
    # A socket path must fit in 108 bytes: pytest's tmp_path for a long test name does not.
    short = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    server = RedisServer(_binary(), tmp_path, unixsocket=short / "redis.sock")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(short, ignore_errors=True)


class SentinelSet:
    """A master, one replica and three sentinels (quorum 2), all on loopback.

    Timeouts are short so a failover after the master dies takes about a second.
    """

    MASTER = "bt"

    def __init__(self, binary: str, directory: Path) -> None:
        self.directory = directory
        (directory / "master").mkdir()
        (directory / "replica").mkdir()
        self.master = RedisServer(binary, directory / "master")
        self.replica = RedisServer(
            binary,
            directory / "replica",
            extra=("--replicaof", "127.0.0.1", "0"),  # the port is set in start()
        )
        self.sentinel_ports = [_free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.MASTER}/0"

    def start(self) -> None:
        self.master.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        sentinel = shutil.which("redis-sentinel")
        assert sentinel is not None, "redis-sentinel is installed with redis-server"
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"logfile {self.directory}/sentinel-{port}.log\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 300\n"
                f"sentinel failover-timeout {self.MASTER} 2000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [sentinel, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        # Ready when every sentinel knows the replica and the other sentinels. A sentinel learns
        # of replicas from the master's INFO, which it asks every 10 s: on a busy host the first
        # answer can take longer than that, so the bound is generous (it is not a sleep).
        self.wait(
            lambda info: info["num-slaves"] >= 1 and info["num-other-sentinels"] >= 2, seconds=40
        )

    def sentinel_client(self, port: int) -> Any:
        import redis

        return redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1,
            decode_responses=True,
        )  # fmt: skip

    def wait(self, ready: Callable[[dict[str, Any]], bool], seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if all(
                    ready(self.sentinel_client(port).sentinel_master(self.MASTER))
                    for port in self.sentinel_ports
                ):
                    return
            except Exception:  # a sentinel still starting
                pass
            time.sleep(0.02)
        raise RuntimeError("the sentinels did not get ready in time")

    def fail_over(self) -> None:
        """Kill the master; return once the sentinels have promoted the replica."""
        self.master.kill()
        self.wait(lambda info: int(info["port"]) == self.replica.port, seconds=30)

    def stop(self) -> None:
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A fresh Sentinel setup (1 master, 1 replica, 3 sentinels); stopped afterwards."""
    setup = SentinelSet(_binary(), tmp_path)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


class RedisCluster:
    """Three masters (no replicas), the slots split evenly, joined with CLUSTER MEET.

    ``cluster-require-full-coverage no``: the loss of one node takes only its slots away.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.nodes = []
        for i in range(3):
            home = directory / f"n{i}"
            home.mkdir()
            extra = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(home / "nodes.conf"),
                "--cluster-node-timeout", "500",
                "--cluster-require-full-coverage", "no",
            )  # fmt: skip
            self.nodes.append(RedisServer(binary, home, extra=extra, port=_cluster_port()))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        step = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * step - 1
            node.client().execute_command("CLUSTER ADDSLOTSRANGE", i * step, last)
        for node in self.nodes[1:]:
            node.client().execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            infos = [node.client().cluster("INFO") for node in self.nodes]
            if all(
                i["cluster_state"] == "ok"
                and int(i["cluster_known_nodes"]) == len(self.nodes)
                and int(i["cluster_slots_assigned"]) == 16384
                for i in infos
            ):
                return
            time.sleep(0.02)
        raise RuntimeError("the cluster did not form in time")

    def owner(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot."""
        slot = self.nodes[0].client().execute_command("CLUSTER KEYSLOT", key)
        step = 16384 // len(self.nodes)
        return self.nodes[min(int(slot) // step, len(self.nodes) - 1)]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A fresh 3-master Redis Cluster; stopped afterwards."""
    cluster = RedisCluster(_binary(), tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def closed_port() -> str:
    """A Redis URL on a loopback port where nothing listens."""
    return f"redis://127.0.0.1:{_free_port()}/0"


class Peer:
    """One storage, as one process of the fleet sees it, driven as ``def`` or ``async def``.

    The ``mode`` fixture decides: the storage's decision (``admission``, ``recording``,
    ``setting``) is performed by the thread driver (``settle``) or, on the mode's event loop, by
    the task driver (``asettle``).
    """

    def __init__(self, storage: Any, mode: Any) -> None:
        self.storage = storage
        self.mode = mode

    def perform(self, effect: Any) -> Any:
        from buttress.policy import asettle, settle

        return self.mode.run(asettle, effect) if self.mode.is_async else settle(effect)

    def admit(self, limits: Any) -> Any:
        return self.perform(self.storage.admission(limits))

    def record(self, ticket: Any, outcome: str, limits: Any) -> Any:
        return self.perform(self.storage.recording(ticket, outcome, limits))

    def force(self, state: str, limits: Any = None) -> Any:
        return self.perform(self.storage.setting(state, limits, expected=None, always=True))

    def call(self, limits: Any, body: Any = None) -> Any:
        """One protected call the way a breaker makes it: admit, run ``body``, record.

        Returns ``"rejected"`` when not admitted, else ``body()``'s result (``"ok"`` if None);
        re-raises what ``body`` raised.
        """
        ticket = self.admit(limits)
        if not ticket.admitted:
            return "rejected"
        try:
            result = "ok" if body is None else body()
        except Exception:
            self.record(ticket, "failure", limits)
            raise
        self.record(ticket, "success", limits)
        return result


@pytest.fixture
def peers(mode: Any, redis_server: RedisServer) -> Iterator[Callable[..., Peer]]:
    """``peers(service="svc", url=None, **make_storage_options)``: a new storage on the server."""
    from buttress.patterns.circuit_breaker.redis_storage import make_storage

    made: list[Any] = []

    def make(service: str = "svc", url: str | None = None, **options: Any) -> Peer:
        storage = make_storage(url or redis_server.url, service, **options)
        made.append(storage)
        return Peer(storage, mode)

    yield make
    for storage in made:
        if mode.is_async:
            mode.run(storage.aclose)
        storage.close()
