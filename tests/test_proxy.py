"""FaultProxy: a real TCP proxy that loses responses after the server committed them."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, Fault, SyncLedger, serve
from resilient_grpc.testing import FaultProxy

REQUEST = ledger_pb2.TransferRequest(from_account="a", to_account="b", amount=1)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def server() -> Iterator[tuple[SyncLedger, int]]:
    grpc_server, port, servicer = serve()
    yield servicer, port
    grpc_server.stop(None)


def _call(stub: ledger_pb2_grpc.LedgerStub, *, wait_for_ready: bool | None = None) -> str:
    try:
        stub.Transfer(REQUEST, timeout=5, wait_for_ready=wait_for_ready)
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def _wait_for_calls(servicer: SyncLedger, count: int) -> None:
    """Wait (bounded) until the server has seen ``count`` Transfer calls."""
    waiter = threading.Event()
    for _ in range(500):
        if len(servicer.state.calls_to(TRANSFER)) >= count:
            return
        waiter.wait(0.01)
    raise AssertionError(f"the server did not see {count} calls within 5 s")


def test_no_cut_forwards_everything(server: tuple[SyncLedger, int]) -> None:
    servicer, port = server
    with FaultProxy(port) as proxy, grpc.insecure_channel(proxy.target) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert [_call(stub) for _ in range(20)] == ["OK"] * 20
        counters = proxy.counters
    assert counters.responses_forwarded == 20
    assert counters.responses_cut == counters.connections_cut == 0
    assert sum(servicer.state.executions.values()) == 20


def test_cut_loses_exactly_the_drawn_responses_after_the_server_committed(
    server: tuple[SyncLedger, int],
) -> None:
    servicer, port = server
    with FaultProxy(port, cut_response_probability=0.3, seed=11) as proxy:

        def worker(_: int) -> list[str]:
            with grpc.insecure_channel(proxy.target, options=OWN_CONNECTION) as channel:
                stub = ledger_pb2_grpc.LedgerStub(channel)
                return [_call(stub) for _ in range(50)]

        with ThreadPoolExecutor(4) as pool:
            results = Counter(code for codes in pool.map(worker, range(4)) for code in codes)
        counters = proxy.counters
    # Every call reached the server and was executed; exactly the cut ones lost their answer.
    assert sum(servicer.state.executions.values()) == 200
    assert results["OK"] == counters.responses_forwarded
    assert results["UNAVAILABLE"] == counters.responses_cut == counters.connections_cut
    assert counters.collateral_calls == 0
    assert set(results) == {"OK", "UNAVAILABLE"}
    assert 0.2 <= counters.responses_cut / 200 <= 0.4


def test_shared_connection_cut_also_fails_other_open_calls(server: tuple[SyncLedger, int]) -> None:
    servicer, port = server
    with FaultProxy(port) as proxy, grpc.insecure_channel(proxy.target) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.add(TRANSFER, Fault(code=grpc.StatusCode.NOT_FOUND, delay=0.5))
        slow = stub.Transfer.future(REQUEST, timeout=5)
        _wait_for_calls(servicer, 1)
        proxy.cut_response_probability = 1.0
        assert _call(stub) == "UNAVAILABLE"
        assert slow.exception() is not None and slow.code() == grpc.StatusCode.UNAVAILABLE
        counters = proxy.counters
    assert counters.responses_cut == 1
    assert counters.collateral_calls == 1


def test_cut_all_resets_open_calls_and_the_channel_recovers(server: tuple[SyncLedger, int]) -> None:
    servicer, port = server
    with FaultProxy(port) as proxy, grpc.insecure_channel(proxy.target) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert _call(stub) == "OK"
        servicer.state.faults.add(TRANSFER, Fault(delay=1.0))
        slow = stub.Transfer.future(REQUEST, timeout=5)
        _wait_for_calls(servicer, 2)
        assert proxy.cut_all() == 1
        assert slow.exception(timeout=5) is not None
        assert slow.code() == grpc.StatusCode.UNAVAILABLE
        # The channel reconnects through the proxy (a call right after the cut may still see
        # the channel in TRANSIENT_FAILURE: wait for it to be ready, within the call's 5 s).
        assert _call(stub, wait_for_ready=True) == "OK"
        counters = proxy.counters
    assert counters.connections_cut == 1
    assert counters.collateral_calls == 1
    assert counters.connections == 2


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="cut_response_probability"):
        FaultProxy(1234, cut_response_probability=1.5)
    with pytest.raises(ValueError, match="upstream_port"):
        FaultProxy(0)
    with pytest.raises(RuntimeError, match="not started"):
        _ = FaultProxy(1234).port
