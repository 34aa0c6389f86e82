"""What a statement is: its verb, whether it writes, its dedup token, and quoting.

Every rule about SQL text lives here, so the retry policy, the insert path and the health
checks ask one module instead of sniffing queries each in their own way.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import InvalidBatchError, SessionStateError

# The setting that lets a server drop a repeated INSERT block (22.x+; absent on 18.16).
DEDUP_SETTING = "insert_deduplication_token"

# Comments, whitespace and parentheses before a query's first keyword.
_LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
# Statements that change nothing: repeating them after an unknown outcome is safe.
READ_VERBS = frozenset({"select", "with", "show", "describe", "desc", "exists", "explain"})

TableName = Union[str, tuple[str, str]]
# Statements that change the server-side session of the connection they run on.
_TEMPORARY = re.compile(r"\s+temporary\b", re.I)
TEMPORARY_ADVICE = (
    "pass the data per call (execute(..., external_tables=[...])) or use a regular table "
    "(ENGINE = Memory, dropped when done)"
)
SESSION_ADVICE = {
    "use": "pass the database in Config.database (CLICKHOUSE_DB) or qualify table names (db.table)",
    "set": "pass settings per call (execute(..., settings={...})) or for every call "
    "(Config.settings)",
}


@functools.lru_cache(maxsize=1024)  # an application sends the same few texts again
def query_verb(query: str) -> str:
    """The first keyword of ``query`` in lower case, after comments and parentheses."""
    start = _LEADING_NOISE.match(query)
    word = _FIRST_WORD.match(query, start.end() if start else 0)
    return word.group(0).lower() if word else ""


def refuse_session_change(verb: str, query: str = "") -> None:
    """Raise :class:`SessionStateError` for ``USE``, ``SET`` and temporary tables: on a
    pooled connection their effect would outlive the call and reach whoever uses the
    connection next."""
    advice = SESSION_ADVICE.get(verb)
    what = verb.upper()
    if advice is None and verb in ("create", "drop") and _is_temporary(query):
        advice, what = TEMPORARY_ADVICE, f"{what} TEMPORARY TABLE"
    if advice is not None:
        raise SessionStateError(
            f"{what} changes the session of one pooled connection, whose next user "
            f"is another caller; it was not sent: {advice}"
        )


def _is_temporary(query: str) -> bool:
    start = _LEADING_NOISE.match(query)
    word = _FIRST_WORD.match(query, start.end() if start else 0)
    return word is not None and _TEMPORARY.match(query, word.end()) is not None


def is_write_query(query: str, params: Any) -> bool:
    """Whether repeating ``query`` after an unknown outcome could change data twice.

    Everything but a known read verb counts as a write (INSERT, ALTER ... UPDATE, DDL):
    a reset after the server applied it must not make the client apply it again. The
    driver sends ``params`` as INSERT data when it is a list, tuple or generator.
    """
    if isinstance(params, (list, tuple, types.GeneratorType)):
        return True
    return query_verb(query) not in READ_VERBS


@dataclass(frozen=True)
class Statement:
    """The facts about one call that decide whether it may be repeated.

    ``replayable``: the call's data can be sent again (not a one-shot iterator).
    ``deduplicated``: a write the server will drop if it arrives twice (a dedup token on
    a server that has the setting). ``background``: a call of the spool replayer, whose
    failures say nothing about the server (a poison batch): they never feed the breaker.
    """

    is_write: bool
    replayable: bool = True
    deduplicated: bool = False
    what: str = "query"
    background: bool = False

    @classmethod
    def of(
        cls,
        query: str,
        params: Any = None,
        settings: Mapping[str, Any] | None = None,
        dedup_supported: Callable[[], bool] = lambda: False,
    ) -> Statement:
        """``dedup_supported()`` is asked only for a write that carries a token. Raises
        :class:`SessionStateError` for ``USE`` and ``SET``."""
        verb = query_verb(query)
        if verb in SESSION_ADVICE or verb in ("create", "drop"):
            refuse_session_change(verb, query)
        if not settings and params is None:  # the hot path: a plain query, no settings
            return READ if verb in READ_VERBS else WRITE
        is_write = isinstance(params, (list, tuple, types.GeneratorType)) or (
            verb not in READ_VERBS
        )
        return cls(
            is_write=is_write,
            replayable=not isinstance(params, (Iterator, types.GeneratorType)),
            deduplicated=is_write
            and bool(settings and settings.get(DEDUP_SETTING))
            and dedup_supported(),
            what=("insert" if verb == "insert" else "statement") if is_write else "query",
        )


READ = Statement(is_write=False)
WRITE = Statement(is_write=True, what="insert")


def settings_for_server(
    settings: dict[str, Any] | None, features: Mapping[str, bool]
) -> dict[str, Any] | None:
    """``settings`` for one server: servers before 22.x reject an unknown
    ``insert_deduplication_token``, so it is dropped there (delivery is then at least once).
    """
    if settings and DEDUP_SETTING in settings and not features.get(DEDUP_SETTING, False):
        return {k: v for k, v in settings.items() if k != DEDUP_SETTING}
    return settings


def insert_delivery(dedup_supported: bool) -> str:
    """What a server's dedup support means for a batch whose outcome was unknown.

    The token only deduplicates on tables that do (Replicated*MergeTree, or MergeTree with
    ``non_replicated_deduplication_window``); elsewhere a replayed batch may appear twice.
    """
    return "exactly_once_on_deduplicating_tables" if dedup_supported else "at_least_once"


# -- identifiers ----------------------------------------------------------------------------
def quote_identifier(name: str) -> str:
    """``name`` in backticks, with backslashes and backticks escaped."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidBatchError(f"bad identifier {name!r}")
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_table(table: TableName) -> str:
    """``"db.table"`` (split at the first dot), ``("db", "table")`` or ``"table"``, quoted."""
    if isinstance(table, tuple):
        if len(table) != 2:
            raise InvalidBatchError(f"table must be 'name', 'db.name' or (db, name): {table!r}")
        database, name = table
    elif isinstance(table, str) and "." in table:
        database, _, name = table.partition(".")
    else:
        return quote_identifier(table)
    return f"{quote_identifier(database)}.{quote_identifier(name)}"


def qualified(database: str, table: str) -> str:
    """```db`.`table``` from two plain names."""
    return f"{quote_identifier(database)}.{quote_identifier(table)}"


def insert_query(table_sql: str, columns: Sequence[str] | None) -> str:
    """``INSERT INTO <table_sql> (cols) VALUES`` for the driver's block insert."""
    cols = f" ({', '.join(quote_identifier(c) for c in columns)})" if columns else ""
    return f"INSERT INTO {table_sql}{cols} VALUES"
