"""Shared fixtures: real ledger servers on loopback, a real Redis and a real Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import AioLedger, SyncLedger, serve, serve_aio
from resilient_grpc.testing.cluster import RedisCluster, make_redis_cluster
from resilient_grpc.testing.servers import PostgresServer, RedisServer
from tests.hedging_fixtures import AioHedgeLedger, HedgeLedger
from tests.private_servers import ExternalServer, ensure_running, session_server, unavailable
from tests.telemetry_fixtures import Otel, fresh_otel


@pytest.fixture
def ledger() -> Iterator[tuple[SyncLedger, int]]:
    """A sync ledger server with no interceptors: (servicer, port)."""
    server, port, servicer = serve()
    yield servicer, port
    server.stop(None)


@pytest.fixture
async def aio_ledger() -> AsyncIterator[tuple[AioLedger, int]]:
    """A grpc.aio ledger server with no interceptors: (servicer, port)."""
    server, port, servicer = await serve_aio()
    yield servicer, port
    await server.stop(None)


@pytest.fixture
def hedge_ledger() -> Iterator[tuple[HedgeLedger, int]]:
    """A sync ledger whose first attempt of every call is the slow replica: (servicer, port)."""
    servicer = HedgeLedger()
    server, port, _ = serve(servicer)
    yield servicer, port
    server.stop(None)


@pytest.fixture
async def aio_hedge_ledger() -> AsyncIterator[tuple[AioHedgeLedger, int]]:
    """The grpc.aio :func:`hedge_ledger`."""
    servicer = AioHedgeLedger()
    server, port, _ = await serve_aio(servicer)
    yield servicer, port
    await server.stop(None)


@pytest.fixture
def plain_stub(ledger: tuple[SyncLedger, int]) -> Iterator[ledger_pb2_grpc.LedgerStub]:
    """A stub on a bare channel to the sync ledger (no resilience)."""
    with grpc.insecure_channel(f"127.0.0.1:{ledger[1]}") as channel:
        yield ledger_pb2_grpc.LedgerStub(channel)


@pytest.fixture
def otel() -> Iterator[Otel]:
    """An in-memory OpenTelemetry SDK the package reports to, fresh for the test."""
    with fresh_otel() as providers:
        yield providers


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | ExternalServer]:
    """A real Redis for the whole session (started by us unless REDIS_URL is set)."""
    yield from session_server(
        "REDIS_URL", RedisServer, "Redis", "redis-server is not on PATH and REDIS_URL is not set"
    )


@pytest.fixture
def redis_url(redis_server: RedisServer | ExternalServer) -> Iterator[str]:
    """The URL of a running Redis, flushed before each test; restarted if a test stopped it."""
    import redis

    url = ensure_running(redis_server)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url
    ensure_running(redis_server)


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisCluster]:
    """A real 6-node Redis Cluster (3 masters, 3 replicas) for the whole session."""
    cluster = make_redis_cluster()
    if cluster is None:
        unavailable("Redis", "redis-server and redis-cli must be on PATH for Redis Cluster tests")
    yield cluster
    cluster.close()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> Iterator[RedisCluster]:
    """The session's cluster, healthy and flushed (every master) before each test."""
    cluster = redis_cluster_session
    for node in cluster.nodes:  # a test may have killed nodes: bring them back
        if node.process is None:
            cluster.restart(node.port)
    cluster.wait_until_ok()
    import redis

    for port in cluster.masters():
        client = redis.Redis(host="127.0.0.1", port=port)
        client.flushall()
        client.close()
    yield cluster


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | ExternalServer]:
    """A real PostgreSQL for the whole session (started by us unless POSTGRES_URL is set)."""
    yield from session_server(
        "POSTGRES_URL",
        PostgresServer,
        "PostgreSQL",
        "PostgreSQL binaries (initdb, postgres) are missing and POSTGRES_URL is not set",
    )


@pytest.fixture
def postgres_url(postgres_server: PostgresServer | ExternalServer) -> Iterator[str]:
    """The URL of a running PostgreSQL; restarted if a test crashed it."""
    yield ensure_running(postgres_server)
    ensure_running(postgres_server)
