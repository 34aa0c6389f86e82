"""Where the schema comes from: ``.sql`` files of a directory (name order) and statements
passed in code, split into statements that remember their file and line.

Placeholders: ``{database}`` (the connection's database), ``{cluster}`` and
``{on_cluster}`` (``ON CLUSTER <name>`` when ``Config.cluster`` is set, else nothing). A
file's checksum is taken over its text as written, so a changed file is noticed whatever
the placeholders expand to.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..statement import quote_identifier

PLACEHOLDER = re.compile(r"\{(database|cluster|on_cluster)\}")
# The tables a statement touches (db.name, quoted or not): CREATE / ALTER / DROP TABLE
# name, and RENAME TABLE a TO b, c TO d.
_NAME = r"(?:`(?:[^`\\]|\\.)+`|[A-Za-z_][\w$]*)"
_QUALIFIED = rf"{_NAME}(?:\.{_NAME})?"
TOUCHES = re.compile(
    rf"^(?:CREATE|ALTER|DROP)\s+TABLE\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?({_QUALIFIED})",
    re.IGNORECASE,
)
RENAMES = re.compile(rf"({_QUALIFIED})\s+TO\s+({_QUALIFIED})", re.IGNORECASE)
# Schema files hold DDL: other statements (an INSERT waiting for data, a SELECT) do not
# belong in a startup step that may run again.
DDL_VERBS = frozenset(
    {"create", "alter", "drop", "rename", "attach", "detach", "truncate", "optimize"}
)


@dataclass(frozen=True)
class SchemaStatement:
    """One statement of the schema, where it was written, placeholders expanded."""

    file: str
    line: int
    sql: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class SchemaFile:
    """One schema file (or the statements given in code, as ``<code>``)."""

    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def statements(self, database: str, cluster: str | None) -> list[SchemaStatement]:
        """The file's statements, placeholders expanded. Raises :class:`ConfigError` for
        a statement that is not DDL or a ``{cluster}`` without a cluster."""
        out = []
        for line, sql in split_sql(self.text):
            verb = sql.split(None, 1)[0].lower() if sql.split() else ""
            if verb not in DDL_VERBS:
                raise ConfigError(
                    "schema_dir",
                    f"{self.name}:{line}: schema files hold DDL (CREATE, ALTER, DROP, "
                    f"RENAME, ...), not {verb.upper() or 'an empty statement'}",
                )
            out.append(SchemaStatement(self.name, line, render(sql, database, cluster)))
        return out

    def tables(self, database: str, cluster: str | None) -> list[tuple[str, str]]:
        """``(database, table)`` of every table this file creates, alters, drops or
        renames."""
        found: list[tuple[str, str]] = []
        for statement in self.statements(database, cluster):
            sql = statement.sql
            names = [m.group(1)] if (m := TOUCHES.match(sql)) else []
            if re.match(r"RENAME\s+TABLE\s", sql, re.IGNORECASE):
                names = [n for pair in RENAMES.findall(sql) for n in pair]
            for name in names:
                pair = table_key(name, database)
                if pair not in found:
                    found.append(pair)
        return found


def table_key(name: str, database: str) -> tuple[str, str]:
    """``(database, table)`` of a table name as SQL writes it (quoted or not, with or
    without its database)."""
    parts = re.findall(_NAME, name.strip())
    if len(parts) >= 2:
        return _unquote(parts[-2]), _unquote(parts[-1])
    return database, _unquote(parts[0]) if parts else name


def load_schema(schema_dir: str | None, statements: Sequence[str]) -> list[SchemaFile]:
    """The schema's files in the order they apply: the directory's ``*.sql`` by name, then
    the statements given in code. Raises :class:`ConfigError` for an unreadable source."""
    files: list[SchemaFile] = []
    if schema_dir is not None:
        try:
            names = sorted(n for n in os.listdir(schema_dir) if n.endswith(".sql"))
        except OSError as err:
            raise ConfigError("schema_dir", f"cannot read {schema_dir!r}: {err.strerror}") from None
        for name in names:
            path = os.path.join(schema_dir, name)
            try:
                with open(path, encoding="utf-8") as fh:
                    files.append(SchemaFile(name, fh.read()))
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError("schema_dir", f"cannot read {path!r}: {err}") from None
    if statements:
        files.append(SchemaFile("<code>", ";\n".join(s.strip().rstrip(";") for s in statements)))
    return files


def render(sql: str, database: str, cluster: str | None) -> str:
    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "database":
            return quote_identifier(database)
        if cluster is None:
            if key == "cluster":
                raise ConfigError("cluster", "the schema uses {cluster}; set CLICKHOUSE_CLUSTER")
            return ""
        return (
            quote_identifier(cluster)
            if key == "cluster"
            else f"ON CLUSTER {quote_identifier(cluster)}"
        )

    return PLACEHOLDER.sub(value, sql)


def split_sql(text: str) -> list[tuple[int, str]]:
    """Statements separated by ``;`` outside quotes and comments, each with the line it
    starts on; empty ones (comments only) are dropped."""
    out: list[tuple[int, str]] = []
    start, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            i = _closing_quote(text, i)
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 1
        elif ch == ";":
            _keep(out, text, start, i)
            start = i + 1
        i += 1
    _keep(out, text, start, n)
    return out


def _closing_quote(text: str, i: int) -> int:
    quote, i = text[i], i + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i


def _keep(out: list[tuple[int, str]], text: str, start: int, end: int) -> None:
    """Keep ``text[start:end]`` without its leading comments, and the line it starts on."""
    chunk = text[start:end]
    body = strip_comments(chunk)
    if not body.strip():
        return
    line = text.count("\n", 0, start + len(chunk) - len(body)) + 1
    out.append((line, body.strip()))


def strip_comments(sql: str) -> str:
    """``sql`` without leading comments (where a statement's verb is looked for)."""
    rest = sql.lstrip()
    while True:
        if rest.startswith("--"):
            end = rest.find("\n")
            rest = "" if end < 0 else rest[end + 1 :].lstrip()
        elif rest.startswith("/*"):
            end = rest.find("*/")
            rest = "" if end < 0 else rest[end + 2 :].lstrip()
        else:
            return rest


def _unquote(name: str) -> str:
    if name.startswith("`") and name.endswith("`"):
        return re.sub(r"\\(.)", r"\1", name[1:-1])
    return name
