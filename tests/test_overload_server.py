"""The overload interceptors on real servers (sync and aio), overloaded by gRPC's own retrying client.

The client is grpcio's native retry (a service config whose ``retryPolicy`` lists
RESOURCE_EXHAUSTED), the kind of client the server does not control. The server records every
attempt (which logical call, which attempt, when, the answer, the pushback it carried) in an
outermost interceptor, and every execution of the handler (late or not) in the handler, so the
assertions are counts of effects: refusals happened, every retry of a refused call came after
its pushback, refused calls never ran, executed-but-abandoned work stays near zero.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import (
    AdmissionController,
    DedupInterceptor,
    IdempotencyKeys,
    MemoryStore,
    OverloadExecutor,
    OverloadInterceptor,
    RetryBudget,
    RetryPolicy,
    resilient_channel,
    resilient_server,
)
from resilient_grpc import aio as rg_aio
from resilient_grpc.core.pushback import PUSHBACK_HEADER
from resilient_grpc.overload import SHED_DETAILS
from tests.helpers import native_retry_options, wait_for

TRANSFER = "/ledger.v1.Ledger/Transfer"
WORKERS = 4
SERVICE_TIME = 0.03  # capacity = 4 / 0.03 = 133 calls/s
RATE = 300.0  # offered: more than twice the capacity
DURATION = 1.2
DEADLINE = 0.5

CLIENT_OPTIONS = native_retry_options(
    max_attempts=5, initial="0.02s", maximum="0.5s", multiplier=2, codes=["RESOURCE_EXHAUSTED"]
)


@dataclass
class Attempt:
    memo: str
    attempt: int
    arrived: float
    code: str = "OK"
    pushback_ms: int | None = None


@dataclass
class Log:
    """What the server saw (appended from worker threads or the loop: list.append is atomic)."""

    attempts: list[Attempt] = field(default_factory=list)
    executions: list[tuple[str, bool]] = field(default_factory=list)  # (memo, late)

    def record(self, memo: str, metadata: Any) -> Attempt:
        previous = dict(metadata or ()).get("grpc-previous-rpc-attempts", "0")
        attempt = Attempt(memo, int(previous) + 1, time.monotonic())
        self.attempts.append(attempt)
        return attempt

    @staticmethod
    def answer(attempt: Attempt, context: Any) -> None:
        code = context.code()
        attempt.code = "OK" if code is None else code.name
        for key, value in context.trailing_metadata() or ():
            if key == PUSHBACK_HEADER:
                attempt.pushback_ms = int(value)

    def check(self) -> None:
        """The properties every overloaded, protected server must show."""
        shed = [a for a in self.attempts if a.code == "RESOURCE_EXHAUSTED"]
        assert len(shed) >= 10, "the server was not overloaded enough to refuse anything"
        assert all(a.pushback_ms is not None for a in shed)
        by_memo: dict[str, list[Attempt]] = {}
        for a in self.attempts:
            by_memo.setdefault(a.memo, []).append(a)
        retried_after_pushback = 0
        served_after_shed = 0
        for attempts in by_memo.values():
            attempts.sort(key=lambda a: a.attempt)
            for before, after in itertools.pairwise(attempts):
                if before.code == "RESOURCE_EXHAUSTED":
                    assert before.pushback_ms is not None
                    # gRPC waits the pushback before the retry (a loaded machine only adds)
                    assert after.arrived - before.arrived >= 0.9 * before.pushback_ms / 1000
                    retried_after_pushback += 1
            if attempts[0].code == "RESOURCE_EXHAUSTED" and attempts[-1].code == "OK":
                served_after_shed += 1
        assert retried_after_pushback >= 5
        assert served_after_shed >= 1
        executed = [memo for memo, _late in self.executions]
        assert len(executed) == len(set(executed)), "a refused call must never have run"
        refused_only = {m for m, at in by_memo.items() if all(a.code != "OK" for a in at)}
        assert not refused_only & set(executed)
        late = sum(1 for _memo, late in self.executions if late)
        assert late <= max(2, 0.03 * len(self.executions)), (late, len(self.executions))


def _late(context: Any) -> bool:
    remaining = context.time_remaining()
    gone = not context.is_active() if hasattr(context, "is_active") else context.cancelled()
    return bool(gone) or (remaining is not None and remaining <= 0)


# --- sync ---------------------------------------------------------------------------------


class SyncRecorder(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, log: Log) -> None:
        self.log = log

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method != TRANSFER:
            return handler
        inner = handler.unary_unary
        metadata = details.invocation_metadata

        def behavior(request: ledger_pb2.TransferRequest, context: Any) -> Any:
            attempt = self.log.record(request.memo, metadata)
            try:
                return inner(request, context)
            finally:
                Log.answer(attempt, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )


class SyncWork(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, log: Log, release: threading.Event | None = None) -> None:
        self.log = log
        self.release = release

    def Transfer(self, request: Any, context: Any) -> ledger_pb2.TransferReply:
        if self.release is not None and request.memo == "hold":
            self.release.wait(10)
        else:
            time.sleep(SERVICE_TIME)
        self.log.executions.append((request.memo, _late(context)))
        return ledger_pb2.TransferReply()


def _sync_server(
    log: Log, interceptors: list[Any], *, release: threading.Event | None = None
) -> tuple[grpc.Server, int]:
    server = grpc.server(OverloadExecutor(max_workers=WORKERS), interceptors=interceptors)
    ledger_pb2_grpc.add_LedgerServicer_to_server(SyncWork(log, release), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.timeout(60)
def test_sync_server_sheds_and_native_retries_come_back_after_the_pushback() -> None:
    log = Log()
    server, port = _sync_server(log, [SyncRecorder(log), OverloadInterceptor()])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            stub.Transfer(ledger_pb2.TransferRequest(memo="warm"), timeout=5)
            calls = []
            began = time.monotonic()
            for index in range(int(RATE * DURATION)):  # open loop: paced, never waits for answers
                delay = began + index / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                request = ledger_pb2.TransferRequest(memo=f"c{index}")
                calls.append(stub.Transfer.future(request, timeout=DEADLINE))
            outcomes = [_outcome(call) for call in calls]
    finally:
        server.stop(None).wait(10)
    assert outcomes.count("OK") >= 0.3 * len(outcomes)
    log.check()


def _outcome(call: Any) -> str:
    try:
        call.result(timeout=10)
        return "OK"
    except grpc.RpcError as error:
        return str(error.code().name)


def test_refused_call_claims_no_key_with_dedup_behind() -> None:
    """OverloadInterceptor before DedupInterceptor: a refused call leaves the store untouched."""
    log = Log()
    store = MemoryStore()
    release = threading.Event()
    controller = AdmissionController(initial_limit=1, min_limit=1, max_limit=1)
    server, port = _sync_server(
        log, [OverloadInterceptor(controller), DedupInterceptor(store)], release=release
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            hold = stub.Transfer.future(ledger_pb2.TransferRequest(memo="hold"), timeout=10)
            wait_for(lambda: controller.in_flight >= 1, "the held call in flight")
            keyed = [("idempotency-key", "order-1")]
            request = ledger_pb2.TransferRequest(memo="order-1")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Transfer(request, metadata=keyed, timeout=5)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == SHED_DETAILS
            trailers = dict(refused.value.trailing_metadata() or ())
            assert int(trailers[PUSHBACK_HEADER]) >= 0
            assert len(store) == 0  # nothing claimed: the dedup interceptor never saw the call
            release.set()
            hold.result(timeout=10)
            # the same key now executes (it was never claimed), then replays
            _, first = stub.Transfer.with_call(request, metadata=keyed, timeout=5)
            _, second = stub.Transfer.with_call(request, metadata=keyed, timeout=5)
    finally:
        release.set()
        server.stop(None).wait(10)
    assert [memo for memo, _ in log.executions] == ["hold", "order-1"]
    assert "idempotency-replayed" not in dict(first.trailing_metadata() or ())
    assert dict(second.trailing_metadata() or ()).get("idempotency-replayed") == "true"


def test_resilient_server_knows_how_long_a_call_queued() -> None:
    """One worker, one call holding it: the next call waits in the pool's queue past the
    allowance and is refused (reason ``queue``) when it finally reaches the worker."""
    log = Log()
    release = threading.Event()
    # deadline_share=0: CoDel alone (else a call with 10 s to go may queue for 5 s)
    controller = AdmissionController(queue_target=0.02, queue_interval=0.05, deadline_share=0)
    server = resilient_server(1, overload=OverloadInterceptor(controller))
    ledger_pb2_grpc.add_LedgerServicer_to_server(SyncWork(log, release), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            hold = stub.Transfer.future(ledger_pb2.TransferRequest(memo="hold"), timeout=10)
            wait_for(lambda: controller.in_flight >= 1, "the held call in flight")
            queued = stub.Transfer.future(ledger_pb2.TransferRequest(memo="queued"), timeout=10)
            time.sleep(0.2)  # "queued" waits behind "hold" for at least this long
            release.set()
            hold.result(timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                queued.result(timeout=10)
    finally:
        release.set()
        server.stop(None).wait(10)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [memo for memo, _ in log.executions] == ["hold"]


def test_resilient_server_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="max_workers must be an integer >= 1"):
        resilient_server(0)
    with pytest.raises(ValueError, match="the sync one"):
        resilient_server(2, overload=rg_aio.OverloadInterceptor())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exempt_methods"):
        OverloadInterceptor(exempt_methods="/a.B/C")
    with pytest.raises(ValueError, match="controller must be an AdmissionController"):
        OverloadInterceptor(controller=object())  # type: ignore[arg-type]


# --- aio ----------------------------------------------------------------------------------


class AioRecorder(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, log: Log) -> None:
        self.log = log

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method != TRANSFER:
            return handler
        inner = handler.unary_unary
        metadata = details.invocation_metadata

        async def behavior(request: ledger_pb2.TransferRequest, context: Any) -> Any:
            attempt = self.log.record(request.memo, metadata)
            try:
                return await inner(request, context)
            finally:
                Log.answer(attempt, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )


class AioWork(ledger_pb2_grpc.LedgerServicer):
    """The overload is inside the handler: a pool of 4 (a database pool, say)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.pool = asyncio.Semaphore(WORKERS)

    async def Transfer(self, request: Any, context: Any) -> ledger_pb2.TransferReply:  # type: ignore[override]
        try:
            async with self.pool:
                await asyncio.sleep(SERVICE_TIME)
        except asyncio.CancelledError:
            self.log.executions.append((request.memo, True))  # started, then abandoned
            raise
        self.log.executions.append((request.memo, _late(context)))
        return ledger_pb2.TransferReply()


@pytest.mark.timeout(60)
async def test_aio_server_sheds_and_native_retries_come_back_after_the_pushback() -> None:
    log = Log()
    server = grpc.aio.server(interceptors=[AioRecorder(log), rg_aio.OverloadInterceptor()])
    ledger_pb2_grpc.add_LedgerServicer_to_server(AioWork(log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=CLIENT_OPTIONS
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            await stub.Transfer(ledger_pb2.TransferRequest(memo="warm"), timeout=5)

            async def one(index: int) -> str:
                request = ledger_pb2.TransferRequest(memo=f"c{index}")
                try:
                    await stub.Transfer(request, timeout=DEADLINE)
                    return "OK"
                except grpc.aio.AioRpcError as error:
                    return error.code().name

            tasks = []
            began = time.monotonic()
            for index in range(int(RATE * DURATION)):
                delay = began + index / RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(index)))
            outcomes = await asyncio.gather(*tasks)
    finally:
        await server.stop(None)
    assert outcomes.count("OK") >= 0.3 * len(outcomes)
    log.check()


def _release_after_first_shed(log: Log, release: threading.Event) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            a.memo == "order" and a.code == "RESOURCE_EXHAUSTED" for a in log.attempts
        ):
            time.sleep(0.002)
        release.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("budget_left", [True, False])
def test_client_stack_waits_the_pushback_and_its_budget_counts_the_retry(
    budget_left: bool,
) -> None:
    """Our client stack against a protected server: the pushback replaces the computed backoff
    (1 ms here, the pushback 200 ms), and the retry is withdrawn from the budget."""
    log = Log()
    release = threading.Event()
    controller = AdmissionController(
        initial_limit=1, min_limit=1, max_limit=1, min_pushback=0.2, max_pushback=0.2
    )
    server, port = _sync_server(
        log, [SyncRecorder(log), OverloadInterceptor(controller)], release=release
    )
    policy = RetryPolicy(
        max_attempts=3,
        initial_backoff=0.001,
        jitter="none",
        retryable_codes={"RESOURCE_EXHAUSTED"},
    )
    budget = RetryBudget(1.0 if budget_left else 0.0, 100.0 if budget_left else 0.0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            hold = ledger_pb2_grpc.LedgerStub(plain).Transfer.future(
                ledger_pb2.TransferRequest(memo="hold"), timeout=10
            )
            wait_for(lambda: controller.in_flight >= 1, "the held call in flight")
            watcher = _release_after_first_shed(log, release)
            with resilient_channel(
                f"127.0.0.1:{port}", retry=policy, budget=budget, idempotency=IdempotencyKeys()
            ) as channel:
                stub = ledger_pb2_grpc.LedgerStub(channel)
                request = ledger_pb2.TransferRequest(memo="order")
                if budget_left:
                    stub.Transfer(request, timeout=5)
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.Transfer(request, timeout=5)
                    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            hold.result(timeout=10)
            watcher.join(10)
    finally:
        release.set()
        server.stop(None).wait(10)
    order = [a for a in log.attempts if a.memo == "order"]
    if budget_left:
        assert [a.code for a in order] == ["RESOURCE_EXHAUSTED", "OK"]
        assert order[1].arrived - order[0].arrived >= 0.18
    else:
        assert [a.code for a in order] == ["RESOURCE_EXHAUSTED"]
