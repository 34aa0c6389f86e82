"""A small TCP proxy that injects network faults between a client and a loopback server.

`FaultProxy` listens on a free 127.0.0.1 port and forwards to a loopback target.  Its
`Mode` can be flipped at any time, also while clients are connected, to simulate the
failures a resilient client must survive: refused connects, connection resets (also
mid-stream), added latency and black holes.  Everything runs in daemon threads whose
blocking calls are bounded by short poll() timeouts, so `close()` is prompt.  (poll, not
select: select() breaks on file descriptors >= 1024, common in big test processes.)
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

__all__ = ["FaultProxy", "Mode"]

_TICK = 0.05  # poll() timeout: bounds mode-flip latency and close() time
_CHUNK = 65536
_MAX_BUFFERED = 1 << 20  # per direction; stop reading a side while the other lags
_IN = select.POLLIN
_OUT = select.POLLOUT
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def _poll(masks: dict[int, int], timeout: float) -> dict[int, int]:
    """poll() the given fd -> event-mask map for at most `timeout` seconds."""
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    return dict(poller.poll(max(0, int(timeout * 1000))))


class Mode(str, enum.Enum):
    """What the proxy does with connections."""

    #: forward both ways
    PASS = "pass"
    #: new connects fail fast with ECONNREFUSED (nothing listens on the port);
    #: established connections keep forwarding
    REFUSE = "refuse"
    #: active connections are reset (RST) when entering the mode; new connections are
    #: reset once `reset_after_bytes` bytes have been forwarded (0: on the first data)
    RESET = "reset"
    #: forward, delaying every chunk by `latency` seconds in both directions
    LATENCY = "latency"
    #: accept and keep connections open but forward nothing; received data is dropped
    BLACKHOLE = "blackhole"


def _hard_close(sock: socket.socket | None) -> None:
    """Close with SO_LINGER 0 so the peer gets a RST instead of a FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _soft_close(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def _resolve_loopback(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """Resolve the target and insist it is loopback: this tool must never touch a network."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve proxy target {host!r}: {exc}") from exc
    if not infos:
        raise ValueError(f"cannot resolve proxy target {host!r}")
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]
        if not ipaddress.ip_address(addr).is_loopback:
            raise ValueError(f"FaultProxy target must be a loopback address, got {host!r}")
    family, _, _, _, sockaddr = infos[0]
    return int(family), tuple(sockaddr)


class _Direction:
    """Chunks queued for one direction, each with the monotonic time it may be sent."""

    def __init__(self) -> None:
        self.queue: deque[tuple[float, bytes]] = deque()
        self.buffered = 0
        self.eof = False  # the reading side sent FIN
        self.shut = False  # FIN forwarded to the writing side

    def push(self, release: float, data: bytes) -> None:
        self.queue.append((release, data))
        self.buffered += len(data)

    def clear(self) -> None:
        self.queue.clear()
        self.buffered = 0

    def ready_in(self, now: float) -> float | None:
        """Seconds until the head chunk may be sent (0 = now), None if empty."""
        if not self.queue:
            return None
        return max(0.0, self.queue[0][0] - now)

    def send_some(self, sock: socket.socket) -> None:
        release, data = self.queue[0]
        sent = sock.send(data)
        self.buffered -= sent
        if sent == len(data):
            self.queue.popleft()
        else:
            self.queue[0] = (release, data[sent:])


class _Connection:
    """One proxied client connection, served by its own daemon thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, budget: int | None) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.budget = budget  # bytes to forward before a reset (connections born in RESET)
        self.forwarded = 0
        self.unanswered = 0  # bytes the client sent since the server last sent any
        self.reset_requested = False
        self.done = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"faultproxy-conn-{client.fileno()}", daemon=True
        )

    def _connect_upstream(self) -> socket.socket | None:
        proxy = self.proxy
        sock = socket.socket(proxy._target_family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(proxy._target_sockaddr)
        if err == 0:
            return sock
        deadline = time.monotonic() + proxy.connect_timeout
        while not proxy._stopping.is_set() and not self.reset_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if _poll({sock.fileno(): _OUT}, min(_TICK, remaining)):
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    return sock
                break
        _soft_close(sock)
        return None

    def _run(self) -> None:
        try:
            self.upstream = self._connect_upstream()
            if self.upstream is None:
                _hard_close(self.client)
                return
            self._pump(self.client, self.upstream)
        except Exception:  # never let a proxy thread die noisily; treat as a crash
            _hard_close(self.client)
            _hard_close(self.upstream)
        finally:
            self.proxy._forget(self)
            self.done.set()

    def _oversized(self, from_client: bool, size: int) -> bool:
        """The client sent more than ``max_request_bytes`` with no answer in between."""
        limit = self.proxy.max_request_bytes
        self.unanswered = self.unanswered + size if from_client else 0
        if limit is None or self.unanswered <= limit:
            return False
        self.proxy.oversized_resets_total += 1
        return True

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        proxy = self.proxy
        up = _Direction()  # client -> upstream
        down = _Direction()  # upstream -> client
        pairs = ((client, upstream, up), (upstream, client, down))
        reset_pending = False
        while True:
            if proxy._stopping.is_set():
                _soft_close(client)
                _soft_close(upstream)
                return
            if self.reset_requested:
                _hard_close(client)
                _hard_close(upstream)
                return
            mode = proxy._mode
            blackhole = mode is Mode.BLACKHOLE
            if blackhole:
                up.clear()
                down.clear()
            if reset_pending and not up.queue and not down.queue:
                _hard_close(client)
                _hard_close(upstream)
                return
            now = time.monotonic()
            timeout = _TICK
            masks = {client.fileno(): 0, upstream.fileno(): 0}
            for src, dst, d in pairs:
                if not d.eof and not reset_pending and d.buffered < _MAX_BUFFERED:
                    masks[src.fileno()] |= _IN
                wait = d.ready_in(now)
                if wait is not None and not blackhole:
                    if wait == 0:
                        masks[dst.fileno()] |= _OUT
                    else:
                        timeout = min(timeout, wait)
            events = _poll(masks, timeout)
            progressed = False
            try:
                for _src, dst, d in pairs:
                    if events.get(dst.fileno(), 0) & (_OUT | _GONE) and masks[dst.fileno()] & _OUT:
                        d.send_some(dst)  # raises if the peer is gone
                        progressed = True
                for src, _dst, d in pairs:
                    ev = events.get(src.fileno(), 0)
                    if d.eof or not ev & (_IN | _GONE):
                        continue
                    progressed = True
                    try:
                        data = src.recv(_CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        d.eof = True
                        continue
                    mode = proxy._mode
                    if mode is Mode.BLACKHOLE:
                        continue
                    if mode is Mode.RESET and self.budget is not None:
                        allowed = max(0, self.budget - self.forwarded)
                        if len(data) >= allowed:
                            data = data[:allowed]
                            if not reset_pending:
                                proxy.budget_reset()
                            reset_pending = True
                    if self._oversized(d is up, len(data)):
                        raise ConnectionResetError("request over max_request_bytes")
                    if data:
                        delay = proxy.latency if mode is Mode.LATENCY else 0.0
                        d.push(time.monotonic() + delay, data)
                        self.forwarded += len(data)
            except OSError:
                # One side reset or broke: pass the failure on as a reset.
                _hard_close(client)
                _hard_close(upstream)
                return
            if events and not progressed:
                time.sleep(0.005)  # e.g. HUP on a side we are not reading now: don't spin
            # Propagate half-closes once everything before the FIN is delivered.
            for _src, dst, d in pairs:
                if d.eof and not d.queue and not d.shut:
                    d.shut = True
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
            if (up.eof and down.eof and not up.queue and not down.queue) or (
                blackhole and (up.eof or down.eof)
            ):
                _soft_close(client)
                _soft_close(upstream)
                return


class FaultProxy:
    """Threaded TCP proxy on 127.0.0.1 in front of a loopback target, with switchable faults.

    Example::

        with FaultProxy(("127.0.0.1", server.port)) as proxy:
            client = Client(proxy.host, port=proxy.port)
            proxy.set_mode("latency", latency=0.2)
            proxy.refuse()  # connects now fail with ECONNREFUSED
            proxy.pass_through()
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        port: int = 0,
        mode: Mode | str = Mode.PASS,
        latency: float = 0.0,
        reset_after_bytes: int = 0,
        max_connections: int = 256,
        connect_timeout: float = 2.0,
    ) -> None:
        target_host, target_port = target
        self._target = (str(target_host), int(target_port))
        self._target_family, self._target_sockaddr = _resolve_loopback(*self._target)
        self._host = "127.0.0.1"
        self._requested_port = int(port)
        self._port = 0
        self._mode = Mode(mode)
        self.latency = float(latency)
        self.reset_after_bytes = int(reset_after_bytes)
        self.max_connections = int(max_connections)
        self.connect_timeout = float(connect_timeout)
        self._lock = threading.RLock()
        self._listener: socket.socket | None = None
        self._listening = False
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._connections_total = 0
        self._rejected_over_limit = 0
        self._resets_left: int | None = None  # RESET mode: budget resets before PASS
        self.budget_resets_total = 0
        # Any mode: reset a connection whose client sends more than this many bytes with no
        # answer in between (one request too large, as a middlebox might): a poison batch.
        self.max_request_bytes: int | None = None
        self.oversized_resets_total = 0

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """Listening port (fixed once started, also across REFUSE periods)."""
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self._host, self._port)

    @property
    def target(self) -> tuple[str, int]:
        return self._target

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode | str) -> None:
        self.set_mode(mode)

    @property
    def connections_total(self) -> int:
        """Connections accepted since start (including ones rejected over the limit)."""
        return self._connections_total

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def rejected_over_limit(self) -> int:
        return self._rejected_over_limit

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self._host}:{self._port} -> {self._target[0]}:{self._target[1]} "
            f"mode={self._mode.value} active={self.active_connections}>"
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        with self._lock:
            if self._acceptor is not None:
                return self
            if self._stopping.is_set():
                raise RuntimeError("FaultProxy was closed; create a new one")
            self._listener = self._bind(self._requested_port)
            self._port = int(self._listener.getsockname()[1])
            if self._requested_port == 0:
                # Re-bind to the now-known port explicitly: a socket bound to port 0 loses
                # its port when un-listened for REFUSE, an explicitly bound one keeps it.
                # Both sockets have SO_REUSEADDR and neither listens, so this cannot race.
                explicit = self._bind(self._port)
                _soft_close(self._listener)
                self._listener = explicit
            if self._mode is not Mode.REFUSE:
                self._listener.listen(128)
                self._listening = True
            self._acceptor = threading.Thread(
                target=self._accept_loop, name=f"faultproxy-accept-{self._port}", daemon=True
            )
            self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, close every connection and join all threads (~1 s at most)."""
        self._stopping.set()
        with self._lock:
            if self._listener is not None:
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor
            _soft_close(self._listener)
            self._listener = None
            self._listening = False
            conns = list(self._connections)
            acceptor = self._acceptor
        deadline = time.monotonic() + 1.0
        if acceptor is not None and acceptor is not threading.current_thread():
            acceptor.join(max(0.0, deadline - time.monotonic()))
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ faults

    def set_mode(
        self,
        mode: Mode | str,
        *,
        latency: float | None = None,
        reset_after_bytes: int | None = None,
    ) -> None:
        """Switch behaviour now; takes effect on live connections within ~50 ms.

        Entering REFUSE closes the listener before returning (new connects are refused
        immediately); entering RESET resets all active connections before returning.
        """
        new = Mode(mode)
        if latency is not None:
            self.latency = float(latency)
        if reset_after_bytes is not None:
            self.reset_after_bytes = int(reset_after_bytes)
        with self._lock:
            self._mode = new
            if self._acceptor is not None and not self._stopping.is_set():
                if new is Mode.REFUSE:
                    self._stop_listening()
                else:
                    self._resume_listening()
        if new is Mode.RESET:
            self.reset_active()

    def pass_through(self) -> None:
        self.set_mode(Mode.PASS)

    def refuse(self) -> None:
        self.set_mode(Mode.REFUSE)

    def reset(self, after_bytes: int = 0, times: int | None = None) -> None:
        """Reset every connection after ``after_bytes`` (active ones at once); with
        ``times``, switch back to PASS once that many connections were cut mid-stream."""
        with self._lock:
            self._resets_left = times
        self.set_mode(Mode.RESET, reset_after_bytes=after_bytes)

    def budget_reset(self) -> None:
        """A connection used up its RESET budget (called by the connection's thread)."""
        with self._lock:
            self.budget_resets_total += 1
            if self._resets_left is not None:
                self._resets_left -= 1
                if self._resets_left <= 0:
                    self._resets_left = None
                    self._mode = Mode.PASS

    def reset_large_requests(self, max_bytes: int | None) -> None:
        """Reset connections that send more than ``max_bytes`` in one go (None: off)."""
        self.max_request_bytes = max_bytes

    def delay(self, latency: float) -> None:
        self.set_mode(Mode.LATENCY, latency=latency)

    def blackhole(self) -> None:
        self.set_mode(Mode.BLACKHOLE)

    def reset_active(self, timeout: float = 1.0) -> int:
        """Reset (RST) every active connection; returns how many.  Waits until done."""
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.reset_requested = True
        deadline = time.monotonic() + timeout
        for conn in conns:
            conn.done.wait(max(0.0, deadline - time.monotonic()))
        return len(conns)

    # ------------------------------------------------------------------ internals

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _stop_listening(self) -> None:
        # Nothing may listen on the port while refusing, so SYNs get a RST (ECONNREFUSED),
        # but the port stays reserved by a bound, non-listening socket.  On Linux,
        # shutdown(SHUT_RD) turns a listener back into such a socket in place (and RSTs
        # connections still in its accept backlog); close()+bind() would race the
        # acceptor's poll(), which keeps the closed listener alive for a moment.
        if not self._listening:
            return
        listener = self._listener
        self._listening = False
        if listener is not None and sys.platform.startswith("linux"):
            try:
                listener.shutdown(socket.SHUT_RD)
                return
            except OSError:
                pass
        _soft_close(listener)
        self._listener = None
        deadline = time.monotonic() + 1.0
        while True:
            try:
                self._listener = self._bind(self._port)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _resume_listening(self) -> None:
        if self._listening:
            return
        if self._listener is None:
            self._listener = self._bind(self._port)
        self._listener.listen(128)
        self._listening = True

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                listener = self._listener if self._listening else None
            if listener is None:
                self._stopping.wait(_TICK)
                continue
            try:
                if not _poll({listener.fileno(): _IN}, _TICK):
                    continue
            except (OSError, ValueError):  # closed under us by close()
                continue
            with self._lock:
                if listener is not self._listener or not self._listening:
                    continue
                try:
                    sock, _addr = listener.accept()
                except OSError:
                    continue
                self._connections_total += 1
                if len(self._connections) >= self.max_connections:
                    self._rejected_over_limit += 1
                    _hard_close(sock)
                    continue
                sock.setblocking(False)
                budget = self.reset_after_bytes if self._mode is Mode.RESET else None
                conn = _Connection(self, sock, budget)
                self._connections.add(conn)
            conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
