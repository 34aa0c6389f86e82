"""A replicated ClickHouse cluster on loopback: Debian's ``zookeeper`` and N private
``clickhouse-server`` replicas of one shard, for tests of failover, replica lag and
deduplicated inserts against the real thing.

Example::

    with LocalCluster(replicas=2) as cluster:
        cluster.create_replicated("events", "id UInt64, s String", order_by="id")
        cluster.replicas[0].kill()            # or .freeze(), .restart()
        cluster.zookeeper.kill()              # the replicated tables go read-only
        cluster.zookeeper.start()

Each replica gets the cluster ``chresilient`` in ``remote_servers``, the macros
``{shard}`` and ``{replica}``, its own interserver HTTP port, and the ZooKeeper node.
Everything lives in temp directories and is removed by ``cleanup()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .server import LocalClickHouse, LocalClickHouseError, free_ports, pdeathsig_preexec

ZOOKEEPER_CLASSPATH = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
CLUSTER = "chresilient"
_HOST = "127.0.0.1"


class LocalZooKeeper:
    """A private standalone ZooKeeper on a free loopback port (Debian's package)."""

    def __init__(self, startup_timeout: float = 30.0) -> None:
        if not os.path.exists(ZOOKEEPER_CLASSPATH.rsplit(":", 1)[1]):
            raise LocalClickHouseError(
                "ZooKeeper not found: install Debian's package (`apt-get install -y "
                "zookeeper`; scripts/bootstrap.sh does)"
            )
        self._base = Path(tempfile.mkdtemp(prefix="chresilient-zk-"))
        (self._base / "data").mkdir()
        (self.port,) = free_ports(1)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    @property
    def host(self) -> str:
        return _HOST

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start it and wait until it serves requests (``stat`` says its mode; ``ruok``
        answers ``imok`` before that)."""
        with self._lock:
            if self.running:
                return
            cfg = self._base / "zoo.cfg"
            cfg.write_text(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\n"
                f"dataDir={self._base / 'data'}\nclientPort={self.port}\n"
                f"clientPortAddress={_HOST}\nadmin.enableServer=false\n"
                "4lw.commands.whitelist=ruok,stat\nmaxSessionTimeout=60000\n",
                encoding="utf-8",
            )
            with (self._base / "zookeeper.log").open("ab") as out:
                self._proc = subprocess.Popen(
                    ["java", "-Xmx256m", f"-Dzookeeper.log.dir={self._base}", "-cp",
                     ZOOKEEPER_CLASSPATH, ZOOKEEPER_MAIN, str(cfg)],
                    cwd=str(self._base), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=pdeathsig_preexec(), close_fds=True,
                )  # fmt: skip
            deadline = time.monotonic() + self.startup_timeout
            while not self._ok():
                if not self.running or time.monotonic() > deadline:
                    self.kill()
                    raise LocalClickHouseError(f"ZooKeeper did not start on port {self.port}")
                time.sleep(0.1)

    def _ok(self) -> bool:
        try:
            with socket.create_connection((_HOST, self.port), timeout=1.0) as sock:
                sock.sendall(b"stat")
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
        except OSError:
            return False
        return b"Mode: standalone" in reply

    def kill(self) -> None:
        """SIGKILL (its data directory stays: ``start()`` brings the same state back)."""
        with self._lock:
            if self._proc is not None:
                if self._proc.poll() is None:
                    self._proc.send_signal(signal.SIGCONT)
                    self._proc.kill()
                self._proc.wait(10)
            self._proc = None

    def freeze(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self._base, ignore_errors=True)


class LocalCluster:
    """ZooKeeper and ``replicas`` clickhouse-server processes of one shard."""

    def __init__(self, replicas: int = 2) -> None:
        self.zookeeper = LocalZooKeeper()
        self._interserver = free_ports(replicas)
        self.replicas: list[LocalClickHouse] = []
        for n in range(replicas):
            self.replicas.append(
                LocalClickHouse(extra_config=lambda n=n: self._config(n))  # type: ignore[misc]
            )

    def _config(self, n: int) -> str:
        peers = "".join(
            f"<replica><host>{_HOST}</host><port>{r.port}</port></replica>" for r in self.replicas
        )
        return f"""
  <zookeeper>
    <node><host>{_HOST}</host><port>{self.zookeeper.port}</port></node>
    <session_timeout_ms>4000</session_timeout_ms>
  </zookeeper>
  <macros><shard>01</shard><replica>r{n + 1}</replica><cluster>{CLUSTER}</cluster></macros>
  <interserver_http_host>{_HOST}</interserver_http_host>
  <interserver_http_port>{self._interserver[n]}</interserver_http_port>
  <remote_servers><{CLUSTER}><shard><internal_replication>true</internal_replication>
    {peers}</shard></{CLUSTER}></remote_servers>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
"""

    def start(self) -> LocalCluster:
        self.zookeeper.start()
        for replica in self.replicas:
            replica.start()
        return self

    def create_replicated(
        self,
        table: str,
        columns: str,
        *,
        order_by: str,
        database: str = "default",
        settings: str = "",
    ) -> None:
        """The same ReplicatedMergeTree table on every replica (one ZooKeeper path);
        ``settings``: the table's SETTINGS clause, e.g. ``replicated_deduplication_window =
        10000``."""
        clause = f" SETTINGS {settings}" if settings else ""
        for replica in self.replicas:
            replica.query(
                f"CREATE TABLE IF NOT EXISTS {database}.{table} ({columns}) "
                f"ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{database}.{table}', "
                f"'{{replica}}') ORDER BY {order_by}{clause}"
            )

    def cleanup(self) -> None:
        for replica in self.replicas:
            replica.cleanup(graceful=False)
        self.zookeeper.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def query_all(self, sql: str) -> list[Any]:
        """``sql`` on every replica, their results in order."""
        return [replica.query(sql) for replica in self.replicas]
