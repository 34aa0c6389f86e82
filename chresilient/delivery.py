"""What an insert into a given table can promise: exactly once or at least once.

A ``ReplicatedMergeTree`` table drops a block whose checksum matches a recent one, and
every retry and replay sends a batch byte-identical, so delivery into it is exactly once
on any server. Other tables deduplicate only with an ``insert_deduplication_token`` on a
server that has it (22.x+) and a deduplication window on the table; otherwise a batch cut
off after the server wrote it may land twice.

The engine is read from ``system.tables`` once per table, after a successful insert (the
server is up then); until it is known the answer is ``unknown``.
"""

from __future__ import annotations

from typing import Any, Callable

from .schema.source import table_key
from .statement import insert_delivery

UNKNOWN = "unknown"
EXACTLY_ONCE = "exactly_once"


class DeliveryGuarantees:
    """Per table, what delivery can promise (see the module docstring)."""

    def __init__(
        self,
        query: Callable[[str, dict[str, Any]], Any],
        database: str,
        dedup_supported: Callable[[], bool],
    ) -> None:
        self._query = query
        self._database = database
        self._dedup_supported = dedup_supported
        # No lock: copying this dict and setting one item are atomic under the GIL, and a
        # lock here would be one more that a fork() could leave held in a child.
        self._engines: dict[str, str] = {}

    def known(self, table_sql: str) -> str:
        """The guarantee if the table's engine is known, else ``unknown`` (no query)."""
        engine = self._engines.get(table_sql)
        return UNKNOWN if engine is None else self._guarantee(engine)

    def learn(self, table_sql: str) -> str:
        """The guarantee, reading the engine once (call it while the server answers)."""
        if table_sql not in self._engines:
            database, name = table_key(table_sql, self._database)
            try:
                rows = self._query(
                    "SELECT engine FROM system.tables WHERE database = %(db)s AND name = %(t)s",
                    {"db": database, "t": name},
                )
            except Exception:  # the answer is only a report: never fail an insert for it
                return UNKNOWN
            self._engines[table_sql] = str(rows[0][0]) if rows else ""
        return self.known(table_sql)

    def report(self) -> dict[str, str]:
        """``{table: guarantee}`` for every table inserted into so far."""
        engines = dict(self._engines)
        return {table: self._guarantee(engine) for table, engine in engines.items()}

    def _guarantee(self, engine: str) -> str:
        if engine.startswith("Replicated"):
            return EXACTLY_ONCE
        return insert_delivery(self._dedup_supported())
