"""The sync client stack against a real ledger server with scripted faults."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, WATCH, Fault, SyncLedger
from resilient_grpc import (
    CircuitBreaker,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
    idempotency_key,
)
from resilient_grpc.client import client_interceptors, resilient_channel
from resilient_grpc.core.keys import derivation_scope, derive_key
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, attempts_of, reason_of
from tests.helpers import (
    BALANCE_REQUEST,
    FAST,
    TRANSFER_REQUEST,
    MakeStub,
    run_threads,
    stub_maker,
)


@pytest.fixture
def target(ledger: tuple[SyncLedger, int]) -> str:
    return f"127.0.0.1:{ledger[1]}"


@pytest.fixture
def servicer(ledger: tuple[SyncLedger, int]) -> SyncLedger:
    return ledger[0]


def stub_for(channel: grpc.Channel) -> ledger_pb2_grpc.LedgerStub:
    return ledger_pb2_grpc.LedgerStub(channel)


@pytest.fixture(params=["channel", "interceptors"])
def make_stub(request: pytest.FixtureRequest, target: str) -> Iterator[MakeStub]:
    """Build stubs with the stack attached both ways (resilient_channel, or client_interceptors
    on grpc.intercept_channel) to the test ledger; closes them afterwards."""
    with stub_maker(target, request.param) as make:
        yield make


def test_fail_twice_then_succeed_with_one_key_on_all_attempts(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 2)

    reply = stub.Transfer(TRANSFER_REQUEST, timeout=5)

    calls = servicer.state.calls_to(TRANSFER)
    assert len(calls) == 3
    keys = {call.key for call in calls}
    assert len(keys) == 1 and None not in keys
    assert reply.from_balance == servicer.state.initial_balance - 5
    # exactly one idempotency-key header on every attempt
    assert all(sum(1 for k, _ in call.metadata if k == "idempotency-key") == 1 for call in calls)


def test_gives_up_with_last_real_error_and_attempt_count(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(
        TRANSFER, Fault(details="first"), Fault(details="second"), Fault(details="third")
    )

    with pytest.raises(grpc.RpcError) as caught:
        stub.Transfer(TRANSFER_REQUEST, timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "third"
    assert attempts_of(caught.value) == 3
    assert reason_of(caught.value) is Reason.MAX_ATTEMPTS


def test_non_idempotent_method_without_key_is_not_retried(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys(methods=[GET_BALANCE]))
    servicer.state.faults.fail_times(TRANSFER, 1)

    with pytest.raises(grpc.RpcError) as caught:
        stub.Transfer(TRANSFER_REQUEST, timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert attempts_of(caught.value) == 1
    assert reason_of(caught.value) is Reason.NOT_IDEMPOTENT
    assert [call.key for call in servicer.state.calls_to(TRANSFER)] == [None]


def test_idempotent_method_is_retried_without_key(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST.with_changes(idempotent_methods=[GET_BALANCE]))
    servicer.state.faults.fail_times(GET_BALANCE, 2)

    stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert [call.key for call in servicer.state.calls_to(GET_BALANCE)] == [None, None, None]


def test_explicit_key_from_context_manager_is_used_on_every_attempt(make_stub, servicer) -> None:
    # Transfer is excluded from generated keys: the explicit key alone makes it retryable.
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys(methods=[GET_BALANCE]))
    servicer.state.faults.fail_times(TRANSFER, 1)

    with idempotency_key("order-42"):
        stub.Transfer(TRANSFER_REQUEST, timeout=5)

    assert [call.key for call in servicer.state.calls_to(TRANSFER)] == ["order-42", "order-42"]
    assert servicer.state.executions["order-42"] == 1


def test_key_already_in_metadata_wins(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 1)

    stub.Transfer(TRANSFER_REQUEST, timeout=5, metadata=(("idempotency-key", "from-metadata"),))

    calls = servicer.state.calls_to(TRANSFER)
    assert [call.key for call in calls] == ["from-metadata", "from-metadata"]
    assert all(sum(1 for k, _ in call.metadata if k == "idempotency-key") == 1 for call in calls)


def test_each_logical_call_gets_its_own_key(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    stub.Transfer(TRANSFER_REQUEST, timeout=5)
    stub.Transfer(TRANSFER_REQUEST, timeout=5)
    keys = [call.key for call in servicer.state.calls_to(TRANSFER)]
    assert len(set(keys)) == 2


def test_pushback_delay_is_honoured(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms="300"))

    stub.GetBalance(BALANCE_REQUEST, timeout=5)

    first, second = servicer.state.calls_to(GET_BALANCE)
    assert second.at - first.at >= 0.29  # computed backoff alone would be <= 0.01 s


@pytest.mark.parametrize("value", ["-1", "soon", "1.5", "2147483648"])
def test_negative_or_malformed_pushback_stops_retrying(make_stub, servicer, value: str) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(pushback_ms=value))

    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert reason_of(caught.value) is Reason.PUSHBACK_STOP
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


def test_retry_info_delay_is_honoured(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(retry_info=0.3))

    stub.GetBalance(BALANCE_REQUEST, timeout=5)

    first, second = servicer.state.calls_to(GET_BALANCE)
    assert second.at - first.at >= 0.29


def test_deadline_shorter_than_backoff_gives_up_in_time(make_stub, servicer) -> None:
    slow = RetryPolicy(max_attempts=5, initial_backoff=1.0, max_backoff=1.0, jitter="none")
    stub = make_stub(retry=slow, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 5)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST, timeout=0.3)
    elapsed = time.monotonic() - started

    assert elapsed < 1.0  # never slept the 1 s backoff past the 300 ms deadline
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the last real error
    assert reason_of(caught.value) is Reason.DEADLINE
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


def test_per_attempt_timeout_bounds_each_attempt(make_stub, servicer) -> None:
    policy = FAST.with_changes(
        per_attempt_timeout=0.2, retryable_codes=["UNAVAILABLE", "DEADLINE_EXCEEDED"]
    )
    stub = make_stub(retry=policy, idempotency=IdempotencyKeys())
    servicer.state.faults.add(GET_BALANCE, Fault(delay=1.0))  # the first attempt hangs

    started = time.monotonic()
    stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert time.monotonic() - started < 1.0
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


def test_budget_caps_retries_when_everything_fails(make_stub, servicer) -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=1.0, window=10.0)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001, jitter="none")
    stub = make_stub(retry=policy, budget=budget, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 2000)

    failures = 0
    for _ in range(500):
        try:
            stub.GetBalance(BALANCE_REQUEST, timeout=5)
        except grpc.RpcError:
            failures += 1

    attempts = len(servicer.state.calls_to(GET_BALANCE))
    assert failures == 500
    # 10% of 500 calls + the 1/s minimum over the 10 s window, instead of 3x
    assert 500 < attempts <= 500 * 1.1 + 1.0 * 10.0
    assert budget.refused > 0


def test_business_errors_are_never_retried(make_stub, servicer) -> None:
    stub = make_stub(
        retry=FAST.with_changes(idempotent_methods=[GET_BALANCE]), idempotency=IdempotencyKeys()
    )
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.NOT_FOUND))

    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) is Reason.NOT_RETRYABLE_CODE
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


def test_retries_stop_as_soon_as_the_breaker_opens(make_stub, servicer) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    stub = make_stub(
        retry=FAST.with_changes(max_attempts=5), breaker=breaker, idempotency=IdempotencyKeys()
    )
    servicer.state.faults.fail_times(GET_BALANCE, 10)

    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST, timeout=5)

    assert not isinstance(caught.value, BreakerOpenError)  # the last real error
    assert reason_of(caught.value) is Reason.BREAKER_OPEN
    assert attempts_of(caught.value) == 2
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2

    with pytest.raises(BreakerOpenError) as rejected:
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
    assert attempts_of(rejected.value) == 0
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


def test_unary_stream_is_retried_before_the_first_message(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 2)

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=3), timeout=5)
    messages = list(call)

    assert [m.sequence for m in messages] == [1, 2, 3]
    assert call.code() == grpc.StatusCode.OK
    keys = [c.key for c in servicer.state.calls_to(WATCH)]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0] is not None


def test_unary_stream_is_not_retried_after_the_first_message(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.add(WATCH, Fault(after_messages=1))

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=3), timeout=5)
    received = [next(call)]
    with pytest.raises(grpc.RpcError) as caught:
        received.append(next(call))

    assert len(received) == 1
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert call.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.state.calls_to(WATCH)) == 1


def test_unary_stream_gives_up_with_the_last_error(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 3)

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=3), timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)

    assert attempts_of(caught.value) == 3
    assert call.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError):  # iterating again repeats the error
        next(call)


def test_unary_stream_key_is_fixed_when_the_stub_is_called(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    with idempotency_key("watch-1"):
        call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=1), timeout=5)
    assert len(list(call)) == 1
    assert [c.key for c in servicer.state.calls_to(WATCH)] == ["watch-1"]


def test_future_call_is_retried(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    future = stub.GetBalance.future(BALANCE_REQUEST, timeout=5)
    assert future.result().account == "alice"
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


def test_with_call_returns_the_successful_attempt(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(GET_BALANCE, 1)
    reply, call = stub.GetBalance.with_call(BALANCE_REQUEST, timeout=5)
    assert reply.account == "alice"
    assert call.code() == grpc.StatusCode.OK


def test_client_interceptors_work_with_intercept_channel(target: str, servicer) -> None:
    interceptors = client_interceptors(retry=FAST, idempotency=IdempotencyKeys(), target=target)
    with grpc.insecure_channel(target) as channel:
        stub = stub_for(grpc.intercept_channel(channel, *interceptors))
        servicer.state.faults.fail_times(TRANSFER, 1)
        stub.Transfer(TRANSFER_REQUEST, timeout=5)
    assert len(servicer.state.calls_to(TRANSFER)) == 2


def test_concurrent_calls_from_many_threads(make_stub, servicer) -> None:
    stub = make_stub(
        retry=FAST, budget=RetryBudget(), breaker=CircuitBreaker(), idempotency=IdempotencyKeys()
    )
    servicer.state.faults.fail_times(TRANSFER, 10)
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(5):
            try:
                stub.Transfer(TRANSFER_REQUEST, timeout=5)
            except BaseException as error:  # collected and asserted below
                errors.append(error)

    run_threads(work, 8)

    assert errors == [] or all(isinstance(e, grpc.RpcError) for e in errors)
    assert servicer.state.duplicate_executions == 0
    assert sum(servicer.state.executions.values()) == 40 - len(errors)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retry": "fast"}, "retry"),
        ({"budget": 0.1}, "budget"),
        ({"breaker": True}, "breaker"),
        ({"idempotency": "idempotency-key"}, "idempotency"),
        ({"reconnect_wait": -1}, "reconnect_wait"),
        ({"reconnect_wait": float("nan")}, "reconnect_wait"),
        ({"target": ""}, "target"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        client_interceptors(**kwargs)


def test_resilient_channel_rejects_an_empty_target() -> None:
    with pytest.raises(ValueError, match="target"):
        resilient_channel("")


def test_unary_stream_status_can_be_read_before_iterating(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 1)
    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2), timeout=5)
    finished: list[bool] = []
    assert call.add_callback(lambda: finished.append(True))

    assert call.initial_metadata() is not None  # runs the retry phase up to the first message
    assert [m.sequence for m in call] == [1, 2]
    assert call.code() == grpc.StatusCode.OK
    assert finished == [True]
    assert len(servicer.state.calls_to(WATCH)) == 2


def test_breaker_refusal_reaches_a_stream_on_first_read(make_stub, servicer, target) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=30)
    stub = make_stub(breaker=breaker, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(WATCH, 1)
    with pytest.raises(grpc.RpcError):
        list(stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2), timeout=5))

    call = stub.Watch(ledger_pb2.WatchRequest(account="alice", count=2), timeout=5)
    with pytest.raises(BreakerOpenError):
        next(call)
    assert call.code() == grpc.StatusCode.UNAVAILABLE
    assert "open" in call.details()
    assert len(servicer.state.calls_to(WATCH)) == 1


def test_keys_inside_a_handler_scope_are_derived_from_the_incoming_key(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    servicer.state.faults.fail_times(TRANSFER, 1)

    with derivation_scope("incoming-key-1"):
        stub.Transfer(TRANSFER_REQUEST, timeout=5)
        stub.Transfer(TRANSFER_REQUEST, timeout=5)

    keys = [call.key for call in servicer.state.calls_to(TRANSFER)]
    first, second = (
        derive_key("incoming-key-1", TRANSFER, 0),
        derive_key("incoming-key-1", TRANSFER, 1),
    )
    assert keys == [first, first, second]  # the retry reuses the derived key


def test_stream_request_methods_pass_through_the_channel(target: str) -> None:
    with resilient_channel(target, retry=FAST) as channel:
        assert isinstance(
            channel.stream_unary("/ledger.v1.Ledger/Nope"), grpc.StreamUnaryMultiCallable
        )
        assert isinstance(
            channel.stream_stream("/ledger.v1.Ledger/Nope"), grpc.StreamStreamMultiCallable
        )


def test_the_channel_supports_connectivity_helpers(target: str) -> None:
    with resilient_channel(target, retry=FAST) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)


def test_a_malformed_key_in_metadata_is_refused_before_sending(make_stub, servicer) -> None:
    stub = make_stub(retry=FAST, idempotency=IdempotencyKeys())
    with pytest.raises(ValueError, match="idempotency key"):
        stub.Transfer(TRANSFER_REQUEST, timeout=5, metadata=(("idempotency-key", "has space"),))
    assert servicer.state.calls_to(TRANSFER) == []
