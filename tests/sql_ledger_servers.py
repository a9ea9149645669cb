"""Start the SQL ledger (``protos.ledger_sql``) behind DedupInterceptor, sync or aio, on PostgreSQL
or SQLite, in transactional or lease mode: one helper for the in-process tests and the crash-loop
server processes. An aio server runs in a thread of its own with its own event loop, so every
test drives it with the same blocking client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from protos import ledger_pb2_grpc
from protos.ledger_sql import (
    AioSQLLedger,
    AsyncPostgresLedgerDatabase,
    AsyncSQLiteLedgerDatabase,
    PostgresLedgerDatabase,
    SQLiteLedgerDatabase,
    SQLLedger,
    create_ledger,
)
from resilient_grpc.aio.server import DedupInterceptor as AioDedupInterceptor
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore, PostgresStore, SQLiteStore, Store

ACCOUNTS = tuple("abcdefghijklmnopqrstuvwxyzABCDEF")  # 32: some optimistic conflicts
BALANCE = 1_000_000
OPTIONS = [("grpc.so_reuseport", 0)]
TRANSFER = "/ledger.v1.Ledger/Transfer"


@dataclass
class LedgerSpec:
    """What to run: ``database`` is ``postgres`` (``where`` a URL) or ``sqlite`` (a file path);
    ``store`` is ``same`` (the dedup store in that database) or ``memory``."""

    database: str
    where: str
    flavour: str = "sync"
    transactional: bool = True
    store: str = "same"
    lease: float = 30.0
    table: str = "resilient_grpc_dedup"
    after_write: Callable[[str], Any] | None = None
    port: int = 0


@dataclass
class RunningLedger:
    port: int
    stop: Callable[[], None]
    store: Any = None
    extra: list[Any] = field(default_factory=list)


def prepare(spec: LedgerSpec) -> None:
    """Create the ledger tables and accounts (idempotent)."""
    if spec.database == "postgres":
        from psycopg_pool import ConnectionPool

        with ConnectionPool(spec.where, min_size=1, max_size=1) as pool:
            create_ledger(PostgresLedgerDatabase(pool), ACCOUNTS, BALANCE)
    else:
        create_ledger(SQLiteLedgerDatabase(spec.where), ACCOUNTS, BALANCE)


def _store(spec: LedgerSpec) -> Store:
    if spec.store == "memory":
        return MemoryStore()
    if spec.database == "postgres":
        return PostgresStore(spec.where, table=spec.table, timeout=2.0)
    return SQLiteStore(spec.where)


def start_ledger(spec: LedgerSpec) -> RunningLedger:
    prepare(spec)
    if spec.flavour == "sync":
        return _start_sync(spec)
    return _start_aio(spec)


def _start_sync(spec: LedgerSpec) -> RunningLedger:
    store = _store(spec)
    closers: list[Callable[[], None]] = [store.close]
    if spec.database == "postgres":
        from psycopg_pool import ConnectionPool

        pool: ConnectionPool[Any] = ConnectionPool(spec.where, min_size=1, max_size=32, timeout=2)
        closers.append(pool.close)
        database: PostgresLedgerDatabase | SQLiteLedgerDatabase = PostgresLedgerDatabase(pool)
    else:
        database = SQLiteLedgerDatabase(spec.where)
    servicer = SQLLedger(database, transactional=spec.transactional, after_write=spec.after_write)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        interceptors=[DedupInterceptor(store, lease=spec.lease, max_wait=2.0)],
        options=OPTIONS,
    )
    ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{spec.port}")
    server.start()

    def stop() -> None:
        server.stop(None).wait(10)
        for close in closers:
            close()

    return RunningLedger(port, stop, store)


def _start_aio(spec: LedgerSpec) -> RunningLedger:
    loop = asyncio.new_event_loop()
    started: futures.Future[tuple[asyncio.Event, int, Any]] = futures.Future()
    finished = threading.Event()

    async def main() -> None:
        store = _store(spec).as_async()
        if spec.database == "postgres":
            from psycopg_pool import AsyncConnectionPool

            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                spec.where, min_size=1, max_size=32, timeout=2, open=False
            )
            await pool.open()
            database: AsyncPostgresLedgerDatabase | AsyncSQLiteLedgerDatabase = (
                AsyncPostgresLedgerDatabase(pool)
            )
        else:
            database = AsyncSQLiteLedgerDatabase(spec.where)
        servicer = AioSQLLedger(
            database, transactional=spec.transactional, after_write=spec.after_write
        )
        server = grpc.aio.server(
            interceptors=[AioDedupInterceptor(store, lease=spec.lease, max_wait=2.0)],
            options=OPTIONS,
        )
        ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"127.0.0.1:{spec.port}")
        await server.start()
        stopping = asyncio.Event()
        started.set_result((stopping, port, store))
        await stopping.wait()
        await server.stop(None)
        await store.aclose()
        if spec.database == "postgres":
            await pool.close()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as error:
            if not started.done():
                started.set_exception(error)
        finally:
            loop.close()
            finished.set()

    threading.Thread(target=run, daemon=True).start()
    stopping, port, store = started.result(timeout=30)

    def stop() -> None:
        if not finished.is_set():
            loop.call_soon_threadsafe(stopping.set)
        assert finished.wait(20), "the aio ledger server did not stop"

    return RunningLedger(port, stop, store)
