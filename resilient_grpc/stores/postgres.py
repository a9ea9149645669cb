"""PostgresStore: dedup records in a PostgreSQL table, shared by every server that reaches it.

Lease mode (any handler) is a drop-in store: one statement per claim, completion, release, renewal
or lookup, each on a pooled autocommit connection. Transactional mode (a handler that writes
through :func:`resilient_grpc.transaction`) keeps the call's record in the handler's own
transaction: the completion is a fenced ``UPDATE`` of the record followed by ``COMMIT``, sent as
one message, so the record and the handler's writes commit together or not at all.

Needs the ``postgres`` extra (psycopg 3 and psycopg-pool).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, overload

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from resilient_grpc.core.dedup import (
    ClaimResult,
    Clock,
    Outcome,
    Record,
    RecordState,
    decode_outcome,
    encode_outcome,
)
from resilient_grpc.core.validation import finite_number, whole_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    AsyncStore,
    CommitFailedError,
    Store,
    StoreUnavailableError,
    new_token,
)
from resilient_grpc.transactional import abort_call, abort_call_async

__all__ = ["AsyncPostgresStore", "PostgresStore"]

log = logging.getLogger("resilient_grpc.stores")

DEFAULT_TABLE = "resilient_grpc_dedup"
#: Expired rows are purged (one bounded batch) every this many claims, per store object.
PURGE_EVERY = 1024
_PLAIN_KEY = re.compile(r"[0-9A-Za-z_.:-]{1,255}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_IN_PROGRESS, _COMPLETED = 0, 1
_ERRORS = (psycopg.Error, PoolTimeout)

# "now" on the store's clock: the injected clock's value if given, else the database's time at
# the start of the statement (the same value everywhere in one statement).
_NOW = "COALESCE({now}::float8, extract(epoch FROM statement_timestamp())::float8)"

_SCHEMA = """
SELECT pg_advisory_xact_lock({lock});
CREATE TABLE IF NOT EXISTS {table} (
    key text PRIMARY KEY,
    state smallint NOT NULL,
    fingerprint bytea NOT NULL,
    token bigint NOT NULL,
    lease_until float8 NOT NULL,
    expires_at float8 NOT NULL,
    outcome bytea
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at)
"""
_CLAIM = """
WITH claimed AS (
    INSERT INTO {table} AS r (key, state, fingerprint, token, lease_until, expires_at)
    VALUES ({key}, 0, {fingerprint}, {token}, @now + {lease}, @now + {lease})
    ON CONFLICT (key) DO UPDATE SET
        state = 0, fingerprint = excluded.fingerprint, token = excluded.token,
        lease_until = excluded.lease_until, expires_at = excluded.expires_at, outcome = NULL
    WHERE r.expires_at <= @now OR (r.state = 0 AND r.lease_until <= @now)
    RETURNING 1
)
SELECT NULL::smallint, NULL::bytea, NULL::float8, NULL::float8, NULL::bytea, @now FROM claimed
UNION ALL
SELECT state, fingerprint, lease_until, expires_at, outcome, @now FROM {table}
WHERE key = {key} AND NOT EXISTS (SELECT FROM claimed)
"""
_COMPLETE = """
UPDATE {table} SET state = 1, outcome = {outcome}, lease_until = @now, expires_at = @now + {ttl}
WHERE key = {key} AND token = {token} AND state = 0 AND lease_until > @now
"""
# Transactional completion: the fenced update, then COMMIT, in one message. Dividing by the
# number of updated rows fails the statement when the claim is no longer ours, so the COMMIT
# that follows in the same message is never reached and the transaction can only roll back.
_COMMIT = f"WITH done AS ({_COMPLETE} RETURNING 1) SELECT 1 / count(*)::int FROM done; COMMIT"
_RELEASE = "DELETE FROM {table} WHERE key = {key} AND token = {token} AND state = 0"
_RENEW = """
UPDATE {table} SET lease_until = @now + {lease}, expires_at = @now + {lease}
WHERE key = {key} AND token = {token} AND state = 0 AND lease_until > @now
"""
_GET = "SELECT state, fingerprint, lease_until, expires_at, outcome, @now FROM {table} WHERE key = {key}"
_PURGE = """
DELETE FROM {table} WHERE key IN (
    SELECT key FROM {table} WHERE expires_at <= @now LIMIT {batch} FOR UPDATE SKIP LOCKED
) AND expires_at <= @now
"""

_Row = tuple[int | None, bytes | None, float | None, float | None, bytes | None, float]


def _table(name: str) -> sql.Composable:
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise ValueError(
            "table must be an SQL identifier (letters, digits, _; at most 63 characters), "
            f"optionally schema-qualified, got {name!r}"
        )
    return sql.Identifier(*parts)


class _Statements:
    """The store's SQL for one table: parametrized statements, plus the transactional commit
    (rendered with literals, because a message of several statements takes no parameters)."""

    def __init__(self, table: str) -> None:
        identifier = _table(table)
        self.table = table
        names = ("key", "fingerprint", "token", "lease", "outcome", "ttl", "batch", "now")
        params = {name: sql.Placeholder(name) for name in names}

        def statement(template: str) -> sql.Composed:
            text = template.replace("@now", _NOW)
            return sql.SQL(text).format(table=identifier, **params)

        self.claim = statement(_CLAIM)
        self.complete = statement(_COMPLETE)
        self.release = statement(_RELEASE)
        self.renew = statement(_RENEW)
        self.get = statement(_GET)
        self.purge = statement(_PURGE)
        self._commit = sql.SQL(_COMMIT.replace("@now", _NOW))
        # the same text as a %-template for the common case (see commit): rendered once here
        marks = {name: f"%({name})s" for name in ("key", "token", "outcome", "ttl", "now")}
        self._commit_text = self._commit.format(
            table=identifier, **{n: sql.SQL(m) for n, m in marks.items()}
        ).as_string(None)
        self._identifier = identifier
        index = f"{table.split('.')[-1][:50]}_expires_at"
        digest = hashlib.sha256(f"resilient_grpc:{table}".encode()).digest()
        lock = int.from_bytes(digest[:8], "big", signed=True)
        self.schema = sql.SQL(_SCHEMA).format(
            table=identifier, index=sql.Identifier(index), lock=sql.Literal(lock)
        )

    def commit(
        self, key: str, token: int, outcome: Outcome, ttl: float, now: float | None
    ) -> sql.SQL | sql.Composed:
        """The transactional completion as one message of literal SQL.

        Store keys are hex digests: those, integers, finite floats and bytes written as
        ``decode('<hex>', 'hex')`` are rendered directly (valid whatever
        ``standard_conforming_strings`` says); any other key goes through psycopg's quoting.
        """
        if _PLAIN_KEY.fullmatch(key):
            return sql.SQL(
                self._commit_text
                % {
                    "key": f"'{key}'",
                    "token": str(int(token)),
                    "outcome": f"decode('{encode_outcome(outcome).hex()}', 'hex')",
                    "ttl": repr(float(ttl)),
                    "now": "NULL" if now is None else repr(float(now)),
                }
            )
        return self._commit.format(
            table=self._identifier,
            key=sql.Literal(key),
            token=sql.Literal(token),
            outcome=sql.Literal(encode_outcome(outcome)),
            ttl=sql.Literal(ttl),
            now=sql.Literal(now),
        )


def _record(row: _Row | None) -> Record | None:
    """The live record a row shows (``None`` for no row or a row that no longer binds)."""
    if row is None:
        return None
    state, fingerprint, lease_until, expires_at, outcome, now = row
    assert state is not None and fingerprint is not None
    assert lease_until is not None and expires_at is not None
    if expires_at <= now:
        return None
    if state == _COMPLETED:
        assert outcome is not None
        return Record(RecordState.COMPLETED, bytes(fingerprint), decode_outcome(bytes(outcome)))
    if lease_until <= now:
        return None
    return Record(RecordState.IN_PROGRESS, bytes(fingerprint), None, lease_until - now)


def _claim_result(token: int, row: _Row | None) -> ClaimResult:
    if row is not None and row[0] is None:
        return ClaimResult(token)
    # a record that binds the key, or none visible (lost a race with a concurrent claim: wait)
    return ClaimResult(None, _record(row))


def _conninfo(conninfo: object) -> str:
    return conninfo if isinstance(conninfo, str) else ""


def _unavailable(store: str, error: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"PostgreSQL store {store} failed: {type(error).__name__}: {error}"
    )


def _commit_failed(store: str, error: psycopg.Error) -> CommitFailedError:
    """Why a call's transaction did not commit (for the server log only)."""
    if isinstance(error, psycopg.errors.DivisionByZero):  # the fenced update matched no row
        return CommitFailedError(
            f"PostgreSQL store {store}: the call's claim was taken over; its transaction rolled back"
        )
    return CommitFailedError(
        f"PostgreSQL store {store} failed: {type(error).__name__}: {error}; the call's "
        "transaction rolled back or its outcome is unknown"
    )


@dataclass(slots=True)
class _Open:
    """A call's open transaction: its connection, and the connection's autocommit setting."""

    connection: Any
    autocommit: bool


@dataclass(frozen=True, slots=True)
class _Settings:
    table: str
    ttl: float
    timeout: float
    min_size: int
    max_size: int
    purge_batch: int
    clock: Clock | None


def _settings(
    table: str,
    ttl: float,
    timeout: float,
    min_size: int,
    max_size: int,
    purge_batch: int,
    clock: Clock | None,
) -> _Settings:
    _table(table)
    finite_number("ttl", ttl, above=0.0, unit=" of seconds")
    finite_number("timeout", timeout, above=0.0, unit=" of seconds")
    whole_number("min_size", min_size, at_least=0)
    whole_number("max_size", max_size, at_least=max(1, min_size))
    whole_number("purge_batch", purge_batch, at_least=1)
    if clock is not None and not callable(clock):
        raise ValueError(f"clock must be a function returning seconds, got {clock!r}")
    return _Settings(table, float(ttl), float(timeout), min_size, max_size, purge_batch, clock)


class _Common:
    """Arguments, statements and bookkeeping shared by the sync and async stores."""

    def __init__(self, settings: _Settings, conninfo: str | None, *, pooled: bool) -> None:
        """``pooled``: the application gave its own pool (``from_pool``), which the store never
        closes; otherwise ``conninfo`` must say where to open one."""
        if not pooled and not isinstance(conninfo, str):
            raise ValueError(f"conninfo must be a connection string or URL, got {conninfo!r}")
        self._settings = settings
        self.conninfo = conninfo
        self._owns_pool = not pooled
        self.table = settings.table
        self.ttl = settings.ttl
        self.timeout = settings.timeout
        self._sql = _Statements(settings.table)
        self._schema_ready = False
        self._claims = 0
        self._open: dict[tuple[str, int], _Open] = {}
        self._where = f"(table {settings.table!r})"

    def _now(self) -> float | None:
        clock = self._settings.clock
        return clock() if clock is not None else None

    def _claim_params(
        self, key: str, fingerprint: bytes, token: int, lease: float
    ) -> dict[str, Any]:
        return {
            "key": key,
            "fingerprint": fingerprint,
            "token": token,
            "lease": float(lease),
            "now": self._now(),
        }

    def _purge_due(self) -> bool:
        self._claims += 1
        return self._claims % PURGE_EVERY == 0

    def _complete_params(
        self, key: str, token: int, outcome: Outcome, ttl: float | None
    ) -> dict[str, Any]:
        return {
            "key": key,
            "token": token,
            "outcome": encode_outcome(outcome),
            "ttl": self.ttl if ttl is None else float(ttl),
            "now": self._now(),
        }

    def _commit_statement(
        self, key: str, token: int, outcome: Outcome, ttl: float | None
    ) -> sql.SQL | sql.Composed:
        return self._sql.commit(
            key, token, outcome, self.ttl if ttl is None else float(ttl), self._now()
        )


class PostgresStore(_Common, Store):
    """Records in a PostgreSQL table (default ``resilient_grpc_dedup``), through a psycopg pool.

    ``conninfo``: a libpq connection string or URL (the store opens its own pool of
    ``min_size``..``max_size`` connections on first use), or use :meth:`from_pool` with the
    application's pool. The table and its ``expires_at`` index are created on first use (or by
    :meth:`create_schema`). ``timeout``: how long an operation waits for a pooled connection
    (while the database is down, calls fail closed after it). Times come from the database's
    clock unless ``clock`` is given (then every server must agree on it). Expired records are
    deleted ``purge_batch`` at a time every 1024 claims (:meth:`purge_expired`), skipping rows
    that are locked, so a purge never waits on a claim or a running transaction.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = DEFAULT_TABLE,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
        min_size: int = 1,
        max_size: int = 20,
        purge_batch: int = 500,
        clock: Clock | None = None,
        _pool: ConnectionPool[psycopg.Connection[Any]] | None = None,
    ) -> None:
        settings = _settings(table, ttl, timeout, min_size, max_size, purge_batch, clock)
        _Common.__init__(self, settings, conninfo, pooled=_pool is not None)
        self._pool = _pool
        self._lock = threading.Lock()

    @overload
    @classmethod
    def from_pool(
        cls, pool: ConnectionPool[psycopg.Connection[Any]], **options: Any
    ) -> PostgresStore: ...

    @overload
    @classmethod
    def from_pool(
        cls, pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]], **options: Any
    ) -> AsyncPostgresStore: ...

    @classmethod
    def from_pool(
        cls,
        pool: ConnectionPool[psycopg.Connection[Any]]
        | AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        **options: Any,
    ) -> PostgresStore | AsyncPostgresStore:
        """A store on the application's psycopg pool (a ``ConnectionPool``, or an
        ``AsyncConnectionPool`` for ``grpc.aio``: then an :class:`AsyncPostgresStore`). The pool
        stays the application's: :meth:`close` does not close it."""
        if isinstance(pool, AsyncConnectionPool):
            return AsyncPostgresStore(_conninfo(pool.conninfo), _pool=pool, **options)
        if not isinstance(pool, ConnectionPool):
            raise ValueError(f"pool must be a psycopg_pool.ConnectionPool, got {pool!r}")
        return cls(_conninfo(pool.conninfo), _pool=pool, **options)

    def as_async(self) -> AsyncPostgresStore:
        """The ``grpc.aio`` view: an :class:`AsyncPostgresStore` with its own async pool."""
        if not self.conninfo:
            raise ValueError(
                "this PostgresStore was made from a pool without a connection string: give "
                "grpc.aio servers PostgresStore.from_pool(an AsyncConnectionPool)"
            )
        s = self._settings
        return AsyncPostgresStore(
            self.conninfo or "",
            table=s.table,
            ttl=s.ttl,
            timeout=s.timeout,
            min_size=s.min_size,
            max_size=s.max_size,
            purge_batch=s.purge_batch,
            clock=s.clock,
        )

    # -- lease mode

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        params = self._claim_params(key, fingerprint, token, lease)
        with self._connection() as connection:
            row = connection.execute(self._sql.claim, params).fetchone()
            if self._purge_due():
                connection.execute(
                    self._sql.purge, {"batch": self._settings.purge_batch, "now": params["now"]}
                )
        return _claim_result(token, row)

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        with self._lock:
            open_ = self._open.pop((key, token), None)
        if open_ is not None:
            return self._commit(open_, key, token, outcome, ttl)
        params = self._complete_params(key, token, outcome, ttl)
        with self._connection() as connection:
            return connection.execute(self._sql.complete, params).rowcount == 1

    def release(self, key: str, token: int) -> bool:
        with self._lock:
            open_ = self._open.pop((key, token), None)
        if open_ is not None:
            self._rollback(open_)
        with self._connection() as connection:
            params = {"key": key, "token": token}
            return connection.execute(self._sql.release, params).rowcount == 1

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        """Extend the live claim held by ``token`` to now + ``lease``; ``False`` if it no longer holds it."""
        params = {"key": key, "token": token, "lease": float(lease), "now": self._now()}
        with self._connection() as connection:
            return connection.execute(self._sql.renew, params).rowcount == 1

    def get(self, key: str) -> Record | None:
        with self._connection() as connection:
            row = connection.execute(self._sql.get, {"key": key, "now": self._now()}).fetchone()
        return _record(row)

    def purge_expired(self) -> int:
        """Delete up to ``purge_batch`` expired records (skipping locked rows); how many went."""
        with self._connection() as connection:
            params = {"batch": self._settings.purge_batch, "now": self._now()}
            return connection.execute(self._sql.purge, params).rowcount

    def create_schema(self) -> None:
        """Create the table and its index if missing (also done on first use)."""
        with self._connection(schema=False) as connection:
            connection.execute(self._sql.schema)
        self._schema_ready = True

    def close(self) -> None:
        with self._lock:
            opened, self._open = list(self._open.values()), {}
        for open_ in opened:
            self._rollback(open_)
        if self._pool is not None and self._owns_pool:
            self._pool.close()

    # -- transactional mode

    def begin_transaction(self, key: str, token: int, context: Any) -> psycopg.Connection[Any]:
        """The connection of the call's transaction (opened on first use): see
        :func:`resilient_grpc.transaction`. Aborts the call with UNAVAILABLE if the database
        cannot be reached."""
        with self._lock:
            open_ = self._open.get((key, token))
        if open_ is not None:
            reused: psycopg.Connection[Any] = open_.connection
            return reused
        try:
            self._ready()
            connection = self._get_pool().getconn(timeout=self.timeout)
        except _ERRORS as error:
            log.warning("%s", _unavailable(self._where, error))
            abort_call(context)
        autocommit = connection.autocommit
        if autocommit:
            connection.autocommit = False
        with self._lock:
            self._open[(key, token)] = _Open(connection, autocommit)
        return connection

    def _commit(
        self, open_: _Open, key: str, token: int, outcome: Outcome, ttl: float | None
    ) -> bool:
        """Write the outcome in the call's transaction and commit, or raise
        :class:`~resilient_grpc.stores.base.CommitFailedError`."""
        connection: psycopg.Connection[Any] = open_.connection
        committed = False
        try:
            connection.execute(self._commit_statement(key, token, outcome, ttl))
            committed = True
        except psycopg.Error as error:
            raise _commit_failed(self._where, error) from error
        finally:
            self._put_back(open_, rollback=not committed)
        return True

    def _rollback(self, open_: _Open) -> None:
        self._put_back(open_, rollback=True)

    def _put_back(self, open_: _Open, *, rollback: bool) -> None:
        connection: psycopg.Connection[Any] = open_.connection
        try:
            if rollback and not connection.closed:
                connection.rollback()
            if open_.autocommit and not connection.closed:
                connection.autocommit = True
        except psycopg.Error:
            pass  # a broken connection: the pool discards it
        self._get_pool().putconn(connection)

    # -- internals

    def _get_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ConnectionPool(
                        self.conninfo or "",
                        min_size=self._settings.min_size,
                        max_size=self._settings.max_size,
                        timeout=self.timeout,
                        # give up reconnecting (back off no further) after ``timeout``: the
                        # next call starts afresh, so service resumes soon after an outage
                        reconnect_timeout=self.timeout,
                        kwargs={"autocommit": True, "connect_timeout": max(1, round(self.timeout))},
                        open=True,
                        name=f"resilient_grpc:{self.table}",
                    )
        return self._pool

    def _ready(self) -> None:
        if not self._schema_ready:
            self.create_schema()

    def _connection(self, *, schema: bool = True) -> _Borrowed:
        return _Borrowed(self, schema)


class _Borrowed:
    """A pooled connection in autocommit mode for one store operation; psycopg errors become
    :class:`StoreUnavailableError`."""

    __slots__ = ("_autocommit", "_connection", "_schema", "_store")

    def __init__(self, store: PostgresStore, schema: bool) -> None:
        self._store = store
        self._schema = schema

    def __enter__(self) -> psycopg.Connection[Any]:
        store = self._store
        try:
            if self._schema:
                store._ready()
            connection = store._get_pool().getconn(timeout=store.timeout)
        except _ERRORS as error:
            raise _unavailable(store._where, error) from error
        self._connection = connection
        self._autocommit = connection.autocommit
        if not self._autocommit:
            connection.autocommit = True
        return connection

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        connection = self._connection
        try:
            if not self._autocommit and not connection.closed:
                connection.autocommit = False
        except psycopg.Error:
            pass
        pool = self._store._get_pool()
        pool.putconn(connection)
        if isinstance(error, psycopg.Error):
            if isinstance(error, psycopg.OperationalError):
                pool.check()  # the database may have restarted: drop the other dead connections
            raise _unavailable(self._store._where, error) from error


class AsyncPostgresStore(_Common, AsyncStore):
    """:class:`PostgresStore` for ``grpc.aio``: the same table and statements on an
    ``AsyncConnectionPool`` (opened on first use, in the server's event loop)."""

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = DEFAULT_TABLE,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
        min_size: int = 1,
        max_size: int = 20,
        purge_batch: int = 500,
        clock: Clock | None = None,
        _pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None,
    ) -> None:
        settings = _settings(table, ttl, timeout, min_size, max_size, purge_batch, clock)
        _Common.__init__(self, settings, conninfo, pooled=_pool is not None)
        self._pool = _pool
        self._pool_lock: asyncio.Lock | None = None

    # -- lease mode

    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        params = self._claim_params(key, fingerprint, token, lease)
        async with _AsyncBorrowed(self) as connection:
            row = await (await connection.execute(self._sql.claim, params)).fetchone()
            if self._purge_due():
                await connection.execute(
                    self._sql.purge, {"batch": self._settings.purge_batch, "now": params["now"]}
                )
        return _claim_result(token, row)

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        open_ = self._open.pop((key, token), None)
        if open_ is not None:
            return await self._commit(open_, key, token, outcome, ttl)
        params = self._complete_params(key, token, outcome, ttl)
        async with _AsyncBorrowed(self) as connection:
            return (await connection.execute(self._sql.complete, params)).rowcount == 1

    async def release(self, key: str, token: int) -> bool:
        open_ = self._open.pop((key, token), None)
        if open_ is not None:
            await self._put_back(open_, rollback=True)
        async with _AsyncBorrowed(self) as connection:
            params = {"key": key, "token": token}
            return (await connection.execute(self._sql.release, params)).rowcount == 1

    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        """See :meth:`PostgresStore.renew`."""
        params = {"key": key, "token": token, "lease": float(lease), "now": self._now()}
        async with _AsyncBorrowed(self) as connection:
            return (await connection.execute(self._sql.renew, params)).rowcount == 1

    async def get(self, key: str) -> Record | None:
        async with _AsyncBorrowed(self) as connection:
            cursor = await connection.execute(self._sql.get, {"key": key, "now": self._now()})
            row = await cursor.fetchone()
        return _record(row)

    async def purge_expired(self) -> int:
        """See :meth:`PostgresStore.purge_expired`."""
        async with _AsyncBorrowed(self) as connection:
            params = {"batch": self._settings.purge_batch, "now": self._now()}
            return (await connection.execute(self._sql.purge, params)).rowcount

    async def create_schema(self) -> None:
        """See :meth:`PostgresStore.create_schema`."""
        async with _AsyncBorrowed(self, schema=False) as connection:
            await connection.execute(self._sql.schema)
        self._schema_ready = True

    async def aclose(self) -> None:
        opened, self._open = list(self._open.values()), {}
        for open_ in opened:
            await self._put_back(open_, rollback=True)
        if self._pool is not None and self._owns_pool:
            await self._pool.close()

    # -- transactional mode

    async def begin_transaction(
        self, key: str, token: int, context: Any
    ) -> psycopg.AsyncConnection[Any]:
        """See :meth:`PostgresStore.begin_transaction`."""
        open_ = self._open.get((key, token))
        if open_ is not None:
            reused: psycopg.AsyncConnection[Any] = open_.connection
            return reused
        try:
            await self._ready()
            connection = await (await self._get_pool()).getconn(timeout=self.timeout)
        except _ERRORS as error:
            log.warning("%s", _unavailable(self._where, error))
            await abort_call_async(context)
        autocommit = connection.autocommit
        if autocommit:
            await connection.set_autocommit(False)
        self._open[(key, token)] = _Open(connection, autocommit)
        return connection

    async def _commit(
        self, open_: _Open, key: str, token: int, outcome: Outcome, ttl: float | None
    ) -> bool:
        """See :meth:`PostgresStore._commit`."""
        connection: psycopg.AsyncConnection[Any] = open_.connection
        committed = False
        try:
            await connection.execute(self._commit_statement(key, token, outcome, ttl))
            committed = True
        except psycopg.Error as error:
            raise _commit_failed(self._where, error) from error
        finally:
            await asyncio.shield(self._put_back(open_, rollback=not committed))
        return True

    async def _put_back(self, open_: _Open, *, rollback: bool) -> None:
        connection: psycopg.AsyncConnection[Any] = open_.connection
        try:
            if rollback and not connection.closed:
                await connection.rollback()
            if open_.autocommit and not connection.closed:
                await connection.set_autocommit(True)
        except psycopg.Error:
            pass  # a broken connection: the pool discards it
        await (await self._get_pool()).putconn(connection)

    # -- internals

    async def _get_pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            if self._pool_lock is None:
                self._pool_lock = asyncio.Lock()
            async with self._pool_lock:
                if self._pool is None:
                    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                        self.conninfo or "",
                        min_size=self._settings.min_size,
                        max_size=self._settings.max_size,
                        timeout=self.timeout,
                        # give up reconnecting (back off no further) after ``timeout``: the
                        # next call starts afresh, so service resumes soon after an outage
                        reconnect_timeout=self.timeout,
                        kwargs={"autocommit": True, "connect_timeout": max(1, round(self.timeout))},
                        open=False,
                        name=f"resilient_grpc:{self.table}",
                    )
                    await pool.open()
                    self._pool = pool
        return self._pool

    async def _ready(self) -> None:
        if not self._schema_ready:
            await self.create_schema()


class _AsyncBorrowed:
    """:class:`_Borrowed` for the async store."""

    __slots__ = ("_autocommit", "_connection", "_schema", "_store")

    def __init__(self, store: AsyncPostgresStore, schema: bool = True) -> None:
        self._store = store
        self._schema = schema

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        store = self._store
        try:
            if self._schema:
                await store._ready()
            connection = await (await store._get_pool()).getconn(timeout=store.timeout)
        except _ERRORS as error:
            raise _unavailable(store._where, error) from error
        self._connection = connection
        self._autocommit = connection.autocommit
        if not self._autocommit:
            await connection.set_autocommit(True)
        return connection

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        connection = self._connection
        try:
            if not self._autocommit and not connection.closed:
                await connection.set_autocommit(False)
        except psycopg.Error:
            pass
        pool = await self._store._get_pool()
        await pool.putconn(connection)
        if isinstance(error, psycopg.Error):
            if isinstance(error, psycopg.OperationalError):
                await pool.check()  # the database may have restarted: drop dead connections
            raise _unavailable(self._store._where, error) from error
