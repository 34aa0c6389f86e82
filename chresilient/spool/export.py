"""Set-aside batches as files ``clickhouse-client`` can load: JSONEachRow or CSV.

``clickhouse-client --query 'INSERT INTO t (a, b) FORMAT JSONEachRow' < batch.jsonl``
loads a batch whose column names are known; CSV (positional) loads one without names.
Values are written the way ClickHouse parses them back to the same thing: decimals as
JSON numbers with every digit, a datetime with a time zone as its Unix timestamp (the
instant the driver would have sent), arrays as JSON arrays or ClickHouse literals.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import ipaddress
import json
import shlex
import uuid
from collections.abc import Iterable
from typing import Any, TextIO

from ..statement import quote_identifier
from .records import SpooledBatch

FORMATS = {"jsonl": "JSONEachRow", "csv": "CSV"}
TEXT_TYPES = (uuid.UUID, ipaddress.IPv4Address, ipaddress.IPv6Address)


class _Exact:
    """A number written verbatim into JSON (json has no raw values: see :func:`_json`)."""

    def __init__(self, text: str) -> None:
        self.text = text


def plain(value: Any) -> Any:
    """A JSON-friendly value ClickHouse parses back to the same thing."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:
            return int(value.timestamp())  # an instant: no server time zone applies
        return value.strftime("%Y-%m-%d %H:%M:%S.%f" if value.microsecond else "%Y-%m-%d %H:%M:%S")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return _Exact(str(value)) if value.is_finite() else str(value)
    if isinstance(value, TEXT_TYPES):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def _json(record: Any, token: str) -> str:
    """JSON with :class:`_Exact` numbers written as they are (not as float, not quoted)."""
    exact: list[str] = []

    def default(value: Any) -> Any:
        if isinstance(value, _Exact):
            exact.append(value.text)
            return f"{token}{len(exact) - 1}"
        raise TypeError(f"cannot export {type(value).__name__}")

    text = json.dumps(record, ensure_ascii=False, default=default)
    for n, number in enumerate(exact):
        text = text.replace(f'"{token}{n}"', number, 1)
    return text


def write_batch(batch: SpooledBatch, fmt: str, out: TextIO) -> int:
    """Write the batch's rows to ``out`` in ``fmt``; returns the number of rows."""
    rows = batch.decode_rows()
    if fmt == "jsonl":
        if batch.columns is None:
            raise ValueError(f"batch {batch.seq} has no column names: export it with --format csv")
        token = f"{uuid.uuid4().hex}:"  # a random marker no value of the batch spells
        for row in rows:
            record = dict(zip(batch.columns, (plain(v) for v in row)))
            out.write(_json(record, token) + "\n")
    elif fmt == "csv":
        for row in rows:
            out.write(_csv_line(row))
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return len(rows)


def _csv_line(row: Iterable[Any]) -> str:
    """One CSV line as ClickHouse reads it: NULL as a bare ``\\N``, every text quoted (so
    the string ``\\N`` stays a string), arrays and maps as quoted literals."""
    fields = []
    for value in row:
        if value is None:
            fields.append("\\N")
            continue
        value = literal(value) if isinstance(value, (list, tuple, dict)) else plain(value)
        if isinstance(value, _Exact):
            fields.append(value.text)
        elif isinstance(value, bool):
            fields.append("1" if value else "0")
        elif isinstance(value, (int, float)):
            fields.append(repr(value))
        else:
            fields.append('"' + str(value).replace('"', '""') + '"')
    return ",".join(fields) + "\n"


def literal(value: Any) -> str:
    """A ClickHouse literal (arrays and maps in CSV): strings single-quoted, escaped."""
    value = plain(value) if not isinstance(value, (list, tuple, dict)) else value
    if value is None:
        return "NULL"
    if isinstance(value, _Exact):
        return value.text
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{literal(k)}:{literal(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def load_command(batch: SpooledBatch, fmt: str, path: str) -> str:
    """The shell command (quoted for sh) that loads an exported batch into its table."""
    columns = f" ({', '.join(map(quote_identifier, batch.columns))})" if batch.columns else ""
    query = f"INSERT INTO {batch.table}{columns} FORMAT {FORMATS[fmt]}"
    return f"clickhouse-client --query {shlex.quote(query)} < {shlex.quote(path)}"
