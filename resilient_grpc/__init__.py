"""resilient-grpc: make gRPC calls safe to retry.

Client side: capped exponential backoff with jitter (:class:`RetryPolicy`) or gRFC A6 hedging
(:class:`HedgingPolicy`), a shared retry budget
(:class:`RetryBudget`), a circuit breaker (:class:`CircuitBreaker`), adaptive client-side
throttling (:class:`AdaptiveThrottle`) and idempotency keys
(:class:`IdempotencyKeys`, :func:`idempotency_key`), attached with :func:`client_interceptors` or
:func:`resilient_channel`. Server side: :class:`DedupInterceptor` replays the stored outcome of a
key instead of executing the handler again, over :class:`MemoryStore`, :class:`SQLiteStore` or
:class:`RedisStore`, :class:`PostgresStore`; :func:`transaction` commits a handler's database
writes together with its dedup record. The ``grpc.aio`` flavours live in :mod:`resilient_grpc.aio`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.keys import IdempotencyKeys, InvalidKeyError, idempotency_key
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.throttle import AdaptiveThrottle

if TYPE_CHECKING:  # what type checkers see; at run time these load on first use
    from resilient_grpc import aio as aio
    from resilient_grpc.breaker import CircuitBreaker
    from resilient_grpc.client import client_interceptors, resilient_channel
    from resilient_grpc.core.admission import AdmissionController
    from resilient_grpc.errors import BreakerOpenError, ThrottledError, attempts_of, reason_of
    from resilient_grpc.overload import OverloadExecutor, OverloadInterceptor, resilient_server
    from resilient_grpc.server import SHARED_SCOPE, DedupInterceptor, peer_identity
    from resilient_grpc.stores import (
        MemoryStore,
        PostgresStore,
        RedisStore,
        SQLiteStore,
        StoreUnavailableError,
    )
    from resilient_grpc.transactional import TransactionUnavailableError, transaction

__version__ = "0.1.0"

# Loaded on first use: keeps `import resilient_grpc` light and `redis` optional.
_LAZY = {
    "CircuitBreaker": "resilient_grpc.breaker",
    "client_interceptors": "resilient_grpc.client",
    "resilient_channel": "resilient_grpc.client",
    "BreakerOpenError": "resilient_grpc.errors",
    "ThrottledError": "resilient_grpc.errors",
    "attempts_of": "resilient_grpc.errors",
    "reason_of": "resilient_grpc.errors",
    "DedupInterceptor": "resilient_grpc.server",
    "AdmissionController": "resilient_grpc.core.admission",
    "OverloadExecutor": "resilient_grpc.overload",
    "OverloadInterceptor": "resilient_grpc.overload",
    "resilient_server": "resilient_grpc.overload",
    "SHARED_SCOPE": "resilient_grpc.server",
    "peer_identity": "resilient_grpc.server",
    "MemoryStore": "resilient_grpc.stores",
    "SQLiteStore": "resilient_grpc.stores",
    "RedisStore": "resilient_grpc.stores",
    "StoreUnavailableError": "resilient_grpc.stores",
    "PostgresStore": "resilient_grpc.stores",
    "transaction": "resilient_grpc.transactional",
    "TransactionUnavailableError": "resilient_grpc.transactional",
}

__all__ = [
    "SHARED_SCOPE",
    "AdaptiveThrottle",
    "AdmissionController",
    "BreakerOpenError",
    "CircuitBreaker",
    "DedupInterceptor",
    "HedgingPolicy",
    "IdempotencyKeys",
    "InvalidKeyError",
    "MemoryStore",
    "OverloadExecutor",
    "OverloadInterceptor",
    "PostgresStore",
    "RedisStore",
    "RetryBudget",
    "RetryPolicy",
    "SQLiteStore",
    "StoreUnavailableError",
    "ThrottledError",
    "TransactionUnavailableError",
    "aio",
    "attempts_of",
    "client_interceptors",
    "idempotency_key",
    "peer_identity",
    "reason_of",
    "resilient_channel",
    "resilient_server",
    "transaction",
]

if not TYPE_CHECKING:
    # Only at run time: a module ``__getattr__`` visible to type checkers would make every
    # name, typos included, an ``Any`` in a user's code.

    def __getattr__(name: str) -> Any:
        if name == "aio":  # the subpackage, as ``grpc.aio`` is reachable after ``import grpc``
            value = importlib.import_module("resilient_grpc.aio")
        else:
            module = _LAZY.get(name)
            if module is None:
                raise AttributeError(f"module 'resilient_grpc' has no attribute {name!r}")
            value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
