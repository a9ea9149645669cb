"""A cancelled ``grpc.aio`` call must not wait for a stalled breaker store (issue 9, item 1).

With a breaker whose state lives in shared storage (Redis), the aio shell runs the breaker's
admission and record in a worker thread. A store that stalls (redis-py waits forever by
default) must not hold a caller that gave up: ``asyncio.wait_for(stub.M(...), t)`` raises
``TimeoutError`` after ``t``, nothing is sent afterwards, and what the stalled step took (the
half-open probe slot, a retry's budget withdrawal) is given back once the store answers, and
only then: the driver is closed from the event loop when the thread is done.

The storage is pybreaker's in-memory one behind a gate that holds one state read until the
test opens it (:class:`~tests.helpers.GatedStorage`); calls go to a real server on loopback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry import trace

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, WATCH, AioLedger, Fault
from resilient_grpc import (
    CircuitBreaker,
    HedgingPolicy,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
    telemetry,
)
from resilient_grpc.aio.client import client_interceptors, resilient_channel
from resilient_grpc.breaker import TargetBreaker
from resilient_grpc.events import CallAbandoned, CallFinished
from resilient_grpc.telemetry import Recorder
from tests.helpers import GatedStorage, until
from tests.telemetry_fixtures import Otel

BALANCE = ledger_pb2.BalanceRequest(account="alice")
RESET = 0.2
#: How long a cancelled call may take to end (it should end at once; the store stalls 10 s).
PROMPT = 1.0


class Rig:
    """A channel (or interceptors) with a gated breaker store, to one real server."""

    def __init__(
        self,
        servicer: AioLedger,
        port: int,
        policy: str,
        how: str = "channel",
        *,
        fail_max: int = 1,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.servicer = servicer
        self.target = f"127.0.0.1:{port}"
        self.storages: list[GatedStorage] = []
        self.breaker = CircuitBreaker(
            fail_max=fail_max, reset_timeout=RESET, probe_every=None, storage=self._storage
        )
        self.budget = RetryBudget(ratio=0.1, min_retries_per_second=1.0)
        kwargs: dict[str, Any] = {"breaker": self.breaker, "idempotency": IdempotencyKeys()}
        kwargs["budget"] = self.budget
        if policy == "retry":
            kwargs["retry"] = retry or RetryPolicy(max_attempts=2)
        else:
            kwargs["hedging"] = HedgingPolicy(max_attempts=2, delay=2.0)  # no hedge in these tests
        if how == "channel":
            self.channel = resilient_channel(self.target, **kwargs)
        else:
            self.channel = grpc.aio.insecure_channel(
                self.target,
                options=[("grpc.enable_retries", 0)],
                interceptors=client_interceptors(target=self.target, **kwargs),
            )
        self.stub = ledger_pb2_grpc.LedgerStub(self.channel)

    def _storage(self, _target: str) -> GatedStorage:
        self.storages.append(GatedStorage())
        return self.storages[-1]

    @property
    def store(self) -> GatedStorage:
        return self.storages[0]

    @property
    def target_breaker(self) -> TargetBreaker:
        return self.breaker.for_target(self.target)

    def calls(self) -> int:
        return len(self.servicer.state.calls_to(GET_BALANCE))

    async def half_open(self) -> None:
        """Make the target's breaker, open it and wait until the next admission is its probe."""
        await self.stub.GetBalance(BALANCE, timeout=10)
        assert self.target_breaker.blocking
        self.target_breaker.circuit.open()
        await asyncio.sleep(RESET * 1.5)


def ends(recorder: Recorder) -> int:
    """How many calls reported their end (finished or abandoned)."""
    return sum(isinstance(e, (CallAbandoned, CallFinished)) for e in recorder.events)


async def gives_up_promptly(call: Any, timeout: float) -> None:
    """``asyncio.wait_for(call, timeout)`` raises TimeoutError, well before the store answers."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call, timeout)
    assert loop.time() - started < timeout + PROMPT


@pytest.fixture
async def rigs(aio_ledger: tuple[AioLedger, int]) -> AsyncIterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.store.gate.set()  # never leave a worker thread waiting
        await rig.channel.close(None)


@pytest.mark.parametrize(
    ("policy", "how"), [("retry", "channel"), ("hedging", "channel"), ("retry", "interceptors")]
)
async def test_a_call_cancelled_during_a_stalled_probe_admission_ends_at_once(
    aio_ledger: tuple[AioLedger, int], rigs: list[Rig], policy: str, how: str
) -> None:
    rig = Rig(*aio_ledger, policy, how)
    rigs.append(rig)
    with telemetry.capture() as recorder:
        await rig.half_open()
        calls = rig.calls()
        balance = rig.budget.balance
        ended = ends(recorder)
        rig.store.armed = True  # the probe's admission stalls

        await gives_up_promptly(rig.stub.GetBalance(BALANCE, timeout=10), 0.2)
        assert rig.store.entered.is_set()  # it timed out in the stalled admission
        await asyncio.sleep(0.1)
        assert rig.calls() == calls  # nothing was sent, then or after
        assert ends(recorder) == ended  # the driver waits for the store before it is closed

        rig.store.gate.set()  # the store answers: the cancelled call took the probe slot...
        await until(lambda: ends(recorder) == ended + 1, "the cancelled call's driver closed")
        assert rig.calls() == calls
        if policy == "retry":  # a call that sent nothing is not traffic: no deposit either
            assert rig.budget.balance == pytest.approx(balance)
        else:  # no withdrawal (the hedging state deposits when it grants the first copy)
            assert rig.budget.balance >= balance

        # ... and gave it back: the next call is the probe, it succeeds and closes the breaker.
        reply = await rig.stub.GetBalance(BALANCE, timeout=10)
        assert reply.account == "alice"
        assert rig.calls() == calls + 1
        assert rig.target_breaker.state == "closed"
        assert ends(recorder) == ended + 2  # reported once each


@pytest.mark.parametrize("policy", ["retry", "hedging"])
async def test_a_call_cancelled_during_a_stalled_record_ends_at_once(
    aio_ledger: tuple[AioLedger, int], rigs: list[Rig], policy: str
) -> None:
    rig = Rig(*aio_ledger, policy)
    rigs.append(rig)
    with telemetry.capture() as recorder:
        await rig.half_open()
        calls = rig.calls()
        balance = rig.budget.balance
        ended = ends(recorder)
        rig.servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=0.3))  # answers OK

        waiting = asyncio.ensure_future(
            gives_up_promptly(rig.stub.GetBalance(BALANCE, timeout=10), 0.8)
        )
        await until(lambda: rig.calls() == calls + 1, "the probe reached the server")
        rig.store.armed = True  # admitted already: the next state read is the record's
        await waiting
        assert rig.store.entered.is_set()  # it timed out in the stalled record
        assert ends(recorder) == ended

        rig.store.gate.set()  # the probe's success is recorded: the breaker closes
        await until(lambda: ends(recorder) == ended + 1, "the cancelled call's driver closed")
        assert rig.target_breaker.state == "closed"
        assert rig.budget.balance >= balance  # its deposit, no withdrawal
        assert rig.calls() == calls + 1  # nothing more was sent

        reply = await rig.stub.GetBalance(BALANCE, timeout=10)
        assert reply.account == "alice"
        assert rig.calls() == calls + 2
        assert ends(recorder) == ended + 2


async def test_a_retry_cancelled_during_its_stalled_admission_is_refunded(
    aio_ledger: tuple[AioLedger, int], rigs: list[Rig]
) -> None:
    servicer, port = aio_ledger
    retry = RetryPolicy(max_attempts=2, initial_backoff=0.5, jitter="none")
    rig = Rig(servicer, port, "retry", fail_max=5, retry=retry)  # the breaker stays closed
    rigs.append(rig)
    with telemetry.capture() as recorder:
        await rig.stub.GetBalance(BALANCE, timeout=10)  # makes the breaker and its store
        calls = rig.calls()
        balance = rig.budget.balance
        servicer.state.faults.fail_times(GET_BALANCE, 1)  # UNAVAILABLE: retried after 0.5 s

        waiting = asyncio.ensure_future(
            gives_up_promptly(rig.stub.GetBalance(BALANCE, timeout=10), 1.0)
        )
        # the retry was granted (withdrawn) and is in its backoff: its admission will stall
        await until(lambda: rig.budget.balance < balance, "the retry was granted")
        rig.store.armed = True
        await waiting
        assert rig.store.entered.is_set()
        assert rig.calls() == calls + 1  # the retry was not sent
        assert ends(recorder) == 1

        rig.store.gate.set()
        await until(lambda: ends(recorder) == 2, "the cancelled call's driver closed")
        assert rig.calls() == calls + 1  # nor after
        # the first attempt's deposit stays; the retry's withdrawal was refunded
        assert rig.budget.balance == pytest.approx(balance + 0.1)


async def test_a_stream_cancelled_during_a_stalled_probe_admission_ends_at_once(
    aio_ledger: tuple[AioLedger, int], rigs: list[Rig]
) -> None:
    rig = Rig(*aio_ledger, "retry")
    rigs.append(rig)
    request = ledger_pb2.WatchRequest(account="alice", count=2)
    with telemetry.capture() as recorder:
        await rig.half_open()
        ended = ends(recorder)
        rig.store.armed = True
        stream = rig.stub.Watch(request, timeout=10)
        await gives_up_promptly(stream.read(), 0.2)  # its first read starts the attempts
        assert rig.store.entered.is_set()
        assert ends(recorder) == ended

        rig.store.gate.set()
        await until(lambda: ends(recorder) == ended + 1, "the cancelled stream's driver closed")
        assert rig.servicer.state.calls_to(WATCH) == []  # nothing was sent, then or after
        replies = [reply async for reply in rig.stub.Watch(request, timeout=10)]  # the probe
        assert [reply.account for reply in replies] == ["alice", "alice"]
        assert rig.target_breaker.state == "closed"


async def test_cancel_during_a_stalled_admission_ends_the_call_at_once(
    aio_ledger: tuple[AioLedger, int], rigs: list[Rig]
) -> None:
    rig = Rig(*aio_ledger, "retry")
    rigs.append(rig)
    with telemetry.capture() as recorder:
        await rig.half_open()
        calls = rig.calls()
        rig.store.armed = True
        call = rig.stub.GetBalance(BALANCE, timeout=10)

        async def result() -> Any:
            return await call

        task = asyncio.ensure_future(result())
        await until(rig.store.entered.is_set, "the admission is in its thread")
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, PROMPT)
        assert call.done() and call.cancelled()
        assert await call.code() == grpc.StatusCode.CANCELLED

        rig.store.gate.set()
        await until(lambda: ends(recorder) == 2, "the cancelled call's driver closed")
        await rig.stub.GetBalance(BALANCE, timeout=10)  # the probe slot was given back
        assert rig.calls() == calls + 1
        assert rig.target_breaker.state == "closed"


async def test_the_call_span_is_not_left_current_in_the_task_that_gave_up(
    aio_ledger: tuple[AioLedger, int], rigs: list[Rig], otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(*aio_ledger, "retry")
    rigs.append(rig)
    await rig.half_open()
    rig.store.armed = True
    tracer = otel.tracer_provider.get_tracer("test")
    with caplog.at_level(logging.ERROR), tracer.start_as_current_span("caller") as caller:
        await gives_up_promptly(rig.stub.GetBalance(BALANCE, timeout=10), 0.2)
        assert trace.get_current_span() is caller  # not the abandoned call's span
        spans = len(otel.spans())
        rig.store.gate.set()
        await until(lambda: len(otel.spans()) == spans + 1, "the call's span ended")
        assert trace.get_current_span() is caller
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]


async def test_an_error_of_breaker_io_whose_caller_left_is_logged_and_the_call_abandoned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody awaits breaker I/O once its caller has left: its error is logged, not lost, and
    the driver is still closed (what the step took, nothing here, is given back)."""
    from resilient_grpc.aio.client import _after_thread

    abandoned: list[bool] = []
    work: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    work.set_exception(RuntimeError("store exploded"))
    with caplog.at_level(logging.ERROR, logger="resilient_grpc.aio.client"):
        _after_thread(lambda: abandoned.append(True), work)
    assert abandoned == [True]
    (record,) = [r for r in caplog.records if "cancelled call failed" in r.getMessage()]
    assert record.exc_info is not None and "store exploded" in str(record.exc_info[1])
