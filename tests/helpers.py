"""Values and clocks that many test files share (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import pybreaker

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import RetryPolicy
from resilient_grpc import client as sync_client
from resilient_grpc.aio import client as aio_client

#: Retries that back off for milliseconds, so retrying tests stay fast.
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)

BALANCE_REQUEST = ledger_pb2.BalanceRequest(account="alice")
TRANSFER_REQUEST = ledger_pb2.TransferRequest(from_account="alice", to_account="bob", amount=5)


def run_threads(work: Callable[[], object], count: int, timeout: float = 30.0) -> None:
    """Run ``work`` on ``count`` threads at once and join them (each within ``timeout`` s)."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` every 5 ms until it is true; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout:g} s: {what}"
        time.sleep(0.005)


async def until(
    condition: Callable[[], object], what: str = "condition", timeout: float = 5.0
) -> None:
    """:func:`wait_for` on the event loop: poll every 10 ms without blocking it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"not reached in {timeout:g} s: {what}"
        await asyncio.sleep(0.01)


class GatedStorage(pybreaker.CircuitMemoryStorage):
    """In-memory breaker state whose reads, while :meth:`holds` says so, wait for the test to
    open ``gate`` (``entered`` is set first): a breaker store that stalls on demand."""

    def __init__(self) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def holds(self) -> bool:
        """Whether this read waits: the first read after the test set ``armed`` (disarms it)."""
        if self.armed:
            self.armed = False
            return True
        return False

    @property
    def state(self) -> str:
        if self.holds():
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return str(super().state)

    @state.setter
    def state(self, value: str) -> None:
        pybreaker.CircuitMemoryStorage.state.fset(self, value)  # type: ignore[attr-defined]


def native_retry_options(
    *, max_attempts: int, initial: str, maximum: str, multiplier: float, codes: list[str]
) -> list[tuple[str, Any]]:
    """Channel options for gRPC's *own* retries of every ledger method (written by hand, not
    by the library under test): a service config with one ``retryPolicy``."""
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": initial,
        "maxBackoff": maximum,
        "backoffMultiplier": multiplier,
        "retryableStatusCodes": codes,
    }
    config = {"methodConfig": [{"name": [{"service": "ledger.v1.Ledger"}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


#: Channel options that turn gRPC core's own retries off (else it drops an application-set
#: ``grpc-previous-rpc-attempts`` header and may retry transparently below the stack).
RETRIES_OFF = [("grpc.enable_retries", 0)]

#: ``make(**stack)``: a ledger stub whose channel has the resilience ``stack`` (retry=, budget=, ...).
MakeStub = Callable[..., ledger_pb2_grpc.LedgerStub]


@contextlib.contextmanager
def stub_maker(
    target: str, how: str = "channel", options: Sequence[tuple[str, Any]] = ()
) -> Iterator[MakeStub]:
    """Sync stubs on ``target`` with the stack attached as ``resilient_channel`` (``how ==
    "channel"``) or as ``client_interceptors`` on ``grpc.intercept_channel`` over a plain channel
    with ``options`` (any other ``how``); every channel made is closed at exit."""
    channels: list[grpc.Channel] = []

    def make(**stack: Any) -> ledger_pb2_grpc.LedgerStub:
        if how == "channel":
            channel = sync_client.resilient_channel(target, **stack)
        else:
            channel = grpc.intercept_channel(
                grpc.insecure_channel(target, options=list(options)),
                *sync_client.client_interceptors(target=target, **stack),
            )
        channels.append(channel)
        return ledger_pb2_grpc.LedgerStub(channel)

    try:
        yield make
    finally:
        for channel in channels:
            channel.close()


@contextlib.asynccontextmanager
async def aio_stub_maker(
    target: str, how: str = "channel", options: Sequence[tuple[str, Any]] = ()
) -> AsyncIterator[MakeStub]:
    """:func:`stub_maker` for ``grpc.aio``: ``resilient_channel``, or ``client_interceptors`` on
    ``grpc.aio.insecure_channel`` with ``options``."""
    channels: list[grpc.aio.Channel] = []

    def make(**stack: Any) -> ledger_pb2_grpc.LedgerStub:
        if how == "channel":
            channel = aio_client.resilient_channel(target, **stack)
        else:
            channel = grpc.aio.insecure_channel(
                target,
                options=list(options),
                interceptors=aio_client.client_interceptors(target=target, **stack),
            )
        channels.append(channel)
        return ledger_pb2_grpc.LedgerStub(channel)

    try:
        yield make
    finally:
        for channel in channels:
            await channel.close()


class FakeClock:
    """A clock the test moves by hand (``clock.now += 0.5``), for the sans-IO core's ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ShiftedClock:
    """A real clock plus an offset the test moves (:meth:`advance`): expiry can be jumped to in
    no time, while a store's waits on the same clock still time out as they would for real."""

    def __init__(self, base: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self.base() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
