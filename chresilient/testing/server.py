"""A private, disposable ClickHouse server for tests.

`LocalClickHouse` runs the ``clickhouse-server`` binary (Debian's 18.16 package works)
as a child process on free loopback ports, with a generated config in a temporary
directory.  Tests can then break it on purpose -- kill it, freeze it with SIGSTOP,
restart it on the same ports -- to exercise reconnect and failover paths against a real
server instead of a mock.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from ..config import Config

__all__ = ["DEFAULT_TESTER_PASSWORD", "LocalClickHouse", "LocalClickHouseError"]

#: Default password of the ``tester`` user; deliberately full of URL/XML-special characters
#: so URL quoting and XML escaping bugs surface in tests.
DEFAULT_TESTER_PASSWORD = "p@ss:w/rd#1&<x>"

_FALLBACK_BINARY = "/usr/sbin/clickhouse-server"
_HOST = "127.0.0.1"
_POLL_INTERVAL = 0.05
_PR_SET_PDEATHSIG = 1

_HOW_TO_GET_ONE = (
    "Install one with `apt-get install -y clickhouse-server` (Debian/Ubuntu), pass "
    "binary=... to LocalClickHouse, or point the tests at an existing server with "
    "CLICKHOUSE_TEST_URL=clickhouse://user:password@host:9000/default."
)


class LocalClickHouseError(RuntimeError):
    """The local server could not be found, started, or did not become ready."""


# Servers not cleaned up when the interpreter exits are killed (and their temp dirs
# removed) so an interrupted test run never leaves orphan clickhouse-server processes.
# Strong references on purpose: a dropped-but-running server must still be reaped.
_LIVE: set[LocalClickHouse] = set()
# A forked child that exits leaves its parent's servers be (it reaps only its own).
os.register_at_fork(after_in_child=_LIVE.clear)


@atexit.register
def _kill_all_at_exit() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.cleanup(graceful=False)


def _resolve_binary(binary: str | os.PathLike[str] | None) -> str:
    if binary is not None:
        path = os.fspath(binary)
        found = shutil.which(path) if os.sep not in path else path
        if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise LocalClickHouseError(
                f"clickhouse-server binary {path!r} not found or not executable. " + _HOW_TO_GET_ONE
            )
        return found
    found = shutil.which("clickhouse-server")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise LocalClickHouseError("clickhouse-server binary not found. " + _HOW_TO_GET_ONE)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once so they cannot coincide), below
    the kernel's ephemeral range when it leaves room: a server restarted on its port must
    not find it taken by a client's outgoing connection (those get ephemeral ports)."""
    low = _ephemeral_low()
    socks: list[socket.socket] = []
    try:
        for tries in range(count + 200):
            if len(socks) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((_HOST, random.randrange(10000, low) if low > 11000 and tries < 200 else 0))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent thread dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only armed for
    servers started from the main thread (otherwise a short-lived worker thread would
    take the server down with it).  The atexit hook covers orderly interpreter exits;
    this covers the parent being SIGKILLed.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Only async-signal-safe-ish work here: the symbol was resolved before fork.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # parent already gone before prctl took effect
            os._exit(1)

    return preexec


class LocalClickHouse:
    """A ``clickhouse-server`` child process on private loopback ports.

    Ports and data directory are chosen once and kept across `restart()`, so clients
    configured with `url` see "the same server coming back", as in production.

    Users: ``default`` (empty password) and ``tester`` (password `password`), both
    restricted to loopback networks.
    """

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        password: str = DEFAULT_TESTER_PASSWORD,
        max_concurrent_queries: int = 100,
        startup_timeout: float = 30.0,
        extra_config: str | Callable[[], str] = "",
    ) -> None:
        self._binary = _resolve_binary(binary)
        self._own_dir = data_dir is None
        self._base = (
            Path(tempfile.mkdtemp(prefix="chresilient-ch-"))
            if data_dir is None
            else Path(data_dir).resolve()
        )
        self._password = password
        self._max_concurrent_queries = int(max_concurrent_queries)
        # More server config (XML inside <yandex>), read at every start: a replicated
        # cluster's ZooKeeper, macros and peers (testing/cluster.py).
        self._extra_config = extra_config
        self.startup_timeout = float(startup_timeout)
        self._port, self._http_port = free_ports(2)
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._started_once = False
        self._version: str | None = None
        self._lock = threading.RLock()
        self._cleaned = False
        _LIVE.add(self)

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return _HOST

    @property
    def port(self) -> int:
        """Native protocol (TCP) port."""
        return self._port

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def user(self) -> str:
        return "default"

    @property
    def tester_user(self) -> str:
        return "tester"

    @property
    def password(self) -> str:
        """Password of the ``tester`` user (``default`` has none)."""
        return self._password

    @property
    def url(self) -> str:
        return f"clickhouse://default@{_HOST}:{self._port}/default"

    @property
    def user_url(self) -> str:
        """URL for the ``tester`` user.  Contains the password: do not log it."""
        pw = quote(self._password, safe="")
        return f"clickhouse://tester:{pw}@{_HOST}:{self._port}/default"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def frozen(self) -> bool:
        return self._frozen and self.running

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process (negative signal number if killed)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def base_dir(self) -> Path:
        return self._base

    @property
    def data_path(self) -> Path:
        return self._base / "data"

    @property
    def log_path(self) -> Path:
        return self._base / "log" / "clickhouse-server.log"

    @property
    def error_log_path(self) -> Path:
        return self._base / "log" / "clickhouse-server.err.log"

    @property
    def stderr_path(self) -> Path:
        return self._base / "log" / "stderr.log"

    @property
    def config_path(self) -> Path:
        return self._base / "config.xml"

    @property
    def version(self) -> str | None:
        """Server version string, known after the first successful start."""
        return self._version

    def __repr__(self) -> str:  # never include the password
        state = "frozen" if self.frozen else ("running" if self.running else "stopped")
        return f"<LocalClickHouse {_HOST}:{self._port} http={self._http_port} {state}>"

    # ------------------------------------------------------------------ config

    def _write_config(self) -> None:
        b = self._base
        for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        extra = self._extra_config() if callable(self._extra_config) else self._extra_config
        config = f"""<?xml version="1.0"?>
<yandex>
  <logger>
    <level>information</level>
    <log>{escape(str(self.log_path))}</log>
    <errorlog>{escape(str(self.error_log_path))}</errorlog>
    <size>10M</size>
    <count>2</count>
    <console>0</console>
  </logger>
  <listen_host>{_HOST}</listen_host>
  <tcp_port>{self._port}</tcp_port>
  <http_port>{self._http_port}</http_port>
  <path>{escape(str(b / "data"))}/</path>
  <tmp_path>{escape(str(b / "tmp"))}/</tmp_path>
  <user_files_path>{escape(str(b / "user_files"))}/</user_files_path>
  <format_schema_path>{escape(str(b / "format_schemas"))}/</format_schema_path>
  <users_config>{escape(str(b / "users.xml"))}</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <max_concurrent_queries>{self._max_concurrent_queries}</max_concurrent_queries>
  <mark_cache_size>67108864</mark_cache_size>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
{extra}
</yandex>
"""
        networks = "<networks><ip>::1</ip><ip>127.0.0.1</ip></networks>"
        common = f"{networks}<profile>default</profile><quota>default</quota>"
        users = f"""<?xml version="1.0"?>
<yandex>
  <profiles>
    <default>
      <max_memory_usage>2000000000</max_memory_usage>
      <!-- idle connections notice a shutdown every poll_interval s (default 10):
           keeps a graceful stop()/restart() with connected clients at ~1 s -->
      <poll_interval>1</poll_interval>
    </default>
  </profiles>
  <users>
    <default><password></password>{common}</default>
    <tester><password>{escape(self._password)}</password>{common}</tester>
  </users>
  <quotas>
    <default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
      <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default>
  </quotas>
</yandex>
"""
        self.config_path.write_text(config, encoding="utf-8")
        users_path = b / "users.xml"
        users_path.write_text(users, encoding="utf-8")
        users_path.chmod(0o600)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Spawn the server and block until it answers ``SELECT 1`` (or raise)."""
        with self._lock:
            if self._cleaned:
                raise LocalClickHouseError("server was cleaned up; create a new one")
            if self.running:
                return
            # A freshly picked port can be grabbed by someone else before the server
            # binds it; only on the very first start may we move to other ports.
            attempts = 1 if self._started_once else 3
            for attempt in range(attempts):
                try:
                    self._spawn_and_wait()
                    break
                except LocalClickHouseError as exc:
                    if attempt + 1 < attempts and "Address already in use" in str(exc):
                        self._port, self._http_port = free_ports(2)
                        continue
                    raise
            self._started_once = True

    def _spawn_and_wait(self) -> None:
        self._write_config()
        # Truncate the error log so failures report this attempt's errors only.
        self.error_log_path.write_bytes(b"")
        with self.stderr_path.open("wb") as out:
            self._proc = subprocess.Popen(
                [self._binary, f"--config-file={self.config_path}"],
                cwd=str(self._base),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our process group's signals don't reach it
                preexec_fn=pdeathsig_preexec(),
                close_fds=True,
            )
        self._frozen = False
        try:
            self._wait_ready(self.startup_timeout)
        except LocalClickHouseError:
            self._kill_proc()
            raise

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers a native ``SELECT 1`` (or raise)."""
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from clickhouse_driver import Client

        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise LocalClickHouseError(
                    f"clickhouse-server exited with status {code} during startup"
                    + self._log_excerpt()
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalClickHouseError(
                    f"clickhouse-server did not answer SELECT 1 on {_HOST}:{self._port} "
                    f"within {timeout:.1f}s (last error: {last_error!r})" + self._log_excerpt()
                )
            step = max(0.1, min(2.0, remaining))
            # Cheap raw probe first: while nothing listens yet, clickhouse-driver would
            # log a warning with a traceback for every refused attempt.
            try:
                socket.create_connection((_HOST, self._port), timeout=step).close()
            except OSError as exc:
                last_error = exc
                time.sleep(_POLL_INTERVAL)
                continue
            client = Client(
                _HOST,
                port=self._port,
                connect_timeout=step,
                send_receive_timeout=step,
                sync_request_timeout=step,
            )
            try:
                client.execute("SELECT 1")
                info: Any = client.connection.server_info
                if info is not None:
                    self._version = "{}.{}.{}".format(*info.version_tuple())
                return
            except Exception as exc:  # not ready yet: refused, reset, timeout...
                last_error = exc
            finally:
                client.disconnect()
            time.sleep(_POLL_INTERVAL)

    def _log_excerpt(self) -> str:
        parts = []
        err = _tail(self.error_log_path)
        if err:
            parts.append(f"--- {self.error_log_path} (tail) ---\n{err}")
        out = _tail(self.stderr_path)
        if out:
            parts.append(f"--- server stdout/stderr (tail) ---\n{out}")
        return ("\n" + "\n".join(parts)) if parts else ""

    def _signal(self, sig: int) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        try:
            os.killpg(proc.pid, sig)  # its own session: pgid == pid
        except ProcessLookupError:
            return False
        except PermissionError:
            proc.send_signal(sig)
        return True

    def _kill_proc(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self._frozen = False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM), falling back to SIGKILL after `timeout` seconds."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                self._frozen = False
                return
            self._signal(signal.SIGTERM)
            if self._frozen:  # a stopped process only acts on SIGTERM once continued
                self._signal(signal.SIGCONT)
                self._frozen = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_proc()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it, so the ports are free again."""
        with self._lock:
            self._kill_proc()

    def restart(self, timeout: float = 10.0) -> None:
        """`stop()` then `start()` on the same ports and data directory."""
        with self._lock:
            self.stop(timeout)
            self.start()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets (connects still complete) but answers nothing."""
        with self._lock:
            if not self._signal(signal.SIGSTOP):
                raise LocalClickHouseError("cannot freeze: server is not running")
            self._frozen = True

    def thaw(self) -> None:
        """SIGCONT after `freeze()`."""
        with self._lock:
            self._signal(signal.SIGCONT)
            self._frozen = False

    def cleanup(self, graceful: bool = True) -> None:
        """Stop the server (if running) and remove the directory if we created it."""
        with self._lock:
            if self._frozen:
                self.thaw()
            if graceful:
                self.stop()
            else:
                self._kill_proc()
            _LIVE.discard(self)
            if self._own_dir and not self._cleaned:
                shutil.rmtree(self._base, ignore_errors=True)
            self._cleaned = True

    def __enter__(self) -> LocalClickHouse:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ convenience

    def client(self, **kwargs: Any) -> Any:
        """A bare ``clickhouse_driver.Client`` for the ``default`` user."""
        from clickhouse_driver import Client

        return Client(_HOST, port=self._port, **kwargs)

    def config(self, **changes: Any) -> Config:
        """A chresilient Config for this server (``default`` user, its own spool directory
        inside the server's, so tests never replay each other's batches); ``changes``
        override any field."""
        fields: dict[str, Any] = {
            "host": _HOST,
            "port": self._port,
            "spool_dir": tempfile.mkdtemp(prefix="spool-", dir=self._base),
        }
        fields.update(changes)
        return Config(**fields)

    def query(self, sql: str, timeout: float = 10.0) -> Any:
        """Run one query on a fresh connection (handy for assertions/setup)."""
        client = self.client(
            connect_timeout=timeout, send_receive_timeout=timeout, sync_request_timeout=timeout
        )
        try:
            return client.execute(sql)
        finally:
            client.disconnect()
