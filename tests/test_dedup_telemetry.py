"""The dedup outcomes the interceptors report, counted by a real OpenTelemetry SDK."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import serve
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import SQLiteStore
from tests.dedup_fixtures import KEY, SlowLedger, sqlite_locked, transfer
from tests.telemetry_fixtures import Otel


def _counts(otel: Otel) -> dict[str, float]:
    outcomes = ("executed", "replayed", "conflict", "waited", "store_error", "fail_open")
    return {
        outcome: otel.total(
            "resilient_grpc.server.dedup",
            rpc__method="Transfer",
            resilient_grpc__dedup__outcome=outcome,
        )
        for outcome in outcomes
    }


def test_every_outcome_is_counted(otel: Otel, tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    server, port, _ = serve(
        SlowLedger(delay=1.0),
        interceptors=[DedupInterceptor(SQLiteStore(path, busy_timeout=0.05))],
        max_workers=32,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            barrier = threading.Barrier(10)

            def duplicate(_: int) -> None:
                barrier.wait(timeout=10)
                stub.Transfer(transfer(), metadata=[(KEY, "same")], timeout=10)

            with ThreadPoolExecutor(10) as pool:
                list(pool.map(duplicate, range(10)))
            with pytest.raises(grpc.RpcError):
                stub.Transfer(transfer(9), metadata=[(KEY, "same")], timeout=10)
            with sqlite_locked(path), pytest.raises(grpc.RpcError):
                stub.Transfer(transfer(), metadata=[(KEY, "other")], timeout=10)
    finally:
        server.stop(None)
    assert _counts(otel) == {
        "executed": 1,
        "replayed": 9,
        "conflict": 1,
        "waited": 9,
        "store_error": 1,
        "fail_open": 0,
    }


def test_an_undecodable_record_is_counted_apart_from_an_unreachable_store(
    otel: Otel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record the store cannot decode (corrupt, or a newer version's format) fails closed like
    an outage, but is counted as ``store_undecodable`` so an operator can tell the two apart."""
    path = tmp_path / "dedup.sqlite3"
    server, port, _ = serve(
        SlowLedger(delay=0.0), interceptors=[DedupInterceptor(SQLiteStore(path))]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            stub.Transfer(transfer(), metadata=[(KEY, "k")], timeout=10)
            with sqlite3.connect(path) as connection:
                connection.execute("UPDATE resilient_grpc_dedup SET outcome = ?", (b"\x07newer",))
            with pytest.raises(grpc.RpcError) as error:
                stub.Transfer(transfer(), metadata=[(KEY, "k")], timeout=10)
    finally:
        server.stop(None)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error.value.details() == "idempotency store unavailable"
    assert str(path) not in str(error.value.debug_error_string())
    undecodable = otel.total(
        "resilient_grpc.server.dedup",
        rpc__method="Transfer",
        resilient_grpc__dedup__outcome="store_undecodable",
    )
    assert (undecodable, _counts(otel)["store_error"]) == (1, 0)
    assert any("cannot decode" in record.getMessage() for record in caplog.records)
