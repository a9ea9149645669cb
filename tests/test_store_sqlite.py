"""SQLiteStore specifics: WAL, durability across reopen, processes sharing one file, precise
StoreUnavailableError messages for a missing directory or a lock held too long, expired rows purged
outside any claim (in bounded batches, found outside any write transaction), and undecodable rows
reported as store errors."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from resilient_grpc.core.dedup import Outcome, RecordState, fingerprint
from resilient_grpc.stores import SQLiteStore, StoreUnavailableError, UndecodableRecordError

FP = fingerprint(b"request")

CLAIMER = """
import sys
from resilient_grpc.stores import SQLiteStore
store = SQLiteStore(sys.argv[1])
sys.stdin.readline()  # start together
print("claimed" if store.claim("shared", b"f" * 32, lease=30).token else "refused", flush=True)
"""


def test_wal_mode_and_durability_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteStore(path)
    claim = store.claim("k", FP, lease=30)
    assert claim.token is not None
    assert store.complete("k", claim.token, Outcome(responses=(b"kept",)))
    store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reopened = SQLiteStore(path)
    record = reopened.get("k")
    assert record is not None and record.state is RecordState.COMPLETED
    assert record.outcome == Outcome(responses=(b"kept",))
    reopened.close()


def test_processes_sharing_the_file_claim_once(tmp_path: Path) -> None:
    path = str(tmp_path / "dedup.sqlite3")
    SQLiteStore(path).close()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate("go\n", timeout=60)[0].strip() for p in processes]
    assert sorted(outputs) == ["claimed", "refused", "refused", "refused"]


def test_missing_directory_is_reported_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "dedup.sqlite3"
    with pytest.raises(StoreUnavailableError) as error:
        SQLiteStore(path)
    assert str(error.value) == (
        f"SQLite store {str(path)!r} failed: OperationalError: unable to open database file"
    )


def test_a_lock_held_past_busy_timeout_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteStore(path, busy_timeout=0.1)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailableError) as error:
        store.claim("k", FP, lease=30)
    assert str(error.value) == (
        f"SQLite store {str(path)!r} failed: OperationalError: database is locked"
    )
    blocker.execute("ROLLBACK")
    blocker.close()
    assert store.claim("k", FP, lease=30).token is not None
    store.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        (count,) = connection.execute("SELECT count(*) FROM resilient_grpc_dedup").fetchone()
    return int(count)


def test_a_row_claimed_again_between_the_scan_and_the_delete_survives(tmp_path: Path) -> None:
    clock = Clock()
    store = SQLiteStore(tmp_path / "dedup.sqlite3", clock=clock, purge_interval=3600)
    for key in ("a", "b"):
        assert store.claim(key, FP, lease=1).token is not None
    clock.now += 10
    keys = store.expired_keys("", clock.now)
    assert keys == ["a", "b"]
    again = store.claim("a", FP, lease=30)  # a retry claims the expired key anew
    assert again.token is not None
    assert store.delete_expired(keys, clock.now) == 1
    record = store.get("a")
    assert record is not None and record.state is RecordState.IN_PROGRESS
    store.close()


def test_a_claim_never_purges_inside_its_transaction(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    clock = Clock()
    store = SQLiteStore(path, clock=clock, purge_interval=3600)
    for index in range(100):
        assert store.claim(f"old{index}", FP, lease=1).token is not None
    clock.now += 10  # all 100 leases lapsed: the rows are expired
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    for index in range(2000):  # the old code purged inside every 1024th claim
        assert store.claim(f"new{index}", FP, lease=30).token is not None
    assert not [s for s in statements if s.lstrip().upper().startswith("DELETE")]
    assert _rows(path) == 2100
    store.close()


def test_purge_deletes_expired_rows_in_bounded_batches(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    clock = Clock()
    store = SQLiteStore(path, clock=clock, purge_interval=3600, purge_batch=1000)
    for index in range(2500):
        assert store.claim(f"old{index:05d}", FP, lease=1).token is not None
    live = store.claim("live", FP, lease=60)
    assert live.token is not None
    clock.now += 10
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    assert store.purge() == 2500
    assert _rows(path) == 1
    assert store.get("live") is not None
    # 1000 + 1000 + 500 deletes, each batch its own write transaction; the scans that found
    # them ran outside any write transaction (BEGIN IMMEDIATE takes the write lock)
    transactions: list[list[str]] = []
    inside = False
    for statement in statements:
        verb = statement.split()[0].upper()
        if verb == "BEGIN":
            inside = True
            transactions.append([])
        elif verb == "COMMIT":
            inside = False
        elif verb == "SELECT":
            assert not inside, "a purge scan ran inside a write transaction"
        elif inside:
            transactions[-1].append(verb)
    assert [len(t) for t in transactions] == [1000, 1000, 500]
    assert all(verb == "DELETE" for t in transactions for verb in t)
    store.close()


def test_the_background_purger_deletes_expired_rows_and_stops_on_close(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    clock = Clock()
    store = SQLiteStore(path, clock=clock, purge_interval=0.02)
    for index in range(50):
        assert store.claim(f"old{index}", FP, lease=1).token is not None
    clock.now += 10
    purger = store._purger
    assert purger is not None and purger.is_alive()
    for _ in range(500):  # bounded: 10 s
        if _rows(path) == 0:
            break
        threading.Event().wait(0.02)
    assert _rows(path) == 0
    store.close()
    assert not purger.is_alive()


@pytest.mark.parametrize(
    "column, value",
    [
        ("outcome", b"\x07garbage"),  # a format version this code does not know
        ("outcome", b"\x01\x00"),  # truncated
        ("state", 7),
        ("fingerprint", "text, not bytes"),
    ],
)
def test_an_undecodable_row_is_a_store_error_not_a_crash(
    tmp_path: Path, column: str, value: object
) -> None:
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteStore(path)
    claim = store.claim("k", FP, lease=30)
    assert claim.token is not None
    assert store.complete("k", claim.token, Outcome(responses=(b"kept",)))
    with sqlite3.connect(path) as connection:
        connection.execute(f"UPDATE resilient_grpc_dedup SET {column} = ?", (value,))
    for call in (
        lambda: store.claim("k", FP, lease=30),
        lambda: store.get("k"),
        lambda: store.complete("k", 1, Outcome()),
        lambda: store.release("k", 1),
    ):
        with pytest.raises(UndecodableRecordError) as error:
            call()
        assert isinstance(error.value, StoreUnavailableError)
        assert "cannot be decoded" in str(error.value)
        assert str(path) in str(error.value)  # for the server's log
    with sqlite3.connect(path) as connection:  # never overwritten: it may be a newer version's
        (stored,) = connection.execute(f"SELECT {column} FROM resilient_grpc_dedup").fetchone()
    assert stored == value
    store.close()


def test_a_renewal_during_the_calls_own_transaction_holds_without_waiting_for_its_lock(
    tmp_path: Path,
) -> None:
    """Transactional mode: the call's transaction holds SQLite's write lock until completion, so
    a renewal that wrote would wait for that lock (``busy_timeout``) and fail. It holds without a
    write instead (nobody else can claim meanwhile), and the completion still commits."""
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteStore(path, busy_timeout=0.05)
    claim = store.claim("k", FP, lease=30)
    token = claim.token
    assert token is not None
    connection = store.begin_transaction("k", token, None)
    connection.execute("CREATE TABLE effects (value TEXT)")
    connection.execute("INSERT INTO effects VALUES ('written')")
    renewed: list[object] = []
    renewal = threading.Thread(target=lambda: renewed.append(store.renew("k", token, lease=30)))
    renewal.start()  # on another thread, as the shared renewal thread does
    renewal.join(timeout=10)
    assert renewed == [True]
    assert store.complete("k", token, Outcome(responses=(b"done",)))
    record = store.get("k")
    assert record is not None and record.state is RecordState.COMPLETED
    assert store.renew("k", token, lease=30) is False  # the transaction ended: a real, fenced one
    with sqlite3.connect(path) as reader:
        assert reader.execute("SELECT value FROM effects").fetchall() == [("written",)]
    store.close()
