"""Set-aside batches as files ``clickhouse-client`` can load: JSONEachRow or CSV.

``clickhouse-client --query "INSERT INTO t FORMAT JSONEachRow" < batch.jsonl`` loads a
batch whose column names are known; CSV (positional) loads one without names. Values are
written the way ClickHouse parses them in those formats (``YYYY-MM-DD hh:mm:ss`` for
DateTime, decimals as text, arrays as JSON arrays / ClickHouse literals).
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import enum
import ipaddress
import json
import uuid
from collections.abc import Iterable
from typing import Any, TextIO

from ..statement import quote_identifier
from .records import SpooledBatch

FORMATS = {"jsonl": "JSONEachRow", "csv": "CSV"}
TEXT_TYPES = (decimal.Decimal, uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)


def plain(value: Any) -> Any:
    """A JSON-friendly value ClickHouse parses back to the same thing."""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f" if value.microsecond else "%Y-%m-%d %H:%M:%S")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, TEXT_TYPES):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def write_batch(batch: SpooledBatch, fmt: str, out: TextIO) -> int:
    """Write the batch's rows to ``out`` in ``fmt``; returns the number of rows."""
    rows = batch.decode_rows()
    if fmt == "jsonl":
        if batch.columns is None:
            raise ValueError(f"batch {batch.seq} has no column names: export it with --format csv")
        for row in rows:
            record = dict(zip(batch.columns, (plain(v) for v in row)))
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows(_csv_row(row) for row in rows)
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return len(rows)


def _csv_row(row: Iterable[Any]) -> list[Any]:
    out = []
    for value in row:
        value = plain(value)
        if isinstance(value, (list, dict)):
            value = json.dumps(value).replace('"', "'")  # a ClickHouse array literal
        elif value is None:
            value = "\\N"
        out.append(value)
    return out


def load_command(batch: SpooledBatch, fmt: str, path: str) -> str:
    """The shell command that loads an exported batch into its table."""
    columns = f" ({', '.join(map(quote_identifier, batch.columns))})" if batch.columns else ""
    query = f"INSERT INTO {batch.table}{columns} FORMAT {FORMATS[fmt]}"
    return f"clickhouse-client --query {json.dumps(query)} < {path}"
