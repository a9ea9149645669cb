"""SQLiteStore: durable records on one host, shared by every server process that opens the same file."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

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
from resilient_grpc.core.validation import finite_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    Store,
    StoreUnavailableError,
    new_token,
)

T = TypeVar("T")

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
        def release(connection: sqlite3.Connection) -> bool:
            if not release_allowed(_entry(connection.execute(_SELECT, (key,)).fetchone()), token):
                return False
            connection.execute(_DELETE, (key,))
            return True

        return self._transaction(release)

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        def renew(connection: sqlite3.Connection) -> bool:
            existing = _entry(connection.execute(_SELECT, (key,)).fetchone())
            entry = renew_entry(existing, token, now=self._clock(), lease=lease)
            if entry is None:
                return False
            connection.execute(_UPSERT, _row(key, entry))
            return True

        return self._transaction(renew)

    def get(self, key: str) -> Record | None:
        def get(connection: sqlite3.Connection) -> Record | None:
            entry = _entry(connection.execute(_SELECT, (key,)).fetchone())
            now = self._clock()
            return entry.view(now) if entry is not None and entry.live(now) else None

        return self._run(get)

    def close(self) -> None:
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
            connection = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self._prepare(connection)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
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
