"""PostgresStore specifics: schema on first use, expiry purge in bounded batches that skip locked
rows, renewal, an application's own pool, clear errors while the database is down, and the round
trips of each path (a replay is one; transactional mode adds one to the handler's transaction)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_sql import PostgresLedgerDatabase, SQLLedger, create_ledger
from resilient_grpc import DedupInterceptor
from resilient_grpc.core.dedup import Outcome, RecordState, fingerprint
from resilient_grpc.stores import AsyncPostgresStore, PostgresStore, StoreUnavailableError
from resilient_grpc.testing.postgres_round_trips import PostgresRoundTrips
from resilient_grpc.testing.servers import PostgresServer
from tests.private_servers import ExternalServer

FP = fingerprint(b"request")
OK = Outcome("OK", responses=(b"response",))


@pytest.fixture
def table() -> str:
    return f"dedup_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def store(postgres_url: str, table: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_url, table=table)
    yield store
    store.close()


def _query(url: str, text: str, *params: Any) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(text, params)
        return cursor.fetchall() if cursor.description else []


def test_schema_is_created_on_first_use_with_an_expiry_index(
    store: PostgresStore, postgres_url: str, table: str
) -> None:
    assert _query(postgres_url, "SELECT to_regclass(%s)", table) == [(None,)]
    assert store.claim("k", FP, lease=5).token is not None
    indexes = _query(postgres_url, "SELECT indexdef FROM pg_indexes WHERE tablename = %s", table)
    assert any("(expires_at)" in definition for (definition,) in indexes), indexes


def test_processes_creating_the_schema_at_once_do_not_collide(
    postgres_url: str, table: str
) -> None:
    stores = [PostgresStore(postgres_url, table=table, min_size=0) for _ in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def create(store: PostgresStore) -> None:
        barrier.wait(timeout=10)
        try:
            store.create_schema()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for store in stores:
        store.close()
    assert errors == []


def test_purge_deletes_expired_records_in_bounded_batches_and_skips_locked_rows(
    store: PostgresStore, postgres_url: str, table: str
) -> None:
    store.create_schema()
    _query(
        postgres_url,
        f"INSERT INTO {table} SELECT 'old' || n, 1, '\\x00', n, 0, 1, NULL "
        "FROM generate_series(1, 1200) n",
    )
    assert store.claim("live", FP, lease=60).token is not None
    with psycopg.connect(postgres_url) as holder:  # a transaction holding one expired row
        holder.execute(f"SELECT 1 FROM {table} WHERE key = 'old7' FOR UPDATE")
        purged = []
        while True:
            done = store.purge_expired()  # would block on the locked row without SKIP LOCKED
            if done == 0:
                break
            purged.append(done)
        holder.rollback()
    assert purged == [500, 500, 199]
    remaining = _query(postgres_url, f"SELECT key FROM {table} ORDER BY key")
    assert remaining == [("live",), ("old7",)]


def test_renew_extends_only_a_live_claim_held_by_the_token(store: PostgresStore) -> None:
    claim = store.claim("k", FP, lease=0.5)
    assert claim.token is not None
    assert store.renew("k", claim.token, lease=30)
    record = store.get("k")
    assert record is not None and record.lease_left > 20
    assert not store.renew("k", claim.token + 1, lease=30)
    assert store.complete("k", claim.token, OK)
    assert not store.renew("k", claim.token, lease=30)
    record = store.get("k")
    assert record is not None and record.state is RecordState.COMPLETED


def test_an_applications_pool_is_used_and_left_open(postgres_url: str, table: str) -> None:
    with ConnectionPool(postgres_url, min_size=1, max_size=2, open=True) as pool:  # autocommit off
        store = PostgresStore.from_pool(pool, table=table)
        claim = store.claim("k", FP, lease=5)
        assert claim.token is not None and store.complete("k", claim.token, OK)
        store.close()
        with pool.connection() as connection:
            assert connection.autocommit is False  # handed back as it was lent
        record = PostgresStore.from_pool(pool, table=table).get("k")
        assert record is not None and record.outcome == OK


async def test_an_applications_async_pool_gives_an_async_store(
    postgres_url: str, table: str
) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(postgres_url, open=False)
    await pool.open()
    store = PostgresStore.from_pool(pool, table=table)
    assert isinstance(store, AsyncPostgresStore)
    claim = await store.claim("k", FP, lease=5)
    assert claim.token is not None and await store.complete("k", claim.token, OK)
    await store.aclose()
    assert not pool.closed
    await pool.close()


def test_bad_arguments_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="table must be an SQL identifier"):
        PostgresStore("postgresql://x", table="dedup; DROP TABLE users")
    with pytest.raises(ValueError, match="ttl"):
        PostgresStore("postgresql://x", ttl=0)
    with pytest.raises(ValueError, match="max_size"):
        PostgresStore("postgresql://x", min_size=4, max_size=2)
    with pytest.raises(ValueError, match="conninfo"):
        PostgresStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool must be"):
        PostgresStore.from_pool("postgresql://x")  # type: ignore[call-overload]


def test_database_down_raises_store_unavailable_then_recovers(
    postgres_server: PostgresServer | ExternalServer, postgres_url: str, table: str
) -> None:
    if not isinstance(postgres_server, PostgresServer):
        pytest.skip("POSTGRES_URL: cannot stop that server")
    store = PostgresStore(postgres_url, table=table, timeout=1.0)
    asynchronous = store.as_async()
    assert store.claim("before", FP, lease=5).token is not None
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnavailableError, match="PostgreSQL store"):
            store.claim("k", FP, lease=5)
        with pytest.raises(StoreUnavailableError, match="PostgreSQL store"):
            asyncio.run(asynchronous.get("k"))
    finally:
        postgres_server.start()
    assert store.claim("after", FP, lease=5).token is not None  # dead connections were dropped
    store.close()


def test_round_trips_replay_one_and_transactional_one_more_than_the_handler(
    postgres_url: str, table: str
) -> None:
    """A replay is one round trip; transactional mode costs the handler's own transaction plus
    one (the claim): the outcome travels with the handler's COMMIT."""
    schema = f"rt_{uuid.uuid4().hex[:12]}"
    _query(postgres_url, f"CREATE SCHEMA {schema}")
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    trips = PostgresRoundTrips()
    pools = [
        ConnectionPool(
            url, min_size=1, max_size=4, configure=trips.attach, kwargs=kwargs, open=True
        )
        # no automatic server-side prepare: it adds one round trip, once per statement and
        # connection, whatever the mode
        for kwargs in (
            {"autocommit": True, "prepare_threshold": None},
            {"autocommit": False, "prepare_threshold": None},
        )
    ]
    store_pool, ledger_pool = pools
    database = PostgresLedgerDatabase(ledger_pool)
    create_ledger(database, ("a", "b"), 1000)
    servers: list[grpc.Server] = []
    stubs = {}
    store = PostgresStore.from_pool(store_pool, table=table)
    store.create_schema()
    for name, transactional, interceptors in [
        ("plain", False, []),
        ("transactional", True, [DedupInterceptor(store)]),
    ]:
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=interceptors)
        ledger_pb2_grpc.add_LedgerServicer_to_server(
            SQLLedger(database, transactional=transactional), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        stubs[name] = ledger_pb2_grpc.LedgerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = ledger_pb2.TransferRequest(from_account="a", to_account="b", amount=1)
    counts: dict[str, list[int]] = {"plain": [], "transactional": [], "replay": []}
    try:
        for index in range(8):
            key = [("idempotency-key", f"key-{index}")]
            for name, stub in [
                ("plain", stubs["plain"]),
                ("transactional", stubs["transactional"]),
            ]:
                trips.reset()
                stub.Transfer(request, metadata=key, timeout=10)
                counts[name].append(trips.count())
            trips.reset()
            stubs["transactional"].Transfer(request, metadata=key, timeout=10)
            counts["replay"].append(trips.count())
        counts = {name: values[3:] for name, values in counts.items()}  # after warming up
    finally:
        for server in servers:
            server.stop(None)
        for pool in pools:
            pool.close()
        trips.close()
    assert counts["replay"] == [1] * 5, counts
    assert [t - p for t, p in zip(counts["transactional"], counts["plain"], strict=True)] == [
        1
    ] * 5, counts
