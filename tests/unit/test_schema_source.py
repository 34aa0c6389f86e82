"""Reading the schema: statement splitting, placeholders, checksums, touched tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from chresilient import Config, ConfigError
from chresilient.schema.source import SchemaFile, load_schema, split_sql, table_key

TEXT = """-- events of the app; a ';' in a comment does not split
CREATE TABLE IF NOT EXISTS {database}.events (
    id UInt64,
    note String DEFAULT 'a;b'  /* nor ; here */
) ENGINE = MergeTree ORDER BY id;

/* only a comment */;
ALTER TABLE `events` {on_cluster} ADD COLUMN IF NOT EXISTS `x;y` UInt8;
"""


def test_statements_split_outside_quotes_and_comments_with_their_lines() -> None:
    parts = split_sql(TEXT)
    assert [line for line, _ in parts] == [2, 8]
    assert parts[0][1].startswith("CREATE TABLE") and "'a;b'" in parts[0][1]
    assert parts[1][1].endswith("`x;y` UInt8")


def test_placeholders_expand_and_the_checksum_is_of_the_text_as_written() -> None:
    schema_file = SchemaFile("001_events.sql", TEXT)
    plain = schema_file.statements("analytics", None)
    assert plain[0].sql.startswith("CREATE TABLE IF NOT EXISTS `analytics`.events")
    assert "ALTER TABLE `events`  ADD COLUMN" in plain[1].sql
    on = schema_file.statements("analytics", "prod")
    assert "ALTER TABLE `events` ON CLUSTER `prod` ADD" in on[1].sql
    assert plain[1].where() == "001_events.sql:8"
    assert schema_file.checksum == SchemaFile("other.sql", TEXT).checksum
    assert schema_file.checksum != SchemaFile("001_events.sql", TEXT + " ").checksum
    with pytest.raises(ConfigError, match="CLICKHOUSE_CLUSTER"):
        SchemaFile("c.sql", "CREATE DATABASE x ON CLUSTER {cluster}").statements("db", None)


def test_touched_tables_and_insert_names_compare_alike() -> None:
    tables = SchemaFile("a.sql", TEXT).tables("analytics", None)
    assert tables == [("analytics", "events")]
    for spelled in ("events", "`events`", "analytics.events", "`analytics`.`events`"):
        assert table_key(spelled, "analytics") == ("analytics", "events")
    assert table_key("other.events", "analytics") == ("other", "events")


def test_files_apply_in_name_order_then_code(tmp_path: Path) -> None:
    (tmp_path / "002_b.sql").write_text("DROP TABLE IF EXISTS b")
    (tmp_path / "001_a.sql").write_text("CREATE DATABASE IF NOT EXISTS a")
    (tmp_path / "notes.txt").write_text("not sql")
    files = load_schema(str(tmp_path), ["DROP TABLE x;", "RENAME TABLE y TO z"])
    assert [f.name for f in files] == ["001_a.sql", "002_b.sql", "<code>"]
    code = files[-1].statements("db", None)
    assert [s.sql for s in code] == ["DROP TABLE x", "RENAME TABLE y TO z"]
    assert files[-1].tables("db", None) == [("db", "x"), ("db", "y"), ("db", "z")]
    with pytest.raises(ConfigError, match="schema_dir"):
        load_schema(str(tmp_path / "missing"), ())


def test_schema_settings_are_validated_and_read_from_env(tmp_path: Path) -> None:
    env = {
        "CLICKHOUSE_HOST": "127.0.0.1",
        "CLICKHOUSE_SCHEMA_DIR": str(tmp_path),
        "CLICKHOUSE_SCHEMA_TIMEOUT": "12.5",
        "CLICKHOUSE_CLUSTER": "prod",
    }
    cfg = Config.from_env(env)
    assert (cfg.schema_dir, cfg.schema_timeout, cfg.cluster) == (str(tmp_path), 12.5, "prod")
    for field, value in (
        ("schema_timeout", 0),
        ("schema_statements", "CREATE ..."),
        ("cluster", ""),
    ):
        with pytest.raises(ConfigError) as info:
            Config(host="127.0.0.1", **{field: value})
        assert info.value.field == field


def test_schema_files_hold_ddl_only() -> None:
    bad = SchemaFile(
        "004_seed.sql", "CREATE TABLE t (id UInt8) ENGINE = Log;\n\nINSERT INTO t VALUES (1)"
    )
    with pytest.raises(ConfigError, match=r"004_seed.sql:3: .*not INSERT"):
        bad.statements("db", None)


def test_the_keeper_keeps_rows_only_for_tables_of_the_schema() -> None:
    from typing import Any

    from clickhouse_driver.errors import ServerException

    from chresilient.schema import Schema, SchemaKeeper

    class AppliedSchema(Schema):
        """The keeper's logic alone: applying is the integration tests' business."""

        def apply(self, timeout: float | None = None) -> dict[str, Any]:
            return {}

    cfg = Config(
        host="127.0.0.1",
        database="my.db",  # a dot in the name: keys are pairs, never "db.table" text
        schema_statements=("CREATE TABLE IF NOT EXISTS {database}.events (id UInt8) ENGINE = Log",),
    )
    keeper = SchemaKeeper(AppliedSchema(cfg, executor=None))  # type: ignore[arg-type]
    missing_column = ServerException("No such column note", code=16)
    assert keeper.lost("`my.db`.`events`", ServerException("gone", code=60))  # and stale now
    unknown_identifier = ServerException("Unknown identifier: note", code=47)
    assert not keeper.ready() and keeper.lost("`events`", missing_column)
    assert keeper.lost("`events`", unknown_identifier)  # also a column not made yet
    keeper.apply_now()
    assert keeper.ready()
    assert not keeper.lost("`events`", missing_column)  # the schema is current: a real error
    assert not keeper.lost("`events`", unknown_identifier)
    assert not keeper.lost("`other`", ServerException("gone", code=60))
    assert not keeper.lost("`events`", ServerException("syntax", code=62))


def test_a_bad_schema_is_a_config_error_when_the_manager_is_built(tmp_path: Path) -> None:
    """schema.md: a missing directory, a statement that is not DDL, or {cluster} without a
    cluster is a ConfigError naming the file and line when the manager is built."""
    from chresilient import ClickHouseConnectionManager

    def build(directory: Path, **changes: object) -> None:
        cfg = Config(
            host="127.0.0.1", port=1, schema_dir=str(directory),
            spool_dir=str(tmp_path / "spool"), **changes,  # type: ignore[arg-type]
        )  # fmt: skip
        ClickHouseConnectionManager(cfg).close()  # not reached when the schema is bad

    seed = tmp_path / "seed"
    seed.mkdir()
    create = "CREATE TABLE IF NOT EXISTS {database}.e (id UInt8) ENGINE = Log;\n"
    (seed / "001_events.sql").write_text(create)
    (seed / "004_seed.sql").write_text("-- seed data\n\nINSERT INTO e VALUES (1);\n")
    with pytest.raises(ConfigError, match=r"004_seed\.sql:3"):
        build(seed)
    clustered = tmp_path / "clustered"
    clustered.mkdir()
    (clustered / "001_db.sql").write_text("CREATE DATABASE IF NOT EXISTS x ON CLUSTER {cluster};\n")
    with pytest.raises(ConfigError, match="CLICKHOUSE_CLUSTER"):
        build(clustered)
    build(clustered, cluster="prod")  # with a cluster it builds
    with pytest.raises(ConfigError) as info:
        build(tmp_path / "missing")
    assert info.value.field == "schema_dir" and "missing" in str(info.value)
