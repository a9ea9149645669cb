"""Telemetry of the overload interceptors: admitted and shed counters (by reason), the limit gauge."""

from __future__ import annotations

import threading

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import AdmissionController, OverloadInterceptor
from resilient_grpc import aio as rg_aio
from tests.helpers import wait_for
from tests.telemetry_fixtures import Otel
from tests.test_overload_server import Log, _sync_server


def test_counts_admitted_and_shed_by_reason_and_reports_the_limit(otel: Otel) -> None:
    log = Log()
    release = threading.Event()
    controller = AdmissionController(initial_limit=1, min_limit=1, max_limit=1)
    overload = OverloadInterceptor(controller, name="ledger")
    server, port = _sync_server(log, [overload], release=release)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            hold = stub.Transfer.future(ledger_pb2.TransferRequest(memo="hold"), timeout=10)
            wait_for(lambda: controller.in_flight >= 1, "the held call in flight")
            for _ in range(2):
                with pytest.raises(grpc.RpcError):
                    stub.Transfer(ledger_pb2.TransferRequest(memo="x"), timeout=5)
            release.set()
            hold.result(timeout=10)
    finally:
        release.set()
        server.stop(None).wait(10)
    assert otel.total("resilient_grpc.server.admitted", rpc__method="Transfer") == 1
    assert otel.total("resilient_grpc.server.shed", resilient_grpc__shed__reason="limit") == 2
    shed_points = otel.points("resilient_grpc.server.shed")
    assert {p.attributes["rpc.service"] for p in shed_points} == {"ledger.v1.Ledger"}
    limits = {
        p.attributes["resilient_grpc.admission.name"]: p.value
        for p in otel.points("resilient_grpc.server.concurrency_limit")
    }
    assert limits["ledger"] == 1
    aio_overload = rg_aio.OverloadInterceptor(
        AdmissionController(initial_limit=7, max_limit=9), name="aio-ledger"
    )
    limits = {
        p.attributes["resilient_grpc.admission.name"]: p.value
        for p in otel.points("resilient_grpc.server.concurrency_limit")
    }
    assert limits["aio-ledger"] == 7
    assert aio_overload.limit == 7
