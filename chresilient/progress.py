"""``execute_with_progress``'s result on a pooled connection that stays checked out until
the result is read, the query cancelled, or an error ends it."""

from __future__ import annotations

import weakref
from typing import Any, NoReturn

from .executor import Held


class Pending:
    """A thread's pending progress result, which ``client.cancel()`` acts on (the driver
    lets a caller drop the result and cancel later); emptied once the query ends, so a
    result read to its end is not kept alive by it."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: ProgressResult | None = None


class ProgressResult:
    """The driver's ``ProgressQueryResult``: iterate for ``(rows, total_rows)`` progress,
    then ``get_result()``; ``progress_totals`` as the driver keeps it. A result dropped
    before its end, and no longer pending, discards its connection (the server may still
    be sending)."""

    def __init__(self, held: Held[Any], pending: Pending | None = None) -> None:
        self._held = held
        self._result = held.value
        self._read = False  # every packet was read: get_result() needs no connection
        self._pending = pending
        if pending is not None:
            pending.result = self
        weakref.finalize(self, _abandon, held)

    @property
    def progress_totals(self) -> Any:
        return self._result.progress_totals

    @property
    def pending(self) -> bool:
        """The query still holds its connection (not read to its end, cancelled or failed)."""
        return not self._held.released

    def __iter__(self) -> ProgressResult:
        return self

    def __next__(self) -> tuple[int, int]:
        if not self.pending and not self._read:
            raise StopIteration  # cancelled or failed: nothing more comes
        try:
            return next(self._result)  # type: ignore[no-any-return]
        except StopIteration:
            self._read = True
            self._release()
            raise
        except BaseException as exc:
            self._raise(exc)

    def get_result(self) -> Any:
        """The rows (and column types) once every packet is read; frees the connection."""
        if self._read:
            return self._result.get_result()  # its packets are all read: no network
        if not self.pending:
            raise RuntimeError("this progress result was cancelled or failed")
        try:
            value = self._result.get_result()
        except BaseException as exc:
            self._raise(exc)
        self._read = True
        self._release()
        return value

    def cancel(self, with_column_types: bool = False) -> Any:
        """Ask the server to stop, read what it still sends, free the connection."""
        if not self.pending:
            raise RuntimeError("cancel(): the query already ended; nothing to cancel")
        try:
            value = self._held.connection.client.cancel(with_column_types=with_column_types)
        except BaseException as exc:
            self._raise(exc)
        self._release()
        return value

    def _release(self) -> None:
        self._held.release()
        self._forget()

    def _forget(self) -> None:
        if self._pending is not None and self._pending.result is self:
            self._pending.result = None

    def _raise(self, exc: BaseException) -> NoReturn:
        self._forget()
        error = self._held.fail(exc)
        if error is exc:
            raise exc
        raise error from exc


def _abandon(held: Held[Any]) -> None:
    """The caller dropped a result it had not read: its connection is not reusable."""
    if not held.released:
        held.fail(GeneratorExit())
