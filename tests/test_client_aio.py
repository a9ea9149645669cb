"""The grpc.aio client stack against a real aio ledger server with scripted faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, WATCH, AioLedger, Fault
from resilient_grpc import (
    CircuitBreaker,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
    idempotency_key,
)
from resilient_grpc.aio.client import client_interceptors, resilient_channel
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, attempts_of, reason_of
from tests.helpers import BALANCE_REQUEST, FAST, TRANSFER_REQUEST, MakeStub, aio_stub_maker


@pytest.fixture
def servicer(aio_ledger: tuple[AioLedger, int]) -> AioLedger:
    return aio_ledger[0]


@pytest.fixture(params=["channel", "interceptors"])
async def make_stub(
    request: pytest.FixtureRequest, aio_ledger: tuple[AioLedger, int]
) -> AsyncIterator[MakeStub]:
    """Build stubs with the stack attached both ways (resilient_channel, or client_interceptors
    on a grpc.aio channel) to the test ledger; closes them afterwards."""
    async with aio_stub_maker(f"127.0.0.1:{aio_ledger[1]}", request.param) as make:
        yield make


async def test_fail_twice_then_succeed_with_one_key_on_all_attempts(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 2)

    reply = await stub.Transfer(TRANSFER_REQUEST, timeout=5)

    calls = servicer.state.calls_to(TRANSFER)
    assert len(calls) == 3
    keys = {call.key for call in calls}
    assert len(keys) == 1 and None not in keys
    assert reply.from_balance == servicer.state.initial_balance - 5


async def test_gives_up_with_last_real_error_and_attempt_count(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(
        TRANSFER, Fault(details="first"), Fault(details="second"), Fault(details="third")
    )

    call = stub.Transfer(TRANSFER_REQUEST, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "third"
    assert attempts_of(caught.value) == 3
    assert reason_of(caught.value) is Reason.MAX_ATTEMPTS
    assert await call.code() == grpc.StatusCode.UNAVAILABLE


async def test_non_idempotent_method_without_key_is_not_retried(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys(methods=[GET_BALANCE]))
    servicer.state.faults.fail_times(TRANSFER, 1)

    with pytest.raises(grpc.RpcError) as caught:
        await stub.Transfer(TRANSFER_REQUEST, timeout=5)

    assert reason_of(caught.value) is Reason.NOT_IDEMPOTENT
    assert [call.key for call in servicer.state.calls_to(TRANSFER)] == [None]


async def test_idempotent_method_is_retried_without_key(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST.with_changes(idempotent_methods=[GET_BALANCE]))
    servicer.state.faults.fail_times(GET_BALANCE, 2)

    await stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert [call.key for call in servicer.state.calls_to(GET_BALANCE)] == [None, None, None]


async def test_explicit_key_from_context_manager_is_used_on_every_attempt(
    make_stub, servicer
) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys(methods=[GET_BALANCE]))
    servicer.state.faults.fail_times(TRANSFER, 1)

    with idempotency_key("order-42"):
        await stub.Transfer(TRANSFER_REQUEST, timeout=5)

    assert [call.key for call in servicer.state.calls_to(TRANSFER)] == ["order-42", "order-42"]


async def test_key_already_in_metadata_wins(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 1)

    await stub.Transfer(
        TRANSFER_REQUEST, timeout=5, metadata=(("idempotency-key", "from-metadata"),)
    )

    calls = servicer.state.calls_to(TRANSFER)
    assert [call.key for call in calls] == ["from-metadata", "from-metadata"]
    assert all(sum(1 for k, _ in call.metadata if k == "idempotency-key") == 1 for call in calls)


async def test_pushback_delay_is_honoured(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="300"))

    await stub.GetBalance(BALANCE_REQUEST, timeout=5)

    first, second = servicer.state.calls_to(GET_BALANCE)
    assert second.at - first.at >= 0.29


@pytest.mark.parametrize("value", ["-1", "soon", "2147483648"])
async def test_negative_or_malformed_pushback_stops_retrying(make_stub, servicer, value) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms=value))

    with pytest.raises(grpc.RpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert reason_of(caught.value) is Reason.PUSHBACK_STOP
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


async def test_retry_info_delay_is_honoured(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(retry_info=0.3))

    await stub.GetBalance(BALANCE_REQUEST, timeout=5)

    first, second = servicer.state.calls_to(GET_BALANCE)
    assert second.at - first.at >= 0.29


async def test_deadline_shorter_than_backoff_gives_up_in_time(make_stub, servicer) -> None:
    slow = RetryPolicy(max_attempts=5, initial_backoff=1.0, max_backoff=1.0, jitter="none")
    stub = make_stub(retry=slow, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 5)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=0.3)

    assert time.monotonic() - started < 1.0
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(caught.value) is Reason.DEADLINE


async def test_budget_caps_retries_when_everything_fails(make_stub, servicer) -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=1.0, window=10.0)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001, jitter="none")
    stub = make_stub(retry=policy, budget=budget, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 2000)

    async def one() -> bool:
        try:
            await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        except grpc.RpcError:
            return False
        return True

    results = []
    for _ in range(10):  # 10 waves of 50 concurrent calls
        results += await asyncio.gather(*(one() for _ in range(50)))

    attempts = len(servicer.state.calls_to(GET_BALANCE))
    assert results.count(False) == 500
    assert 500 < attempts <= 500 * 1.1 + 1.0 * 10.0
    assert budget.refused > 0


async def test_business_errors_are_never_retried_nor_counted(
    make_stub, servicer, aio_ledger
) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    stub = make_stub(
        retry=FAST.with_changes(idempotent_methods=[GET_BALANCE]),
        breaker=breaker,
        idempotency=IdempotencyKeys(),
    )
    servicer.state.faults.fail_times(GET_BALANCE, 5, Fault(code=grpc.StatusCode.NOT_FOUND))

    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    assert len(servicer.state.calls_to(GET_BALANCE)) == 5
    target = breaker.for_target(f"127.0.0.1:{aio_ledger[1]}")
    assert target.state == "closed"
    assert target.circuit.fail_counter == 0


async def test_breaker_opens_and_fails_fast_without_calling(make_stub, servicer) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    stub = make_stub(
        retry=FAST.with_changes(max_attempts=5), breaker=breaker, idempotency=IdempotencyKeys()
    )
    servicer.state.faults.fail_times(GET_BALANCE, 10)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert reason_of(caught.value) is Reason.BREAKER_OPEN
    assert attempts_of(caught.value) == 2

    for _ in range(10):
        call = stub.GetBalance(BALANCE_REQUEST, timeout=5)
        with pytest.raises(BreakerOpenError):
            await call
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert "open" in await call.details()
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


async def test_unary_stream_is_retried_before_the_first_message(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 2)

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=3), timeout=5)
    messages = [message async for message in call]

    assert [m.sequence for m in messages] == [1, 2, 3]
    assert await call.code() == grpc.StatusCode.OK
    keys = [c.key for c in servicer.state.calls_to(WATCH)]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0] is not None


async def test_unary_stream_read_api_works(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 1)

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2), timeout=5)
    first = await call.read()
    second = await call.read()
    end = await call.read()

    assert (first.sequence, second.sequence) == (1, 2)
    assert end is grpc.aio.EOF


async def test_unary_stream_is_not_retried_after_the_first_message(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(WATCH, Fault(after_messages=1))

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=3), timeout=5)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call:
            received.append(message)

    assert len(received) == 1
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await call.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.state.calls_to(WATCH)) == 1


async def test_unary_stream_gives_up_with_the_last_error(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 3)

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=3), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass

    assert attempts_of(caught.value) == 3
    assert await call.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_loop_is_never_blocked_while_backing_off(make_stub, servicer) -> None:
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.4, max_backoff=0.4, jitter="none")
    stub = make_stub(retry=policy, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    finally:
        task.cancel()
    assert ticks >= 10  # the loop kept running during the 0.4 s backoff


async def test_client_interceptors_work_with_an_aio_channel(aio_ledger, servicer) -> None:
    target = f"127.0.0.1:{aio_ledger[1]}"
    interceptors = client_interceptors(retry=FAST, idempotency=IdempotencyKeys(), target=target)
    async with grpc.aio.insecure_channel(target, interceptors=interceptors) as channel:
        servicer.state.faults.fail_times(TRANSFER, 1)
        await ledger_pb2_grpc.LedgerStub(channel).Transfer(TRANSFER_REQUEST, timeout=5)
    assert len(servicer.state.calls_to(TRANSFER)) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retry": 3}, "retry"),
        ({"budget": "10%"}, "budget"),
        ({"breaker": object()}, "breaker"),
        ({"idempotency": True}, "idempotency"),
        ({"reconnect_wait": 0}, "reconnect_wait"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        client_interceptors(**kwargs)


# The resilient_channel call object -------------------------------------------------------------


@pytest.fixture
async def channel_stub(aio_ledger: tuple[AioLedger, int]) -> AsyncIterator[object]:
    """A stub on ``resilient_channel`` (its own call object, not gRPC's interceptor machinery)."""
    channel = resilient_channel(
        f"127.0.0.1:{aio_ledger[1]}", retry=FAST, idempotency=IdempotencyKeys()
    )
    yield ledger_pb2_grpc.LedgerStub(channel)
    await channel.close()


async def test_call_status_can_be_read_without_awaiting_the_call(channel_stub, servicer) -> None:
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    call = channel_stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert await call.code() == grpc.StatusCode.OK  # starts the call, waits for its outcome
    assert call.done()
    assert (await call).account == "alice"  # the same outcome, not a new call
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


async def test_two_tasks_awaiting_one_call_share_its_outcome(channel_stub, servicer) -> None:
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    call = channel_stub.GetBalance(BALANCE_REQUEST, timeout=5)

    first, second = await asyncio.gather(call.code(), asyncio.ensure_future(_await(call)))

    assert first == grpc.StatusCode.OK
    assert second.account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


async def _await(call: object) -> object:
    return await call  # type: ignore[misc]


async def test_done_callbacks_run_when_the_call_finishes(channel_stub, servicer) -> None:
    call = channel_stub.GetBalance(BALANCE_REQUEST, timeout=5)
    seen: list[object] = []
    call.add_done_callback(seen.append)
    assert not call.done() and seen == []

    await call

    assert seen == [call]
    late: list[object] = []
    call.add_done_callback(late.append)
    assert late == [call]


async def test_cancelled_before_it_starts_sends_nothing(channel_stub, servicer) -> None:
    call = channel_stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert call.cancel()

    with pytest.raises(asyncio.CancelledError):
        await call

    assert call.cancelled()
    assert servicer.state.calls_to(GET_BALANCE) == []


async def test_cancelling_the_awaiting_task_cancels_the_rpc(channel_stub, servicer) -> None:
    servicer.state.faults.add(GET_BALANCE, Fault(delay=2.0))
    call = channel_stub.GetBalance(BALANCE_REQUEST, timeout=5)
    task = asyncio.ensure_future(_await(call))
    await asyncio.sleep(0.1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert call.done()
    assert call.last_call is not None and call.last_call.cancelled()


async def test_time_remaining_counts_down_from_the_deadline(channel_stub) -> None:
    call = channel_stub.GetBalance(BALANCE_REQUEST, timeout=5)
    remaining = call.time_remaining()
    assert remaining is not None and 4.0 < remaining <= 5.0
    await call


async def test_exactly_one_probe_after_reset_with_concurrent_tasks(aio_ledger, servicer) -> None:
    target = f"127.0.0.1:{aio_ledger[1]}"
    breaker = CircuitBreaker(fail_max=2, reset_timeout=0.3, probe_every=None)
    async with resilient_channel(target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 2)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        for _ in range(20):  # open: nothing reaches the server
            with pytest.raises(BreakerOpenError):
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        assert len(servicer.state.calls_to(GET_BALANCE)) == 2

        await asyncio.sleep(0.35)  # past reset_timeout (bounded, short)
        servicer.state.faults.add(GET_BALANCE, Fault(delay=0.2))  # a slow probe that fails

        async def outcome() -> str:
            try:
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
            except BreakerOpenError:
                return "breaker"
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "ok"

        outcomes = await asyncio.gather(*(outcome() for _ in range(10)))
        assert sorted(outcomes) == ["UNAVAILABLE"] + ["breaker"] * 9
        assert len(servicer.state.calls_to(GET_BALANCE)) == 3
        assert breaker.for_target(target).state == "open"


async def test_stream_request_methods_pass_through_the_channel(aio_ledger) -> None:
    async with resilient_channel(f"127.0.0.1:{aio_ledger[1]}", retry=FAST) as channel:
        assert isinstance(
            channel.stream_unary("/ledger.v1.Ledger/Nope"), grpc.aio.StreamUnaryMultiCallable
        )
        assert isinstance(
            channel.stream_stream("/ledger.v1.Ledger/Nope"), grpc.aio.StreamStreamMultiCallable
        )


async def test_the_channel_supports_connectivity_helpers(aio_ledger) -> None:
    async with resilient_channel(f"127.0.0.1:{aio_ledger[1]}", retry=FAST) as channel:
        await asyncio.wait_for(channel.channel_ready(), 5)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
