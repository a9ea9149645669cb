"""Server-streaming calls and exempt methods go through the overload interceptors as documented,
sync and aio alike: a refused stream sends no message, an admitted one holds its slot until it
ends, an exempt method is never refused."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import AioLedger, SyncLedger
from resilient_grpc import AdmissionController, OverloadInterceptor, resilient_server
from resilient_grpc import aio as rg_aio
from resilient_grpc.core.admission import Admit
from resilient_grpc.core.pushback import PUSHBACK_HEADER

EXEMPT = ["/ledger.v1.Ledger/GetBalance"]
WATCH = ledger_pb2.WatchRequest(account="a", count=3)
BALANCE = ledger_pb2.BalanceRequest(account="a")


def full_controller() -> tuple[AdmissionController, Admit]:
    """A controller whose only slot is taken by the test's own ticket."""
    controller = AdmissionController(initial_limit=1, min_limit=1, max_limit=1)
    ticket = controller.decide("/test/Hold", queued_for=0.0, deadline_remaining=None)
    assert isinstance(ticket, Admit)
    return controller, ticket


def wait_idle(controller: AdmissionController) -> None:
    deadline = time.monotonic() + 10
    while controller.in_flight and time.monotonic() < deadline:
        time.sleep(0.005)


def test_sync_streams_and_exempt_methods() -> None:
    controller, ticket = full_controller()
    server = resilient_server(2, overload=OverloadInterceptor(controller, exempt_methods=EXEMPT))
    ledger_pb2_grpc.add_LedgerServicer_to_server(SyncLedger(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            stream = stub.Watch(WATCH, timeout=5)
            with pytest.raises(grpc.RpcError) as refused:
                list(stream)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert PUSHBACK_HEADER in dict(refused.value.trailing_metadata() or ())
            stub.GetBalance(BALANCE, timeout=5)  # exempt: served although the server is full
            controller.finish(ticket)
            assert len(list(stub.Watch(WATCH, timeout=5))) == 3
            wait_idle(controller)
    finally:
        server.stop(None).wait(10)
    assert controller.in_flight == 0  # the stream held its slot until it ended, then gave it back


async def test_aio_streams_and_exempt_methods() -> None:
    controller, ticket = full_controller()
    server = grpc.aio.server(
        interceptors=[rg_aio.OverloadInterceptor(controller, exempt_methods=EXEMPT)]
    )
    ledger_pb2_grpc.add_LedgerServicer_to_server(AioLedger(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Watch(WATCH, timeout=5):
                    raise AssertionError("a refused stream sends no message")
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert PUSHBACK_HEADER in dict(refused.value.trailing_metadata() or ())
            await stub.GetBalance(BALANCE, timeout=5)
            controller.finish(ticket)
            assert len([m async for m in stub.Watch(WATCH, timeout=5)]) == 3
    finally:
        await server.stop(None)
    assert controller.in_flight == 0


def test_a_plain_pool_turns_the_queue_rule_off() -> None:
    """Without an OverloadExecutor the interceptor cannot see a wait: it never refuses for it."""
    controller = AdmissionController(queue_target=0.001, queue_interval=0.001)
    server = grpc.server(ThreadPoolExecutor(1), interceptors=[OverloadInterceptor(controller)])
    ledger_pb2_grpc.add_LedgerServicer_to_server(SyncLedger(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            calls = [stub.GetBalance.future(BALANCE, timeout=10) for _ in range(20)]
            for call in calls:
                call.result(timeout=10)
    finally:
        server.stop(None).wait(10)
