"""Tests of the real-server harness itself: LocalClickHouse, FaultProxy and the fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from clickhouse_driver import Client, errors
from helpers import (
    NETWORK_ERRORS,
    ClickHouseEndpoint,
    fast_client,
    pid_alive,
    port_refuses,
    settled_tcp_connections,
    tcp_connections,
    wait_until,
)

from chresilient.testing.faultproxy import FaultProxy, Mode
from chresilient.testing.server import LocalClickHouse, LocalClickHouseError

WRONG_PASSWORD_CODES = {193, 516}  # 18.x "Wrong password" / modern AUTHENTICATION_FAILED


def _whoami(client: Client) -> str:
    # 18.16 has no currentUser(); the query can see itself in system.processes. A marker
    # of its own: an earlier client's query may still be listed for a moment.
    marker = uuid.uuid4().hex
    rows = client.execute(
        f"SELECT user, 'whoami-{marker}' FROM system.processes WHERE query LIKE '%whoami-{marker}%'"
    )
    return str(rows[0][0])


# --------------------------------------------------------------------------- server


def test_session_server_answers(clickhouse: ClickHouseEndpoint, client: Client) -> None:
    version = client.execute("SELECT version()")[0][0]
    assert isinstance(version, str) and version[0].isdigit()
    if clickhouse.local is not None:
        assert clickhouse.local.version == version
        assert clickhouse.local.running
    assert Client.from_url(clickhouse.url).execute("SELECT 1") == [(1,)]


def test_local_server_properties(clickhouse_server: LocalClickHouse) -> None:
    s = clickhouse_server
    assert s.host == "127.0.0.1"
    assert s.port != s.http_port
    assert s.url == f"clickhouse://default@127.0.0.1:{s.port}/default"
    assert s.password not in repr(s)
    assert s.log_path.exists()
    assert s.pid is not None and pid_alive(s.pid)
    assert s.query("SELECT timezone()")[0][0] in ("UTC", "Etc/UTC")
    # listen_host is 127.0.0.1 only: the HTTP port answers there too.
    with socket.create_connection((s.host, s.http_port), timeout=2) as sock:
        sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
        assert b"Ok." in sock.recv(4096)


def test_tester_user_authenticates(clickhouse_server: LocalClickHouse) -> None:
    s = clickhouse_server
    assert any(ch in s.password for ch in "@:/#")
    assert _whoami(Client.from_url(s.user_url)) == "tester"
    assert _whoami(Client(s.host, port=s.port, user="tester", password=s.password)) == "tester"
    assert _whoami(s.client()) == "default"

    with pytest.raises(errors.ServerException) as excinfo:
        Client(s.host, port=s.port, user="tester", password="wrong").execute("SELECT 1")
    assert excinfo.value.code in WRONG_PASSWORD_CODES


def test_kill_then_restart_on_same_port(clickhouse_server: LocalClickHouse) -> None:
    s = clickhouse_server
    port, http_port, old_pid = s.port, s.http_port, s.pid
    client = fast_client(s.host, s.port, timeout=2)
    assert client.execute("SELECT 1") == [(1,)]

    s.kill()
    assert not s.running and s.pid is None
    assert s.returncode == -signal.SIGKILL
    assert old_pid is not None and not pid_alive(old_pid)  # reaped, not a zombie
    assert port_refuses(s.host, port)
    with pytest.raises(NETWORK_ERRORS):
        client.execute("SELECT 1")

    started = time.monotonic()
    s.restart()
    assert time.monotonic() - started < 30  # hang guard (a restart takes 1-2 s)
    assert (s.port, s.http_port) == (port, http_port)
    assert s.pid != old_pid
    assert client.execute("SELECT 1") == [(1,)]  # the driver reconnects by itself

    # Again, with an established connection at the moment of the kill (server-side
    # sockets of the dead process linger): the port must still be re-bindable.
    s.kill()
    s.start()
    assert client.execute("SELECT 2") == [(2,)]


def test_data_survives_kill_and_graceful_restart(clickhouse_server: LocalClickHouse) -> None:
    s = clickhouse_server
    s.query("CREATE TABLE t (x UInt64) ENGINE = MergeTree ORDER BY x")
    s.query("INSERT INTO t SELECT number FROM system.numbers LIMIT 3")
    s.kill()
    s.start()
    assert s.query("SELECT count() FROM t") == [(3,)]

    client = s.client()
    client.execute("SELECT 1")  # an idle connected client must not stall a graceful stop
    started = time.monotonic()
    s.restart()
    assert time.monotonic() - started < 30  # hang guard
    assert s.returncode is None and s.running
    assert s.query("SELECT count() FROM t") == [(3,)]


def test_freeze_times_out_and_thaw_recovers(clickhouse_server: LocalClickHouse) -> None:
    s = clickhouse_server
    client = fast_client(s.host, s.port, timeout=1)
    assert client.execute("SELECT 1") == [(1,)]

    s.freeze()
    assert s.frozen and s.running
    started = time.monotonic()
    with pytest.raises((errors.SocketTimeoutError, *NETWORK_ERRORS)):
        client.execute("SELECT 1")
    assert time.monotonic() - started < 10  # hang guard: the 1 s timeouts ended it

    s.thaw()
    assert not s.frozen
    s.wait_ready(10)
    assert client.execute("SELECT 1") == [(1,)]


def test_stop_while_frozen_is_bounded(clickhouse_server: LocalClickHouse) -> None:
    s = clickhouse_server
    pid = s.pid
    s.freeze()
    started = time.monotonic()
    s.stop(timeout=5)
    assert time.monotonic() - started < 20  # bounded: SIGKILL after the 5 s
    assert not s.running and pid is not None and not pid_alive(pid)


def test_context_manager_cleans_up() -> None:
    with LocalClickHouse() as s:
        pid, base = s.pid, s.base_dir
        assert s.query("SELECT 1") == [(1,)]
    assert pid is not None and not pid_alive(pid)
    assert not base.exists()


def test_given_data_dir_is_kept(tmp_path: Path) -> None:
    with LocalClickHouse(data_dir=tmp_path / "ch") as s:
        assert s.base_dir == (tmp_path / "ch").resolve()
    assert (tmp_path / "ch" / "config.xml").exists()


def test_missing_binary_says_how_to_get_one() -> None:
    with pytest.raises(LocalClickHouseError) as excinfo:
        LocalClickHouse(binary="/nonexistent/clickhouse-server")
    message = str(excinfo.value)
    assert "apt-get install -y clickhouse-server" in message
    assert "CLICKHOUSE_TEST_URL" in message


def test_startup_failure_reports_output(tmp_path: Path) -> None:
    fake = tmp_path / "fake-server"
    fake.write_text("#!/bin/sh\necho 'boom: bad config' >&2\nexit 3\n")
    fake.chmod(0o755)
    s = LocalClickHouse(binary=fake, startup_timeout=5)
    try:
        with pytest.raises(LocalClickHouseError, match="boom: bad config"):
            s.start()
        assert not s.running
    finally:
        s.cleanup()


def test_startup_timeout_kills_the_process(tmp_path: Path) -> None:
    fake = tmp_path / "hanging-server"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    s = LocalClickHouse(binary=fake, startup_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(LocalClickHouseError, match="did not answer"):
            s.start()
        assert time.monotonic() - started < 5
        assert not s.running
    finally:
        s.cleanup()


_CHILD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from chresilient.testing.server import LocalClickHouse
    s = LocalClickHouse()
    s.start()
    print(s.pid, s.base_dir, flush=True)
    if sys.argv[1] == "hang":
        time.sleep(60)
    # "exit": leave without cleanup(); the atexit hook must reap the server
    """
)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_server_dies_with_its_python_parent(how: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_SCRIPT, "exit" if how == "exit" else "hang"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    server_pid = None
    base = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "child did not start its server"
        pid_text, base_text = line.split(maxsplit=1)
        server_pid, base = int(pid_text), Path(base_text.strip())
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)  # no atexit: PR_SET_PDEATHSIG must do it
        proc.wait(timeout=10)
        wait_until(lambda: not pid_alive(server_pid), 5, what="server to die with parent")
        if how == "exit":
            assert not base.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid is not None and pid_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


_FORKING_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from chresilient.testing.server import LocalClickHouse
    s = LocalClickHouse()
    s.start()
    s.query("CREATE TABLE kept (x UInt8) ENGINE = MergeTree ORDER BY x")
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a forked worker ends normally: its atexit hooks run
    os.waitpid(pid, 0)
    print(s.base_dir.exists(), s.query("SELECT count() FROM system.tables WHERE name = 'kept'"))
    s.cleanup()
    """
)


def test_a_forked_child_that_exits_leaves_its_parents_server_alone() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FORKING_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "[(1,)]"], done.stdout


# --------------------------------------------------------------------------- proxy


def test_proxy_pass_forwards(
    fault_proxy: FaultProxy, client: Client, clickhouse: ClickHouseEndpoint
) -> None:
    assert fault_proxy.mode is Mode.PASS
    assert fault_proxy.address == (fault_proxy.host, fault_proxy.port)
    assert fault_proxy.target == (clickhouse.host, clickhouse.port)
    before = settled_tcp_connections(client)

    proxied = fast_client(fault_proxy.host, fault_proxy.port, timeout=5)
    assert proxied.execute("SELECT 42") == [(42,)]
    assert fault_proxy.connections_total == 1
    assert fault_proxy.active_connections == 1
    wait_until(lambda: tcp_connections(client) == before + 1, what="server-side connection")

    rows = proxied.execute("SELECT number FROM system.numbers LIMIT 200000")
    assert len(rows) == 200000 and rows[-1] == (199999,)

    proxied.disconnect()
    wait_until(lambda: fault_proxy.active_connections == 0, what="proxy to drop connection")
    wait_until(lambda: tcp_connections(client) == before, what="server to see disconnect")


def test_proxy_refuse_fails_fast(fault_proxy: FaultProxy) -> None:
    port = fault_proxy.port
    established = fast_client(fault_proxy.host, port, timeout=5)
    assert established.execute("SELECT 1") == [(1,)]

    fault_proxy.set_mode("refuse")
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((fault_proxy.host, port), timeout=5)
    with pytest.raises(errors.NetworkError):
        fast_client(fault_proxy.host, port, timeout=5).execute("SELECT 1")
    assert time.monotonic() - started < 5.0  # refused at once, not timed out
    # Established connections are not affected by REFUSE.
    assert established.execute("SELECT 2") == [(2,)]

    fault_proxy.set_mode(Mode.PASS)
    assert fault_proxy.port == port
    assert fast_client(fault_proxy.host, port, timeout=5).execute("SELECT 3") == [(3,)]


def test_proxy_reset_active_kills_in_flight_query(fault_proxy: FaultProxy) -> None:
    proxied = fast_client(fault_proxy.host, fault_proxy.port, timeout=10)
    assert proxied.execute("SELECT 1") == [(1,)]

    timer = threading.Timer(0.3, fault_proxy.reset_active)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(NETWORK_ERRORS):
            proxied.execute("SELECT sleep(3)")
    finally:
        timer.join(5)
    assert time.monotonic() - started < 2.5  # failed at the reset (0.3 s), not at 3 s
    # Still in PASS mode: the driver reconnects and the next query works.
    assert proxied.execute("SELECT 1") == [(1,)]


def test_proxy_reset_mode(fault_proxy: FaultProxy, client: Client) -> None:
    before = settled_tcp_connections(client)
    connected = fast_client(fault_proxy.host, fault_proxy.port, timeout=5)
    assert connected.execute("SELECT 1") == [(1,)]

    fault_proxy.set_mode("reset")  # resets the active connection right away
    assert fault_proxy.active_connections == 0
    started = time.monotonic()
    with pytest.raises(NETWORK_ERRORS):
        connected.execute("SELECT 1")  # ping fails, reconnect is reset at handshake
    with pytest.raises(NETWORK_ERRORS):
        fast_client(fault_proxy.host, fault_proxy.port, timeout=5).execute("SELECT 1")
    assert time.monotonic() - started < 10  # reset at once, not timed out (2 x 5 s)

    # Mid-stream: forward the handshake and part of the result, then reset.
    fault_proxy.reset(after_bytes=20_000)
    with pytest.raises(NETWORK_ERRORS):
        fast_client(fault_proxy.host, fault_proxy.port, timeout=5).execute(
            "SELECT number FROM system.numbers LIMIT 1000000"
        )

    fault_proxy.pass_through()
    assert fast_client(fault_proxy.host, fault_proxy.port, timeout=5).execute("SELECT 1") == [(1,)]
    # The server saw the resets too: no leaked server-side connections.
    wait_until(lambda: tcp_connections(client) <= before + 1, what="server connections")


def test_proxy_latency_slows_queries(fault_proxy: FaultProxy) -> None:
    proxied = fast_client(fault_proxy.host, fault_proxy.port, timeout=5)
    assert proxied.execute("SELECT 1") == [(1,)]

    fault_proxy.set_mode("latency", latency=0.2)
    started = time.monotonic()
    assert proxied.execute("SELECT 1") == [(1,)]
    elapsed = time.monotonic() - started
    assert elapsed >= 0.2
    assert elapsed < 10  # no-hang bound only

    fault_proxy.pass_through()
    started = time.monotonic()
    assert proxied.execute("SELECT 1") == [(1,)]
    assert time.monotonic() - started < 5


def test_proxy_blackhole_times_out_then_recovers(fault_proxy: FaultProxy) -> None:
    proxied = fast_client(fault_proxy.host, fault_proxy.port, timeout=1)
    assert proxied.execute("SELECT 1") == [(1,)]

    fault_proxy.set_mode(Mode.BLACKHOLE)
    started = time.monotonic()
    with pytest.raises((errors.SocketTimeoutError, *NETWORK_ERRORS)):
        proxied.execute("SELECT 1")
    assert time.monotonic() - started < 10  # hang guard: the 1 s timeouts ended it

    # Raw view: the connect succeeds, but nothing ever comes back.
    with socket.create_connection(fault_proxy.address, timeout=2) as sock:
        sock.sendall(b"\x00garbage")
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(1)

    fault_proxy.pass_through()
    fresh = fast_client(fault_proxy.host, fault_proxy.port, timeout=5)
    assert fresh.execute("SELECT 1") == [(1,)]


def test_proxy_close_is_bounded(clickhouse: ClickHouseEndpoint) -> None:
    proxy = FaultProxy((clickhouse.host, clickhouse.port)).start()
    socks = [socket.create_connection(proxy.address, timeout=2) for _ in range(5)]
    try:
        wait_until(lambda: proxy.active_connections == 5, what="5 proxied connections")
        proxy.set_mode("latency", latency=30)
        for sock in socks:
            sock.sendall(b"x")
        started = time.monotonic()
        proxy.close()
        assert time.monotonic() - started < 5.0  # not the 30 s latency
        alive = [t.name for t in threading.enumerate() if t.name.startswith("faultproxy-")]
        assert alive == []
        assert port_refuses(proxy.host, proxy.port)
    finally:
        for sock in socks:
            sock.close()


def test_proxy_max_connections(clickhouse: ClickHouseEndpoint) -> None:
    with FaultProxy((clickhouse.host, clickhouse.port), max_connections=2) as proxy:
        socks = [socket.create_connection(proxy.address, timeout=2) for _ in range(2)]
        try:
            wait_until(lambda: proxy.active_connections == 2, what="2 proxied connections")
            # The third is reset: on recv, or already in connect() when the RST arrives
            # before the client's connect returned (a loaded machine).
            with pytest.raises(ConnectionResetError):
                third = socket.create_connection(proxy.address, timeout=2)
                socks.append(third)
                third.settimeout(2)
                third.recv(1)
            wait_until(lambda: proxy.connections_total == 3, what="3 accepted connections")
            assert proxy.active_connections == 2
            assert proxy.rejected_over_limit == 1
        finally:
            for sock in socks:
                sock.close()


def test_proxy_refuses_non_loopback_targets() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("192.0.2.1", 9000))
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(("10.0.0.1", 9000))
    FaultProxy(("localhost", 9000)).close()  # resolves to loopback: fine, never started


def test_proxy_in_front_of_private_server_survives_restart(
    clickhouse_server: LocalClickHouse,
) -> None:
    with FaultProxy((clickhouse_server.host, clickhouse_server.port)) as proxy:
        proxied = fast_client(proxy.host, proxy.port, timeout=2)
        assert proxied.execute("SELECT 1") == [(1,)]
        clickhouse_server.kill()
        with pytest.raises(NETWORK_ERRORS):
            proxied.execute("SELECT 1")  # upstream refused: the proxy resets the client
        clickhouse_server.start()
        assert proxied.execute("SELECT 1") == [(1,)]
