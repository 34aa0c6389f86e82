"""``execute_with_progress``'s result on a pooled connection that stays checked out until
the result is read, the query cancelled, or an error ends it."""

from __future__ import annotations

from typing import Any, NoReturn

from .executor import Held


class ProgressResult:
    """The driver's ``ProgressQueryResult``: iterate for ``(rows, total_rows)`` progress,
    then ``get_result()``; ``progress_totals`` as the driver keeps it."""

    def __init__(self, held: Held[Any]) -> None:
        self._held = held
        self._result = held.value
        self._read = False  # every packet was read: get_result() needs no connection

    @property
    def progress_totals(self) -> Any:
        return self._result.progress_totals

    def __iter__(self) -> ProgressResult:
        return self

    def __next__(self) -> tuple[int, int]:
        try:
            return next(self._result)  # type: ignore[no-any-return]
        except StopIteration:
            self._read = True
            self._held.release()
            raise
        except BaseException as exc:
            self._raise(exc)

    def get_result(self) -> Any:
        """The rows (and column types) once every packet is read; frees the connection."""
        return self._finish(lambda: self._result.get_result())

    def cancel(self, with_column_types: bool = False) -> Any:
        """Ask the server to stop, read what it still sends, free the connection."""
        client = self._held.connection.client
        return self._finish(lambda: client.cancel(with_column_types=with_column_types))

    def _finish(self, read: Any) -> Any:
        if self._read:
            return read()
        if self._held.released:
            raise RuntimeError("this progress result was already read to its end")
        try:
            value = read()
        except BaseException as exc:
            self._raise(exc)
        self._held.release()
        return value

    def _raise(self, exc: BaseException) -> NoReturn:
        error = self._held.fail(exc)
        if error is exc:
            raise exc
        raise error from exc
