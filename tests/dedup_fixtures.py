"""Helpers for the dedup server tests: slow and failing ledgers, servers of raw-bytes handlers, a
parallel run of keyed transfers, and a raw HTTP/2 gRPC call that can send header values the grpc
client refuses to send (non-ASCII idempotency keys)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import struct
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, AioLedger, SyncLedger
from resilient_grpc import IdempotencyKeys, RetryPolicy, resilient_channel
from resilient_grpc.stores import MemoryStore, RedisStore, SQLiteStore, Store

KEY = "idempotency-key"
#: The service of :func:`serve_raw` / :func:`serve_raw_aio`: ``/test.Raw/<Name>``.
RAW_SERVICE = "test.Raw"
RawHandlers = dict[str, "grpc.RpcMethodHandler[Any, Any]"]


@contextlib.contextmanager
def serve_raw(
    handlers: RawHandlers, interceptors: Sequence[grpc.ServerInterceptor], *, max_workers: int = 8
) -> Iterator[grpc.Channel]:
    """A sync server of raw-bytes ``handlers`` (``{"Name": handler}`` under ``test.Raw``) behind
    ``interceptors``, and a channel to it; both closed at exit."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(None)


@dataclass
class AioRaw:
    """A running :func:`serve_raw_aio`: the server (a test may stop it early) and a channel."""

    server: grpc.aio.Server
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def serve_raw_aio(
    handlers: RawHandlers, interceptors: Sequence[grpc.aio.ServerInterceptor]
) -> AsyncIterator[AioRaw]:
    """The grpc.aio :func:`serve_raw` (stopping an already stopped server at exit is fine)."""
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield AioRaw(server, channel)
    finally:
        await channel.close()
        await server.stop(None)


def transfer_in_parallel(
    target: str,
    retry: RetryPolicy,
    options: Sequence[tuple[str, Any]],
    *,
    workers: int = 4,
    per_worker: int = 250,
) -> list[ledger_pb2.TransferReply]:
    """``workers`` threads, each on its own ``resilient_channel`` (keys, ``retry``), send
    ``per_worker`` transfers of distinct amounts 1..workers*per_worker; every reply, in order."""

    def worker(index: int) -> list[ledger_pb2.TransferReply]:
        channel = resilient_channel(
            target, retry=retry, idempotency=IdempotencyKeys(), options=list(options)
        )
        stub = ledger_pb2_grpc.LedgerStub(channel)
        try:
            return [
                stub.Transfer(transfer(amount=index * per_worker + n + 1), timeout=30)
                for n in range(per_worker)
            ]
        finally:
            channel.close()

    with futures.ThreadPoolExecutor(workers) as pool:
        return [reply for batch in pool.map(worker, range(workers)) for reply in batch]


class SlowLedger(SyncLedger):
    """A sync ledger whose Transfer sleeps ``delay`` s first, or raises on the next ``crashes`` calls."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.crashes = 0
        self.started = threading.Event()
        self.seen_scopes: list[tuple[str, str]] = []

    def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.TransferReply:
        from resilient_grpc.core.keys import current_scope

        scope = current_scope()
        if scope is not None:
            self.seen_scopes.append((scope.parent_key, scope.next_key(TRANSFER)))
        self.started.set()
        if self.crashes:
            self.crashes -= 1
            self.state.record(TRANSFER, context.invocation_metadata())
            raise RuntimeError("handler bug")
        if self.delay:
            time.sleep(self.delay)
        return super().Transfer(request, context)


class AioSlowLedger(AioLedger):
    """The aio twin of :class:`SlowLedger` (sleeps with ``asyncio.sleep``)."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.crashes = 0
        self.started = 0

    async def wait_started(self) -> None:
        """Wait (bounded) until a Transfer handler has started."""
        for _ in range(500):
            if self.started:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no Transfer handler started within 5 s")

    async def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.TransferReply:
        self.started += 1
        if self.crashes:
            self.crashes -= 1
            self.state.record(TRANSFER, context.invocation_metadata() or ())
            raise RuntimeError("handler bug")
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().Transfer(request, context)


class RecordingAdmission:
    """Mixin for a DedupInterceptor: records what admission decided (the server-side answer to a
    call whose client already gave up). Subclasses set their own ``admitted`` list."""

    admitted: list[object]

    def admit(self, method: str, context: Any, raw: bytes, deserialize: Any) -> Any:
        decision = super().admit(method, context, raw, deserialize)  # type: ignore[misc]
        self.admitted.append(decision)
        return decision


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Iterator[str]:
    """Hold the SQLite write lock from another connection, so a store on ``path`` with a short
    ``busy_timeout`` is down; yields the status details the interceptor then answers with (only
    that the store is unavailable: the file path and driver text stay in the server log)."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield "idempotency store unavailable"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def make_store(kind: str, tmp_path: Path, request: Any) -> Store:
    """A fresh store of ``kind`` (memory, sqlite in ``tmp_path``, or redis on the test Redis)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "dedup.sqlite3")
    return RedisStore.from_url(request.getfixturevalue("redis_url"))


def transfer(amount: int = 1, memo: str = "") -> ledger_pb2.TransferRequest:
    return ledger_pb2.TransferRequest(from_account="a", to_account="b", amount=amount, memo=memo)


# ---------------------------------------------------------------------------- raw HTTP/2


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, no Huffman coding."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _hpack_int(value: int, bits: int, flags: int = 0) -> bytes:
    limit = (1 << bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = [flags | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    )


def _read_int(data: bytes, offset: int, bits: int) -> tuple[int, int]:
    limit = (1 << bits) - 1
    value = data[offset] & limit
    offset += 1
    if value < limit:
        return value, offset
    shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            return value, offset


def _literal_headers(block: bytes) -> dict[str, str]:
    """The literal (non-Huffman) headers of an HPACK block; indexed fields are skipped."""
    headers: dict[str, str] = {}
    offset = 0
    while offset < len(block):
        first = block[offset]
        if first & 0x80:  # indexed field (":status 200" and the like)
            _, offset = _read_int(block, offset, 7)
            continue
        if first & 0x20:  # dynamic table size update
            _, offset = _read_int(block, offset, 5)
            continue
        bits = 6 if first & 0x40 else 4
        index, offset = _read_int(block, offset, bits)
        if index:
            raise AssertionError("indexed header names are not supported by this tiny decoder")
        strings = []
        for _ in range(2):
            huffman = block[offset] & 0x80
            length, offset = _read_int(block, offset, 7)
            if huffman:
                raise AssertionError("Huffman-coded headers are not supported by this tiny decoder")
            strings.append(block[offset : offset + length].decode("latin-1"))
            offset += length
        headers[strings[0]] = strings[1]
    return headers


def raw_unary_call(
    port: int, method: str, request: bytes, metadata: list[tuple[bytes, bytes]]
) -> tuple[str, str]:
    """Send one unary call over a bare HTTP/2 connection; return (grpc-status, grpc-message).

    Header values go out as given (e.g. UTF-8 bytes), which the grpc client would refuse.
    """
    headers = b"".join(
        _literal(name, value)
        for name, value in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ]
    )
    body = b"\x00" + len(request).to_bytes(4, "big") + request
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0, b"")
            + _frame(1, 4, 1, headers)
            + _frame(0, 1, 1, body)
        )
        buffer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            offset = 0
            while offset + 9 <= len(buffer):
                length = int.from_bytes(buffer[offset : offset + 3], "big")
                kind, flags = buffer[offset + 3], buffer[offset + 4]
                stream = int.from_bytes(buffer[offset + 5 : offset + 9], "big")
                payload = buffer[offset + 9 : offset + 9 + length]
                if len(payload) < length:
                    break
                if kind == 1 and stream == 1 and flags & 1:
                    found = _literal_headers(payload)
                    return found["grpc-status"], urllib.parse.unquote(found["grpc-message"])
                offset += 9 + length
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
    raise AssertionError("no trailers received on the raw HTTP/2 connection")
