"""The pytest plugin, as a user's project uses it: only its fixtures, run by ``pytester``
in a separate pytest process (the plugin loads through its ``pytest11`` entry point)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_OUTAGE_TEST = '''
import time
import uuid

import pytest

from chresilient import ClickHouseConnectionManager, ClickHouseUnavailableError, RetryConfig

FAST = RetryConfig(initial_delay=0.05, max_delay=0.2, timeout_per_attempt=2, total_timeout=3)


@pytest.mark.clickhouse_config(retry=FAST, spool_replay_interval=0.2)
def test_events_survive_a_clickhouse_crash(clickhouse_server, clickhouse_manager):
    table = f"events_{uuid.uuid4().hex}"
    clickhouse_manager.execute(f"CREATE TABLE {table} (id UInt32) ENGINE = MergeTree ORDER BY id")
    clickhouse_server.kill()
    result = clickhouse_manager.insert(table, [(1,), (2,)], column_names=["id"])
    assert result.spooled and not result.delivered
    clickhouse_server.start()
    deadline = time.monotonic() + 60
    while clickhouse_server.query(f"SELECT count() FROM {table}") != [(2,)]:
        assert time.monotonic() < deadline, "the spooled rows never arrived"
        time.sleep(0.1)


def test_the_server_answers_again_in_the_next_test(clickhouse_server):
    assert clickhouse_server.query("SELECT 1") == [(1,)]


def test_refused_connections_through_the_proxy(clickhouse_server, clickhouse_fault_proxy):
    proxy = clickhouse_fault_proxy
    cfg = clickhouse_server.config(host=proxy.host, port=proxy.port, retry=FAST)
    with ClickHouseConnectionManager(cfg) as mgr:
        proxy.refuse()
        with pytest.raises(ClickHouseUnavailableError):
            mgr.execute("SELECT 1")
        proxy.pass_through()
        mgr.reconnect()
        assert mgr.execute("SELECT 1") == [(1,)]


def test_a_frozen_server_is_thawed_after_the_test(clickhouse_server):
    clickhouse_server.freeze()
'''

SERVER_PORTS = """
PORTS = []

def test_one(clickhouse_server):
    PORTS.append(clickhouse_server.port)

def test_two(clickhouse_server):
    PORTS.append(clickhouse_server.port)
    assert len(set(PORTS)) == 2, PORTS
"""


def test_a_users_outage_tests_run_green_with_the_plugins_fixtures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_outage=USER_OUTAGE_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=240")
    result.assert_outcomes(passed=4)


def test_function_scope_gives_each_test_its_own_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ports=SERVER_PORTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--clickhouse-scope=function")
    result.assert_outcomes(passed=2)


def test_no_server_binary_fails_with_the_install_hint(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_needs_server="def test_it(clickhouse_server):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--clickhouse-binary=/nonexistent/clickhouse-server"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*apt-get install -y clickhouse-server*"])


def test_a_bad_scope_in_the_ini_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nclickhouse_scope = Function\n")
    pytester.makepyfile(test_plain="def test_it():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*clickhouse_scope must be one of*"])
