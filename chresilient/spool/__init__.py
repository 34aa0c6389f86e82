"""The durable insert spool: store (SQLite), codec (exact row types), replay (a thread)."""

from .codec import SpoolDecodeError, SpoolEncodeError
from .records import BatchState, PutResult, SpooledBatch, SpoolTotals
from .replay import ReplayReport, SpoolReplayer
from .service import Spool
from .store import SpoolStore

__all__ = [
    "BatchState",
    "PutResult",
    "ReplayReport",
    "Spool",
    "SpoolDecodeError",
    "SpoolEncodeError",
    "SpoolReplayer",
    "SpoolStore",
    "SpoolTotals",
    "SpooledBatch",
]
