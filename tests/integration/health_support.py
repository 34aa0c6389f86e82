"""Helpers for the health tests: serve a WSGI app over real HTTP, call it, count connections."""

from __future__ import annotations

from helpers import tcp_connections

from chresilient.testing.http import request, serve_wsgi
from chresilient.testing.server import LocalClickHouse

__all__ = ["ConnectionCounter", "call", "serve"]

serve = serve_wsgi
call = request


class ConnectionCounter:
    """Counts native connections a server accepted, from the server's own records.

    Accepted = (open now - open before) + (closed since): the open count comes from
    ``system.metrics``, the closed ones from the server log ("Done processing connection").
    The observer's own connection stays open throughout, so it cancels out.
    """

    def __init__(self, server: LocalClickHouse) -> None:
        self.server = server
        self.observer = server.client(connect_timeout=5, send_receive_timeout=10)
        self.open_before = tcp_connections(self.observer)
        self.closed_before = self._closed()

    def _closed(self) -> int:
        text = self.server.log_path.read_text(encoding="utf-8", errors="replace")
        return text.count("Done processing connection")

    def accepted(self) -> int:
        return (
            tcp_connections(self.observer)
            - self.open_before
            + (self._closed() - self.closed_before)
        )

    def close(self) -> None:
        self.observer.disconnect()
