"""Adversarial review: a caller's task cancelled while breaker storage I/O runs in a thread.

With a breaker whose state lives in shared storage (Redis), ``grpc.aio`` calls run the breaker's
admission in a worker thread. When the awaiting task is cancelled (``asyncio.wait_for``, a task
group) while that admission is on its way back, the admission it took - the half-open probe
slot - must still be given back: otherwise the breaker refuses every later call for good.
The storage here is pybreaker's in-memory one behind a gate that holds the admission's state
read (a slow store); the calls go to a real server on loopback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, AioLedger
from resilient_grpc import CircuitBreaker, HedgingPolicy, IdempotencyKeys, RetryPolicy, telemetry
from resilient_grpc.aio.client import resilient_channel
from resilient_grpc.events import CallAbandoned
from tests.helpers import GatedStorage, until

BALANCE = ledger_pb2.BalanceRequest(account="alice")
RESET = 0.2


@pytest.mark.parametrize("policy", ["retry", "hedging"])
async def test_a_task_cancelled_during_the_probe_admission_frees_the_probe_slot(
    aio_ledger: tuple[AioLedger, int], policy: str
) -> None:
    servicer, port = aio_ledger
    target = f"127.0.0.1:{port}"
    storages: list[GatedStorage] = []

    def storage(_target: str) -> GatedStorage:
        storages.append(GatedStorage())
        return storages[-1]

    breaker = CircuitBreaker(fail_max=1, reset_timeout=RESET, probe_every=None, storage=storage)
    kwargs: dict[str, Any] = (
        {"retry": RetryPolicy(max_attempts=2)}
        if policy == "retry"
        else {"hedging": HedgingPolicy(max_attempts=2, delay=0.5)}
    )
    with telemetry.capture() as recorder:
        async with resilient_channel(
            target, breaker=breaker, idempotency=IdempotencyKeys(), **kwargs
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            await stub.GetBalance(BALANCE, timeout=10)  # makes the target's breaker (and storage)
            target_breaker = breaker.for_target(target)
            assert target_breaker.blocking
            target_breaker.circuit.open()
            await asyncio.sleep(RESET * 1.5)  # the next admission is the half-open probe
            gated = storages[0]
            gated.armed = True
            calls_before = len(servicer.state.calls_to(GET_BALANCE))

            task = asyncio.ensure_future(stub.GetBalance(BALANCE, timeout=10))
            await until(gated.entered.is_set)  # the admission is in its worker thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):  # at once: it does not wait for the store
                await asyncio.wait_for(task, 5)
            assert not any(isinstance(e, CallAbandoned) for e in recorder.events)
            gated.gate.set()  # the slow store answers: the probe slot was taken
            # the cancelled call's driver is closed once the store answered: it frees the slot
            await until(lambda: any(isinstance(e, CallAbandoned) for e in recorder.events))

            # The cancelled call sent nothing and holds nothing: the next call is the probe.
            assert len(servicer.state.calls_to(GET_BALANCE)) == calls_before
            reply = await stub.GetBalance(BALANCE, timeout=10)
            assert reply.account == "alice"
            assert len(servicer.state.calls_to(GET_BALANCE)) == calls_before + 1
            assert target_breaker.state == "closed"
