"""``throttle=AdaptiveThrottle(...)`` in the client stacks, sync and aio, against real servers."""

from __future__ import annotations

import random
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, Fault
from resilient_grpc import AdaptiveThrottle, IdempotencyKeys, RetryPolicy, ThrottledError
from resilient_grpc.aio.client import client_interceptors as aio_client_interceptors
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import client_interceptors, resilient_channel
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import attempts_of, reason_of
from tests.helpers import BALANCE_REQUEST

CALLS = 200


def _throttle() -> AdaptiveThrottle:
    return AdaptiveThrottle(k=2.0, window=60.0, uniform=random.Random(3).random)


def _sync_channel(kind: str, target: str, **stack: Any) -> grpc.Channel:
    if kind == "channel":
        return resilient_channel(target, **stack)
    return grpc.intercept_channel(
        grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]),
        *client_interceptors(target=target, **stack),
    )


@pytest.mark.parametrize("kind", ["channel", "interceptors"])
def test_a_failing_backend_is_spared_most_calls(kind: str, ledger) -> None:
    servicer, port = ledger
    throttle = _throttle()
    servicer.state.faults.fail_times(GET_BALANCE, CALLS)
    outcomes: dict[str, int] = {}
    with _sync_channel(kind, f"127.0.0.1:{port}", throttle=throttle) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        for _ in range(CALLS):
            try:
                stub.GetBalance(BALANCE_REQUEST, timeout=5)
            except ThrottledError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert attempts_of(error) == 0 and reason_of(error) is Reason.THROTTLED
                outcomes["throttled"] = outcomes.get("throttled", 0) + 1
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                outcomes["sent"] = outcomes.get("sent", 0) + 1
    sent = len(servicer.state.calls_to(GET_BALANCE))
    assert sent == outcomes["sent"]
    assert sent + outcomes["throttled"] == CALLS
    assert sent < 0.25 * CALLS  # the throttle rejected most calls locally
    assert throttle.rejected == outcomes["throttled"]


@pytest.mark.parametrize("kind", ["channel", "interceptors"])
def test_no_call_is_rejected_while_the_backend_is_healthy(kind: str, ledger) -> None:
    servicer, port = ledger
    throttle = _throttle()
    servicer.state.faults.fail_times(GET_BALANCE, 20, Fault(code=grpc.StatusCode.NOT_FOUND))
    with _sync_channel(kind, f"127.0.0.1:{port}", throttle=throttle) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        for _ in range(CALLS):
            try:
                stub.GetBalance(BALANCE_REQUEST, timeout=5)
            except grpc.RpcError as error:  # business errors: the backend is fine
                assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(servicer.state.calls_to(GET_BALANCE)) == CALLS
    assert throttle.rejected == 0 and throttle.rejection_probability == 0.0


def test_a_throttled_retry_gives_up_with_the_last_real_error(ledger) -> None:
    servicer, port = ledger
    throttle = AdaptiveThrottle(k=1.0, uniform=lambda: 0.0)  # rejects whenever p > 0
    servicer.state.faults.fail_times(GET_BALANCE, 5)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)
    with (
        resilient_channel(
            f"127.0.0.1:{port}", retry=policy, idempotency=IdempotencyKeys(), throttle=throttle
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=5)
    assert not isinstance(caught.value, ThrottledError)  # the server's own error
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(caught.value) is Reason.THROTTLED and attempts_of(caught.value) == 1
    assert len(servicer.state.calls_to(GET_BALANCE)) == 1


@pytest.mark.parametrize("kind", ["channel", "interceptors"])
async def test_aio_a_failing_backend_is_spared_most_calls(kind: str, aio_ledger) -> None:
    servicer, port = aio_ledger
    target = f"127.0.0.1:{port}"
    throttle = _throttle()
    servicer.state.faults.fail_times(GET_BALANCE, CALLS)
    if kind == "channel":
        channel = aio_resilient_channel(target, throttle=throttle)
    else:
        channel = grpc.aio.insecure_channel(
            target, interceptors=aio_client_interceptors(target=target, throttle=throttle)
        )
    throttled = 0
    async with channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        for _ in range(CALLS):
            try:
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
            except ThrottledError:
                throttled += 1
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
    sent = len(servicer.state.calls_to(GET_BALANCE))
    assert sent + throttled == CALLS and sent < 0.25 * CALLS


def test_a_bad_throttle_argument_names_the_field() -> None:
    with pytest.raises(ValueError, match="throttle"):
        client_interceptors(throttle=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="throttle"):
        aio_resilient_channel("127.0.0.1:1", throttle="sre")  # type: ignore[arg-type]
