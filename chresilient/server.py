"""What a ClickHouse server says about itself: identity, optional features, replica delay.

Read in one place so the pool, the health monitor and the dependency report agree: the
same :class:`ServerInfo`, the same feature detection, the same replica delay and the same
lag threshold (``Config.max_replica_delay``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from clickhouse_driver import Client
from clickhouse_driver.connection import Connection
from clickhouse_driver.errors import ServerException

from .errors import describe
from .statement import DEDUP_SETTING

log = structlog.get_logger("chresilient.server")

# Only columns the server computes from its local replication queue: no ZooKeeper round
# trip (columns such as total_replicas would need one), so a probe stays cheap.
REPLICAS_QUERY = (
    "SELECT database, table, absolute_delay, is_readonly, is_session_expired "
    "FROM system.replicas"
)


@dataclass(frozen=True)
class ServerInfo:
    """What one server said about itself in the native handshake."""

    name: str = ""
    version: tuple[int, ...] = ()
    revision: int = 0
    timezone: str = ""
    display_name: str = ""

    @classmethod
    def of(cls, connection: Connection) -> ServerInfo:
        """From a connected driver connection."""
        info = connection.server_info
        return cls(
            name=str(info.name),
            version=tuple(info.version_tuple()),
            revision=int(info.revision),
            timezone=str(info.timezone or ""),
            display_name=str(getattr(info, "display_name", "") or ""),
        )

    @property
    def version_string(self) -> str:
        return ".".join(str(v) for v in self.version)

    def as_dict(self) -> dict[str, Any]:
        return {
            "server": self.name,
            "version": self.version_string,
            "revision": self.revision,
            "timezone": self.timezone,
            "display_name": self.display_name,
        }


def detect_features(client: Client, host: str) -> Mapping[str, bool]:
    """Which optional features the server has (one query per host and server revision)."""
    try:
        rows = client.execute(
            f"SELECT name FROM system.settings WHERE name IN ('{DEDUP_SETTING}')"
        )
    except ServerException as err:  # e.g. a user without access to system tables
        log.warning("feature_detection_failed", host=host, error=describe(err))
        rows = []
    names = {row[0] for row in rows}
    return {DEDUP_SETTING: DEDUP_SETTING in names}


@dataclass(frozen=True)
class ReplicaStatus:
    """One replicated table on one server, from ``system.replicas``."""

    table: str
    delay: float
    readonly: bool
    session_expired: bool


def read_replicas(client: Client) -> list[ReplicaStatus]:
    """The replicated tables of the server behind ``client`` (empty: none)."""
    return [
        ReplicaStatus(f"{db}.{table}", float(delay), bool(readonly), bool(expired))
        for db, table, delay, readonly, expired in client.execute(REPLICAS_QUERY)
    ]


def replica_delay(replicas: list[ReplicaStatus]) -> float:
    """The largest ``absolute_delay`` (0.0 when the server has no replicated tables)."""
    return max((r.delay for r in replicas), default=0.0)


def read_replica_delay(label: str, client: Client) -> float | None:
    """The host's replica delay in seconds; ``label`` names the host (for fakes in tests)."""
    return replica_delay(read_replicas(client))


def is_lagging(delay: float | None, limit: float | None) -> bool:
    """Whether a replica ``delay`` behind exceeds ``limit`` (unknown delay: not lagging)."""
    return delay is not None and limit is not None and delay > limit
