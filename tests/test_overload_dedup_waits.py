"""OverloadInterceptor in front of DedupInterceptor: duplicates that wait for their in-flight twin
(or are replayed) did not execute the handler, so their durations must not teach the admission
controller that the method got slow (issue 14: hedged copies shrank the concurrency limit).

Real servers on 127.0.0.1, sync and aio alike: a fast method sets the baseline, then one slow
execution is joined by many duplicates of its key. Only the one execution is a sample, so the
limit shrinks by at most one step (each slow sample takes ~10% off it); before the fix every
waiting duplicate was a slow sample too and the limit fell to well under half.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import (
    AdmissionController,
    DedupInterceptor,
    MemoryStore,
    OverloadExecutor,
    OverloadInterceptor,
)
from resilient_grpc import aio as rg_aio
from tests.helpers import wait_for

DUPLICATES = 8
WARM_CALLS = 20
#: One slow sample takes the limit L to 0.9 L + 0.2 sqrt(L); nine would take it under 0.4 L.
ONE_STEP = 0.9


def _key(name: str) -> list[tuple[str, str]]:
    return [("idempotency-key", name)]


class SyncLedger(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.executed: list[str] = []

    def Transfer(self, request: Any, context: Any) -> ledger_pb2.TransferReply:
        if request.memo == "hold":
            self.release.wait(10)
        self.executed.append(request.memo)
        return ledger_pb2.TransferReply()


class AioLedger(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, release: asyncio.Event) -> None:
        self.release = release
        self.executed: list[str] = []

    async def Transfer(self, request: Any, context: Any) -> ledger_pb2.TransferReply:  # type: ignore[override]
        if request.memo == "hold":
            await asyncio.wait_for(self.release.wait(), 10)
        self.executed.append(request.memo)
        return ledger_pb2.TransferReply()


@pytest.mark.timeout(60)
def test_sync_duplicates_waiting_on_a_slow_execution_do_not_shrink_the_limit() -> None:
    controller = AdmissionController()
    release = threading.Event()
    ledger = SyncLedger(release)
    server = grpc.server(
        OverloadExecutor(max_workers=2 * DUPLICATES),
        interceptors=[OverloadInterceptor(controller), DedupInterceptor(MemoryStore())],
    )
    ledger_pb2_grpc.add_LedgerServicer_to_server(ledger, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            for index in range(WARM_CALLS):  # a fast method: its baseline
                stub.Transfer(
                    ledger_pb2.TransferRequest(memo=f"w{index}"),
                    metadata=_key(f"w{index}"),
                    timeout=5,
                )
            before = controller.limit
            hold = ledger_pb2.TransferRequest(memo="hold")
            calls = [
                stub.Transfer.future(hold, metadata=_key("slow"), timeout=20)
                for _ in range(1 + DUPLICATES)
            ]
            wait_for(lambda: controller.in_flight == 1 + DUPLICATES, "duplicates not in flight")
            time.sleep(0.2)  # the one execution and its waiting duplicates are slow
            release.set()
            for call in calls:
                call.result(timeout=10)
            wait_for(lambda: controller.in_flight == 0, "calls left in flight")
            # and a replay afterwards is no sample either (a very fast "execution")
            stub.Transfer(hold, metadata=_key("slow"), timeout=5)
    finally:
        release.set()
        server.stop(None).wait(10)
    assert ledger.executed.count("hold") == 1
    assert controller.limit >= ONE_STEP * before, (before, controller.limit)
    assert controller.in_flight == 0


@pytest.mark.timeout(60)
async def test_aio_duplicates_waiting_on_a_slow_execution_do_not_shrink_the_limit() -> None:
    controller = AdmissionController()
    release = asyncio.Event()
    ledger = AioLedger(release)
    server = grpc.aio.server(
        interceptors=[
            rg_aio.OverloadInterceptor(controller),
            rg_aio.DedupInterceptor(MemoryStore()),
        ]
    )
    ledger_pb2_grpc.add_LedgerServicer_to_server(ledger, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            for index in range(WARM_CALLS):
                await stub.Transfer(
                    ledger_pb2.TransferRequest(memo=f"w{index}"),
                    metadata=_key(f"w{index}"),
                    timeout=5,
                )
            before = controller.limit
            hold = ledger_pb2.TransferRequest(memo="hold")
            calls = [
                asyncio.ensure_future(stub.Transfer(hold, metadata=_key("slow"), timeout=20))
                for _ in range(1 + DUPLICATES)
            ]
            try:
                deadline = time.monotonic() + 10
                while controller.in_flight < 1 + DUPLICATES:
                    assert time.monotonic() < deadline, "duplicates not in flight"
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.2)
                release.set()
                await asyncio.gather(*calls)
            finally:
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
            deadline = time.monotonic() + 10
            while controller.in_flight:
                assert time.monotonic() < deadline, "calls left in flight"
                await asyncio.sleep(0.005)
            await stub.Transfer(hold, metadata=_key("slow"), timeout=5)
    finally:
        release.set()
        await server.stop(None)
    assert ledger.executed.count("hold") == 1
    assert controller.limit >= ONE_STEP * before, (before, controller.limit)
    assert controller.in_flight == 0
