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
    renew_entry,
)
from resilient_grpc.core.validation import finite_number, whole_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    CommitFailedError,
    Store,
    StoreUnavailableError,
    ThreadedAsyncStore,
    UndecodableRecordError,
    new_token,
)
from resilient_grpc.transactional import abort_call, abort_call_async

T = TypeVar("T")
_log = logging.getLogger(__name__)

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
# The purge: a read-only scan in key order (in WAL mode it blocks no writer) finds a batch of
# expired keys, then one short write transaction deletes them, each only if still expired (it
# may have been claimed again in between). No index on expires_at: keeping one up to date
# doubled the cost of a claim plus completion (47 -> 87 us measured), for every call.
_EXPIRED = (
    "SELECT key FROM resilient_grpc_dedup WHERE key > ? AND expires_at <= ? ORDER BY key LIMIT ?"
)
_DELETE_EXPIRED = "DELETE FROM resilient_grpc_dedup WHERE key = ? AND expires_at <= ?"
_STATES = {RecordState.IN_PROGRESS: 0, RecordState.COMPLETED: 1}
_BY_NUMBER = {number: state for state, number in _STATES.items()}
#: Seconds between two purges of expired rows (per store object, in a background thread).
DEFAULT_PURGE_INTERVAL = 60.0
#: Rows deleted per purge transaction: a purge never holds the write lock for long.
DEFAULT_PURGE_BATCH = 200


class SQLiteStore(Store):
    """Records in an SQLite file in WAL mode; several processes on one host may share ``path``.

    Each claim is one ``BEGIN IMMEDIATE`` transaction (read the row, apply
    :func:`~resilient_grpc.core.dedup.claim_entry`, write), so two processes can never both claim
    a key. Times are wall-clock seconds (``time.time``) so that processes agree on leases.
    ``synchronous="NORMAL"`` survives a process crash; use ``"FULL"`` to survive power loss too.
    ``busy_timeout`` bounds how long a write waits for another process's lock before the store
    reports itself unavailable. One connection per thread; the async view
    (:meth:`~resilient_grpc.stores.base.Store.as_async`) runs the calls in worker threads.

    Expired rows are deleted by a background thread (started by the first claim, stopped by
    :meth:`close`) every ``purge_interval`` seconds: a scan outside any write transaction finds
    them, and transactions of at most ``purge_batch`` deletes remove them, so a claim never pays
    for a purge and a purge never holds the write lock long (see :meth:`purge`). A row that cannot be decoded raises
    :class:`~resilient_grpc.stores.base.UndecodableRecordError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float = DEFAULT_TTL,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        purge_interval: float = DEFAULT_PURGE_INTERVAL,
        purge_batch: int = DEFAULT_PURGE_BATCH,
        clock: Clock = time.time,
    ) -> None:
        finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        finite_number("busy_timeout", busy_timeout, above=0.0, unit=" of seconds")
        finite_number("purge_interval", purge_interval, above=0.0, unit=" of seconds")
        whole_number("purge_batch", purge_batch, at_least=1)
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
        self.purge_interval = float(purge_interval)
        self.purge_batch = purge_batch
        self._lock = threading.Lock()
        self._purger: threading.Thread | None = None
        self._closing = threading.Event()
        #: the connections of the calls' open transactions (transactional mode), by (key, token)
        self._open: dict[tuple[str, int], sqlite3.Connection] = {}
        self._spare: list[sqlite3.Connection] = []
        self._run(lambda connection: None)  # create the file and schema now: fail early

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        if self._purger is None:
            self._start_purger()

        def claim(connection: sqlite3.Connection) -> ClaimResult:
            now = self._clock()
            existing = self._entry(key, connection.execute(_SELECT, (key,)).fetchone())
            entry = claim_entry(existing, fingerprint, token, now=now, lease=lease)
            if entry is None:
                assert existing is not None
                return ClaimResult(None, existing.view(now))
            connection.execute(_UPSERT, _row(key, entry))
            return ClaimResult(token)

        return self._transaction(claim)

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        if self._finish(key, token, outcome, ttl):  # transactional mode: commits with the writes
            return True

        def complete(connection: sqlite3.Connection) -> bool:
            existing = self._entry(key, connection.execute(_SELECT, (key,)).fetchone())
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
            row = connection.execute(_SELECT, (key,)).fetchone()
            if not release_allowed(self._entry(key, row), token):
                return False
            connection.execute(_DELETE, (key,))
            return True

        return self._transaction(release)

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        """See :meth:`Store.renew`. While the call's own transaction is open (transactional
        mode) it holds SQLite's write lock, so no other executor can claim the key until it
        ends: the claim holds without a write, which would only wait (up to ``busy_timeout``)
        for the lock that transaction holds."""
        with self._lock:
            opened = self._open.get((key, token))
        if opened is not None and opened.in_transaction:
            return True

        def renew(connection: sqlite3.Connection) -> bool:
            existing = self._entry(key, connection.execute(_SELECT, (key,)).fetchone())
            entry = renew_entry(existing, token, now=self._clock(), lease=lease)
            if entry is None:
                return False
            connection.execute(_UPSERT, _row(key, entry))
            return True

        return self._transaction(renew)

    def get(self, key: str) -> Record | None:
        def get(connection: sqlite3.Connection) -> Record | None:
            entry = self._entry(key, connection.execute(_SELECT, (key,)).fetchone())
            now = self._clock()
            return entry.view(now) if entry is not None and entry.live(now) else None

        return self._run(get)

    def purge(self) -> int:
        """Delete expired rows now; returns how many were deleted. The background purger calls
        this every ``purge_interval`` seconds.

        One pass over the table in key order: each batch of up to ``purge_batch`` expired keys
        is found by a read (no write lock: WAL readers never block writers), then deleted in
        one short write transaction that rechecks each row's expiry.
        """
        deleted = 0
        after = ""
        while not self._closing.is_set():
            now = self._clock()
            keys = self.expired_keys(after, now)
            if not keys:
                break
            deleted += self.delete_expired(keys, now)
            # copy the deletions from the WAL to the database here, not in a later claim's
            # commit (SQLite's auto-checkpoint runs in whichever commit crosses its threshold)
            self._run(lambda connection: connection.execute("PRAGMA wal_checkpoint(PASSIVE)"))
            if len(keys) < self.purge_batch:
                break
            after = keys[-1]
        return deleted

    def expired_keys(self, after: str, now: float) -> list[str]:
        """Up to ``purge_batch`` keys after ``after`` (in key order) expired at ``now``."""

        def scan(connection: sqlite3.Connection) -> list[str]:
            rows = connection.execute(_EXPIRED, (after, now, self.purge_batch)).fetchall()
            return [str(row[0]) for row in rows]

        return self._run(scan)

    def delete_expired(self, keys: list[str], now: float) -> int:
        """Delete those of ``keys`` still expired at ``now``, in one write transaction."""

        def delete(connection: sqlite3.Connection) -> int:
            cursor = connection.executemany(_DELETE_EXPIRED, [(key, now) for key in keys])
            return cursor.rowcount

        return self._transaction(delete)

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
            self._open[(key, token)] = connection
        return connection

    def _begin(self, key: str, token: int) -> sqlite3.Connection | None:
        with self._lock:
            opened = self._open.get((key, token))
            connection = opened or (self._spare.pop() if self._spare else None)
        if opened:
            return connection
        try:
            if connection is None:
                connection = self._new_connection()
            connection.execute("BEGIN IMMEDIATE")
            entry = self._entry(key, connection.execute(_SELECT, (key,)).fetchone())
            if release_allowed(entry, token) and entry is not None and entry.live(self._clock()):
                return connection
            _log.warning("SQLite store %r: the call's claim is no longer held", self.path)
        except (sqlite3.Error, StoreUnavailableError) as error:
            _log.warning("SQLite store %r failed: %s: %s", self.path, type(error).__name__, error)
        if connection is not None:
            self._give_back(connection, rollback=True)
        return None

    def _finish(self, key: str, token: int, outcome: Outcome, ttl: float | None) -> bool:
        """Complete the call's open transaction: write the outcome and commit (``True``).
        ``False``: no open transaction (lease mode); :class:`CommitFailedError`: nothing
        committed (the flow releases the key and answers UNAVAILABLE)."""
        with self._lock:
            connection = self._open.pop((key, token), None)
        if connection is None:
            return False
        committed = False
        try:
            if not connection.in_transaction:  # the handler committed on its own: lease mode
                return False
            existing = self._entry(key, connection.execute(_SELECT, (key,)).fetchone())
            # fenced: the write lock has been held since the claim was checked live at BEGIN
            if existing is None or not release_allowed(existing, token):
                raise CommitFailedError(
                    f"SQLite store {self.path!r}: the call's claim was lost; its transaction "
                    "rolled back"
                )
            now = self._clock()
            ttl = self.ttl if ttl is None else ttl
            entry = Entry(
                RecordState.COMPLETED, existing.fingerprint, token, now, now + ttl, outcome
            )
            connection.execute(_UPSERT, _row(key, entry))
            connection.execute("COMMIT")
            committed = True
        except (sqlite3.Error, UndecodableRecordError) as error:
            raise CommitFailedError(
                f"SQLite store {self.path!r} failed: {type(error).__name__}: {error}; the call's "
                "transaction rolled back or its outcome is unknown"
            ) from error
        finally:
            self._give_back(connection, rollback=not committed)
        return True

    def _abandon(self, key: str, token: int) -> None:
        """Roll back the call's open transaction, if any (before a release)."""
        with self._lock:
            opened = self._open.pop((key, token), None)
        if opened is not None:
            self._give_back(opened, rollback=True)

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
        self._closing.set()
        with self._lock:
            purger, self._purger = self._purger, None
        if purger is not None and purger is not threading.current_thread():
            purger.join()
        with self._lock:
            spare, self._spare = self._spare, []
            opened, self._open = list(self._open.values()), {}
        for connection in [*spare, *opened]:
            connection.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    # -- internals

    def _start_purger(self) -> None:
        with self._lock:
            if self._purger is not None or self._closing.is_set():
                return
            self._purger = threading.Thread(
                target=self._purge_forever, name=f"SQLiteStore purge {self.path}", daemon=True
            )
            self._purger.start()

    def _purge_forever(self) -> None:
        while not self._closing.wait(self.purge_interval):
            try:
                self.purge()
            except StoreUnavailableError as error:  # locked or gone for now: try next time
                _log.warning("purging expired dedup records failed: %s", error)

    def _entry(
        self, key: str, row: tuple[int, bytes, int, float, float, bytes | None] | None
    ) -> Entry | None:
        try:
            return _entry(row)
        except (ValueError, TypeError) as error:
            raise UndecodableRecordError(
                f"SQLite store {self.path!r}: the record of key {key[:16]}... cannot be decoded "
                f"(corrupt, or written by a newer version): {error}"
            ) from error

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
            self.store._open[(key, token)] = connection
        opened = self._connections[(key, token)] = AsyncSQLiteConnection(connection, thread)
        return opened

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        opened = self._connections.pop((key, token), None)
        if opened is not None:
            try:
                committed = await opened.run(self.store._finish, key, token, outcome, ttl)
            finally:
                opened._thread.shutdown(wait=False)
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
    record_state = _BY_NUMBER.get(state)
    if record_state is None:
        raise ValueError(f"unknown record state {state!r}")
    if not isinstance(fingerprint, bytes):
        raise ValueError(f"the stored fingerprint is a {type(fingerprint).__name__}, not bytes")
    if (outcome is None) != (record_state is RecordState.IN_PROGRESS):
        raise ValueError(
            f"a {record_state.value} record {'without' if outcome is None else 'with'} an outcome"
        )
    return Entry(
        record_state,
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
