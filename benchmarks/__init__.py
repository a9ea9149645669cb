"""Benchmarks for resilient-grpc: `python -m benchmarks` runs the retry-policy comparison."""

import os

# gRPC's C core logs every GOAWAY the fault proxy provokes at INFO; keep benchmark output readable
# (set GRPC_VERBOSITY yourself to see them). Must happen before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
