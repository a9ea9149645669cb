"""Adversarial review: hedged and retried grpc.aio calls cancelled at odd moments leave nothing
behind: no task on the loop, no thread, and the losers are cancelled on the server.

Calls are cancelled with ``call.cancel()`` at several points (before the first hedge, just after
it, after a random short time) and by ``asyncio.wait_for`` timeouts; some are left to finish.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, serve_aio
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget
from resilient_grpc.aio.client import resilient_channel
from resilient_grpc.core.hedging import HedgingPolicy
from tests.hedging_fixtures import AioHedgeLedger

BALANCE = ledger_pb2.BalanceRequest(account="alice")
HEDGE = HedgingPolicy(max_attempts=3, delay=0.05)
CALLS = 24


@pytest.fixture
async def hedge_ledger() -> AsyncIterator[tuple[AioHedgeLedger, int]]:
    servicer = AioHedgeLedger(hold=5.0)
    server, port, _ = await serve_aio(servicer)
    yield servicer, port
    await server.stop(None)


async def test_cancelled_hedged_calls_leave_no_task_thread_or_charge(
    hedge_ledger: tuple[AioHedgeLedger, int],
) -> None:
    servicer, port = hedge_ledger
    rng = random.Random(7)
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=60.0)
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, failure_rate=0.0)
    threads_before = set(threading.enumerate())
    tasks_before = asyncio.all_tasks()
    async with resilient_channel(
        f"127.0.0.1:{port}",
        hedging=HEDGE,
        budget=budget,
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    ) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)

        async def one(n: int) -> str:
            call = stub.GetBalance(BALANCE, timeout=10)
            how = n % 4
            if how == 3:  # left alone: the hedge answers
                return (await call).account
            if how == 2:  # the awaiting task is cancelled by a timeout
                try:
                    await asyncio.wait_for(asyncio.ensure_future(_await(call)), rng.random() * 0.1)
                except asyncio.TimeoutError:
                    return "timeout"
                return "ok"
            task = asyncio.ensure_future(_await(call))
            await asyncio.sleep(0.0 if how == 0 else rng.random() * 0.1)
            call.cancel()
            try:
                await task
            except asyncio.CancelledError:
                assert call.cancelled()
                assert await call.code() == grpc.StatusCode.CANCELLED
                return "cancelled"
            return "ok"

        results = await asyncio.gather(*(one(n) for n in range(CALLS)))
        assert results.count("alice") == CALLS // 4
        sent = len(servicer.state.calls_to(GET_BALANCE))
        await asyncio.sleep(0.3)  # a hedge sent after its call was over would arrive by now
        assert len(servicer.state.calls_to(GET_BALANCE)) == sent
        # Every first copy that was sent was cancelled on the server (or won: none here).
        firsts = sum(1 for c in servicer.state.calls_to(GET_BALANCE) if not _hedge(c.metadata))
        assert await servicer.cancellations(firsts) == firsts
        assert _ours(asyncio.all_tasks() - tasks_before) == []
        assert breaker.for_target(f"127.0.0.1:{port}").state == "closed"
        assert int(breaker.for_target(f"127.0.0.1:{port}").circuit.fail_counter) == 0
    await asyncio.sleep(0.1)
    assert {t for t in threading.enumerate() if t.name.startswith("resilient-grpc")} <= {
        t for t in threads_before if t.name.startswith("resilient-grpc")
    } | {t for t in threading.enumerate() if t.name == "resilient-grpc-timers"}


def _ours(tasks: set[asyncio.Task[object]]) -> list[asyncio.Task[object]]:
    """The tasks running library code (the server's own tasks share this loop)."""
    return [
        task
        for task in tasks
        if "resilient_grpc" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    ]


async def _await(call: object) -> object:
    return await call  # type: ignore[misc]


def _hedge(metadata: object) -> bool:
    return any(key == "grpc-previous-rpc-attempts" for key, _ in metadata or ())  # type: ignore[attr-defined]
