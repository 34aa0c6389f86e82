"""The schema at startup, against real servers: applied once, recorded, refused when
changed or wrong, kept after a server comes back from an empty data directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import Client
from helpers import make_config, subprocess_env, wait_until
from test_cli import run_cli

from chresilient import ClickHouseConnectionManager, SchemaError, StartupTimeoutError
from chresilient.testing.faultproxy import FaultProxy

EVENTS = """-- the events of the application
CREATE TABLE IF NOT EXISTS {database}.events (
    id UInt64,
    kind String
) ENGINE = MergeTree ORDER BY id;
"""
# 18.16 has no ADD COLUMN IF NOT EXISTS: the record keeps it from running twice.
ADD_COLUMN = "ALTER TABLE {database}.events ADD COLUMN note String;\n"


@pytest.fixture
def database(client: Client) -> Iterator[str]:
    """An empty database of the session server (a dot in its name), dropped afterwards."""
    name = f"schema.{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        client.execute(f"DROP DATABASE IF EXISTS `{name}`")


def _schema_dir(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "schema"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.sql").write_text(text)
    return directory


def _records(client: Client, database: str) -> list[tuple[str, int]]:
    return [
        (str(f), int(n))
        for f, n in client.execute(
            f"SELECT file, count() FROM `{database}`._chresilient_schema "
            "GROUP BY file ORDER BY file"
        )
    ]


def test_an_empty_database_gets_its_tables_at_startup_once(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS, "002_note": ADD_COLUMN})
    cfg = make_config(clickhouse, database=database, schema_dir=str(directory))
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=30)
        assert mgr.schema.last_report is not None
        assert mgr.schema.last_report["applied"] == ["001_events.sql", "002_note.sql"]
        assert mgr.insert("events", [(1, "a", "n")], ["id", "kind", "note"]).delivered
        assert [f["state"] for f in mgr.schema.status()] == ["applied", "applied"]
    with ClickHouseConnectionManager(cfg) as again:
        again.start(wait=True, timeout=30)
        assert again.schema.last_report is not None
        assert again.schema.last_report["applied"] == []  # recorded: skipped
    assert _records(client, database) == [("001_events.sql", 1), ("002_note.sql", 1)]
    columns = client.execute(
        "SELECT name FROM system.columns WHERE database = %(db)s AND table = 'events'",
        {"db": database},
    )
    assert [c for (c,) in columns] == ["id", "kind", "note"]
    # Another machine applied 001 at the same moment (a later record, another checksum):
    # the record lists both, and the first one counts.
    client.execute(
        f"INSERT INTO `{database}`._chresilient_schema "
        "(file, checksum, applied_at, applied_by, columns) VALUES",
        [("001_events.sql", "0" * 64, int(time.time()) + 60, "other-host:1", "[]")],
    )
    with ClickHouseConnectionManager(cfg) as third:
        third.start(wait=True, timeout=30)  # no SchemaError: the first checksum counts
        first = third.schema.status()[0]
        assert first["state"] == "applied" and first["applied_by"] != "other-host:1"
    assert _records(client, database) == [("001_events.sql", 2), ("002_note.sql", 1)]


def test_what_is_there_already_counts_as_applied_and_code_comes_last(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    # The database, the table and its added column exist already (made by hand, or by a
    # process that died before its record): DATABASE_ALREADY_EXISTS (82),
    # TABLE_ALREADY_EXISTS (57), and ILLEGAL_COLUMN (44) "already exists" from ADD COLUMN.
    client.execute(
        f"CREATE TABLE `{database}`.events (id UInt64, kind String, note String) "
        "ENGINE = MergeTree ORDER BY id"
    )
    first = "CREATE DATABASE {database};\n" + EVENTS.replace(" IF NOT EXISTS", "")
    directory = _schema_dir(tmp_path, **{"001_events": first, "002_note": ADD_COLUMN})
    code = ("CREATE TABLE IF NOT EXISTS {database}.x (id UInt8) ENGINE = Log",)
    cfg = make_config(
        clickhouse, database=database, schema_dir=str(directory), schema_statements=code
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=30)
        assert mgr.schema.last_report is not None
        assert mgr.schema.last_report["applied"] == ["001_events.sql", "002_note.sql", "<code>"]
    records = [("001_events.sql", 1), ("002_note.sql", 1), ("<code>", 1)]
    assert _records(client, database) == records
    columns = client.execute(
        "SELECT name FROM system.columns WHERE database = %(db)s AND table = 'events'",
        {"db": database},
    )
    assert [c for (c,) in columns] == ["id", "kind", "note"]
    assert client.execute(f"EXISTS TABLE `{database}`.x") == [(1,)]


WORKER = """
import json, sys
from chresilient import ClickHouseConnectionManager
with ClickHouseConnectionManager() as mgr:
    mgr.start(wait=True, timeout=60)
    print("REPORT", json.dumps(mgr.schema.last_report), flush=True)
"""


def test_four_processes_starting_together_apply_each_file_once(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    directory = _schema_dir(
        tmp_path, **{f"{n:03d}_t{n}": EVENTS.replace("events", f"t{n}") for n in range(5)}
    )
    env = subprocess_env(
        clickhouse, tmp_path, CLICKHOUSE_DB=database, CLICKHOUSE_SCHEMA_DIR=str(directory)
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    reports = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0
            (line,) = [x for x in out.splitlines() if x.startswith("REPORT ")]  # not a log
            reports.append(json.loads(line[len("REPORT ") :]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    applied = sorted(name for r in reports for name in r["applied"])
    assert applied == [f"{n:03d}_t{n}.sql" for n in range(5)]  # each once, by someone
    assert _records(client, database) == [(f"{n:03d}_t{n}.sql", 1) for n in range(5)]


def test_a_changed_applied_file_is_refused_with_its_name(
    clickhouse: Any, database: str, tmp_path: Path
) -> None:
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS})
    cfg = make_config(clickhouse, database=database, schema_dir=str(directory))
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=30)
    (directory / "001_events.sql").write_text(EVENTS.replace("kind String", "kind UInt8"))
    with ClickHouseConnectionManager(cfg) as mgr:
        with pytest.raises(SchemaError) as info:
            mgr.start(wait=True, timeout=30)
        assert info.value.file == "001_events.sql" and "changed" in str(info.value)
        assert not mgr.started
        assert mgr.schema.status()[0]["state"] == "changed"
    env = subprocess_env(
        clickhouse, tmp_path, CLICKHOUSE_DB=database, CLICKHOUSE_SCHEMA_DIR=str(directory)
    )
    status = run_cli(["schema", "status"], env)
    assert status.returncode == 1 and '"changed"' in status.stdout
    assert run_cli(["schema", "apply"], env).returncode == 3


def test_a_refused_statement_names_its_file_and_line(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    bad = "-- line 1\nCREATE TABLE IF NOT EXISTS {database}.ok (id UInt64) ENGINE = Log;\n\n"
    bad += "CREATE TABLE {database}.broken (id UInt64 ENGINE = Log;\n"
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS, "002_bad": bad})
    cfg = make_config(clickhouse, database=database, schema_dir=str(directory))
    with ClickHouseConnectionManager(cfg) as mgr, pytest.raises(SchemaError) as info:
        mgr.start(wait=True, timeout=30)
    assert (info.value.file, info.value.line) == ("002_bad.sql", 4)
    assert "002_bad.sql:4" in str(info.value) and "62" in str(info.value)  # SYNTAX_ERROR
    # The good file was applied and recorded; the bad one is not recorded.
    assert _records(client, database) == [("001_events.sql", 1)]
    # required=False does not hide it: a SchemaError is raised all the same.
    with ClickHouseConnectionManager(cfg) as mgr, pytest.raises(SchemaError):
        mgr.start(wait=True, timeout=30, required=False)
    env = subprocess_env(
        clickhouse, tmp_path, CLICKHOUSE_DB=database, CLICKHOUSE_SCHEMA_DIR=str(directory)
    )
    status = run_cli(["schema", "status"], env)
    assert status.returncode == 1  # not all applied: 002 is pending
    assert [f["state"] for f in json.loads(status.stdout)] == ["applied", "pending"]
    refused = run_cli(["schema", "apply"], env)
    assert refused.returncode == 3 and "002_bad.sql:4" in refused.stderr


def test_a_column_dropped_by_hand_shows_in_the_consistency_report(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS, "002_note": ADD_COLUMN})
    cfg = make_config(
        clickhouse, database=database, schema_dir=str(directory), analytics_probe_table=None
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=30)
        assert mgr.ensure_analytics_consistency()["overall_consistent"] is True
        client.execute(f"ALTER TABLE `{database}`.events DROP COLUMN note")
        report = mgr.ensure_analytics_consistency()
        assert report["overall_consistent"] is False
        assert any("note" in p for p in report["problems"]), report["problems"]
    env = subprocess_env(
        clickhouse, tmp_path, CLICKHOUSE_DB=database, CLICKHOUSE_SCHEMA_DIR=str(directory)
    )
    diff = run_cli(["schema", "diff"], env)
    assert diff.returncode == 1
    (table,) = json.loads(diff.stdout)
    assert table["missing"] == ["note"] and table["exists"] is True


def test_a_server_back_from_an_empty_volume_gets_its_tables_and_loses_no_row(
    clickhouse_server: Any, tmp_path: Path
) -> None:
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS})
    cfg = make_config(
        clickhouse_server,
        schema_dir=str(directory),
        schema_timeout=10.0,
        spool_dir=str(tmp_path / "spool"),
        spool_replay_interval=0.2,
    )
    accepted: list[tuple[float, int]] = []  # (started at, id) of every accepted insert
    stop = threading.Event()

    def write(mgr: ClickHouseConnectionManager) -> None:
        n = 0
        while not stop.is_set() and n < 5_000:
            started = time.monotonic()
            ids = list(range(n * 10, n * 10 + 10))
            mgr.insert("events", [(i, "k") for i in ids], ["id", "kind"])
            accepted.extend((started, i) for i in ids)
            n += 1
            time.sleep(0.01)

    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=30)
        writer = threading.Thread(target=write, args=(mgr,), daemon=True)
        writer.start()
        wait_until(lambda: len(accepted) >= 100, 30, what="inserts before the wipe")
        clickhouse_server.kill()
        shutil.rmtree(clickhouse_server.data_path)
        clickhouse_server.data_path.mkdir()
        wiped = time.monotonic()
        clickhouse_server.start()
        wait_until(
            lambda: sum(1 for t, _ in accepted if t > wiped) >= 300, 60, what="inserts after"
        )
        stop.set()
        writer.join(60)
        assert not writer.is_alive()
        after = {i for t, i in accepted if t > wiped}
        check = clickhouse_server.client()

        def landed() -> bool:
            try:
                rows = check.execute("SELECT id FROM events")
            except Exception:
                return False
            return after <= {i for (i,) in rows}

        wait_until(landed, 60, what="every row accepted after the wipe in the new table")
        assert mgr.spool is not None
        wait_until(lambda: mgr.spool.pending().batches == 0, 60, what="the spool to drain")
        assert mgr.spool.set_aside() == []
        (_, unique) = check.execute("SELECT count(), uniqExact(id) FROM events")[0]
        assert unique >= len(after)
        assert mgr.schema.status()[0]["state"] == "applied"


def test_a_schema_table_dropped_by_hand_comes_back_and_its_inserts_land(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS, "002_note": ADD_COLUMN})
    cfg = make_config(
        clickhouse,
        database=database,
        schema_dir=str(directory),
        spool_dir=str(tmp_path / "spool"),
        spool_replay_interval=0.2,
    )
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=30)
        client.execute(f"DROP TABLE `{database}`.events")  # no outage: nothing else tells
        result = mgr.insert("events", [(7, "k", "n")], ["id", "kind", "note"])
        assert result.spooled and "60" in (result.error or "")  # UNKNOWN_TABLE
        with pytest.raises(Exception, match="60"):  # a table the schema lacks: raised
            mgr.insert("not_in_schema", [(1,)], ["id"])
        wait_until(
            lambda: (
                client.execute(
                    "SELECT count() FROM system.tables WHERE database = %(db)s AND name = 'events'",
                    {"db": database},
                )
                == [(1,)]
            ),
            30,
            what="the table to be created again",
        )

        def landed() -> bool:
            try:
                rows = client.execute(f"SELECT id, note FROM `{database}`.events")
                return bool(rows == [(7, "n")])
            except Exception:  # the table or its column is being created again
                return False

        wait_until(landed, 30, what="the spooled row to land")
        assert mgr.schema.last_report is not None
        assert mgr.schema.last_report["restored"] == ["001_events.sql", "002_note.sql"]
        assert _records(client, database) == [("001_events.sql", 1), ("002_note.sql", 1)]


def test_a_table_a_later_file_drops_stays_dropped(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    old = "CREATE TABLE IF NOT EXISTS {database}.old (id UInt8) ENGINE = Log;\n"
    directory = _schema_dir(
        tmp_path,
        **{"001_old": old + EVENTS, "002_drop": "DROP TABLE IF EXISTS {database}.old;\n"},
    )
    cfg = make_config(
        clickhouse, database=database, schema_dir=str(directory), analytics_probe_table=None
    )
    for _ in range(2):
        with ClickHouseConnectionManager(cfg) as mgr:
            mgr.start(wait=True, timeout=30)
            assert mgr.schema.last_report is not None
            assert mgr.schema.last_report["restored"] == []
            assert [t.name for t in mgr.schema.expected] == ["events"]
            assert mgr.ensure_analytics_consistency()["overall_consistent"] is True
    tables = client.execute(
        "SELECT name FROM system.tables WHERE database = %(db)s", {"db": database}
    )
    assert sorted(n for (n,) in tables) == ["_chresilient_schema", "events"]


def test_required_false_defers_a_slow_schema_to_the_background(
    clickhouse: Any, client: Client, database: str, tmp_path: Path
) -> None:
    import fcntl
    import hashlib
    import os
    import tempfile

    directory = _schema_dir(tmp_path, **{"001_events": EVENTS})
    cfg = make_config(clickhouse, database=database, schema_dir=str(directory), schema_timeout=1.0)
    key = "|".join(f"{h}:{p}" for h, p in cfg.hosts) + f"/{cfg.database}"
    lock = os.path.join(
        tempfile.gettempdir(),
        f"chresilient-schema-{hashlib.sha1(key.encode()).hexdigest()[:12]}.lock",
    )
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is applying it, slowly
    try:
        strict = ClickHouseConnectionManager(cfg)
        with strict, pytest.raises(StartupTimeoutError, match="another process"):
            strict.start(wait=True, timeout=30)
        with ClickHouseConnectionManager(cfg) as mgr:
            mgr.start(wait=True, timeout=30, required=False)  # degraded, not raised
            assert mgr.started
            fcntl.flock(fd, fcntl.LOCK_UN)
            wait_until(lambda: mgr.schema.last_report is not None, 30, what="the background apply")
            assert mgr.insert("events", [(1, "k")], ["id", "kind"]).delivered
    finally:
        os.close(fd)


def test_clickhouse_unavailable_times_out_at_the_statement_it_was_at(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, database: str, tmp_path: Path
) -> None:
    # The proxy resets any request over 100 kB: the small record queries pass, the big
    # statement of 002 never reaches the server (to the schema, ClickHouse is unavailable).
    big = "CREATE TABLE IF NOT EXISTS {database}.big (id UInt64, s String DEFAULT '%s') "
    big = big % ("x" * 150_000) + "ENGINE = Log;\n"
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS, "002_big": big})
    cfg = make_config(
        fault_proxy,
        auth=clickhouse,
        database=database,
        schema_dir=str(directory),
        schema_timeout=2.0,
    )
    fault_proxy.reset_large_requests(100_000)
    with ClickHouseConnectionManager(cfg) as mgr:
        started = time.monotonic()
        with pytest.raises(StartupTimeoutError) as info:
            mgr.start(wait=True, timeout=30)
        assert time.monotonic() - started >= 1.5  # retried until schema_timeout (less a step)
        assert "schema not applied within 2s, at 002_big.sql:1" in str(info.value)
        assert fault_proxy.oversized_resets_total >= 2 and not mgr.started
    assert _records(client, database) == [("001_events.sql", 1)]


def test_required_false_applies_the_schema_once_clickhouse_answers(
    clickhouse: Any, client: Client, fault_proxy: FaultProxy, database: str, tmp_path: Path
) -> None:
    directory = _schema_dir(tmp_path, **{"001_events": EVENTS})
    cfg = make_config(fault_proxy, auth=clickhouse, database=database, schema_dir=str(directory))
    fault_proxy.refuse()
    with ClickHouseConnectionManager(cfg) as mgr:
        mgr.start(wait=True, timeout=0.5, required=False)  # ClickHouse down: not raised
        assert mgr.started and mgr.schema.last_report is None
        fault_proxy.pass_through()
        wait_until(lambda: mgr.schema.last_report is not None, 30, what="the background apply")
        assert mgr.schema.last_report["applied"] == ["001_events.sql"]
    assert _records(client, database) == [("001_events.sql", 1)]
