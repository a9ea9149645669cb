"""Test helpers that inject real faults: a TCP proxy that loses gRPC responses after the server
committed them, and a Redis round-trip counter for benchmarks."""

from __future__ import annotations

from resilient_grpc.testing.proxy import FaultProxy, ProxyCounters
from resilient_grpc.testing.redis_round_trips import RoundTripCounter

__all__ = ["FaultProxy", "ProxyCounters", "RoundTripCounter"]
