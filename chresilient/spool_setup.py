"""The spool wired to the call path: where replayed batches go and who judges a failure.

Replayed batches take the manager's call path (pool, retry, failover) as background
calls, whose failures never feed the breaker; a one-attempt ``SELECT 1`` probe decides
whether a failed delivery was ClickHouse's fault or the batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Callable

from .config import Config
from .errors import CircuitOpenError
from .events import Event, Events
from .executor import Executor
from .hosts import all_busy
from .ingest import deliver
from .metrics import SPOOL_COUNTERS, Metrics
from .spool import Spool, SpooledBatch, SpoolReplayer, SpoolStore
from .spool.target import target_of
from .statement import Statement, insert_delivery

# A replay lease outlives the longest call the retry policy allows by this much.
LEASE_MARGIN = 30.0


def open_spool(
    cfg: Config,
    *,
    executor: Executor,
    metrics: Metrics,
    events: Events,
    dedup_supported: Callable[[], bool],
    ready: Callable[[], bool] = lambda: True,
    lost: Callable[[str, BaseException], bool] = lambda table, error: False,
) -> Spool | None:
    """The spool and its replayer, or None when disabled. A directory that cannot be
    written is logged and reported by ``health()``; it does not stop the manager. The
    replayer wakes when the connection state recovers."""
    if not cfg.spool_enabled:
        return None
    store = SpoolStore(
        cfg.resolved_spool_dir,
        target=target_of(cfg.hosts, cfg.database),
        max_bytes=cfg.spool_max_bytes,
        full_policy=cfg.spool_full_policy,
        block_timeout=cfg.spool_block_timeout,
    )
    for counter in SPOOL_COUNTERS:  # present (at 0) in metrics() from the start
        metrics.incr(counter, 0)
    retry = cfg.retry
    longest_call = retry.total_timeout or retry.max_attempts * (
        retry.timeout_per_attempt + retry.max_delay
    )

    def background(query: str, rows: Sequence[Any], *, settings: dict[str, Any]) -> Any:
        """An INSERT of the replayer: the call path, but its failures never feed the
        breaker (a poison batch must not refuse live traffic)."""
        statement = replace(Statement.of(query, rows, settings, dedup_supported), background=True)
        return executor.query(
            query,
            rows,
            statement,
            settings,
            with_column_types=False,
            external_tables=None,
            query_id=None,
            types_check=False,
            columnar=False,
        )

    def deliver_spooled(batch: SpooledBatch) -> None:
        rows = batch.decode_rows()
        deliver(
            background, metrics, batch.table, batch.columns, rows, batch.settings, batch.batch_id
        )

    def probe() -> bool:
        """Does ClickHouse answer at all? One ``SELECT 1``, one attempt, breaker-neutral."""
        try:
            host, permit = executor.choose()
        except CircuitOpenError:
            return False
        try:
            with host.pool.connection(executor.policy.timeout_per_attempt) as conn:
                conn.client.execute("SELECT 1")
            return True
        except Exception:
            return False
        finally:
            permit.neutral()

    replayer = SpoolReplayer(
        store,
        deliver_spooled,
        metrics=metrics,
        interval=cfg.spool_replay_interval,
        lease_seconds=longest_call + LEASE_MARGIN,
        busy=lambda: all_busy(executor.hosts),
        in_use=lambda: any(h.pool.checked_out() for h in executor.hosts),
        probe=probe,
        max_attempts=cfg.spool_max_attempts,
        ready=ready,
        lost=lost,
    )
    events.listen(Event.RECOVERED, lambda **_: replayer.wake())
    return Spool(store, replayer, guarantee=lambda: insert_delivery(dedup_supported()))
