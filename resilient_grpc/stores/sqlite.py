"""SQLiteStore: durable records on one host, shared by every server process that opens the same file."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from resilient_grpc.core.dedup import (
    ClaimResult,
    Clock,
    Entry,
    Outcome,
    Record,
    RecordState,
    claim_entry,
    complete_entry,
    decode_outcome,
    encode_outcome,
    release_allowed,
)
from resilient_grpc.core.validation import finite_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    Store,
    StoreUnavailableError,
    ThreadedAsyncStore,
    new_token,
)
from resilient_grpc.transactional import abort_call, abort_call_async

T = TypeVar("T")
_log = logging.getLogger("resilient_grpc.stores")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resilient_grpc_dedup (
    key TEXT PRIMARY KEY,
    state INTEGER NOT NULL,
    fingerprint BLOB NOT NULL,
    token INTEGER NOT NULL,
    lease_until REAL NOT NULL,
    expires_at REAL NOT NULL,
    outcome BLOB
) WITHOUT ROWID
"""
_SELECT = (
    "SELECT state, fingerprint, token, lease_until, expires_at, outcome "
    "FROM resilient_grpc_dedup WHERE key = ?"
)
_UPSERT = "INSERT OR REPLACE INTO resilient_grpc_dedup VALUES (?, ?, ?, ?, ?, ?, ?)"
_DELETE = "DELETE FROM resilient_grpc_dedup WHERE key = ?"
_PURGE = "DELETE FROM resilient_grpc_dedup WHERE expires_at <= ?"
_STATES = {RecordState.IN_PROGRESS: 0, RecordState.COMPLETED: 1}
_BY_NUMBER = {number: state for state, number in _STATES.items()}
#: Expired rows are deleted every this many claims (per process).
PURGE_EVERY = 1024


class SQLiteStore(Store):
    """Records in an SQLite file in WAL mode; several processes on one host may share ``path``.

    Each claim is one ``BEGIN IMMEDIATE`` transaction (read the row, apply
    :func:`~resilient_grpc.core.dedup.claim_entry`, write), so two processes can never both claim
    a key. Times are wall-clock seconds (``time.time``) so that processes agree on leases.
    ``synchronous="NORMAL"`` survives a process crash; use ``"FULL"`` to survive power loss too.
    ``busy_timeout`` bounds how long a write waits for another process's lock before the store
    reports itself unavailable. One connection per thread; the async view
    (:meth:`~resilient_grpc.stores.base.Store.as_async`) runs the calls in worker threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float = DEFAULT_TTL,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        clock: Clock = time.time,
    ) -> None:
        finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        finite_number("busy_timeout", busy_timeout, above=0.0, unit=" of seconds")
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(
                f"synchronous must be one of OFF, NORMAL, FULL, EXTRA, got {synchronous!r}"
            )
        self.path = os.fspath(path)
        self.ttl = float(ttl)
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous.upper()
        self._clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._claims = 0
        self._open: dict[tuple[str, int], tuple[sqlite3.Connection, Any]] = {}
        self._spare: list[sqlite3.Connection] = []
        self._run(lambda connection: None)  # create the file and schema now: fail early

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()

        def claim(connection: sqlite3.Connection) -> ClaimResult:
            now = self._clock()
            existing = _entry(connection.execute(_SELECT, (key,)).fetchone())
            entry = claim_entry(existing, fingerprint, token, now=now, lease=lease)
            if entry is None:
                assert existing is not None
                return ClaimResult(None, existing.view(now))
            if self._count_claim() % PURGE_EVERY == 0:
                connection.execute(_PURGE, (now,))
            connection.execute(_UPSERT, _row(key, entry))
            return ClaimResult(token)

        return self._transaction(claim)

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        with self._lock:
            opened = self._open.get((key, token))
        if opened is not None:  # transactional mode: the outcome commits with the handler's writes
            committed = self._finish(key, token, outcome, ttl)
            if committed is False:
                abort_call(opened[1])
            if committed:
                return True

        def complete(connection: sqlite3.Connection) -> bool:
            existing = _entry(connection.execute(_SELECT, (key,)).fetchone())
            entry = complete_entry(
                existing,
                token,
                outcome,
                now=self._clock(),
                ttl=self.ttl if ttl is None else ttl,
            )
            if entry is None:
                return False
            connection.execute(_UPSERT, _row(key, entry))
            return True

        return self._transaction(complete)

    def release(self, key: str, token: int) -> bool:
        self._abandon(key, token)

        def release(connection: sqlite3.Connection) -> bool:
            if not release_allowed(_entry(connection.execute(_SELECT, (key,)).fetchone()), token):
                return False
            connection.execute(_DELETE, (key,))
            return True

        return self._transaction(release)

    def get(self, key: str) -> Record | None:
        def get(connection: sqlite3.Connection) -> Record | None:
            entry = _entry(connection.execute(_SELECT, (key,)).fetchone())
            now = self._clock()
            return entry.view(now) if entry is not None and entry.live(now) else None

        return self._run(get)

    # -- transactional mode (see resilient_grpc.transactional)

    def begin_transaction(self, key: str, token: int, context: Any) -> sqlite3.Connection:
        """The connection of the call's transaction (``BEGIN IMMEDIATE``, opened on first use).

        The transaction holds SQLite's write lock from here until the call completes, so no
        other executor can take the key over meanwhile (and other writers wait, up to
        ``busy_timeout``). Aborts the call with UNAVAILABLE if the claim is no longer ours or
        the file cannot be written.
        """
        connection = self._begin(key, token)
        if connection is None:
            abort_call(context)
        with self._lock:
            self._open[(key, token)] = (connection, context)
        return connection

    def _begin(self, key: str, token: int) -> sqlite3.Connection | None:
        with self._lock:
            opened = self._open.get((key, token))
            connection = opened[0] if opened else self._spare.pop() if self._spare else None
        if opened:
            return connection
        try:
            if connection is None:
                connection = self._new_connection()
            connection.execute("BEGIN IMMEDIATE")
            entry = _entry(connection.execute(_SELECT, (key,)).fetchone())
            if release_allowed(entry, token) and entry is not None and entry.live(self._clock()):
                return connection
            _log.warning("SQLite store %r: the call's claim is no longer held", self.path)
        except sqlite3.Error as error:
            _log.warning("SQLite store %r failed: %s: %s", self.path, type(error).__name__, error)
        if connection is not None:
            self._give_back(connection, rollback=True)
        return None

    def _finish(self, key: str, token: int, outcome: Outcome, ttl: float | None) -> bool | None:
        """Complete the call's open transaction: write the outcome and commit. ``None``: no open
        transaction; ``False``: nothing committed (the caller aborts the call)."""
        with self._lock:
            opened = self._open.pop((key, token), None)
        if opened is None:
            return None
        connection = opened[0]
        committed = False
        try:
            if not connection.in_transaction:  # the handler committed on its own: lease mode
                return None
            existing = _entry(connection.execute(_SELECT, (key,)).fetchone())
            # fenced: the write lock has been held since the claim was checked live at BEGIN
            if existing is not None and release_allowed(existing, token):
                now = self._clock()
                ttl = self.ttl if ttl is None else ttl
                entry = Entry(
                    RecordState.COMPLETED, existing.fingerprint, token, now, now + ttl, outcome
                )
                connection.execute(_UPSERT, _row(key, entry))
                connection.execute("COMMIT")
                committed = True
        except sqlite3.Error as error:
            _log.warning("SQLite store %r failed: %s: %s", self.path, type(error).__name__, error)
        finally:
            self._give_back(connection, rollback=not committed)
        return committed

    def _abandon(self, key: str, token: int) -> None:
        """Roll back the call's open transaction, if any (before a release)."""
        with self._lock:
            opened = self._open.pop((key, token), None)
        if opened is not None:
            self._give_back(opened[0], rollback=True)

    def _give_back(self, connection: sqlite3.Connection, *, rollback: bool) -> None:
        try:
            if rollback and connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error:
            connection.close()
            return
        with self._lock:
            self._spare.append(connection)

    def as_async(self) -> AsyncSQLiteStore:
        """The ``grpc.aio`` view (calls run in worker threads), transactional mode included."""
        return AsyncSQLiteStore(self)

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, []
            opened, self._open = list(self._open.values()), {}
        for connection in [*spare, *(connection for connection, _ in opened)]:
            connection.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    # -- internals

    def _count_claim(self) -> int:
        with self._lock:
            self._claims += 1
            return self._claims

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._new_connection()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _new_connection(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        self._prepare(connection)
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """WAL mode and the table. Processes opening a new file at once can find it locked
        (switching to WAL takes an exclusive lock that SQLite may refuse without waiting), so
        retry within ``busy_timeout``."""
        deadline = time.monotonic() + self.busy_timeout
        pause = threading.Event()
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute(f"PRAGMA synchronous={self.synchronous}")
                connection.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    connection.close()
                    raise
                pause.wait(0.01)

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return work(self._connection())
        except sqlite3.Error as error:
            raise StoreUnavailableError(
                f"SQLite store {self.path!r} failed: {type(error).__name__}: {error}"
            ) from error

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def transaction(connection: sqlite3.Connection) -> T:
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result

        return self._run(transaction)


class AsyncSQLiteConnection:
    """The connection of a ``grpc.aio`` handler's transaction on :class:`SQLiteStore`.

    Its statements run on a thread of its own: the transaction holds SQLite's write lock, and
    claims waiting for that lock may occupy every shared worker thread, so the holder must
    never queue behind them. The event loop never blocks.
    """

    def __init__(self, connection: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self.connection = connection
        self._thread = thread

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> SQLiteResult:
        """Run one statement; its rows (all fetched) and row count."""

        def run() -> SQLiteResult:
            cursor = self.connection.execute(sql, parameters)
            rows = cursor.fetchall()
            return SQLiteResult(rows, cursor.rowcount)

        return await self.run(run)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(*args)`` on this transaction's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)


@dataclass(frozen=True, slots=True)
class SQLiteResult:
    """What a statement returned: its rows and its row count (``-1`` for a query)."""

    rows: list[Any]
    rowcount: int


class AsyncSQLiteStore(ThreadedAsyncStore):
    """:class:`SQLiteStore` for ``grpc.aio``: blocking calls in worker threads, and transactional
    mode for ``resilient_grpc.aio.transaction`` (statements through :class:`AsyncSQLiteConnection`,
    each open transaction on a thread of its own)."""

    store: SQLiteStore

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(store)
        self._connections: dict[tuple[str, int], AsyncSQLiteConnection] = {}

    async def begin_transaction(self, key: str, token: int, context: Any) -> AsyncSQLiteConnection:
        """See :meth:`SQLiteStore.begin_transaction`."""
        opened = self._connections.get((key, token))
        if opened is not None:
            return opened
        thread = ThreadPoolExecutor(1, thread_name_prefix="resilient_grpc-sqlite-transaction")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(thread, self.store._begin, key, token)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        if connection is None:
            thread.shutdown(wait=False)
            await abort_call_async(context)
        with self.store._lock:
            self.store._open[(key, token)] = (connection, context)
        opened = self._connections[(key, token)] = AsyncSQLiteConnection(connection, thread)
        return opened

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        opened = self._connections.pop((key, token), None)
        if opened is not None:
            with self.store._lock:
                context = self.store._open[(key, token)][1]
            try:
                committed = await opened.run(self.store._finish, key, token, outcome, ttl)
            finally:
                opened._thread.shutdown(wait=False)
            if committed is False:
                await abort_call_async(context)
            if committed:
                return True
        return await super().complete(key, token, outcome, ttl=ttl)

    async def release(self, key: str, token: int) -> bool:
        opened = self._connections.pop((key, token), None)
        if opened is not None:
            try:
                await opened.run(self.store._abandon, key, token)
            finally:
                opened._thread.shutdown(wait=False)
        return await super().release(key, token)


def _entry(row: tuple[int, bytes, int, float, float, bytes | None] | None) -> Entry | None:
    if row is None:
        return None
    state, fingerprint, token, lease_until, expires_at, outcome = row
    return Entry(
        _BY_NUMBER[state],
        bytes(fingerprint),
        token,
        lease_until,
        expires_at,
        decode_outcome(outcome) if outcome is not None else None,
    )


def _row(key: str, entry: Entry) -> tuple[str, int, bytes, int, float, float, bytes | None]:
    outcome = encode_outcome(entry.outcome) if entry.outcome is not None else None
    return (
        key,
        _STATES[entry.state],
        entry.fingerprint,
        entry.token,
        entry.lease_until,
        entry.expires_at,
        outcome,
    )
