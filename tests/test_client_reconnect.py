"""``reconnect_wait`` bounds only the wait for a reconnect, never the attempt (issue 9, item 3).

The server stops and comes back on the same port; the restarted server's handler takes 1.5 s,
three times ``reconnect_wait``. A call without a deadline must get its answer, as plain gRPC
gives it, instead of a DEADLINE_EXCEEDED nobody asked for.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, AioLedger, Fault, SyncLedger, serve, serve_aio
from resilient_grpc import RetryPolicy
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import resilient_channel
from tests.helpers import BALANCE_REQUEST

RETRIES = RetryPolicy(
    max_attempts=5,
    initial_backoff=0.05,
    max_backoff=0.05,
    jitter="none",
    idempotent_methods=[GET_BALANCE],
)
RECONNECT_WAIT = 0.5
SLOW_HANDLER = 1.5
#: A quick reconnect (gRPC's default first backoff is 1 s): the wait is about the handler.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
]


def _slow_servicer(kind: type[Any]) -> Any:
    servicer = kind()
    servicer.state.faults.add(GET_BALANCE, Fault(code=None, delay=SLOW_HANDLER))
    return servicer


def test_a_slow_attempt_after_a_reconnect_is_not_cut() -> None:
    server, port, _ = serve()
    restarted: list[Any] = []
    channel = resilient_channel(
        f"127.0.0.1:{port}", retry=RETRIES, reconnect_wait=RECONNECT_WAIT, options=FAST_RECONNECT
    )

    def restart() -> None:
        time.sleep(0.1)
        restarted.append(serve(_slow_servicer(SyncLedger), port=port))

    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
        server.stop(None).wait(5)
        thread = threading.Thread(target=restart)
        thread.start()
        reply = stub.GetBalance(BALANCE_REQUEST)  # no deadline: none may be invented
        thread.join(5)
        assert reply.account == "alice"
        assert len(restarted[0][2].state.calls_to(GET_BALANCE)) == 1
    finally:
        channel.close()
        for again, _, _ in restarted:
            again.stop(None)


async def test_aio_a_slow_attempt_after_a_reconnect_is_not_cut() -> None:
    server, port, _ = await serve_aio()
    restarted: list[Any] = []
    channel = aio_resilient_channel(
        f"127.0.0.1:{port}", retry=RETRIES, reconnect_wait=RECONNECT_WAIT, options=FAST_RECONNECT
    )

    async def restart() -> None:
        await asyncio.sleep(0.1)
        restarted.append(await serve_aio(_slow_servicer(AioLedger), port=port))

    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        await server.stop(None)
        restarter = asyncio.create_task(restart())
        try:
            reply = await stub.GetBalance(BALANCE_REQUEST)
        finally:
            await asyncio.wait_for(restarter, 5)
        assert reply.account == "alice"
        assert len(restarted[0][2].state.calls_to(GET_BALANCE)) == 1
    finally:
        await channel.close()
        for again, _, _ in restarted:
            await again.stop(None)


def test_the_wait_itself_is_bounded_when_nothing_comes_back() -> None:
    server, port, _ = serve()
    channel = resilient_channel(
        f"127.0.0.1:{port}",
        retry=RETRIES.with_changes(max_attempts=2),
        reconnect_wait=RECONNECT_WAIT,
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
        server.stop(None).wait(5)
        started = time.monotonic()
        try:
            stub.GetBalance(BALANCE_REQUEST)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        else:
            raise AssertionError("the server is gone: the call cannot succeed")
        assert time.monotonic() - started < RECONNECT_WAIT + 2.0
    finally:
        channel.close()
