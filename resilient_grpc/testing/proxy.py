"""A real TCP proxy on 127.0.0.1 that loses gRPC responses *after* the server has committed them.

Why: a retried write is only dangerous when the server executed it and the client never heard
back. :class:`FaultProxy` produces exactly that on a real socket. It forwards bytes between a gRPC
client and server and reads (never rewrites) the HTTP/2 frame headers flowing through it, so it
knows where each call ends.

Semantics of ``cut_response_probability=p`` (measured, see ``tests/test_proxy.py``):

* A *call end* is the server's HTTP/2 ``HEADERS`` frame with ``END_STREAM`` on a stream: the
  trailers carrying ``grpc-status`` (or a trailers-only error). The server sends it after the
  handler returned and the response message was written, i.e. after the server committed.
* For every call end the proxy draws once from its own ``random.Random(seed)``. With probability
  ``p`` it forwards everything *before* that frame, drops the frame, sends the client a
  ``GOAWAY`` whose last-stream-id is the highest stream the client opened (so gRPC knows every
  open call may have been processed and never retries one transparently), and closes both TCP
  connections. The client sees that call fail with ``UNAVAILABLE`` although the server executed
  it: a lost acknowledgement. Otherwise the frame is forwarded unchanged.
* HTTP/2 multiplexes calls on one connection, so a cut also fails every *other* call still open
  on that connection (counted in :attr:`ProxyCounters.collateral_calls`; they may or may not have
  executed). With one call in flight per connection, the fraction of calls that lose their
  response is the drawn fraction ``p`` and nothing else fails. To keep that with concurrent
  callers, give each caller its own channel *and* its own connection:
  ``grpc.insecure_channel(proxy.target, options=[("grpc.use_local_subchannel_pool", 1)])``
  (channels otherwise share connections process-wide).
* The client's next call opens a fresh connection through the proxy (the GOAWAY tells it to).

:meth:`FaultProxy.cut_all` resets (TCP RST, no GOAWAY) every current connection at once: an
abrupt network failure; every call open on them fails with ``UNAVAILABLE``.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
_HEADERS = 0x1
_RST_STREAM = 0x3
_GOAWAY = 0x7
_END_STREAM = 0x1
_RECV_SIZE = 65536


@dataclass(frozen=True)
class ProxyCounters:
    """A snapshot of what the proxy did.

    ``responses_forwarded``: call ends delivered to the client. ``responses_cut``: call ends
    dropped by a random cut (the server answered, the client never heard). ``collateral_calls``:
    other calls open on a connection when it was cut (random cut or :meth:`FaultProxy.cut_all`).
    ``connections``: TCP connections accepted. ``connections_cut``: connections reset by the proxy.
    """

    connections: int
    responses_forwarded: int
    responses_cut: int
    collateral_calls: int
    connections_cut: int


def _goaway(last_stream: int) -> bytes:
    """A GOAWAY frame (NO_ERROR): the client must open new calls on a fresh connection."""
    payload = struct.pack(">II", last_stream, 0)
    return len(payload).to_bytes(3, "big") + bytes([_GOAWAY, 0]) + struct.pack(">I", 0) + payload


class _FrameSplitter:
    """Splits a byte stream into whole HTTP/2 frames: ``(type, flags, stream_id, raw_bytes)``."""

    def __init__(self, preface: bytes = b"") -> None:
        self._buffer = bytearray()
        self._skip = len(preface)

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        self._buffer += data
        if self._skip:
            taken = min(self._skip, len(self._buffer))
            del self._buffer[:taken]
            self._skip -= taken
        frames: list[tuple[int, int, int, bytes]] = []
        while len(self._buffer) >= _FRAME_HEADER:
            length = int.from_bytes(self._buffer[0:3], "big")
            end = _FRAME_HEADER + length
            if len(self._buffer) < end:
                break
            frame_type = self._buffer[3]
            flags = self._buffer[4]
            (stream,) = struct.unpack(">I", self._buffer[5:9])
            frames.append((frame_type, flags, stream & 0x7FFFFFFF, bytes(self._buffer[:end])))
            del self._buffer[:end]
        return frames


class _Connection:
    """One proxied client connection: two sockets, two pump threads, the set of open streams."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.open_streams: set[int] = set()
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        for target in (self._pump_requests, self._pump_responses):
            threading.Thread(target=target, daemon=True, name="fault-proxy-pump").start()

    def _pump_requests(self) -> None:
        """Client -> server: forward raw bytes at once; parse only to track which streams are open."""
        splitter = _FrameSplitter(_PREFACE)
        try:
            while True:
                data = self.client.recv(_RECV_SIZE)
                if not data:
                    break
                for frame_type, _flags, stream, _raw in splitter.feed(data):
                    if stream and frame_type == _HEADERS:
                        with self.lock:
                            self.open_streams.add(stream)
                    elif stream and frame_type == _RST_STREAM:
                        with self.lock:
                            self.open_streams.discard(stream)
                self.upstream.sendall(data)
        except OSError:
            pass
        self.close(reset=False)

    def _pump_responses(self) -> None:
        """Server -> client: forward whole frames; at each call end decide whether to cut."""
        splitter = _FrameSplitter()
        try:
            while True:
                data = self.upstream.recv(_RECV_SIZE)
                if not data:
                    break
                pending: list[bytes] = []
                for frame_type, flags, stream, raw in splitter.feed(data):
                    if stream and frame_type == _RST_STREAM:
                        with self.lock:
                            self.open_streams.discard(stream)
                    elif stream and frame_type == _HEADERS and flags & _END_STREAM:
                        if self.proxy._draw_cut():
                            # GOAWAY naming the highest stream the client opened: "any of your
                            # calls may have been processed", so gRPC never retries them
                            # transparently, and opens new calls on a fresh connection.
                            with self.lock:
                                last = max(self.open_streams | {stream})
                            pending.append(_goaway(last))
                            self.client.sendall(b"".join(pending))
                            self.cut(stream)
                            return
                        with self.lock:
                            self.open_streams.discard(stream)
                        self.proxy._count(responses_forwarded=1)
                    pending.append(raw)
                if pending:
                    self.client.sendall(b"".join(pending))
        except OSError:
            pass
        self.close(reset=False)

    def cut(self, stream: int | None) -> None:
        """Reset both connections; ``stream`` is the call whose response was dropped (if any)."""
        with self.lock:
            if self.closed:
                return
            others = len(self.open_streams - {stream}) if stream else len(self.open_streams)
        self.proxy._count(
            responses_cut=1 if stream else 0, collateral_calls=others, connections_cut=1
        )
        # A dropped response closes with FIN after the GOAWAY; cut_all() resets (RST) abruptly.
        self.close(reset=stream is None)

    def close(self, *, reset: bool) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            try:
                if reset:
                    # Linger 0 makes close() send RST; SHUT_RD wakes the other pump's recv.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.proxy._forget(self)


class FaultProxy:
    """A loopback TCP proxy to ``127.0.0.1:upstream_port`` that can lose responses (see module doc).

    ``cut_response_probability`` may be changed while running. ``seed`` makes the sequence of
    cut decisions reproducible (the order of call ends still depends on scheduling). Use as a
    context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        cut_response_probability: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not isinstance(upstream_port, int) or not 0 < upstream_port < 65536:
            raise ValueError(f"upstream_port must be a TCP port (1-65535), got {upstream_port!r}")
        self.upstream_port = upstream_port
        self.cut_response_probability = cut_response_probability
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._counts = {
            "connections": 0,
            "responses_forwarded": 0,
            "responses_cut": 0,
            "collateral_calls": 0,
            "connections_cut": 0,
        }

    @property
    def cut_response_probability(self) -> float:
        """The chance that one call end is dropped together with its connection."""
        return self._probability

    @cut_response_probability.setter
    def cut_response_probability(self, value: float) -> None:
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"cut_response_probability must be in [0, 1], got {value!r}")
        self._probability = float(value)

    @property
    def port(self) -> int:
        """The port the proxy listens on (after :meth:`start`)."""
        if not self._port:
            raise RuntimeError("FaultProxy.port: the proxy is not started")
        return self._port

    @property
    def target(self) -> str:
        """``"127.0.0.1:<port>"``, ready for ``grpc.insecure_channel``."""
        return f"127.0.0.1:{self.port}"

    @property
    def counters(self) -> ProxyCounters:
        """What the proxy has done so far."""
        with self._lock:
            return ProxyCounters(**self._counts)

    def start(self) -> FaultProxy:
        """Listen on a free loopback port and start accepting connections."""
        if self._listener is not None:
            raise RuntimeError("FaultProxy.start: already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fault-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and reset every connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.cut_all()

    def cut_all(self) -> int:
        """Reset every current connection (every open call on them fails); returns how many."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.cut(None)
        return len(connections)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, client, upstream)
            with self._lock:
                if self._listener is None:
                    connection.closed = True
                    client.close()
                    upstream.close()
                    return
                self._connections.add(connection)
                self._counts["connections"] += 1
            connection.start()

    def _draw_cut(self) -> bool:
        with self._lock:
            return self._probability > 0.0 and self._random.random() < self._probability

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
