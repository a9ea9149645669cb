"""Hedging (gRFC A6) through the ``grpc.aio`` stack against real servers: the first attempt of
every call is the slow replica (see :mod:`tests.hedging_fixtures`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, Fault, serve_aio
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.aio.client import client_interceptors, resilient_channel
from resilient_grpc.aio.server import DedupInterceptor
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, attempts_of, reason_of
from resilient_grpc.stores import MemoryStore
from tests.hedging_fixtures import PREVIOUS, AioHedgeLedger, attempt_number
from tests.helpers import (
    BALANCE_REQUEST,
    RETRIES_OFF,
    TRANSFER_REQUEST,
    MakeStub,
    aio_stub_maker,
)

HEDGE = HedgingPolicy(max_attempts=3, delay=0.1)


@pytest.fixture(params=["channel", "interceptors"])
async def make_stub(
    request: pytest.FixtureRequest, aio_hedge_ledger: tuple[AioHedgeLedger, int]
) -> AsyncIterator[MakeStub]:
    async with aio_stub_maker(
        f"127.0.0.1:{aio_hedge_ledger[1]}", request.param, RETRIES_OFF
    ) as make:
        yield make


async def test_the_fast_copy_wins_and_the_slow_one_is_cancelled_on_the_server(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, _ = aio_hedge_ledger
    stub = make_stub(hedging=HEDGE, idempotency=IdempotencyKeys())

    started = time.monotonic()
    reply = await stub.GetBalance(BALANCE_REQUEST, timeout=15)

    assert reply.account == "alice"
    assert time.monotonic() - started < servicer.hold
    calls = servicer.state.calls_to(GET_BALANCE)
    assert 2 <= len(calls) <= 3
    assert len({c.key for c in calls}) == 1 and calls[0].key is not None
    assert sorted(attempt_number(c.metadata) for c in calls) == list(range(1, len(calls) + 1))
    assert not any(k == PREVIOUS for k, _ in calls[0].metadata)
    assert await servicer.cancellations(1) == 1


async def test_keyed_hedged_writes_execute_once_with_dedup_and_twice_without() -> None:
    async def run(interceptors: list[object]) -> int:
        servicer = AioHedgeLedger(slow=0.6)
        server, port, _ = await serve_aio(servicer, interceptors=interceptors)  # type: ignore[arg-type]
        try:
            async with resilient_channel(
                f"127.0.0.1:{port}",
                hedging=HedgingPolicy(max_attempts=2, delay=0.1),
                idempotency=IdempotencyKeys(),
            ) as channel:
                await ledger_pb2_grpc.LedgerStub(channel).Transfer(TRANSFER_REQUEST, timeout=15)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while len(servicer.state.calls_to(TRANSFER)) < 2 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(servicer.slow)
            return sum(servicer.state.executions.values())
        finally:
            await server.stop(None)

    assert await run([]) == 2
    assert await run([DedupInterceptor(MemoryStore())]) == 1


async def test_no_hedges_when_the_budget_is_exhausted(make_stub, aio_hedge_ledger) -> None:
    servicer, _ = aio_hedge_ledger
    servicer.hold = 0.5
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    stub = make_stub(hedging=HEDGE, budget=budget, idempotency=IdempotencyKeys())

    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=15)).account == "alice"

    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert budget.refused >= 1


async def test_no_hedges_while_the_breaker_probes_and_none_at_all_when_open(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, port = aio_hedge_ledger
    servicer.hold = 0.5
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.2, failure_rate=0)
    stub = make_stub(hedging=HEDGE, breaker=breaker, idempotency=IdempotencyKeys())
    servicer.slow_first = False
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.INTERNAL))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1

    with pytest.raises(BreakerOpenError):
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1

    await asyncio.sleep(0.3)
    servicer.slow_first = True
    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=15)).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    assert breaker.for_target(f"127.0.0.1:{port}").state == "closed"


async def test_non_fatal_failures_send_the_next_copy_at_once(make_stub, aio_hedge_ledger) -> None:
    servicer, _ = aio_hedge_ledger
    servicer.slow_first = False
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0), idempotency=IdempotencyKeys()
    )
    servicer.state.faults.fail_times(GET_BALANCE, 3)

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)

    assert time.monotonic() - started < 5.0
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert attempts_of(caught.value) == 3
    assert reason_of(caught.value) is Reason.MAX_ATTEMPTS


@pytest.mark.parametrize("how", ["task", "call"])
async def test_cancel_cancels_every_attempt_in_flight(make_stub, aio_hedge_ledger, how) -> None:
    servicer, _ = aio_hedge_ledger
    servicer.slow_first = True
    # every attempt is slow: attempt 1 holds, later ones hold too
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=2, delay=0.05), idempotency=IdempotencyKeys()
    )
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=10.0))

    call = stub.GetBalance(BALANCE_REQUEST, timeout=15)
    task = asyncio.ensure_future(call)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(servicer.state.calls_to(GET_BALANCE)) < 2 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    if how == "task":
        task.cancel()
    else:
        assert call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await servicer.cancellations(1) == 1  # the first attempt saw the cancellation
    await asyncio.sleep(0.2)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2  # nothing sent after the cancel


async def test_retry_and_hedging_on_the_same_methods_is_refused() -> None:
    with pytest.raises(ValueError, match="retry= and hedging= both apply to every method"):
        resilient_channel("127.0.0.1:1", retry=RetryPolicy(), hedging=HEDGE)
    with pytest.raises(ValueError, match="retry= and hedging= both apply"):
        client_interceptors(retry=RetryPolicy(), hedging=HEDGE)


async def test_hedging_with_a_redis_breaker_runs_breaker_io_off_the_loop(
    aio_hedge_ledger, redis_url, monkeypatch
) -> None:
    """With a breaker whose state lives in Redis, every event of the hedged call does Redis
    round trips: they run in worker threads, never on the event loop."""
    import threading

    import redis

    from resilient_grpc.breaker import TargetBreaker

    servicer, port = aio_hedge_ledger
    loop_thread = threading.get_ident()
    admit_threads: list[int] = []
    original = TargetBreaker.admit

    def admit(self: TargetBreaker) -> int:
        admit_threads.append(threading.get_ident())
        return original(self)

    monkeypatch.setattr(TargetBreaker, "admit", admit)
    client = redis.Redis.from_url(redis_url)
    try:
        async with resilient_channel(
            f"127.0.0.1:{port}",
            hedging=HEDGE,
            breaker=CircuitBreaker.redis(client, namespace="hedge-test"),
            idempotency=IdempotencyKeys(),
        ) as channel:
            reply = await ledger_pb2_grpc.LedgerStub(channel).GetBalance(
                BALANCE_REQUEST, timeout=15
            )
        assert reply.account == "alice"
        assert len(admit_threads) >= 2  # the first copy and at least one hedge
        assert loop_thread not in admit_threads
        assert await servicer.cancellations(1) == 1
    finally:
        client.close()


# Issue 11: the breaker counts calls, a hedging budget, failure copies held for the breaker ------


async def test_the_breaker_counts_one_failure_per_call_not_one_per_copy(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, port = aio_hedge_ledger
    servicer.slow_first = False
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30, failure_rate=0)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    target = breaker.for_target(f"127.0.0.1:{port}")
    servicer.state.faults.fail_times(GET_BALANCE, 2)
    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=15)).account == "alice"
    assert target.state == "closed"

    servicer.state.faults.fail_times(GET_BALANCE, 3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)
    assert attempts_of(caught.value) == 3
    assert target.state == "closed"
    servicer.state.faults.fail_times(GET_BALANCE, 3)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)
    assert target.state == "open"
    # its first copy's failure was the call's one failure: it opened the breaker at once,
    # which refused the other copies
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3 + 3 + 1
    servicer.state.faults.clear()


async def test_latency_hedges_draw_on_the_hedging_budget_failure_copies_on_the_retry_budget(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, _ = aio_hedge_ledger
    servicer.hold = 0.5
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0)
    hedging_budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0)
    stub = make_stub(
        hedging=HEDGE, budget=budget, hedging_budget=hedging_budget, idempotency=IdempotencyKeys()
    )
    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=15)).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    assert budget.refused == 0

    servicer.slow_first = False
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)
    assert reason_of(caught.value) is Reason.BUDGET_EXHAUSTED
    assert budget.refused == 1
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3


async def test_a_failure_copy_waits_its_backoff_and_for_an_open_breaker_to_close(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, port = aio_hedge_ledger
    servicer.slow_first = False
    breaker = CircuitBreaker(fail_max=1, reset_timeout=0.3, failure_rate=0, probe_every=None)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0, failure_backoff=0.2),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    started = time.monotonic()
    held = asyncio.ensure_future(stub.GetBalance(BALANCE_REQUEST, timeout=15))
    await asyncio.sleep(0.5)
    assert not held.done()
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1
    assert breaker.for_target(f"127.0.0.1:{port}").state == "open"
    assert (await stub.GetBalance(BALANCE_REQUEST, timeout=15)).account == "alice"
    assert (await asyncio.wait_for(held, 15)).account == "alice"
    assert time.monotonic() - started >= 0.5
    assert len(servicer.state.calls_to(GET_BALANCE)) == 3


async def test_without_a_failure_backoff_an_open_breaker_ends_the_call(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, _ = aio_hedge_ledger
    servicer.slow_first = False
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30, failure_rate=0, probe_every=None)
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=3, delay=5.0),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=15)
    assert reason_of(caught.value) is Reason.BREAKER_OPEN
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


async def test_a_winning_latency_hedge_gives_its_withdrawal_back(
    make_stub, aio_hedge_ledger
) -> None:
    servicer, _ = aio_hedge_ledger
    servicer.hold = 0.5  # every first copy is slow: the hedge wins every call
    hedging_budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)  # one hedge
    stub = make_stub(
        hedging=HedgingPolicy(max_attempts=2, delay=0.05, refund_wins=True),
        hedging_budget=hedging_budget,
        idempotency=IdempotencyKeys(),
    )
    for _ in range(3):  # the budget allows one hedge; refunded, it serves every call
        assert (await stub.GetBalance(BALANCE_REQUEST, timeout=15)).account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 6
    assert hedging_budget.refused == 0
    assert hedging_budget.balance == pytest.approx(1.0)
