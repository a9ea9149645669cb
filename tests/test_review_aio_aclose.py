"""Adversarial review: ``aclose`` of the grpc.aio DedupInterceptor while an execution that
outlived its call is still renewing its lease.

The renewal thread starts a renewal task on the loop every third of the lease. Tasks started
while ``aclose`` waits out its grace were not in the set it waited for: they must be awaited
(or cancelled) too, so that nothing the interceptor owns runs after ``aclose`` returns.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest

from resilient_grpc.aio.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore
from resilient_grpc.stores.base import ThreadedAsyncStore
from tests.dedup_fixtures import KEY, serve_raw_aio

LEASE = 0.3  # a renewal every 0.1 s


class SlowRenewals(ThreadedAsyncStore):
    """A store whose renewals take most of a renewal period (a slow round trip)."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.renewals = 0

    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        self.renewals += 1
        await asyncio.sleep(0.09)
        return await super().renew(key, token, lease=lease)


@pytest.mark.parametrize("grace", [0.45, None])
async def test_aclose_owns_the_renewals_started_during_its_grace(grace: float | None) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: bytes, context: Any) -> bytes:
        started.set()
        if grace is None:  # aclose(None) waits for it: it ends after a few renewals
            await asyncio.sleep(0.5)
        else:
            await release.wait()  # ends only when cancelled by aclose
        return b"done"

    store = SlowRenewals()
    interceptor = DedupInterceptor(store, lease=LEASE)
    handlers = {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
    async with serve_raw_aio(handlers, [interceptor]) as raw:
        method = raw.channel.unary_unary("/test.Raw/Slow")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await method(b"req", metadata=[(KEY, "slow")], timeout=0.2)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert started.is_set()  # the execution outlived its call, renewing its lease
        await raw.server.stop(None)

        await interceptor.aclose(grace)
        assert store.renewals >= 2
        assert not interceptor._tasks  # nothing it owns is left running
        before = set(asyncio.all_tasks())
        await asyncio.sleep(LEASE)  # a renewal left scheduled would start a task by now
        assert not interceptor._tasks
        assert set(asyncio.all_tasks()) <= before
