"""Benchmarks for resilient-grpc: `python -m benchmarks` runs the retry-policy comparison."""
