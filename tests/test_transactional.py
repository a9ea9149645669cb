"""Transactional mode: a handler's writes through ``transaction(context)`` and the call's dedup
record commit or roll back together (PostgresStore and SQLiteStore, sync and aio servers)."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_sql import Refusal
from resilient_grpc import MemoryStore, SQLiteStore, TransactionUnavailableError, transaction
from resilient_grpc.stores.base import ThreadedAsyncStore
from resilient_grpc.testing.servers import PostgresServer
from resilient_grpc.transactional import async_transaction, call_scope
from tests.sql_ledger_servers import ACCOUNTS, BALANCE, LedgerSpec, RunningLedger, start_ledger

KEY = "idempotency-key"
Start = Callable[..., RunningLedger]


class Database:
    """Reads the ledger's tables directly (PostgreSQL or SQLite)."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind = kind
        self.where = where

    def query(self, text: str, *params: Any) -> list[Any]:
        if self.kind == "postgres":
            import psycopg

            with psycopg.connect(self.where, autocommit=True) as connection:
                cursor = connection.execute(text, params)
                return cursor.fetchall() if cursor.description else []
        with sqlite3.connect(self.where) as connection:
            return connection.execute(text.replace("%s", "?"), params).fetchall()

    def applied(self, memo: str) -> int:
        return int(self.query("SELECT count(*) FROM transfers WHERE memo = %s", memo)[0][0])

    def total(self) -> int:
        return int(self.query("SELECT sum(balance) FROM accounts")[0][0])


Setup = tuple[Start, Database, str]


@pytest.fixture(params=["postgres-sync", "postgres-aio", "sqlite-sync", "sqlite-aio"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    yield from _setup(request, tmp_path)


@pytest.fixture(params=["postgres-sync", "postgres-aio"])
def pg_setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    yield from _setup(request, tmp_path)


def _setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    kind, flavour = request.param.split("-")
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        import psycopg

        schema = f"s_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
        where = f"{url}?options=-csearch_path%3D{schema}"
    else:
        where = str(tmp_path / "ledger.sqlite3")
    running: list[RunningLedger] = []

    def start(**options: Any) -> RunningLedger:
        ledger = start_ledger(LedgerSpec(kind, where, flavour=flavour, **options))
        running.append(ledger)
        return ledger

    yield start, Database(kind, where), flavour
    for ledger in running:
        ledger.stop()


def _stub(port: int) -> tuple[grpc.Channel, ledger_pb2_grpc.LedgerStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, ledger_pb2_grpc.LedgerStub(channel)


def _transfer(memo: str, amount: int = 5, source: str = "a", target: str = "b") -> Any:
    return ledger_pb2.TransferRequest(
        from_account=source, to_account=target, amount=amount, memo=memo
    )


def test_the_transfer_and_its_record_commit_together_and_replay(
    setup: Setup,
) -> None:
    start, database, _ = setup
    ledger = start()
    channel, stub = _stub(ledger.port)
    with channel:
        first = stub.Transfer(_transfer("m1"), metadata=[(KEY, "k1")], timeout=10)
        again, call = stub.Transfer.with_call(_transfer("m1"), metadata=[(KEY, "k1")], timeout=10)
    assert again == first
    assert ("idempotency-replayed", "true") in call.trailing_metadata()
    assert database.applied("m1") == 1
    assert database.total() == len(ACCOUNTS) * BALANCE


def test_a_cached_business_error_commits_and_a_retryable_one_rolls_back(
    setup: Setup,
) -> None:
    start, database, _ = setup
    ledger = start()
    channel, stub = _stub(ledger.port)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Transfer(_transfer("big", amount=BALANCE + 1), metadata=[(KEY, "k2")], timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as replayed:
            stub.Transfer(_transfer("big", amount=BALANCE + 1), metadata=[(KEY, "k2")], timeout=10)
        assert replayed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("idempotency-replayed", "true") in (replayed.value.trailing_metadata() or ())
    assert database.applied("big") == 0


def test_an_exception_after_the_writes_rolls_them_back_and_frees_the_key(setup: Setup) -> None:
    start, database, _ = setup
    failures = [RuntimeError("handler bug after its writes")]

    def fail_once(_: str) -> None:
        if failures:
            raise failures.pop()

    ledger = start(after_write=fail_once)
    channel, stub = _stub(ledger.port)
    with channel:
        with pytest.raises(grpc.RpcError) as failed:
            stub.Transfer(_transfer("m5"), metadata=[(KEY, "k5")], timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert database.applied("m5") == 0  # rolled back, key included: the retry executes
        stub.Transfer(_transfer("m5"), metadata=[(KEY, "k5")], timeout=10)
    assert database.applied("m5") == 1
    assert database.total() == len(ACCOUNTS) * BALANCE


def test_a_business_error_after_the_writes_commits_them_with_the_outcome(setup: Setup) -> None:
    start, database, _ = setup
    refuse = Refusal(grpc.StatusCode.FAILED_PRECONDITION, "refused after writing")
    ledger = start(after_write=lambda _: refuse)
    channel, stub = _stub(ledger.port)
    with channel:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Transfer(_transfer("m6"), metadata=[(KEY, "k6")], timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("idempotency-replayed", "true") in (refused.value.trailing_metadata() or ())
    assert database.applied("m6") == 1


def test_a_concurrent_duplicate_waits_for_the_commit_and_replays(setup: Setup) -> None:
    start, database, flavour = setup
    writing = threading.Event()

    def slow(_: str) -> None:  # the first execution holds its transaction open for a while
        writing.set()
        threading.Event().wait(0.3)

    async def slow_aio(key: str) -> None:
        import asyncio

        writing.set()
        await asyncio.sleep(0.3)

    ledger = start(after_write=slow if flavour == "sync" else slow_aio)
    channel, stub = _stub(ledger.port)
    with channel:
        first = stub.Transfer.future(_transfer("m7"), metadata=[(KEY, "k7")], timeout=10)
        assert writing.wait(10)
        second, call = stub.Transfer.with_call(_transfer("m7"), metadata=[(KEY, "k7")], timeout=10)
        assert first.result() == second
    assert ("idempotency-replayed", "true") in call.trailing_metadata()
    assert database.applied("m7") == 1


def test_a_claim_taken_over_before_the_commit_rolls_the_writes_back(pg_setup: Setup) -> None:
    """The fenced completion refuses a stale executor: its transfer is not applied, and the
    client gets UNAVAILABLE (retryable), never the stale execution's success."""
    start, database, _ = pg_setup
    table = "resilient_grpc_dedup"

    def take_over(_: str) -> None:  # another executor's claim replaces ours
        database.query(f"UPDATE {table} SET token = token + 1")

    # (SQLite cannot be taken over: its transaction holds the write lock from the start)
    ledger = start(after_write=take_over)
    channel, stub = _stub(ledger.port)
    with channel, pytest.raises(grpc.RpcError) as failed:
        stub.Transfer(_transfer("stale"), metadata=[(KEY, "k3")], timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not commit" in str(failed.value.details())
    assert database.applied("stale") == 0


def test_a_failed_commit_frees_the_key_so_the_retry_executes_at_once(pg_setup: Setup) -> None:
    """The handler's connection dies between its writes and the commit: nothing is applied, the
    client gets UNAVAILABLE (not the uncommitted answer), and the key is released, so the retry
    with the same key runs at once (a 30 s lease: a kept claim would make it wait, then ABORTED)."""
    start, database, _ = pg_setup
    killed = threading.Event()

    def kill_the_transaction(_: str) -> None:
        if not killed.is_set():
            killed.set()
            database.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE state = 'idle in transaction' AND pid <> pg_backend_pid()"
            )

    ledger = start(after_write=kill_the_transaction, lease=30.0)
    channel, stub = _stub(ledger.port)
    with channel:
        with pytest.raises(grpc.RpcError) as failed:
            stub.Transfer(_transfer("lost-commit"), metadata=[(KEY, "k5")], timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not commit" in str(failed.value.details())
        assert database.applied("lost-commit") == 0
        reply = stub.Transfer(_transfer("lost-commit"), metadata=[(KEY, "k5")], timeout=10)
    assert reply.transfer_id
    assert database.applied("lost-commit") == 1
    assert database.total() == len(ACCOUNTS) * BALANCE


def test_database_down_between_write_and_commit_fails_closed(
    pg_setup: Setup, request: pytest.FixtureRequest
) -> None:
    start, database, _ = pg_setup
    server = request.getfixturevalue("postgres_server")
    if not isinstance(server, PostgresServer):
        pytest.skip("POSTGRES_URL: cannot stop that server")
    crashed = threading.Event()

    def crash(_: str) -> None:
        if not crashed.is_set():
            crashed.set()
            server.stop()

    ledger = start(after_write=crash, lease=1.0)
    channel, stub = _stub(ledger.port)
    with channel:
        with pytest.raises(grpc.RpcError) as failed:
            stub.Transfer(_transfer("outage"), metadata=[(KEY, "k4")], timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "127.0.0.1" not in str(failed.value.details())
        with pytest.raises(grpc.RpcError) as down:  # fail closed: nothing runs while down
            stub.Transfer(_transfer("outage"), metadata=[(KEY, "k4")], timeout=10)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        server.start()
        # the claim made before the crash lapses after its lease; until then: ABORTED, retry
        for _ in range(100):
            try:
                reply = stub.Transfer(_transfer("outage"), metadata=[(KEY, "k4")], timeout=10)
                break
            except grpc.RpcError as error:
                assert error.code() in {grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE}
                threading.Event().wait(0.1)
    assert reply.transfer_id
    assert database.applied("outage") == 1
    assert database.total() == len(ACCOUNTS) * BALANCE


def test_transaction_refuses_stores_and_calls_that_cannot_have_one() -> None:
    with pytest.raises(TransactionUnavailableError, match="idempotency key"), transaction(None):
        pass
    scope = call_scope(MemoryStore(), "k", 1, _Nothing())
    with (
        scope,
        pytest.raises(TransactionUnavailableError, match="MemoryStore cannot"),
        transaction(None),
    ):
        pass
    with (
        call_scope(MemoryStore(), "k", None, _Nothing()),
        pytest.raises(TransactionUnavailableError, match="fail_open"),
        transaction(None),
    ):
        pass


async def test_aio_transaction_refuses_a_store_that_cannot(tmp_path: Path) -> None:
    store = MemoryStore().as_async()
    with (
        call_scope(store, "k", 1, _Nothing()),
        pytest.raises(TransactionUnavailableError, match="MemoryStore cannot"),
    ):
        async with async_transaction(None):
            pass
    wrapped = ThreadedAsyncStore(SQLiteStore(tmp_path / "x.sqlite3"))  # not its as_async()
    with (
        call_scope(wrapped, "k", 1, _Nothing()),
        pytest.raises(TransactionUnavailableError, match=r"SQLiteStore itself \(or its as_async"),
    ):
        async with async_transaction(None):
            pass


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None
