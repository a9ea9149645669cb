"""Test helpers that inject real faults: a TCP proxy that loses gRPC responses after the server
committed them, private Redis and PostgreSQL servers a test may crash and restart (and a Redis Cluster of
them, :mod:`resilient_grpc.testing.cluster`, which needs the ``redis`` extra), and Redis
round-trip counters for benchmarks."""

from __future__ import annotations

from resilient_grpc.testing.proxy import FaultProxy, ProxyCounters
from resilient_grpc.testing.redis_round_trips import RoundTripCounter
from resilient_grpc.testing.servers import PostgresServer, RedisServer, ServerUnavailableError

__all__ = [
    "FaultProxy",
    "PostgresServer",
    "ProxyCounters",
    "RedisServer",
    "RoundTripCounter",
    "ServerUnavailableError",
]
