"""SQLiteStore specifics: WAL, durability across reopen, processes sharing one file, and precise
StoreUnavailableError messages for a missing directory or a lock held too long."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from resilient_grpc.core.dedup import Outcome, RecordState, fingerprint
from resilient_grpc.stores import SQLiteStore, StoreUnavailableError

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
