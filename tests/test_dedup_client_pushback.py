"""End to end: a duplicate that cannot wait gets ABORTED + pushback, and the client stack comes back."""

from __future__ import annotations

import threading
import time

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, Fault, serve, serve_aio
from resilient_grpc import DedupInterceptor, IdempotencyKeys, RetryPolicy, idempotency_key
from resilient_grpc import aio as rg_aio
from resilient_grpc.client import resilient_channel

REQUEST = ledger_pb2.TransferRequest(from_account="a", to_account="b", amount=5)
POLICY = RetryPolicy(max_attempts=8, initial_backoff=0.01, max_backoff=0.05)


def test_sync_duplicate_is_pushed_back_then_gets_the_replay() -> None:
    server, port, servicer = serve(
        interceptors=[DedupInterceptor(max_wait=0.02, max_pushback=0.05)]
    )
    servicer.state.faults.add(TRANSFER, Fault(code=None, delay=0.3))  # the first execution is slow
    try:
        with resilient_channel(
            f"127.0.0.1:{port}", retry=POLICY, idempotency=IdempotencyKeys()
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            first: list[ledger_pb2.TransferReply] = []

            def original() -> None:
                with idempotency_key("pushback-sync-1"):  # contextvars do not follow threads
                    first.append(stub.Transfer(REQUEST))

            with idempotency_key("pushback-sync-1"):
                runner = threading.Thread(target=original)
                runner.start()
                deadline = time.monotonic() + 5
                while not servicer.state.calls_to(TRANSFER) and time.monotonic() < deadline:
                    time.sleep(0.005)
                # No deadline: the duplicate may wait only max_wait, then is told to come back.
                reply, call = stub.Transfer.with_call(REQUEST)
            runner.join(timeout=10)
        assert first and reply == first[0]
        assert ("idempotency-replayed", "true") in tuple(call.trailing_metadata() or ())
        assert servicer.state.executions["pushback-sync-1"] == 1
    finally:
        server.stop(None)


async def test_aio_duplicate_is_pushed_back_then_gets_the_replay() -> None:
    import asyncio

    server, port, servicer = await serve_aio(
        interceptors=[rg_aio.DedupInterceptor(max_wait=0.02, max_pushback=0.05)]
    )
    servicer.state.faults.add(TRANSFER, Fault(code=None, delay=0.3))
    channel = rg_aio.resilient_channel(
        f"127.0.0.1:{port}", retry=POLICY, idempotency=IdempotencyKeys()
    )
    try:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        with idempotency_key("pushback-aio-1"):
            first = asyncio.ensure_future(stub.Transfer(REQUEST))
            for _ in range(500):
                if servicer.state.calls_to(TRANSFER):
                    break
                await asyncio.sleep(0.005)
            second = await stub.Transfer(REQUEST)
        assert second == await asyncio.wait_for(first, 10)
        assert servicer.state.executions["pushback-aio-1"] == 1
    finally:
        await channel.close()
        await server.stop(None)
