"""The grpc.aio DedupInterceptor on a real grpc.aio.server: the server table, the aio way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, WATCH, AioLedger, Fault, serve_aio
from resilient_grpc.aio import DedupInterceptor
from resilient_grpc.stores import MemoryStore, SQLiteStore
from tests.dedup_fixtures import (
    KEY,
    AioSlowLedger,
    RecordingAdmission,
    make_store,
    sqlite_locked,
    transfer,
)

REPLAYED = ("idempotency-replayed", "true")

Start = Callable[..., Awaitable[tuple[AioLedger, ledger_pb2_grpc.LedgerStub]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def run(
        servicer: AioLedger | None = None,
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
        interceptor_class: type[DedupInterceptor] = DedupInterceptor,
        **options: Any,
    ) -> tuple[AioLedger, ledger_pb2_grpc.LedgerStub]:
        server, port, servicer = await serve_aio(
            servicer, interceptors=[*interceptors, interceptor_class(**options)]
        )
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return servicer, ledger_pb2_grpc.LedgerStub(channel)

    yield run
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


async def _error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def _keyed(key: str) -> list[tuple[str, str]]:
    return [(KEY, key)]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_replays_exact_bytes_and_stored_errors(
    kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    servicer, stub = await start(store=make_store(kind, tmp_path, request))
    first = await stub.Transfer(transfer(5), metadata=_keyed("k1"))
    call = stub.Transfer(transfer(5), metadata=_keyed("k1"))
    assert (await call).SerializeToString() == first.SerializeToString()
    assert tuple(await call.trailing_metadata()) == (REPLAYED,)
    assert servicer.state.executions["k1"] == 1

    servicer.state.faults.add(
        TRANSFER, Fault(code=grpc.StatusCode.ALREADY_EXISTS, details="dup", pushback_ms="9")
    )
    errors = [await _error(stub.Transfer(transfer(), metadata=_keyed("k2"))) for _ in range(2)]
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}
    assert {e.details() for e in errors} == {"dup"}
    assert tuple(errors[0].trailing_metadata()) == (("grpc-retry-pushback-ms", "9"),)
    assert tuple(errors[1].trailing_metadata()) == (("grpc-retry-pushback-ms", "9"), REPLAYED)

    conflict = await _error(stub.Transfer(transfer(6), metadata=_keyed("k1")))
    assert conflict.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert conflict.details().startswith("idempotency key reused with a different request")
    assert servicer.state.executions["k1"] == 1


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_fifty_concurrent_tasks_execute_once(
    kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    servicer, stub = await start(
        AioSlowLedger(delay=0.2), store=make_store(kind, tmp_path, request)
    )
    replies = await asyncio.gather(
        *(stub.Transfer(transfer(7), metadata=_keyed("same"), timeout=10) for _ in range(50))
    )
    assert len({r.SerializeToString() for r in replies}) == 1
    assert servicer.state.executions["same"] == 1
    assert len(servicer.state.calls_to(TRANSFER)) == 1


async def test_bad_keys_and_missing_required_keys(start: Start) -> None:
    store = MemoryStore()
    servicer, stub = await start(store=store, require_key_methods=[TRANSFER])
    missing = await _error(stub.Transfer(transfer()))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing.details() == (
        f"{TRANSFER} requires an idempotency key in the 'idempotency-key' metadata header"
    )
    long = await _error(stub.Transfer(transfer(), metadata=_keyed("k" * 256)))
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert long.details() == (
        "invalid 'idempotency-key' metadata: idempotency key is 256 characters long; "
        "the maximum is 255"
    )
    assert servicer.state.calls_to(TRANSFER) == [] and len(store) == 0


async def test_unexpected_exceptions_release_the_key(start: Start) -> None:
    ledger = AioSlowLedger()
    ledger.crashes = 1
    servicer, stub = await start(ledger)
    crashed = await _error(stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert crashed.code() == grpc.StatusCode.UNKNOWN
    await stub.Transfer(transfer(), metadata=_keyed("k1"))
    assert servicer.state.executions["k1"] == 1
    assert len(servicer.state.calls_to(TRANSFER)) == 2


async def test_a_duplicate_that_cannot_wait_gets_aborted_with_pushback(start: Start) -> None:
    servicer, stub = await start(AioSlowLedger(delay=2.0), lease=4.0)
    slow = asyncio.ensure_future(stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert isinstance(servicer, AioSlowLedger)
    await servicer.wait_started()
    error = await _error(stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=0.6))
    assert error.code() == grpc.StatusCode.ABORTED
    # the lease left (about 3.9 s) capped at max_pushback (default 1 s)
    assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    assert (await slow).transfer_id
    assert servicer.state.executions["k1"] == 1


class _Stall(grpc.aio.ServerInterceptor):
    """Holds every call ``delay`` s before dedup sees it: a CPU-bound step (say, an auth check)
    that blocks the loop, so grpc.aio cannot cancel the call at its deadline before dedup runs."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        inner = handler.unary_unary
        if inner is None:
            return handler

        async def stalled(request: Any, context: Any) -> Any:
            time.sleep(self.delay)  # deliberately blocking: see the class docstring
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            stalled, handler.request_deserializer, handler.response_serializer
        )


class _Recording(RecordingAdmission, DedupInterceptor):
    admitted: list[object] = []


async def test_an_expired_deadline_runs_and_claims_nothing(start: Start) -> None:
    store = MemoryStore()
    _Recording.admitted = []
    servicer, stub = await start(
        store=store, interceptors=(_Stall(0.3),), interceptor_class=_Recording
    )
    error = await _error(stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=0.1))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if _Recording.admitted:
            break
        await asyncio.sleep(0.01)
    assert _Recording.admitted == [
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the deadline expired before the call could start; nothing was executed",
        )
    ]
    assert servicer.state.calls_to(TRANSFER) == [] and len(store) == 0
    await stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=5)
    assert servicer.state.executions["k1"] == 1


async def test_streams_are_replayed_whole(start: Start) -> None:
    servicer, stub = await start()
    request = ledger_pb2.WatchRequest(account="a", count=3)
    first = [m async for m in stub.Watch(request, metadata=_keyed("w1"))]
    replay = stub.Watch(request, metadata=_keyed("w1"))
    assert [m async for m in replay] == first
    assert tuple(await replay.trailing_metadata()) == (REPLAYED,)
    assert len(servicer.state.calls_to(WATCH)) == 1


async def test_tenants_never_share_a_record(start: Start) -> None:
    def tenant(context: Any) -> str:
        return dict(context.invocation_metadata()).get("tenant", "")

    servicer, stub = await start(scope=tenant)
    alice = await stub.Transfer(transfer(), metadata=[(KEY, "k1"), ("tenant", "alice")])
    bob = await stub.Transfer(transfer(), metadata=[(KEY, "k1"), ("tenant", "bob")])
    assert alice.transfer_id != bob.transfer_id
    assert await stub.Transfer(transfer(), metadata=[(KEY, "k1"), ("tenant", "bob")]) == bob
    assert servicer.state.executions["k1"] == 2


async def test_store_down_fails_closed_then_recovers(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    servicer, stub = await start(store=SQLiteStore(path, busy_timeout=0.05))
    with sqlite_locked(path) as details:
        error = await _error(stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == details
    assert servicer.state.calls_to(TRANSFER) == []
    await stub.Transfer(transfer(), metadata=_keyed("k1"))
    assert servicer.state.executions["k1"] == 1


async def test_a_call_cancelled_mid_handler_finishes_and_its_outcome_is_replayed(
    start: Start,
) -> None:
    """A deadline says nothing about the effect: the claim is kept (never released), the handler
    finishes shielded from the cancellation, and the retry gets its stored outcome."""
    store = MemoryStore()
    servicer, stub = await start(AioSlowLedger(delay=0.5), store=store, lease=30.0)
    error = await _error(stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=0.1))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=10)
    await call
    assert REPLAYED in tuple(await call.trailing_metadata())
    assert servicer.state.executions["k1"] == 1
