"""Helpers for the health tests: serve a WSGI app over real HTTP, call it, count connections."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from helpers import tcp_connections

from chresilient.testing.server import LocalClickHouse


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields the base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 30.0
) -> Reply:
    """One HTTP request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(
        url, method=method, headers=headers or {}, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, dict(err.headers.items()), err.read())


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
