"""Ledgers for the hedging tests: the first attempt of a call is the slow replica.

An attempt is told apart by its ``grpc-previous-rpc-attempts`` header (absent on the first).
GetBalance's first attempt holds until the client cancels it (recorded in ``cancelled``);
Transfer's first attempt executes at once and then answers ``slow`` seconds later (a slow
replica, or a late response, whose effect happened), so executions can be counted with and
without server dedup.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc

from protos import ledger_pb2
from protos.ledger_service import GET_BALANCE, TRANSFER, AioLedger, SyncLedger

PREVIOUS = "grpc-previous-rpc-attempts"


def attempt_number(metadata: Any) -> int:
    """1 for a first attempt, n + 1 for one that says n attempts came before."""
    for key, value in metadata or ():
        if key == PREVIOUS:
            return int(value) + 1
    return 1


class HedgeLedger(SyncLedger):
    """A sync ledger whose first attempts are slow (see the module docstring)."""

    def __init__(self, *, hold: float = 10.0, slow: float = 0.5) -> None:
        super().__init__()
        self.hold = hold
        self.slow = slow
        self.slow_first = True
        self._lock = threading.Lock()
        #: Attempt numbers whose handler saw the client cancel them.
        self.cancelled: list[int] = []

    def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.BalanceReply:
        number = attempt_number(context.invocation_metadata())
        if number == 1 and self.slow_first:
            self.state.record(GET_BALANCE, context.invocation_metadata())
            gone = threading.Event()
            context.add_callback(gone.set)
            if gone.wait(self.hold) and not context.is_active():
                with self._lock:
                    self.cancelled.append(number)
            return self.state.balance(request.account)
        return super().GetBalance(request, context)

    def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.ServicerContext
    ) -> ledger_pb2.TransferReply:
        reply = super().Transfer(request, context)
        if attempt_number(context.invocation_metadata()) == 1 and self.slow_first:
            time.sleep(self.slow)
        return reply

    def cancellations(self, count: int, within: float = 10.0) -> int:
        """Wait (bounded) until ``count`` cancellations were seen; return how many were."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.cancelled) >= count:
                    break
            time.sleep(0.01)
        with self._lock:
            return len(self.cancelled)


class AioHedgeLedger(AioLedger):
    """The ``grpc.aio`` twin of :class:`HedgeLedger` (a cancelled handler gets CancelledError)."""

    def __init__(self, *, hold: float = 10.0, slow: float = 0.5) -> None:
        super().__init__()
        self.hold = hold
        self.slow = slow
        self.slow_first = True
        self.cancelled: list[int] = []

    async def GetBalance(
        self, request: ledger_pb2.BalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.BalanceReply:
        number = attempt_number(context.invocation_metadata())
        if number == 1 and self.slow_first:
            self.state.record(GET_BALANCE, context.invocation_metadata() or ())
            try:
                await asyncio.sleep(self.hold)
            except asyncio.CancelledError:
                self.cancelled.append(number)
                raise
            return self.state.balance(request.account)
        return await super().GetBalance(request, context)

    async def Transfer(
        self, request: ledger_pb2.TransferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.TransferReply:
        reply = await super().Transfer(request, context)
        if attempt_number(context.invocation_metadata()) == 1 and self.slow_first:
            await asyncio.sleep(self.slow)
        return reply

    async def cancellations(self, count: int, within: float = 10.0) -> int:
        """Wait (bounded) until ``count`` cancellations were seen; return how many were."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while len(self.cancelled) < count and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return len(self.cancelled)


__all__ = ["PREVIOUS", "TRANSFER", "AioHedgeLedger", "HedgeLedger", "attempt_number"]
