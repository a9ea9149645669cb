"""Adversarial review 9: deadlines, pushback, native retries and accounting (issue 9, items 2, 3,
5, 6, 8), sync and aio, through ``resilient_channel`` and ``client_interceptors``.

The server records the deadline each attempt arrived with (``context.time_remaining()``) and
when; the client side counts the breaker's failures, the throttle's ``(requests, accepts)``
(one per recorded outcome) and the retry budget's balance.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pybreaker
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, WATCH, AioLedger, Fault, SyncLedger, serve, serve_aio
from resilient_grpc import (
    AdaptiveThrottle,
    CircuitBreaker,
    HedgingPolicy,
    IdempotencyKeys,
    RetryBudget,
    RetryPolicy,
)
from resilient_grpc.aio.client import client_interceptors as aio_client_interceptors
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import client_interceptors, resilient_channel
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import BreakerOpenError, attempts_of, reason_of
from tests.helpers import BALANCE_REQUEST

WATCH_REQUEST = ledger_pb2.WatchRequest(account="alice", count=2)
#: A deadline the server reports as more than this is no deadline at all.
NO_DEADLINE = 1e6


class FailureCount(pybreaker.CircuitBreakerListener):  # type: ignore[misc]
    """Counts the failures fed to the breaker (its own counter resets on every success)."""

    def __init__(self) -> None:
        self.failures = 0

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.failures += 1


class Stack:
    def __init__(self, **overrides: Any) -> None:
        self.budget = RetryBudget(ratio=1.0, min_retries_per_second=10.0, window=60.0)
        self.counted = FailureCount()
        self.breaker = CircuitBreaker(
            fail_max=1000, reset_timeout=30, failure_rate=0.0, listeners=[self.counted]
        )
        self.throttle = AdaptiveThrottle(window=60.0, uniform=lambda: 1.0)  # never rejects
        self.values: dict[str, Any] = {
            "budget": self.budget,
            "breaker": self.breaker,
            "throttle": self.throttle,
            "idempotency": IdempotencyKeys(),
            **overrides,
        }
        self.breaker = self.values["breaker"]

    def failures(self, target: str) -> int:
        return self.counted.failures


class Deadlines(SyncLedger):
    """Records (arrival, seconds left) of every GetBalance attempt; ``delay`` slows each one."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, float]] = []
        self.delay = 0.0

    def GetBalance(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.seen.append((time.monotonic(), context.time_remaining()))
        if self.delay:
            time.sleep(self.delay)
        return super().GetBalance(request, context)


class AioDeadlines(AioLedger):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, float]] = []
        self.delay = 0.0

    async def GetBalance(self, request: Any, context: Any) -> Any:
        self.seen.append((time.monotonic(), context.time_remaining()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().GetBalance(request, context)


class SyncSide:
    def __init__(self, how: str) -> None:
        self.how = how
        self.servicer = Deadlines()
        self.server, port, _ = serve(self.servicer)
        self.target = f"127.0.0.1:{port}"
        self.channels: list[grpc.Channel] = []

    def stub(self, stack: Stack) -> ledger_pb2_grpc.LedgerStub:
        if self.how == "channel":
            channel = resilient_channel(self.target, **stack.values)
        else:
            channel = grpc.intercept_channel(
                grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)]),
                *client_interceptors(target=self.target, **stack.values),
            )
        self.channels.append(channel)
        return ledger_pb2_grpc.LedgerStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.server.stop(None)


class AioSide:
    def __init__(self, how: str) -> None:
        self.how = how
        self.servicer = AioDeadlines()
        self.channels: list[grpc.aio.Channel] = []

    async def start(self) -> AioSide:
        self.server, port, _ = await serve_aio(self.servicer)
        self.target = f"127.0.0.1:{port}"
        return self

    def stub(self, stack: Stack) -> ledger_pb2_grpc.LedgerStub:
        if self.how == "channel":
            channel = aio_resilient_channel(self.target, **stack.values)
        else:
            channel = grpc.aio.insecure_channel(
                self.target,
                options=[("grpc.enable_retries", 0)],
                interceptors=aio_client_interceptors(target=self.target, **stack.values),
            )
        self.channels.append(channel)
        return ledger_pb2_grpc.LedgerStub(channel)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.server.stop(None)


@pytest.fixture(params=["channel", "interceptors"])
def sync_side(request: pytest.FixtureRequest) -> Iterator[SyncSide]:
    side = SyncSide(request.param)
    yield side
    side.close()


@pytest.fixture(params=["channel", "interceptors"])
async def aio_side(request: pytest.FixtureRequest) -> AsyncIterator[AioSide]:
    side = await AioSide(request.param).start()
    yield side
    await side.close()


# Item 3: no deadline the caller did not ask for ------------------------------------------------

RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


def test_no_attempt_of_a_call_without_deadline_gets_one(sync_side: SyncSide) -> None:
    stub = sync_side.stub(Stack(retry=RETRY))
    sync_side.servicer.state.faults.fail_times(GET_BALANCE, 2)
    stub.GetBalance(BALANCE_REQUEST)
    stub.GetBalance.future(BALANCE_REQUEST).result(timeout=5)
    left = [remaining for _, remaining in sync_side.servicer.seen]
    assert len(left) == 4 and all(remaining > NO_DEADLINE for remaining in left), left


async def test_aio_no_attempt_of_a_call_without_deadline_gets_one(aio_side: AioSide) -> None:
    stub = aio_side.stub(Stack(retry=RETRY))
    aio_side.servicer.state.faults.fail_times(GET_BALANCE, 2)
    await stub.GetBalance(BALANCE_REQUEST)
    left = [remaining for _, remaining in aio_side.servicer.seen]
    # grpc.aio's servicer context says None for "no deadline"
    assert len(left) == 3 and all(remaining is None for remaining in left), left


def test_no_hedged_copy_of_a_call_without_deadline_gets_one(sync_side: SyncSide) -> None:
    hedging = HedgingPolicy(max_attempts=3, delay=0.05)
    stub = sync_side.stub(Stack(hedging=hedging))
    sync_side.servicer.state.faults.fail_times(GET_BALANCE, 2)
    stub.GetBalance.future(BALANCE_REQUEST).result(timeout=5)
    left = [remaining for _, remaining in sync_side.servicer.seen]
    assert len(left) == 3 and all(remaining > NO_DEADLINE for remaining in left), left


# Item 5: per-attempt timeouts inside the caller's deadline ---------------------------------------

CUT = RetryPolicy(
    max_attempts=5, initial_backoff=0.01, max_backoff=0.01, jitter="none", per_attempt_timeout=0.2
)


def _check_cut_call(seen: list[tuple[float, float]], started: float, ended: float) -> None:
    # 0.2 s, 0.2 s, then the rest of the 0.5 s deadline: never past it
    assert len(seen) == 3, seen
    for arrival, remaining in seen:
        assert arrival + remaining <= started + 0.5 + 0.05
    assert seen[0][1] <= 0.2 + 0.05 and seen[1][1] <= 0.2 + 0.05
    assert ended - started < 0.5 + 0.15


def test_per_attempt_timeouts_are_retried_only_while_the_deadline_lives(
    sync_side: SyncSide,
) -> None:
    stack = Stack(retry=CUT)
    stub = sync_side.stub(stack)
    sync_side.servicer.delay = 1.0
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST, timeout=0.5)
    ended = time.monotonic()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert attempts_of(caught.value) == 3
    _check_cut_call(sync_side.servicer.seen, started, ended)
    # the two attempts the per-attempt timeout cut count; the caller's own deadline does not
    assert stack.failures(sync_side.target) == 2
    assert stack.throttle.counts == (2, 0)


async def test_aio_per_attempt_timeouts_are_retried_only_while_the_deadline_lives(
    aio_side: AioSide,
) -> None:
    stack = Stack(retry=CUT)
    stub = aio_side.stub(stack)
    aio_side.servicer.delay = 1.0
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST, timeout=0.5)
    ended = time.monotonic()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert attempts_of(caught.value) == 3
    _check_cut_call(aio_side.servicer.seen, started, ended)
    assert stack.failures(aio_side.target) == 2
    assert stack.throttle.counts == (2, 0)


def test_a_servers_deadline_exceeded_listed_as_retryable_is_retried_and_counts(
    sync_side: SyncSide,
) -> None:
    retry = RetryPolicy(
        max_attempts=3,
        initial_backoff=0.01,
        max_backoff=0.02,
        retryable_codes={grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED},
    )
    stack = Stack(retry=retry)
    stub = sync_side.stub(stack)
    sync_side.servicer.state.faults.fail_times(
        GET_BALANCE, 1, Fault(code=grpc.StatusCode.DEADLINE_EXCEEDED)
    )
    assert stub.GetBalance(BALANCE_REQUEST, timeout=5).account == "alice"
    assert len(sync_side.servicer.seen) == 2
    assert stack.failures(sync_side.target) == 1  # the server's own DEADLINE_EXCEEDED counts
    assert stack.throttle.counts == (2, 1)


MANY = 40


def test_the_callers_own_deadline_never_counts_however_tight(sync_side: SyncSide) -> None:
    """Many calls whose deadline expires mid-attempt: gRPC's deadline and the stack's own
    reckoning of it must agree every time (rounding must not make one look like the server's)."""
    stack = Stack()
    stub = sync_side.stub(stack)
    sync_side.servicer.delay = 0.3  # far past the deadline, even on a loaded machine
    for _ in range(MANY):
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalance(BALANCE_REQUEST, timeout=0.01)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stack.failures(sync_side.target) == 0
    assert stack.throttle.counts == (0, 0)


def test_every_attempt_a_per_attempt_timeout_cuts_is_retried(sync_side: SyncSide) -> None:
    """The same agreement for ``per_attempt_timeout``: each cut attempt is retried once."""
    retry = RetryPolicy(
        max_attempts=2, initial_backoff=0.001, max_backoff=0.001, per_attempt_timeout=0.01
    )
    stub = sync_side.stub(Stack(retry=retry))
    sync_side.servicer.delay = 0.3  # far past the deadline, even on a loaded machine
    for _ in range(MANY // 2):
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalance(BALANCE_REQUEST)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert attempts_of(caught.value) == 2


async def test_aio_the_callers_own_deadline_never_counts_however_tight(aio_side: AioSide) -> None:
    stack = Stack()
    stub = aio_side.stub(stack)
    aio_side.servicer.delay = 0.3  # far past the deadline, even on a loaded machine
    for _ in range(MANY):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(BALANCE_REQUEST, timeout=0.01)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stack.failures(aio_side.target) == 0
    assert stack.throttle.counts == (0, 0)


# Item 6: pushback bounds -----------------------------------------------------------------------

BOUNDED = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, max_pushback=0.2)


def test_int32_max_pushback_is_capped_and_one_more_stops(sync_side: SyncSide) -> None:
    stub = sync_side.stub(Stack(retry=BOUNDED))
    faults = sync_side.servicer.state.faults
    faults.add(GET_BALANCE, Fault(pushback_ms=str(2**31 - 1)))
    started = time.monotonic()
    stub.GetBalance(BALANCE_REQUEST)  # no deadline: max_pushback alone bounds the wait
    assert time.monotonic() - started < 1.0
    first, second = (arrival for arrival, _ in sync_side.servicer.seen)
    assert second - first >= 0.19

    faults.add(GET_BALANCE, Fault(pushback_ms=str(2**31)))  # beyond int32: malformed
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetBalance(BALANCE_REQUEST)
    assert reason_of(caught.value) is Reason.PUSHBACK_STOP
    assert len(sync_side.servicer.seen) == 3


async def test_aio_int32_max_pushback_is_capped_and_one_more_stops(aio_side: AioSide) -> None:
    stub = aio_side.stub(Stack(retry=BOUNDED))
    faults = aio_side.servicer.state.faults
    faults.add(GET_BALANCE, Fault(pushback_ms=str(2**31 - 1)))
    await asyncio.wait_for(stub.GetBalance(BALANCE_REQUEST), 1.0)
    faults.add(GET_BALANCE, Fault(pushback_ms=str(2**31)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(BALANCE_REQUEST)
    assert reason_of(caught.value) is Reason.PUSHBACK_STOP
    assert len(aio_side.servicer.seen) == 3


def test_a_huge_retry_info_delay_is_capped_too(sync_side: SyncSide) -> None:
    stub = sync_side.stub(Stack(retry=BOUNDED))
    sync_side.servicer.state.faults.add(GET_BALANCE, Fault(retry_info=3600.0 * 24 * 365))
    started = time.monotonic()
    stub.GetBalance(BALANCE_REQUEST)
    assert time.monotonic() - started < 1.0
    assert len(sync_side.servicer.seen) == 2


A6 = RetryPolicy(
    max_attempts=5, initial_backoff=0.1, max_backoff=1.0, multiplier=4.0, jitter="none"
)


def _gaps(seen: list[tuple[float, float]]) -> list[float]:
    arrivals = [arrival for arrival, _ in seen]
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def test_backoff_restarts_from_initial_after_a_pushback(sync_side: SyncSide) -> None:
    """Computed 0.1 s, 0.4 s; a 0 ms pushback; the next computed one is 0.1 s again, not 1 s."""
    stub = sync_side.stub(Stack(retry=A6))
    sync_side.servicer.state.faults.add(
        GET_BALANCE, Fault(), Fault(), Fault(pushback_ms="0"), Fault()
    )
    stub.GetBalance(BALANCE_REQUEST, timeout=5)
    gaps = _gaps(sync_side.servicer.seen)
    assert len(gaps) == 4
    assert 0.09 <= gaps[0] < 0.3 and 0.39 <= gaps[1] < 0.6 and gaps[2] < 0.08
    assert 0.09 <= gaps[3] < 0.3, gaps  # A6: restarted from initial_backoff


async def test_aio_backoff_restarts_from_initial_after_a_pushback(aio_side: AioSide) -> None:
    stub = aio_side.stub(Stack(retry=A6))
    aio_side.servicer.state.faults.add(
        GET_BALANCE, Fault(), Fault(), Fault(pushback_ms="0"), Fault()
    )
    await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    gaps = _gaps(aio_side.servicer.seen)
    assert len(gaps) == 4 and 0.09 <= gaps[3] < 0.3, gaps


def test_a_hedge_pushback_of_int32_max_is_capped_and_one_more_stops_hedging(
    sync_side: SyncSide,
) -> None:
    hedging = HedgingPolicy(max_attempts=3, delay=5.0, max_pushback=0.2)
    stub = sync_side.stub(Stack(hedging=hedging))
    faults = sync_side.servicer.state.faults
    faults.add(GET_BALANCE, Fault(pushback_ms=str(2**31 - 1)))
    started = time.monotonic()
    stub.GetBalance.future(BALANCE_REQUEST).result(timeout=5)
    assert time.monotonic() - started < 1.0
    first, second = (arrival for arrival, _ in sync_side.servicer.seen)
    assert second - first >= 0.19

    faults.add(GET_BALANCE, Fault(pushback_ms=str(2**31)))
    with pytest.raises(grpc.RpcError):
        stub.GetBalance.future(BALANCE_REQUEST).result(timeout=5)
    assert len(sync_side.servicer.seen) == 3  # hedging stopped: no second copy


# Item 2: native retries stay off --------------------------------------------------------------

NATIVE = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "ledger.v1.Ledger"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.01s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
FIVE = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.02)


@pytest.mark.parametrize(
    "options",
    [
        [("grpc.service_config", NATIVE)],  # gRPC's retries are on by default
        [("grpc.enable_retries", True), ("grpc.service_config", NATIVE.encode())],
        [("grpc.service_config", NATIVE), ("grpc.enable_retries", 1), ("grpc.enable_retries", 1)],
    ],
    ids=["default-on", "bool-and-bytes", "repeated"],
)
def test_a_service_config_never_multiplies_attempts(
    ledger: tuple[SyncLedger, int], options: list[tuple[str, Any]]
) -> None:
    servicer, port = ledger
    servicer.state.faults.fail_times(GET_BALANCE, 50)
    with pytest.warns(RuntimeWarning, match="native retries"):
        channel = resilient_channel(
            f"127.0.0.1:{port}", retry=FIVE, idempotency=IdempotencyKeys(), options=options
        )
    with channel, pytest.raises(grpc.RpcError):
        ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=10)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 5


async def test_aio_a_service_config_never_multiplies_attempts_under_user_interceptors(
    aio_ledger: tuple[AioLedger, int],
) -> None:
    servicer, port = aio_ledger
    servicer.state.faults.fail_times(GET_BALANCE, 50)

    class Passthrough(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(details, request)

    with pytest.warns(RuntimeWarning, match="native retries"):
        channel = aio_resilient_channel(
            f"127.0.0.1:{port}",
            retry=FIVE,
            idempotency=IdempotencyKeys(),
            options=[("grpc.service_config", NATIVE)],
            interceptors=[Passthrough()],
        )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await ledger_pb2_grpc.LedgerStub(channel).GetBalance(BALANCE_REQUEST, timeout=10)
    assert len(servicer.state.calls_to(GET_BALANCE)) == 5


def test_options_without_native_retries_give_no_warning(ledger: tuple[SyncLedger, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        channel = resilient_channel(
            f"127.0.0.1:{ledger[1]}",
            options=[("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 1 << 20)],
        )
    channel.close()


# Item 8: only calls that were sent are traffic ---------------------------------------------------


def test_refused_streams_and_hedged_calls_do_not_feed_the_budget(sync_side: SyncSide) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60, failure_rate=0.0, probe_every=None)
    hedging = HedgingPolicy(max_attempts=2, delay=0.05, methods=[GET_BALANCE])
    stack = Stack(retry=RETRY, hedging=hedging, breaker=breaker)
    stub = sync_side.stub(stack)
    sync_side.servicer.state.faults.fail_times(GET_BALANCE, 2)
    with pytest.raises(grpc.RpcError):
        stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result(timeout=5)  # opens it
    balance = stack.budget.balance
    for _ in range(50):
        with pytest.raises(BreakerOpenError):
            stub.GetBalance.future(BALANCE_REQUEST, timeout=5).result(timeout=5)
        with pytest.raises(BreakerOpenError):
            list(stub.Watch(WATCH_REQUEST, timeout=5))
    assert stack.budget.balance == balance
    assert len(sync_side.servicer.state.calls_to(WATCH)) == 0


async def test_aio_refused_streams_and_hedged_calls_do_not_feed_the_budget(
    aio_side: AioSide,
) -> None:
    breaker = CircuitBreaker(fail_max=1, reset_timeout=60, failure_rate=0.0, probe_every=None)
    hedging = HedgingPolicy(max_attempts=2, delay=0.05, methods=[GET_BALANCE])
    stack = Stack(retry=RETRY, hedging=hedging, breaker=breaker)
    stub = aio_side.stub(stack)
    aio_side.servicer.state.faults.fail_times(GET_BALANCE, 2)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
    balance = stack.budget.balance
    for _ in range(50):
        with pytest.raises(BreakerOpenError):
            await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        with pytest.raises(BreakerOpenError):
            async for _ in stub.Watch(WATCH_REQUEST, timeout=5):
                pass
    assert stack.budget.balance == balance


def test_a_retry_refused_by_the_breaker_after_its_backoff_is_refunded(
    sync_side: SyncSide,
) -> None:
    breaker = CircuitBreaker(fail_max=2, reset_timeout=60, failure_rate=0.0, probe_every=None)
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.3, max_backoff=0.3, jitter="none")
    stack = Stack(retry=retry, breaker=breaker)
    stack.budget = stack.values["budget"] = RetryBudget(
        ratio=1.0, min_retries_per_second=0.0, window=60.0
    )
    stub = sync_side.stub(stack)
    sync_side.servicer.state.faults.fail_times(GET_BALANCE, 2)
    first = stub.GetBalance.future(BALANCE_REQUEST, timeout=5)  # fails, backs off 0.3 s
    deadline = time.monotonic() + 3
    while len(sync_side.servicer.seen) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError):  # the second failure opens the breaker
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        first.result(timeout=5)  # its retry is refused: the breaker is open
    assert reason_of(caught.value) is Reason.BREAKER_OPEN
    assert len(sync_side.servicer.seen) == 2
    assert stack.budget.balance == 2.0  # two calls sent, no retry sent


def test_a_hedged_call_against_the_callers_own_deadline_never_counts(sync_side: SyncSide) -> None:
    stack = Stack(hedging=HedgingPolicy(max_attempts=2, delay=0.005))
    stub = sync_side.stub(stack)
    sync_side.servicer.delay = 0.3  # far past the deadline, even on a loaded machine
    for _ in range(MANY // 2):
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalance.future(BALANCE_REQUEST, timeout=0.02).result(timeout=5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stack.failures(sync_side.target) == 0
    assert stack.throttle.counts == (0, 0)


async def test_aio_a_hedged_call_against_the_callers_own_deadline_never_counts(
    aio_side: AioSide,
) -> None:
    stack = Stack(hedging=HedgingPolicy(max_attempts=2, delay=0.005))
    stub = aio_side.stub(stack)
    aio_side.servicer.delay = 0.3  # far past the deadline, even on a loaded machine
    for _ in range(MANY // 2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetBalance(BALANCE_REQUEST, timeout=0.02)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stack.failures(aio_side.target) == 0
    assert stack.throttle.counts == (0, 0)
