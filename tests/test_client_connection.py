"""A real dropped connection: the server stops and comes back on the same port.

After the connection drops, the first attempt makes the channel reconnect; the connect is
refused, the channel enters TRANSIENT_FAILURE and waits out its reconnect backoff (about 1 s).
In that window gRPC fails new RPCs at once, even after the server is back, so plain retries
burn every attempt in a fraction of a second. The stack's retry attempts use wait_for_ready
(bounded by the deadline), so they wait for the reconnect instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, serve, serve_aio
from resilient_grpc import RetryPolicy
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.client import resilient_channel
from resilient_grpc.core.retry import Reason
from resilient_grpc.errors import attempts_of, reason_of
from tests.helpers import BALANCE_REQUEST

# 5 attempts 50 ms apart: all of them fall inside the channel's ~1 s reconnect backoff.
QUICK_RETRIES = RetryPolicy(
    max_attempts=5,
    initial_backoff=0.05,
    max_backoff=0.05,
    multiplier=1.0,
    jitter="none",
    idempotent_methods=[GET_BALANCE],
)
RESTART_AFTER = 0.1


def restart_later(port: int, servers: list[Any]) -> threading.Thread:
    """Start a new sync ledger on ``port`` after RESTART_AFTER seconds (in a thread)."""

    def run() -> None:
        time.sleep(RESTART_AFTER)
        servers.append(serve(port=port))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("reconnect_wait", [None, 5.0], ids=["fail-fast", "wait-for-ready"])
def test_retries_survive_a_dropped_connection(reconnect_wait: float | None) -> None:
    server, port, _ = serve()
    servers: list[Any] = []
    channel = resilient_channel(
        f"127.0.0.1:{port}", retry=QUICK_RETRIES, reconnect_wait=reconnect_wait
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)  # connected
        server.stop(None).wait(5)  # the connection drops; the port is closed
        restarter = restart_later(port, servers)
        started = time.monotonic()
        if reconnect_wait is None:
            # Without wait_for_ready every retry fails at once: the call is lost although
            # the server is back after 0.1 s.
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetBalance(BALANCE_REQUEST, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert attempts_of(caught.value) == 5
            assert reason_of(caught.value) is Reason.MAX_ATTEMPTS
            assert time.monotonic() - started < 0.8  # all 5 burned inside the reconnect window
            restarter.join(5)
            assert servers[0][2].state.calls_to(GET_BALANCE) == []
        else:
            reply = stub.GetBalance(BALANCE_REQUEST, timeout=5)
            assert reply.account == "alice"
            restarter.join(5)
            # the retry waited for the reconnect and reached the restarted server once
            assert len(servers[0][2].state.calls_to(GET_BALANCE)) == 1
    finally:
        channel.close()
        for restarted, _, _ in servers:
            restarted.stop(None)


def test_wait_for_ready_retry_is_bounded_without_a_deadline() -> None:
    server, port, _ = serve()
    policy = QUICK_RETRIES.with_changes(max_attempts=2)
    channel = resilient_channel(f"127.0.0.1:{port}", retry=policy, reconnect_wait=0.3)
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
        server.stop(None).wait(5)  # and it never comes back
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalance(BALANCE_REQUEST)  # no deadline at all
        assert time.monotonic() - started < 3.0  # did not hang waiting for the server
        assert caught.value.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNAVAILABLE,
        )
        assert attempts_of(caught.value) == 2
    finally:
        channel.close()


@pytest.mark.parametrize("reconnect_wait", [None, 5.0], ids=["fail-fast", "wait-for-ready"])
async def test_aio_retries_survive_a_dropped_connection(reconnect_wait: float | None) -> None:
    server, port, _ = await serve_aio()
    channel = aio_resilient_channel(
        f"127.0.0.1:{port}", retry=QUICK_RETRIES, reconnect_wait=reconnect_wait
    )
    restarted: list[Any] = []

    async def restart() -> None:
        await asyncio.sleep(RESTART_AFTER)
        restarted.append(await serve_aio(port=port))

    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        await server.stop(None)
        restarter = asyncio.create_task(restart())
        started = time.monotonic()
        if reconnect_wait is None:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert attempts_of(caught.value) == 5
            assert time.monotonic() - started < 0.8
            await asyncio.wait_for(restarter, 5)
            assert restarted[0][2].state.calls_to(GET_BALANCE) == []
        else:
            reply = await stub.GetBalance(BALANCE_REQUEST, timeout=5)
            assert reply.account == "alice"
            await asyncio.wait_for(restarter, 5)
            assert len(restarted[0][2].state.calls_to(GET_BALANCE)) == 1
    finally:
        await channel.close()
        for again, _, _ in restarted:
            await again.stop(None)
