"""The ``grpc.aio`` flavour: the same policies, budget, breaker, keys and dedup, never blocking the loop."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resilient_grpc.aio.client import client_interceptors, resilient_channel
    from resilient_grpc.aio.overload import OverloadInterceptor
    from resilient_grpc.aio.server import DedupInterceptor
    from resilient_grpc.transactional import async_transaction as transaction

_LAZY = {
    "client_interceptors": "resilient_grpc.aio.client",
    "resilient_channel": "resilient_grpc.aio.client",
    "DedupInterceptor": "resilient_grpc.aio.server",
    "OverloadInterceptor": "resilient_grpc.aio.overload",
    "transaction": "resilient_grpc.transactional",
}
_RENAMED = {"transaction": "async_transaction"}

__all__ = [
    "DedupInterceptor",
    "OverloadInterceptor",
    "client_interceptors",
    "resilient_channel",
    "transaction",
]


if not TYPE_CHECKING:  # at run time only: type checkers see the imports above

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'resilient_grpc.aio' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
