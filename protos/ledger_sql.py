"""The demo ledger on a SQL database (PostgreSQL or SQLite), with optimistic concurrency.

Tables: ``accounts(id, balance, version)`` and ``transfers(id, memo, from_account, to_account,
amount)`` (one row per applied transfer, so tests count applications). A transfer reads both
accounts, then writes each with ``UPDATE ... WHERE id = %s AND version = %s``: if another
transfer changed an account in between, no row matches and the call answers ABORTED, which a
client may retry because everything the attempt wrote rolls back.

:func:`transfer_steps` is the whole transfer as a generator of SQL statements (no I/O), so the
sync and aio servicers only run statements. In **transactional** mode the servicer writes
through :func:`resilient_grpc.transaction` (the dedup record commits with the transfer); in
**lease** mode it commits on its own connection before returning (what a handler unaware of
transactional mode does; a crash after that commit and before the dedup record completes lets
a retry apply the transfer twice). ``after_write(key)`` runs after the writes and before the
handler returns (tests crash the server there); if it returns a :class:`Refusal`, the call ends
with that status after the writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import transaction
from resilient_grpc.aio import transaction as async_transaction

POSTGRES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS accounts "
    "(id text PRIMARY KEY, balance bigint NOT NULL, version bigint NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS transfers (id bigserial PRIMARY KEY, memo text NOT NULL, "
    "from_account text NOT NULL, to_account text NOT NULL, amount bigint NOT NULL)",
)
SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS accounts "
    "(id TEXT PRIMARY KEY, balance INTEGER NOT NULL, version INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS transfers (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "memo TEXT NOT NULL, from_account TEXT NOT NULL, to_account TEXT NOT NULL, "
    "amount INTEGER NOT NULL)",
)


@dataclass(frozen=True)
class Statement:
    """One SQL statement with ``%s`` placeholders."""

    sql: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Result:
    """What a statement gave: its rows and its row count."""

    rows: list[Any]
    rowcount: int


@dataclass(frozen=True)
class Refusal:
    """The transfer is refused with this status (nothing it wrote may commit unless cacheable)."""

    code: grpc.StatusCode
    details: str


def transfer_steps(
    request: ledger_pb2.TransferRequest,
) -> Generator[Statement, Result, ledger_pb2.TransferReply | Refusal]:
    """A transfer as statements: read both accounts, write them fenced by version, log it."""
    source, target, amount = request.from_account, request.to_account, request.amount
    if amount <= 0 or source == target:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "amount must be > 0 between two accounts")
    found = yield Statement(
        "SELECT id, balance, version FROM accounts WHERE id IN (%s, %s)", (source, target)
    )
    accounts = {row[0]: (row[1], row[2]) for row in found.rows}
    if source not in accounts or target not in accounts:
        return Refusal(grpc.StatusCode.NOT_FOUND, "unknown account")
    if accounts[source][0] < amount:
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds")
    balances = {source: accounts[source][0] - amount, target: accounts[target][0] + amount}
    for account in sorted(balances):  # one lock order for every transfer: no deadlocks
        written = yield Statement(
            "UPDATE accounts SET balance = %s, version = version + 1 WHERE id = %s AND version = %s",
            (balances[account], account, accounts[account][1]),
        )
        if written.rowcount != 1:
            return Refusal(grpc.StatusCode.ABORTED, "concurrent update of an account; retry")
    logged = yield Statement(
        "INSERT INTO transfers (memo, from_account, to_account, amount) "
        "VALUES (%s, %s, %s, %s) RETURNING id",
        (request.memo, source, target, amount),
    )
    return ledger_pb2.TransferReply(
        transfer_id=f"t{logged.rows[0][0]}",
        from_balance=balances[source],
        to_balance=balances[target],
    )


def balance_steps(
    request: ledger_pb2.BalanceRequest,
) -> Generator[Statement, Result, ledger_pb2.BalanceReply | Refusal]:
    found = yield Statement(
        "SELECT balance, version FROM accounts WHERE id = %s", (request.account,)
    )
    if not found.rows:
        return Refusal(grpc.StatusCode.NOT_FOUND, "unknown account")
    balance, version = found.rows[0]
    return ledger_pb2.BalanceReply(account=request.account, balance=balance, sequence=version)


# ---------------------------------------------------------------------------- databases


class PostgresLedgerDatabase:
    """The ledger's own connections on PostgreSQL (a psycopg ``ConnectionPool``)."""

    schema = POSTGRES_SCHEMA

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A transaction of the ledger's own (commits when the block ends without error)."""
        with self.pool.connection() as connection:
            yield connection

    @staticmethod
    def run(connection: Any, statement: Statement) -> Result:
        cursor = connection.execute(statement.sql, statement.params)
        rows = cursor.fetchall() if cursor.description else []
        return Result(rows, cursor.rowcount)


class SQLiteLedgerDatabase:
    """The ledger's own connections on an SQLite file (the dedup store's file in the demos)."""

    schema = SQLITE_SCHEMA

    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )

    @contextlib.contextmanager
    def connection(
        self, connection: sqlite3.Connection | None = None
    ) -> Iterator[sqlite3.Connection]:
        """A transaction of the ledger's own (on this thread's connection unless given)."""
        if connection is None:
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = self.connect()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @staticmethod
    def run(connection: Any, statement: Statement) -> Result:
        cursor = connection.execute(statement.sql.replace("%s", "?"), statement.params)
        return Result(cursor.fetchall(), cursor.rowcount)


class AsyncPostgresLedgerDatabase:
    """:class:`PostgresLedgerDatabase` on a psycopg ``AsyncConnectionPool``."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        async with self.pool.connection() as connection:
            yield connection

    @staticmethod
    async def run(connection: Any, statement: Statement) -> Result:
        cursor = await connection.execute(statement.sql, statement.params)
        rows = await cursor.fetchall() if cursor.description else []
        return Result(rows, cursor.rowcount)


class AsyncSQLiteLedgerDatabase:
    """:class:`SQLiteLedgerDatabase` for ``grpc.aio``: statements run in worker threads."""

    def __init__(self, path: str) -> None:
        self.sync = SQLiteLedgerDatabase(path)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A transaction of the ledger's own on a new connection, on a thread of its own."""
        from resilient_grpc.stores.sqlite import AsyncSQLiteConnection

        thread = ThreadPoolExecutor(1)
        try:
            raw = await asyncio.get_running_loop().run_in_executor(thread, self.sync.connect)
            connection = AsyncSQLiteConnection(raw, thread)
            try:
                await connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                except BaseException:
                    await connection.execute("ROLLBACK")
                    raise
                await connection.execute("COMMIT")
            finally:
                await connection.run(raw.close)
        finally:
            thread.shutdown(wait=False)

    @staticmethod
    async def run(connection: Any, statement: Statement) -> Result:
        done = await connection.execute(statement.sql.replace("%s", "?"), statement.params)
        return Result(done.rows, done.rowcount)


def create_ledger(
    database: PostgresLedgerDatabase | SQLiteLedgerDatabase, accounts: Sequence[str], balance: int
) -> None:
    """Create the tables and open ``accounts`` with ``balance`` each (existing ones are kept)."""
    with database.connection() as connection:
        for text in database.schema:
            connection.execute(text)
        for account in accounts:
            database.run(
                connection,
                Statement(
                    "INSERT INTO accounts (id, balance) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                    (account, balance),
                ),
            )


# ---------------------------------------------------------------------------- servicers


def _drive(steps: Generator[Statement, Result, Any], run: Callable[[Statement], Result]) -> Any:
    try:
        statement = next(steps)
        while True:
            statement = steps.send(run(statement))
    except StopIteration as done:
        return done.value


async def _drive_async(
    steps: Generator[Statement, Result, Any], run: Callable[[Statement], Any]
) -> Any:
    try:
        statement = next(steps)
        while True:
            statement = steps.send(await run(statement))
    except StopIteration as done:
        return done.value


def _key(context: Any) -> str:
    return next(
        (str(v) for k, v in context.invocation_metadata() or () if k == "idempotency-key"), ""
    )


class SQLLedger(ledger_pb2_grpc.LedgerServicer):
    """The ledger for ``grpc.server`` on ``database``; ``transactional`` writes through
    :func:`resilient_grpc.transaction`, else on the ledger's own committed transaction."""

    def __init__(
        self,
        database: PostgresLedgerDatabase | SQLiteLedgerDatabase,
        *,
        transactional: bool = True,
        after_write: Callable[[str], Refusal | None] | None = None,
    ) -> None:
        self.database = database
        self.transactional = transactional
        self.after_write = after_write

    def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.TransferReply:
        opened = transaction(context) if self.transactional else self.database.connection()
        with opened as connection:
            reply = _drive(transfer_steps(request), lambda s: self.database.run(connection, s))
            if isinstance(reply, Refusal):
                context.abort(reply.code, reply.details)
        if self.after_write is not None:
            refusal = self.after_write(_key(context))
            if isinstance(refusal, Refusal):
                context.abort(refusal.code, refusal.details)
        return reply

    def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.BalanceReply:
        with self.database.connection() as connection:
            reply = _drive(balance_steps(request), lambda s: self.database.run(connection, s))
        if isinstance(reply, Refusal):
            context.abort(reply.code, reply.details)
        return reply


class AioSQLLedger(ledger_pb2_grpc.LedgerServicer):
    """:class:`SQLLedger` for ``grpc.aio``; ``after_write`` may be a coroutine function."""

    def __init__(
        self,
        database: AsyncPostgresLedgerDatabase | AsyncSQLiteLedgerDatabase,
        *,
        transactional: bool = True,
        after_write: Callable[[str], Any] | None = None,
    ) -> None:
        self.database = database
        self.transactional = transactional
        self.after_write = after_write

    async def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.TransferReply:
        opened = async_transaction(context) if self.transactional else self.database.connection()
        async with opened as connection:
            reply = await _drive_async(
                transfer_steps(request), lambda s: self.database.run(connection, s)
            )
            if isinstance(reply, Refusal):
                await context.abort(reply.code, reply.details)
        if self.after_write is not None:
            refusal = self.after_write(_key(context))
            if asyncio.iscoroutine(refusal):
                refusal = await refusal
            if isinstance(refusal, Refusal):
                await context.abort(refusal.code, refusal.details)
        return reply

    async def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.BalanceReply:
        async with self.database.connection() as connection:
            reply = await _drive_async(
                balance_steps(request), lambda s: self.database.run(connection, s)
            )
        if isinstance(reply, Refusal):
            await context.abort(reply.code, reply.details)
        return reply
