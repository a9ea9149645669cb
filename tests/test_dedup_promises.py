"""Tries to break the dedup promise the way users' failures do, counting handler executions per key.

Each test is one case of issue 8, on the sync and the aio server (and on every store where it
applies): a client deadline mid-handler through our own client stack, a cancellation at every
await point of the aio shell, a handler slower than its lease, a refused completion, a full
store, a restarted Redis, a SIGKILLed server process (the known limit of lease mode), orphaned
and crowding waiters, store errors kept from clients, initial metadata, and aio handlers the
interceptor cannot run. Handlers here do their effect (the counted transfer) and may work on
after it, which is where a duplicate hurts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, AioLedger, SyncLedger, serve, serve_aio
from resilient_grpc import IdempotencyKeys, RetryPolicy, idempotency_key, logs, resilient_channel
from resilient_grpc.aio import resilient_channel as aio_resilient_channel
from resilient_grpc.aio.server import DedupInterceptor as AioDedupInterceptor
from resilient_grpc.core.dedup import ClaimResult, Outcome, Record
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import AsyncStore, MemoryStore, SQLiteStore
from resilient_grpc.stores.base import StoreFullError, StoreUnavailableError
from resilient_grpc.testing.servers import RedisServer
from tests.dedup_fixtures import (
    KEY,
    RawHandlers,
    make_store,
    serve_raw,
    serve_raw_aio,
    sqlite_locked,
    transfer,
)
from tests.dedup_server_process import ServerProcess
from tests.helpers import until
from tests.telemetry_fixtures import Otel

REPLAYED = ("idempotency-replayed", "true")
KINDS = ["sync", "aio"]
#: The client stack of the issue's scenario: per-attempt deadlines shorter than the handler.
ISSUE_RETRY = RetryPolicy(
    max_attempts=4,
    per_attempt_timeout=0.3,
    retryable_codes=frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"}),
)


@pytest.fixture(autouse=True)
def _every_warning_logged() -> None:
    """Each test sees its own WARNING lines (the server log is throttled per outcome)."""
    logs._server_throttle.reset()


# ---------------------------------------------------------------------------- servicers


@dataclass
class Script:
    """What a Transfer handler does: wait ``before`` s, hold the first execution until ``hold``
    is set, apply the transfer (the effect, counted per key), send ``initial`` metadata, then
    work ``after`` s more."""

    before: float = 0.0
    after: float = 0.0
    hold: threading.Event | None = None
    initial: tuple[tuple[str, str], ...] = ()


def _key(context: Any) -> str | None:
    return dict(context.invocation_metadata() or ()).get(KEY)


class SyncEffects(SyncLedger):
    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script
        self.started = 0

    def Transfer(self, request: ledger_pb2.TransferRequest, context: Any) -> Any:
        script = self.script
        self.started += 1
        first = self.started == 1
        time.sleep(script.before)
        if first and script.hold is not None:
            script.hold.wait(30)
        reply = self.state.transfer(request, _key(context))
        if script.initial:
            context.send_initial_metadata(script.initial)
        time.sleep(script.after)
        return reply


class AioEffects(AioLedger):
    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script
        self.started = 0

    async def Transfer(self, request: ledger_pb2.TransferRequest, context: Any) -> Any:
        script = self.script
        self.started += 1
        first = self.started == 1
        await asyncio.sleep(script.before)
        if first and script.hold is not None:
            await asyncio.to_thread(script.hold.wait, 30)
        reply = self.state.transfer(request, _key(context))
        if script.initial:
            await context.send_initial_metadata(script.initial)
        await asyncio.sleep(script.after)
        return reply


@dataclass
class Running:
    servicer: SyncEffects | AioEffects
    stub: ledger_pb2_grpc.LedgerStub
    port: int
    interceptor: DedupInterceptor | AioDedupInterceptor

    def executions(self, key: str) -> int:
        return self.servicer.state.executions[key]


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a sync or aio ledger server behind a DedupInterceptor; an aio channel to it."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def run(kind: str, script: Script | None = None, **options: Any) -> Running:
        script = script or Script()
        if kind == "sync":
            interceptor: Any = DedupInterceptor(**options)
            server, port, servicer = serve(
                SyncEffects(script), interceptors=[interceptor], max_workers=32
            )
            stops.append(_stop_sync(server))
        else:
            interceptor = AioDedupInterceptor(**options)
            aio_server, port, servicer = await serve_aio(
                AioEffects(script), interceptors=[interceptor]
            )
            stops.append(_stop_aio(aio_server, interceptor))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stops.insert(0, channel.close)
        assert isinstance(servicer, (SyncEffects, AioEffects))
        return Running(servicer, ledger_pb2_grpc.LedgerStub(channel), port, interceptor)

    yield run
    for stop in stops:
        await stop()


def _stop_sync(server: grpc.Server) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        await asyncio.to_thread(lambda: server.stop(None).wait(10))

    return stop


def _stop_aio(
    server: grpc.aio.Server, interceptor: AioDedupInterceptor
) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        await server.stop(None)
        await interceptor.aclose(5)

    return stop


def _keyed(key: str) -> list[tuple[str, str]]:
    return [(KEY, key)]


async def _error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def _replayed(stub: ledger_pb2_grpc.LedgerStub, key: str, timeout: float = 10) -> Any:
    """Call again with ``key``; assert the answer is a replay; return the call."""
    call = stub.Transfer(transfer(), metadata=_keyed(key), timeout=timeout)
    await call
    assert REPLAYED in tuple(await call.trailing_metadata())
    return call


# ---------------------------------------------------------------------------- store doubles


class Gated(AsyncStore):
    """An async store that is slow at one operation (``slow``): the place a cancellation lands.

    ``claim`` is slow *after* the inner claim is written (its answer is what gets lost); the
    others are slow before they reach the inner store.
    """

    def __init__(self, inner: AsyncStore, slow: str, delay: float) -> None:
        self.inner = inner
        self.slow = slow
        self.delay = delay
        self.ttl = inner.ttl

    async def _pause(self, name: str) -> None:
        if self.slow == name:
            self.slow = ""  # once
            await asyncio.sleep(self.delay)

    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        result = await self.inner.claim(key, fingerprint, lease=lease)
        await self._pause("claim")
        return result

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        await self._pause("complete")
        return await self.inner.complete(key, token, outcome, ttl=ttl)

    async def release(self, key: str, token: int) -> bool:
        return await self.inner.release(key, token)

    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        return await self.inner.renew(key, token, lease=lease)

    async def get(self, key: str) -> Record | None:
        return await self.inner.get(key)

    async def wait(self, key: str, timeout: float) -> Record | None:
        return await self.inner.wait(key, timeout)


class Counting(MemoryStore):
    """A MemoryStore counting renewals; ``forget`` makes every renewal find the claim gone."""

    def __init__(self, *, forget: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.renewals = 0
        self.forget = forget

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        self.renewals += 1
        if self.forget:  # the store lost the claim (a restart, an eviction, a failover)
            self.release(key, token)
        return super().renew(key, token, lease=lease)


class Full(MemoryStore):
    """A store full of live claims: every claim is refused with StoreFullError."""

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        raise StoreFullError("MemoryStore full: 100000 live claims", retry_after=0.25)


class FailsToComplete(MemoryStore):
    """A store that goes down after the handler ran (at completion)."""

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        raise StoreUnavailableError("SQLite store '/srv/secret/dedup.db' failed: disk I/O error")


# ---------------------------------------------------------------------------- 1: deadlines


@pytest.mark.parametrize("kind", KINDS)
async def test_a_deadline_mid_handler_through_our_client_stack_executes_once(
    kind: str, start: Start
) -> None:
    """The issue's scenario: per-attempt deadline 0.3 s, handler does its effect then works
    0.5 s more. One logical call must execute once (aio on main: 4 times, and failed)."""
    server = await start(kind, Script(after=0.5))
    channel = aio_resilient_channel(
        f"127.0.0.1:{server.port}", retry=ISSUE_RETRY, idempotency=IdempotencyKeys()
    )
    try:
        reply = await ledger_pb2_grpc.LedgerStub(channel).Transfer(transfer(7), timeout=10)
    finally:
        await channel.close()
    assert reply.transfer_id
    assert list(server.servicer.state.executions.values()) == [1]


# ---------------------------------------------------------------------------- 2: aio await points


@pytest.mark.parametrize("point", ["claim", "wait", "execute", "complete"])
async def test_a_cancel_at_any_await_point_of_the_aio_shell_never_duplicates_nor_blocks(
    point: str, start: Start, tmp_path: Path
) -> None:
    """Cancel the call (its deadline) while the aio shell awaits ``point``; then retry.

    claim: the claim lands after the cancel (SQLite in a worker thread): it is released, so the
    retry executes at once instead of waiting out a 30 s lease. wait: a cancelled duplicate
    changes nothing. execute / complete: the handler (effect done) finishes and its outcome is
    stored: the retry replays it.
    """
    inner = SQLiteStore(tmp_path / "dedup.sqlite3").as_async()
    store = Gated(inner, point, delay=0.6)
    script = Script(after=0.6 if point in ("wait", "execute") else 0.0)
    server = await start("aio", script, store=store, lease=30.0)
    stub = server.stub
    if point == "wait":
        first = asyncio.ensure_future(stub.Transfer(transfer(), metadata=_keyed("k"), timeout=10))
        await until(lambda: server.servicer.started == 1)
    if point == "wait":  # the client cancels a waiting duplicate (its deadline would not land)
        duplicate = stub.Transfer(transfer(), metadata=_keyed("k"), timeout=10)
        await asyncio.sleep(0.2)
        duplicate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await duplicate
        await first
    else:
        error = await _error(stub.Transfer(transfer(), metadata=_keyed("k"), timeout=0.2))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    retry = stub.Transfer(transfer(), metadata=_keyed("k"), timeout=8)
    await retry
    if point != "claim":
        assert REPLAYED in tuple(await retry.trailing_metadata())
    assert server.executions("k") == 1


# ---------------------------------------------------------------------------- 3: slow handlers


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "redis"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_handler_slower_than_its_lease_runs_once_and_its_outcome_is_stored(
    kind: str, store_kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Lease 1 s, handler 2 s: the lease is renewed while it runs, so a duplicate arriving after
    the first lease would have lapsed waits and replays, and the completion is accepted."""
    store = make_store(store_kind, tmp_path, request)
    server = await start(kind, Script(before=2.0), store=store, lease=1.0)
    first = asyncio.ensure_future(
        server.stub.Transfer(transfer(), metadata=_keyed("slow"), timeout=20)
    )
    await until(lambda: server.servicer.started == 1)
    await asyncio.sleep(1.3)  # past the first lease
    duplicate = server.stub.Transfer(transfer(), metadata=_keyed("slow"), timeout=10)
    await asyncio.gather(first, duplicate)
    assert REPLAYED in tuple(await duplicate.trailing_metadata())
    await _replayed(server.stub, "slow")  # the first call's completion was stored
    assert server.executions("slow") == 1
    assert server.servicer.started == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_renewals_cost_no_round_trip_for_short_handlers(kind: str, start: Start) -> None:
    """Renewals come every third of the lease: none for handlers shorter than that."""
    store = Counting()
    server = await start(kind, store=store, lease=3.0)
    for n in range(20):
        await server.stub.Transfer(transfer(), metadata=_keyed(f"fast-{n}"), timeout=5)
    assert store.renewals == 0
    server.servicer.script.before = 1.6
    await server.stub.Transfer(transfer(), metadata=_keyed("slow"), timeout=10)
    assert store.renewals >= 1  # at 1.0 s (and maybe again at 2.0 s on a loaded machine)


def test_sync_renewals_share_one_thread() -> None:
    store = Counting()
    server, port, _ = serve(
        SyncEffects(Script(before=0.5)), interceptors=[DedupInterceptor(store, lease=0.3)]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            calls = [
                stub.Transfer.future(transfer(), metadata=_keyed(f"k{n}"), timeout=10)
                for n in range(8)
            ]
            deadline = time.monotonic() + 5
            while store.renewals < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            # Counted while the calls still run: the thread ends once nothing is due.
            renewal_threads = [
                t for t in threading.enumerate() if t.name.startswith("resilient-grpc-lease")
            ]
            for call in calls:
                call.result()
    finally:
        server.stop(None)
    assert store.renewals >= 8  # every call was renewed at least once (every 0.1 s)...
    assert len(renewal_threads) == 1  # ...by one shared thread


@pytest.mark.parametrize("kind", KINDS)
async def test_a_completion_the_store_refuses_is_never_silent(
    kind: str, start: Start, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """The store lost the running handler's claim: the renewal and the completion are refused;
    each is a WARNING, a dedup outcome in the metric, and a span event. The live answer is sent."""
    caplog.set_level(logging.WARNING, logger="resilient_grpc.server")
    store = Counting(forget=True)
    server = await start(kind, Script(before=0.5), store=store, lease=0.6)
    reply = await server.stub.Transfer(transfer(), metadata=_keyed("lost"), timeout=10)
    assert reply.transfer_id
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "refused the handler's outcome" in warnings
    assert "refused to renew a running handler's lease" in warnings
    for outcome in ("complete_refused", "lease_lost"):
        assert (
            otel.total("resilient_grpc.server.dedup", resilient_grpc__dedup__outcome=outcome) == 1
        )


# ---------------------------------------------------------------------------- 4: full store


@pytest.mark.parametrize("fail_open", [False, True])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_full_store_answers_resource_exhausted_with_pushback(
    kind: str, fail_open: bool, start: Start
) -> None:
    """Full of live claims: RESOURCE_EXHAUSTED with a pushback, handler not run; fail_open does
    not apply (an overload signal, not an outage)."""
    server = await start(kind, store=Full(), fail_open=fail_open)
    error = await _error(server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("grpc-retry-pushback-ms", "250") in tuple(error.trailing_metadata() or ())
    assert "100000" not in (error.details() or "")  # the store's own text stays in the log
    assert server.servicer.started == 0


# ---------------------------------------------------------------------------- 5: restarted Redis


@pytest.mark.parametrize("kind", KINDS)
async def test_redis_restarted_mid_handler_is_never_silent(
    kind: str,
    start: Start,
    redis_server: RedisServer,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis killed and restarted (no persistence) while a handler runs: the answer is still
    delivered, the lost claim is reported (renewal refused, completion refused), and the key is
    not stuck. What the restarted Redis forgot it cannot replay: the README asks for persistence
    and ``noeviction``."""
    if not isinstance(redis_server, RedisServer):
        pytest.skip("needs a Redis this test can kill")
    from resilient_grpc.stores import RedisStore

    caplog.set_level(logging.WARNING, logger="resilient_grpc.server")
    store = RedisStore.from_url(redis_url)
    server = await start(kind, Script(before=1.2), store=store, lease=0.9)
    first = asyncio.ensure_future(
        server.stub.Transfer(transfer(), metadata=_keyed("r"), timeout=20)
    )
    await until(lambda: server.servicer.started == 1)
    await asyncio.to_thread(redis_server.stop)
    await asyncio.sleep(0.35)  # a renewal fails while Redis is down
    await asyncio.to_thread(redis_server.start)
    reply = await first
    assert reply.transfer_id
    assert server.executions("r") == 1
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "refused the handler's outcome" in warnings
    again = server.stub.Transfer(transfer(), metadata=_keyed("r"), timeout=10)
    await again  # answered (executed again: the restarted Redis forgot the key)
    store.close()


# ---------------------------------------------------------------------------- killed process


def test_a_process_killed_after_the_effect_re_executes_after_the_lease(
    tmp_path: Path,
) -> None:
    """The known limit of lease mode: the executing process is SIGKILLed after the handler's
    effect and before its outcome is stored; once the lease lapses, a retry executes again
    (transactional mode on PostgreSQL/SQLite closes this; the README says so)."""
    store = f"sqlite:{tmp_path / 'dedup.sqlite3'}"
    hang = str(tmp_path / "hang")
    victim = ServerProcess(store, lease=1.0, hang_once=hang, hang_after_effect=True)
    survivor = ServerProcess(store, lease=1.0, hang_once=hang, hang_after_effect=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{victim.port}") as channel:
            call = ledger_pb2_grpc.LedgerStub(channel).Transfer.future(
                transfer(), metadata=_keyed("killed"), timeout=30
            )
            assert victim.wait_for("EXEC killed", timeout=20)
            victim.kill()
            with pytest.raises(grpc.RpcError):
                call.result()
        channel = resilient_channel(
            f"127.0.0.1:{survivor.port}",
            retry=RetryPolicy(max_attempts=8, initial_backoff=0.2, max_backoff=1.0),
            idempotency=IdempotencyKeys(),
        )
        try:
            with idempotency_key("killed"):
                ledger_pb2_grpc.LedgerStub(channel).Transfer(transfer(), timeout=20)
        finally:
            channel.close()
    finally:
        survivor.stop()
        victim.stop()
    assert victim.executions() == ["killed"]
    assert survivor.executions() == ["killed"]  # executed twice in all: the documented limit


# ---------------------------------------------------------------------------- waiters


@pytest.mark.parametrize("kind", KINDS)
async def test_a_waiter_is_not_orphaned_when_the_key_is_reclaimed_in_the_same_process(
    kind: str, start: Start
) -> None:
    """A's claim lapses (the store clock jumps) while B waits on A; C re-claims the key in the
    same process and completes. B must get C's answer then, not sleep out its deadline."""
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    hold = threading.Event()
    server = await start(kind, Script(hold=hold), store=store, lease=30.0)
    stub = server.stub
    try:
        a = asyncio.ensure_future(stub.Transfer(transfer(), metadata=_keyed("k"), timeout=30))
        await until(lambda: server.servicer.started == 1)
        b_call = stub.Transfer(transfer(), metadata=_keyed("k"), timeout=30)
        b = asyncio.ensure_future(b_call)
        await asyncio.sleep(0.3)  # B is waiting on A's flight
        now[0] += 100.0  # A's lease lapses
        await stub.Transfer(transfer(), metadata=_keyed("k"), timeout=10)  # C executes
        done, _ = await asyncio.wait({b}, timeout=8)  # B's deadline is 30 s away
        assert b in done, "the waiter slept on although the key's outcome was stored"
        assert REPLAYED in tuple(await b_call.trailing_metadata())
    finally:
        hold.set()
    await asyncio.wait({a}, timeout=10)


@pytest.mark.parametrize("kind", KINDS)
async def test_waiting_duplicates_are_bounded_per_key(kind: str, start: Start) -> None:
    hold = threading.Event()
    server = await start(kind, Script(hold=hold), max_waiters=2)
    stub = server.stub
    try:
        first = asyncio.ensure_future(stub.Transfer(transfer(), metadata=_keyed("k"), timeout=20))
        await until(lambda: server.servicer.started == 1)
        waiters = [
            asyncio.ensure_future(stub.Transfer(transfer(), metadata=_keyed("k"), timeout=20))
            for _ in range(2)
        ]
        await asyncio.sleep(0.3)
        crowd = await asyncio.gather(
            *(stub.Transfer(transfer(), metadata=_keyed("k"), timeout=20) for _ in range(3)),
            return_exceptions=True,
        )
        assert not any(w.done() for w in waiters)  # the crowd was answered while they wait
        for error in crowd:
            assert isinstance(error, grpc.aio.AioRpcError), error
            assert error.code() == grpc.StatusCode.ABORTED
            assert any(k == "grpc-retry-pushback-ms" for k, _ in error.trailing_metadata() or ())
    finally:
        hold.set()
    await asyncio.gather(first, *waiters)
    assert server.executions("k") == 1


def test_max_waiters_and_per_method_leases_are_validated() -> None:
    for options, message in [
        ({"max_waiters": 0}, "max_waiters must be an integer >= 1"),
        ({"lease": {"/a.B/C": 0}}, r"lease\['/a.B/C'\] must be a finite number of seconds > 0"),
        ({"lease": {"Transfer": 5.0}}, "lease: each entry must look like"),
        ({"lease": "30"}, "lease must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            DedupInterceptor(**options)
    leases = DedupInterceptor(lease={"/a.B/*": 5.0, "/a.B/Slow": 120.0}).leases
    assert (leases("/a.B/Slow"), leases("/a.B/Fast"), leases("/c.D/E")) == (120.0, 5.0, 30.0)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_lease_can_be_set_per_method(kind: str, start: Start) -> None:
    store = MemoryStore()
    server = await start(kind, Script(hold=threading.Event()), store=store, lease={TRANSFER: 90.0})
    hold = server.servicer.script.hold
    assert hold is not None
    call = asyncio.ensure_future(server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=10))
    try:
        await until(lambda: server.servicer.started == 1)
        (key,) = list(store._claims)
        record = store.get(key)
        assert record is not None and 80.0 < record.lease_left <= 90.0
    finally:
        hold.set()
    await call


# ---------------------------------------------------------------------------- 6: nothing internal


@pytest.mark.parametrize("kind", KINDS)
async def test_store_failures_tell_clients_nothing_internal(
    kind: str, start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_grpc.server")
    path = tmp_path / "dedup.sqlite3"
    server = await start(kind, store=SQLiteStore(path, busy_timeout=0.05))
    with sqlite_locked(path):
        error = await _error(server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "idempotency store unavailable"
    assert str(path) in caplog.text  # the cause is in the server log


@pytest.mark.parametrize("kind", KINDS)
async def test_a_store_failing_after_the_handler_ran_is_not_logged_as_refusing_the_call(
    kind: str, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_grpc.server")
    server = await start(kind, store=FailsToComplete())
    reply = await server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=5)
    assert reply.transfer_id  # the live answer
    assert "refusing the call" not in caplog.text
    assert "answered but not stored" in caplog.text
    assert "disk I/O error" in caplog.text


class Buggy(MemoryStore):
    """A custom store with a bug: it raises its driver's own error instead of
    StoreUnavailableError, with internal details in the message."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at = at

    def _fail(self, step: str) -> None:
        if step == self.at:
            raise RuntimeError("connect to db.internal:5432 failed (user=ledger)")

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        self._fail("claim")
        return super().claim(key, fingerprint, lease=lease)

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        self._fail("complete")
        return super().complete(key, token, outcome, ttl=ttl)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_custom_store_raising_its_own_error_tells_clients_nothing_internal(
    kind: str, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that raises something other than StoreUnavailableError is a store that is down:
    the client gets the same UNAVAILABLE (not grpc's "Exception calling application" with the
    driver's text), nothing runs, and the cause goes to the server log."""
    caplog.set_level(logging.WARNING, logger="resilient_grpc")
    server = await start(kind, store=Buggy("claim"))
    error = await _error(server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "idempotency store unavailable"
    assert server.servicer.started == 0
    assert "db.internal" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
async def test_a_custom_store_raising_at_completion_still_answers_live(
    kind: str, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_grpc")
    server = await start(kind, store=Buggy("complete"))
    reply = await server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=5)
    assert reply.transfer_id  # the handler ran once; its live answer reaches the client
    assert server.executions("k") == 1
    assert "answered but not stored" in caplog.text
    assert "db.internal" in caplog.text


# ---------------------------------------------------------------------------- 7: initial metadata


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "redis"])
@pytest.mark.parametrize("kind", KINDS)
async def test_initial_metadata_is_stored_and_replayed(
    kind: str, store_kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    script = Script(initial=(("x-ledger-region", "eu-1"),))
    server = await start(kind, script, store=make_store(store_kind, tmp_path, request))
    first = server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=5)
    await first
    replay = await _replayed(server.stub, "k")
    assert ("x-ledger-region", "eu-1") in tuple(await first.initial_metadata())
    assert ("x-ledger-region", "eu-1") in tuple(await replay.initial_metadata())
    assert server.executions("k") == 1


# ---------------------------------------------------------------------------- 8: aio handler kinds


@pytest.fixture
async def raw_aio_server() -> AsyncIterator[Callable[..., Awaitable[grpc.aio.Channel]]]:
    """An aio server of raw-bytes handlers (``{"Name": handler}`` under ``test.Raw``) behind an
    ``AioDedupInterceptor(**options)``, closed (and the interceptor too) after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def run(handlers: RawHandlers, **options: Any) -> grpc.aio.Channel:
            interceptor = AioDedupInterceptor(**options)
            stack.push_async_callback(interceptor.aclose, 5)
            raw = await stack.enter_async_context(serve_raw_aio(handlers, [interceptor]))
            return raw.channel

        yield run


async def test_aio_stream_handlers_that_write_through_the_context_are_deduplicated(
    raw_aio_server: Callable[..., Awaitable[grpc.aio.Channel]],
) -> None:
    executions: list[bytes] = []

    async def watch(request: bytes, context: Any) -> None:
        executions.append(request)
        for n in range(3):
            await context.write(b"message-%d" % n)

    channel = await raw_aio_server({"Watch": grpc.unary_stream_rpc_method_handler(watch)})
    method = channel.unary_stream("/test.Raw/Watch")
    first = [m async for m in method(b"req", metadata=_keyed("w"), timeout=5)]
    call = method(b"req", metadata=_keyed("w"), timeout=5)
    again = [m async for m in call]
    assert first == again == [b"message-0", b"message-1", b"message-2"]
    assert REPLAYED in tuple(await call.trailing_metadata())
    assert executions == [b"req"]


async def test_aio_handlers_that_are_not_coroutines_are_refused_loudly(
    raw_aio_server: Callable[..., Awaitable[grpc.aio.Channel]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="resilient_grpc.server")
    executions: list[bytes] = []

    def blocking(request: bytes, context: Any) -> bytes:
        executions.append(request)
        return b"answer"

    channel = await raw_aio_server(
        {"Pay": grpc.unary_unary_rpc_method_handler(blocking)},
        require_key_methods=["/test.Raw/Pay"],
    )
    method = channel.unary_unary("/test.Raw/Pay")
    for metadata in (_keyed("p"), _keyed("p"), []):  # keyed twice, and a required key missing
        error = await _error(method(b"req", metadata=metadata, timeout=5))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert executions == []
    assert caplog.text.count("is not a coroutine function") == 1


# ---------------------------------------------------------------------------- streams cut short


def test_a_sync_stream_whose_client_goes_away_keeps_its_claim() -> None:
    """A client cancelling mid-stream says nothing about the effect: the claim is kept (the
    retry is told to come back), never released for a second execution."""
    executions: list[bytes] = []

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        executions.append(request)
        for n in range(40):
            yield b"m%d" % n
            time.sleep(0.05)

    handlers = {"Watch": grpc.unary_stream_rpc_method_handler(stream)}
    with serve_raw(handlers, [DedupInterceptor(lease=30.0)]) as channel:
        method = channel.unary_stream("/test.Raw/Watch")
        call = method(b"req", metadata=_keyed("s"), timeout=10)
        assert next(call) == b"m0"
        call.cancel()
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as retry:
            list(method(b"req", metadata=_keyed("s"), timeout=1))
    assert retry.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert executions == [b"req"]


async def test_an_aio_stream_whose_client_goes_away_keeps_its_claim(
    raw_aio_server: Callable[..., Awaitable[grpc.aio.Channel]],
) -> None:
    executions: list[bytes] = []

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        executions.append(request)
        for n in range(40):
            yield b"m%d" % n
            await asyncio.sleep(0.05)

    channel = await raw_aio_server(
        {"Watch": grpc.unary_stream_rpc_method_handler(stream)}, lease=30.0
    )
    method = channel.unary_stream("/test.Raw/Watch")
    call = method(b"req", metadata=_keyed("s"), timeout=10)
    assert await call.read() == b"m0"
    call.cancel()
    await asyncio.sleep(0.3)
    error = await _error(_drain(method(b"req", metadata=_keyed("s"), timeout=1)))
    assert error.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert executions == [b"req"]


async def _drain(call: Any) -> list[bytes]:
    return [message async for message in call]


async def test_aio_aclose_cancels_executions_that_outlived_their_calls_and_keeps_their_claims() -> (
    None
):
    """An execution shielded from its call's cancellation is owned by the interceptor:
    ``aclose`` cancels it (the handler sees the cancellation) and awaits it; the outcome is
    unknown, so the claim is kept."""
    seen: list[str] = []
    started = asyncio.Event()

    async def slow(request: bytes, context: Any) -> bytes:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return b"never"

    store = MemoryStore()
    interceptor = AioDedupInterceptor(store, lease=30.0)
    handlers = {"Slow": grpc.unary_unary_rpc_method_handler(slow)}
    async with serve_raw_aio(handlers, [interceptor]) as raw:
        method = raw.channel.unary_unary("/test.Raw/Slow")
        error = await _error(method(b"req", metadata=_keyed("slow"), timeout=0.3))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert started.is_set() and seen == []  # the execution outlived its call
        await interceptor.aclose(0)
        assert seen == ["cancelled"] and not interceptor._tasks
        (key,) = list(store._claims)
        record = store.get(key)
        assert record is not None and record.state.value == "in_progress"  # claim kept


def test_a_sync_handler_sees_a_servicer_context() -> None:
    """The context wrapper that records initial metadata and aborts is still a ServicerContext."""
    seen: list[bool] = []

    def pay(request: bytes, context: Any) -> bytes:
        seen.append(isinstance(context, grpc.ServicerContext) and context.is_active())
        return b"paid"

    handlers = {"Pay": grpc.unary_unary_rpc_method_handler(pay)}
    with serve_raw(handlers, [DedupInterceptor()], max_workers=2) as channel:
        assert channel.unary_unary("/test.Raw/Pay")(b"r", metadata=_keyed("p"), timeout=5)
    assert seen == [True]


async def test_an_aio_handler_sees_an_aio_servicer_context(
    raw_aio_server: Callable[..., Awaitable[grpc.aio.Channel]],
) -> None:
    seen: list[bool] = []

    async def pay(request: bytes, context: Any) -> bytes:
        seen.append(isinstance(context, grpc.aio.ServicerContext) and not context.done())
        return b"paid"

    channel = await raw_aio_server({"Pay": grpc.unary_unary_rpc_method_handler(pay)})
    assert await channel.unary_unary("/test.Raw/Pay")(b"r", metadata=_keyed("p"), timeout=5)
    assert seen == [True]


async def test_an_aio_execution_that_outlives_its_call_keeps_renewing_its_lease(
    start: Start,
) -> None:
    """Cancelled at 0.2 s, the shielded handler runs on for 1.5 s with a 0.6 s lease: its claim
    is still renewed, so a retry after the first lease would have lapsed waits and replays."""
    server = await start("aio", Script(before=1.5), lease=0.6)
    error = await _error(server.stub.Transfer(transfer(), metadata=_keyed("k"), timeout=0.2))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.8)  # past the first lease
    await _replayed(server.stub, "k")
    assert server.executions("k") == 1 and server.servicer.started == 1
