"""``chresilient.Client``: clickhouse-driver's Client API on the pool, against a real server.

The driver's own tests run through it in test_driver_suite.py; these cover what a pooled
client defines for itself (per-thread ``connection`` and ``last_query``, held progress
connections, error classes a bare-driver ``except`` still catches).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from clickhouse_driver import Client as DriverClient
from clickhouse_driver import errors as driver_errors
from helpers import ClickHouseEndpoint, free_port, in_thread

import chresilient
from chresilient import ClickHouseUnavailableError, Config, RetryConfig

FAST = Config(spool_enabled=False, retry=RetryConfig(initial_delay=0.01, max_delay=0.05))


@pytest.fixture
def ch(clickhouse: ClickHouseEndpoint) -> Iterator[chresilient.Client]:
    """A drop-in client, made the way a migrated codebase makes it."""
    client = chresilient.Client(
        clickhouse.host,
        port=clickhouse.port,
        user=clickhouse.user,
        password=clickhouse.password,
        database=clickhouse.database,
        settings={"max_threads": 2},
        config=FAST,
    )
    try:
        yield client
    finally:
        client.manager.close()


def checked_out(client: chresilient.Client) -> int:
    return sum(h.pool.checked_out() for h in client.manager.hosts)


def test_from_url_and_keywords_configure_the_pool(clickhouse: ClickHouseEndpoint) -> None:
    with chresilient.Client.from_url(clickhouse.url + "?compression=lz4&max_threads=3") as c:
        try:
            setting = "SELECT value FROM system.settings WHERE name = 'max_threads'"
            assert c.execute(setting) == [("3",)]
            assert c.manager.config.compression == "lz4"
            assert c.settings == {"max_threads": "3"}
        finally:
            c.manager.close()
    with pytest.raises(TypeError, match="no_such_keyword"):
        chresilient.Client(clickhouse.host, no_such_keyword=1)


def test_progress_holds_its_connection_until_the_result_is_read(
    ch: chresilient.Client,
) -> None:
    query = "SELECT count() FROM numbers(300000)"
    progress = ch.execute_with_progress(query, settings={"max_block_size": 10000})
    assert checked_out(ch) == 1
    steps = list(progress)
    assert steps and steps[-1][0] > 0  # (rows read so far, total rows)
    assert checked_out(ch) == 0
    assert progress.get_result() == [(300000,)] == ch.execute(query)
    assert ch.last_query.progress.rows >= 300000

    ch.execute_with_progress("SELECT CAST(2 AS Int32) AS x")  # dropped: cancel() finds it
    assert ch.cancel(with_column_types=True) == ([(2,)], [("x", "Int32")])
    assert checked_out(ch) == 0
    with pytest.raises(RuntimeError, match="no pending"):
        ch.cancel()  # nothing in flight: never touches a pooled connection
    rows = ch.execute_iter("SELECT number FROM numbers(100000)", settings={"max_block_size": 100})
    assert next(rows) == (0,)  # a stream holds the connection the last progress used
    with pytest.raises(RuntimeError, match="no pending"):
        ch.cancel()
    assert sum(1 for _ in rows) == 99999  # the stream was not disturbed
    ch.execute_with_progress(query)  # dropped unread: held until the next one replaces it
    assert checked_out(ch) == 1
    assert ch.execute_with_progress("SELECT 5").get_result() == [(5,)]
    assert checked_out(ch) == 0  # the abandoned one was discarded, not leaked
    with pytest.raises(driver_errors.ServerException):
        list(ch.execute_with_progress("SELECT no_such_column"))
    assert checked_out(ch) == 0
    assert ch.execute("SELECT 1") == [(1,)]


def test_connection_and_last_query_are_the_calling_threads(ch: chresilient.Client) -> None:
    ch.execute("SELECT 1")
    mine = ch.connection
    ch.execute("SELECT 2")
    assert ch.connection is mine  # the next call of this thread reused it (LIFO)
    ch.execute("SELECT number FROM numbers(7)")

    def other() -> Any:
        ch.execute("SELECT number FROM numbers(3)")  # on the connection this thread used
        return ch.last_query.profile_info.rows, ch.connection

    thread, box = in_thread(other)
    thread.join(30)
    assert "error" not in box, box
    rows, theirs = box["result"]
    assert rows == 3 and theirs is mine  # the same pooled connection served both threads
    assert ch.last_query.profile_info.rows == 7  # yet each thread sees its own query
    ch.reset_last_query()
    assert ch.last_query is None


def test_disconnect_closes_idle_connections_and_the_client_stays_usable(
    ch: chresilient.Client,
) -> None:
    with ch:
        ch.execute("SELECT 1")
        assert ch.connection.connected
    assert not ch.connection.connected  # the same connection, closed by disconnect()
    assert ch.execute("SELECT 1") == [(1,)]


def test_a_bare_driver_except_clause_still_catches_the_final_error() -> None:
    client = chresilient.Client("127.0.0.1", port=free_port(), config=FAST)
    try:
        with pytest.raises(driver_errors.NetworkError) as caught:
            client.execute("SELECT 1")
        assert isinstance(caught.value, ClickHouseUnavailableError)
        assert caught.value.attempts == FAST.retry.max_attempts
    finally:
        client.manager.close()


def test_substitute_params_is_the_drivers(ch: chresilient.Client, client: DriverClient) -> None:
    params = {"x": "it's", "n": 5}
    query = "SELECT %(x)s, %(n)s"
    assert ch.substitute_params(query, params, ch.connection.context) == (
        client.substitute_params(query, params, client.connection.context)
    )


def test_dataframes_round_trip(ch: chresilient.Client) -> None:
    import pandas  # the numpy extra (scripts/bootstrap.sh and tox install it)

    ch.execute("DROP TABLE IF EXISTS dropin_frames")
    ch.execute("CREATE TABLE dropin_frames (id UInt32, name String) ENGINE = Memory")
    try:
        frame = pandas.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"]})
        numpy_client = chresilient.Client.from_kwargs(
            ch.manager.config.host,
            port=ch.manager.config.port,
            user=ch.manager.config.user,
            password=ch.manager.config.password,
            database=ch.manager.config.database,
            settings={"use_numpy": True},
            config=FAST,
        )
        try:
            assert numpy_client.insert_dataframe("INSERT INTO dropin_frames VALUES", frame) == 3
            back = numpy_client.query_dataframe("SELECT id, name FROM dropin_frames ORDER BY id")
        finally:
            numpy_client.manager.close()
        assert back["id"].tolist() == [1, 2, 3] and back["name"].tolist() == ["a", "b", "c"]
    finally:
        ch.execute("DROP TABLE IF EXISTS dropin_frames")
