"""The sans-IO core: retry decisions, backoff, budgets, idempotency keys and dedup state.

Nothing in this package imports ``grpc``, sleeps or does I/O. Status codes are carried as
their names (``"UNAVAILABLE"``), clocks and random sources are injectable, so the sync and
``grpc.aio`` shells share one implementation and the tests can drive it deterministically.
"""
