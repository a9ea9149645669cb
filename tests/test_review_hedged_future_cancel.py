"""Adversarial review: a sync hedged future cancelled while another thread is sending a copy.

The hedge is sent by the shared timer thread. When what sends it is slow (an interceptor below
the stack fetching a token, a channel blocked on flow control), the caller may cancel the future
meanwhile. ``cancel()`` returning True must mean what it means for a ``grpc.Future``: the future
is cancelled and done at once, ``result()`` raises ``FutureCancelledError`` without waiting for
that send, the done callbacks have run, and the copy the other thread was sending is cancelled
as soon as it exists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE
from resilient_grpc import IdempotencyKeys
from resilient_grpc.client import client_interceptors
from resilient_grpc.core.hedging import HedgingPolicy
from tests.hedging_fixtures import HedgeLedger, attempt_number

BALANCE = ledger_pb2.BalanceRequest(account="alice")


class HoldSecondCopy(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Below the resilient stack: the send of the second copy waits for the test's gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        if attempt_number(client_call_details.metadata) == 2:
            self.entered.set()
            assert self.gate.wait(10)
        return continuation(client_call_details, request)


def test_cancel_while_the_timer_thread_sends_a_copy_is_done_at_once(
    hedge_ledger: tuple[HedgeLedger, int],
) -> None:
    servicer, port = hedge_ledger
    target = f"127.0.0.1:{port}"
    hold = HoldSecondCopy()
    channel = grpc.intercept_channel(
        grpc.intercept_channel(
            grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]), hold
        ),
        *client_interceptors(
            target=target,
            hedging=HedgingPolicy(max_attempts=2, delay=0.05),
            idempotency=IdempotencyKeys(),
        ),
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        future = stub.GetBalance.future(BALANCE, timeout=15)
        called: list[object] = []
        future.add_done_callback(called.append)
        assert hold.entered.wait(10)  # the timer thread is sending the second copy

        try:
            assert future.cancel() is True
            assert future.cancelled() and future.done()
            assert called == [future]
            with pytest.raises(grpc.FutureCancelledError):
                future.result(timeout=1)  # not after the slow send
            assert future.cancel() is False
        finally:
            hold.gate.set()

        # The copy that was on its way is cancelled once it exists; nothing else is sent.
        assert servicer.cancellations(1) == 1  # the first copy saw the cancellation
        time.sleep(0.3)  # a third copy (max_attempts=2: none) or a retry would be seen by now
        assert 1 <= len(servicer.state.calls_to(GET_BALANCE)) <= 2
    finally:
        channel.close()
