"""Test helpers that inject real faults: a TCP proxy that loses gRPC responses after the server committed."""

from __future__ import annotations

from resilient_grpc.testing.proxy import FaultProxy, ProxyCounters

__all__ = ["FaultProxy", "ProxyCounters"]
