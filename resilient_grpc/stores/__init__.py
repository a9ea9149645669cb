"""Dedup stores: :class:`MemoryStore` (embedded default), :class:`SQLiteStore` (durable, one host),
:class:`RedisStore` (shared by many replicas; needs the ``redis`` extra, imported on first use), :class:`PostgresStore`
(shared, and transactional: needs the ``postgres`` extra, imported on first use)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient_grpc.stores.base import (
    AsyncStore,
    CommitFailedError,
    Store,
    StoreFullError,
    StoreUnavailableError,
    UndecodableRecordError,
)
from resilient_grpc.stores.memory import MemoryStore
from resilient_grpc.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from resilient_grpc.stores.postgres import AsyncPostgresStore, PostgresStore
    from resilient_grpc.stores.redis import RedisStore

__all__ = [
    "AsyncPostgresStore",
    "AsyncStore",
    "CommitFailedError",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "StoreFullError",
    "StoreUnavailableError",
    "UndecodableRecordError",
]


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from resilient_grpc.stores.redis import RedisStore

        return RedisStore
    if name in {"PostgresStore", "AsyncPostgresStore"}:
        from resilient_grpc.stores import postgres

        return getattr(postgres, name)
    raise AttributeError(f"module 'resilient_grpc.stores' has no attribute {name!r}")
