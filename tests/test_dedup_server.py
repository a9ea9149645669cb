"""The sync DedupInterceptor on a real grpc.server: every row of the design's server table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, WATCH, Fault, SyncLedger, serve
from resilient_grpc import IdempotencyKeys, RetryPolicy, idempotency_key, resilient_channel
from resilient_grpc.core.dedup import scoped_key
from resilient_grpc.core.keys import derive_key
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore, SQLiteStore
from tests.dedup_fixtures import (
    KEY,
    RecordingAdmission,
    SlowLedger,
    make_store,
    raw_unary_call,
    sqlite_locked,
    transfer,
)

REPLAYED = ("idempotency-replayed", "true")

Start = Callable[..., tuple[SyncLedger, ledger_pb2_grpc.LedgerStub]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start a ledger behind a DedupInterceptor; returns (servicer, stub). Stopped at teardown."""
    servers: list[grpc.Server] = []
    channels: list[grpc.Channel] = []

    def run(
        servicer: SyncLedger | None = None,
        interceptors: tuple[grpc.ServerInterceptor, ...] = (),
        max_workers: int = 64,
        interceptor_class: type[DedupInterceptor] = DedupInterceptor,
        **options: Any,
    ) -> tuple[SyncLedger, ledger_pb2_grpc.LedgerStub]:
        dedup = interceptor_class(**options)
        server, port, servicer = serve(
            servicer, interceptors=[*interceptors, dedup], max_workers=max_workers
        )
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        servicer.port = port  # type: ignore[union-attr]
        return servicer, ledger_pb2_grpc.LedgerStub(channel)

    yield run
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(None)


def _error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def _keyed(key: str) -> list[tuple[str, str]]:
    return [(KEY, key)]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_first_call_executes_and_repeats_replay_the_exact_bytes(
    kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    servicer, stub = start(store=make_store(kind, tmp_path, request))
    first, call = stub.Transfer.with_call(transfer(5), metadata=_keyed("k1"))
    assert REPLAYED not in tuple(call.trailing_metadata() or ())
    for _ in range(3):
        again, call = stub.Transfer.with_call(transfer(5), metadata=_keyed("k1"))
        assert again.SerializeToString() == first.SerializeToString()
        assert tuple(call.trailing_metadata()) == (REPLAYED,)
    assert servicer.state.executions["k1"] == 1
    assert servicer.state.balances["b"] == servicer.state.initial_balance + 5


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_deterministic_errors_are_replayed_with_details_and_trailers(
    kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    servicer, stub = start(store=make_store(kind, tmp_path, request))
    servicer.state.faults.add(
        TRANSFER, Fault(code=grpc.StatusCode.NOT_FOUND, details="no account b", pushback_ms="7")
    )
    first = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1")))
    replay = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert first.code() == replay.code() == grpc.StatusCode.NOT_FOUND
    assert first.details() == replay.details() == "no account b"
    assert tuple(first.trailing_metadata()) == (("grpc-retry-pushback-ms", "7"),)
    assert tuple(replay.trailing_metadata()) == (("grpc-retry-pushback-ms", "7"), REPLAYED)
    assert len(servicer.state.calls_to(TRANSFER)) == 1


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_key_reuse_with_a_different_request_is_refused(
    kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    servicer, stub = start(store=make_store(kind, tmp_path, request))
    stub.Transfer(transfer(5), metadata=_keyed("k1"))
    error = _error(lambda: stub.Transfer(transfer(5, memo="other"), metadata=_keyed("k1")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        "idempotency key reused with a different request: the key was first used on another "
        "method, or with a request whose content differs from this one"
    )
    assert servicer.state.executions["k1"] == 1
    assert len(servicer.state.calls_to(TRANSFER)) == 1


def test_key_reuse_while_in_progress_is_refused(start: Start) -> None:
    servicer, stub = start(SlowLedger(delay=0.5))
    slow = stub.Transfer.future(transfer(5), metadata=_keyed("k1"))
    assert isinstance(servicer, SlowLedger) and servicer.started.wait(5)
    error = _error(lambda: stub.Transfer(transfer(6), metadata=_keyed("k1"), timeout=5))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert slow.result(timeout=5).transfer_id
    assert servicer.state.executions["k1"] == 1


def test_no_key_passes_through(start: Start) -> None:
    servicer, stub = start()
    stub.Transfer(transfer())
    _, call = stub.Transfer.with_call(transfer())
    assert tuple(call.trailing_metadata() or ()) == ()
    assert servicer.state.executions[None] == 2


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        ((), f"{TRANSFER} requires an idempotency key in the 'idempotency-key' metadata header"),
        (
            _keyed(""),
            "invalid 'idempotency-key' metadata: idempotency key is empty",
        ),
        (
            _keyed("k" * 256),
            "invalid 'idempotency-key' metadata: idempotency key is 256 characters long; "
            "the maximum is 255",
        ),
        (
            _keyed("two words"),
            "invalid 'idempotency-key' metadata: idempotency key has a character that is not "
            "visible ASCII (' ' at position 3)",
        ),
    ],
)
def test_bad_or_missing_keys_are_invalid_argument_and_nothing_runs(
    start: Start, metadata: list[tuple[str, str]], details: str
) -> None:
    store = MemoryStore()
    servicer, stub = start(store=store, require_key_methods=[TRANSFER])
    error = _error(lambda: stub.Transfer(transfer(), metadata=metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == details
    assert servicer.state.calls_to(TRANSFER) == []
    assert len(store) == 0


def test_a_non_ascii_key_sent_on_the_wire_is_invalid_argument(start: Start) -> None:
    store = MemoryStore()
    servicer, _ = start(store=store)
    status, message = raw_unary_call(
        servicer.port,  # type: ignore[attr-defined]
        TRANSFER,
        transfer().SerializeToString(),
        [(KEY.encode(), "clé".encode())],
    )
    assert status == "3"  # INVALID_ARGUMENT
    assert message == (
        "invalid 'idempotency-key' metadata: idempotency key has a character that is not "
        "visible ASCII ('é' at position 2)"
    )
    assert servicer.state.calls_to(TRANSFER) == []
    assert len(store) == 0


def test_only_selected_methods_are_deduplicated(start: Start) -> None:
    servicer, stub = start(methods=[TRANSFER])
    stub.GetBalance(ledger_pb2.BalanceRequest(account="a"), metadata=_keyed("k1"))
    _, call = stub.GetBalance.with_call(
        ledger_pb2.BalanceRequest(account="a"), metadata=_keyed("k1")
    )
    assert REPLAYED not in tuple(call.trailing_metadata() or ())
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


def test_the_same_key_on_another_method_is_refused(start: Start) -> None:
    servicer, stub = start()
    stub.Transfer(transfer(), metadata=_keyed("k1"))
    error = _error(
        lambda: stub.GetBalance(ledger_pb2.BalanceRequest(account="a"), metadata=_keyed("k1"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert servicer.state.calls_to(GET_BALANCE) == []
    assert servicer.state.executions["k1"] == 1


def test_retryable_failures_release_the_key_and_the_retry_executes(start: Start) -> None:
    ledger = SlowLedger()
    ledger.crashes = 1
    servicer, stub = start(ledger)
    servicer.state.faults.add(TRANSFER, Fault(code=grpc.StatusCode.UNAVAILABLE, details="busy"))
    crashed = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert crashed.code() == grpc.StatusCode.UNKNOWN
    unavailable = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert unavailable.code() == grpc.StatusCode.UNAVAILABLE
    assert unavailable.details() == "busy"
    _, call = stub.Transfer.with_call(transfer(), metadata=_keyed("k1"))
    assert REPLAYED not in tuple(call.trailing_metadata() or ())
    assert servicer.state.executions["k1"] == 1
    assert len(servicer.state.calls_to(TRANSFER)) == 3


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_fifty_concurrent_duplicates_execute_once(
    kind: str, start: Start, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    servicer, stub = start(SlowLedger(delay=0.2), store=make_store(kind, tmp_path, request))
    barrier = threading.Barrier(50)

    def call(_: int) -> bytes:
        barrier.wait(timeout=10)
        reply: ledger_pb2.TransferReply = stub.Transfer(
            transfer(7), metadata=_keyed("same"), timeout=10
        )
        return reply.SerializeToString()

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(call, range(50)))
    assert len(replies) == 50 and len(set(replies)) == 1
    assert servicer.state.executions["same"] == 1
    assert len(servicer.state.calls_to(TRANSFER)) == 1
    assert servicer.state.balances["b"] == servicer.state.initial_balance + 7


def test_a_duplicate_that_cannot_wait_gets_aborted_with_pushback(start: Start) -> None:
    servicer, stub = start(SlowLedger(delay=2.0), lease=4.0, max_pushback=10.0)
    slow = stub.Transfer.future(transfer(), metadata=_keyed("k1"))
    assert isinstance(servicer, SlowLedger) and servicer.started.wait(5)
    began = time.monotonic()
    error = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=0.6))
    assert time.monotonic() - began < 1.8, "gave up before the first attempt finished"
    assert error.code() == grpc.StatusCode.ABORTED
    assert error.details().startswith(
        "another attempt with this idempotency key is still in progress; retry after"
    )
    trailers = dict(error.trailing_metadata())
    assert 2500 < int(trailers["grpc-retry-pushback-ms"]) <= 4000
    assert slow.result(timeout=5).transfer_id
    assert servicer.state.executions["k1"] == 1


class _Stall(grpc.ServerInterceptor):  # type: ignore[misc]
    """An interceptor in front of dedup that holds every call ``delay`` s (a slow auth check)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def stalled(request: Any, context: Any) -> Any:
            time.sleep(self.delay)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            stalled, handler.request_deserializer, handler.response_serializer
        )


class _Recording(RecordingAdmission, DedupInterceptor):
    admitted: list[object] = []


def test_an_expired_deadline_is_answered_without_claiming_or_running(start: Start) -> None:
    store = MemoryStore()
    _Recording.admitted = []
    servicer, stub = start(store=store, interceptors=(_Stall(0.3),), interceptor_class=_Recording)
    error = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=0.1))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):  # the stalled server side reaches the interceptor after 0.3 s
        if _Recording.admitted:
            break
        time.sleep(0.01)
    assert _Recording.admitted == [
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the deadline expired before the call could start; nothing was executed",
        )
    ]
    assert servicer.state.calls_to(TRANSFER) == []
    assert len(store) == 0
    stub.Transfer(transfer(), metadata=_keyed("k1"), timeout=5)
    assert servicer.state.executions["k1"] == 1


def test_tenants_with_the_same_key_never_share_a_record(start: Start) -> None:
    def tenant(context: grpc.ServicerContext) -> str:
        return dict(context.invocation_metadata()).get("tenant", "")

    store = MemoryStore()
    servicer, stub = start(store=store, scope=tenant)
    replies = {}
    for name in ("alice", "bob"):
        replies[name] = stub.Transfer(transfer(), metadata=[(KEY, "k1"), ("tenant", name)])
    assert replies["alice"].transfer_id != replies["bob"].transfer_id
    for name in ("alice", "bob"):
        again, call = stub.Transfer.with_call(transfer(), metadata=[(KEY, "k1"), ("tenant", name)])
        assert again == replies[name]
        assert tuple(call.trailing_metadata()) == (REPLAYED,)
    assert servicer.state.executions["k1"] == 2
    assert store.get(scoped_key("alice", "k1")) is not None
    assert store.get(scoped_key("", "k1")) is None


def test_streams_are_cached_whole_and_replayed(start: Start) -> None:
    servicer, stub = start()
    request = ledger_pb2.WatchRequest(account="a", count=3)
    first = list(stub.Watch(request, metadata=_keyed("w1")))
    replay = stub.Watch(request, metadata=_keyed("w1"))
    assert list(replay) == first and [m.sequence for m in first] == [1, 2, 3]
    assert tuple(replay.trailing_metadata()) == (REPLAYED,)
    assert len(servicer.state.calls_to(WATCH)) == 1


def test_a_stream_that_fails_midway_with_a_deterministic_error_is_replayed_whole(
    start: Start,
) -> None:
    servicer, stub = start()
    servicer.state.faults.add(
        WATCH, Fault(code=grpc.StatusCode.OUT_OF_RANGE, details="end", after_messages=2)
    )
    request = ledger_pb2.WatchRequest(account="a", count=5)
    for attempt in range(2):
        call = stub.Watch(request, metadata=_keyed("w1"))
        received = []
        with pytest.raises(grpc.RpcError):
            received.extend(call)
        assert [m.sequence for m in received] == [1, 2]
        assert call.code() == grpc.StatusCode.OUT_OF_RANGE and call.details() == "end"
        assert (REPLAYED in tuple(call.trailing_metadata())) == (attempt == 1)
    assert len(servicer.state.calls_to(WATCH)) == 1


def test_an_oversized_response_is_not_stored_and_never_executed_again(start: Start) -> None:
    store = MemoryStore()
    servicer, stub = start(store=store, max_response_bytes=8)
    stub.Transfer(transfer(), metadata=_keyed("k1"))
    error = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith(
        "the call with this idempotency key already executed, but its response ("
    )
    assert "exceeded max_response_bytes" in error.details()
    assert tuple(error.trailing_metadata()) == (REPLAYED,)
    assert servicer.state.executions["k1"] == 1


def test_handlers_run_inside_a_derivation_scope_of_their_key(start: Start) -> None:
    ledger = SlowLedger()
    start(ledger)[1].Transfer(transfer(), metadata=_keyed("parent-1"))
    assert ledger.seen_scopes == [("parent-1", derive_key("parent-1", TRANSFER, 0))]


def test_fail_open_runs_the_handler_while_the_store_is_down(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    servicer, stub = start(store=SQLiteStore(path, busy_timeout=0.05), fail_open=True)
    with sqlite_locked(path):
        stub.Transfer(transfer(), metadata=_keyed("k1"))
        stub.Transfer(transfer(), metadata=_keyed("k1"))
    assert servicer.state.executions["k1"] == 2  # no dedup while the store was down


def test_fail_closed_answers_unavailable_and_runs_nothing(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    servicer, stub = start(store=SQLiteStore(path, busy_timeout=0.05))
    with sqlite_locked(path) as details:
        error = _error(lambda: stub.Transfer(transfer(), metadata=_keyed("k1")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == details
    assert servicer.state.calls_to(TRANSFER) == []
    stub.Transfer(transfer(), metadata=_keyed("k1"))
    assert servicer.state.executions["k1"] == 1


def test_bad_interceptor_arguments_name_the_field() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"lease": 0}, "lease must be a finite number of seconds > 0"),
        ({"ttl": -1}, "ttl must be a finite number of seconds > 0"),
        ({"max_response_bytes": 0}, "max_response_bytes must be an integer >= 1"),
        ({"fail_open": "yes"}, "fail_open must be True or False"),
        ({"header": "Idempotency-Key"}, "header must be a non-empty lower-case"),
        ({"methods": "/a.B/C"}, "methods: expected a collection"),
        ({"require_key_methods": ["Transfer"]}, "require_key_methods: each entry"),
        ({"scope": "tenant"}, "scope must be a function"),
        ({"store": object()}, "store must be a resilient_grpc.stores.Store"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            DedupInterceptor(**options)


def test_the_client_stack_honours_the_pushback_and_gets_the_replay(start: Start) -> None:
    servicer, _ = start(SlowLedger(delay=1.2), max_pushback=1.0)
    port = servicer.port  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        first = ledger_pb2_grpc.LedgerStub(plain).Transfer.future(
            transfer(), metadata=_keyed("k1"), timeout=10
        )
        assert isinstance(servicer, SlowLedger) and servicer.started.wait(5)
        policy = RetryPolicy(
            max_attempts=4,
            initial_backoff=0.01,
            max_backoff=0.02,
            per_attempt_timeout=0.5,
            retryable_codes=frozenset({"UNAVAILABLE", "ABORTED"}),
        )
        channel = resilient_channel(
            f"127.0.0.1:{port}", retry=policy, idempotency=IdempotencyKeys()
        )
        began = time.monotonic()
        with idempotency_key("k1"):
            retried = ledger_pb2_grpc.LedgerStub(channel).Transfer(transfer(), timeout=10)
        waited = time.monotonic() - began
        channel.close()
        assert retried == first.result(timeout=5)
    # attempt 1 waited ~0.4 s and was ABORTED with a 1000 ms pushback; the computed backoff
    # (10-20 ms) would have retried long before the pushback
    assert waited >= 0.9
    assert servicer.state.executions["k1"] == 1


def test_stores_keep_a_hash_never_the_raw_key(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteStore(path)
    _, stub = start(store=store)
    stub.Transfer(transfer(), metadata=_keyed("raw-secret-key-4242"))
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"raw-secret-key-4242" not in stored
    assert scoped_key("", "raw-secret-key-4242").encode() in stored


def test_calls_made_by_a_handler_carry_keys_derived_from_its_key(start: Start) -> None:
    downstream, _ = start()
    downstream_port = downstream.port  # type: ignore[attr-defined]
    channel = resilient_channel(
        f"127.0.0.1:{downstream_port}",
        retry=RetryPolicy(max_attempts=2),
        idempotency=IdempotencyKeys(),
    )
    calls = ledger_pb2_grpc.LedgerStub(channel)

    class Chained(SyncLedger):
        """Transfer forwards to the downstream ledger; fails UNAVAILABLE the first time."""

        attempts = 0

        def Transfer(self, request: Any, context: Any) -> Any:
            forwarded = calls.Transfer(request, timeout=5)
            Chained.attempts += 1
            if Chained.attempts == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "lost after forwarding")
            return forwarded

    _, stub = start(Chained())
    with pytest.raises(grpc.RpcError):
        stub.Transfer(transfer(), metadata=_keyed("parent"))
    reply = stub.Transfer(transfer(), metadata=_keyed("parent"))  # the handler runs again
    channel.close()
    expected = derive_key("parent", TRANSFER, 0)
    assert [c.key for c in downstream.state.calls_to(TRANSFER)] == [expected]
    assert downstream.state.executions[expected] == 1, "the downstream deduplicated the re-run"
    assert reply.transfer_id == "t1"
