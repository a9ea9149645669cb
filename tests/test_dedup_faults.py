"""Exactly-once under real faults, with the real client stack retrying: responses lost by a TCP
proxy after the server committed, and the Redis store stopped and restarted mid-run."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import TRANSFER, SyncLedger, serve
from resilient_grpc import IdempotencyKeys, RetryPolicy, resilient_channel
from resilient_grpc.aio import resilient_channel as aio_resilient_channel
from resilient_grpc.aio.server import DedupInterceptor as AioDedupInterceptor
from resilient_grpc.server import DedupInterceptor
from resilient_grpc.stores import MemoryStore, RedisStore
from resilient_grpc.testing import FaultProxy
from resilient_grpc.testing.servers import RedisServer
from tests.dedup_fixtures import KEY, transfer, transfer_in_parallel

RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.002, max_backoff=0.05, jitter="full")
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def ledger_behind_proxy() -> Iterator[tuple[SyncLedger, FaultProxy]]:
    server, port, servicer = serve(interceptors=[DedupInterceptor(MemoryStore())])
    with FaultProxy(port, cut_response_probability=0.3, seed=2024) as proxy:
        yield servicer, proxy
    server.stop(None)


def test_a_thousand_transfers_with_30_percent_lost_responses_apply_exactly_once(
    ledger_behind_proxy: tuple[SyncLedger, FaultProxy],
) -> None:
    servicer, proxy = ledger_behind_proxy
    replies = transfer_in_parallel(proxy.target, RETRY, OWN_CONNECTION, workers=4, per_worker=250)

    total = 4 * 250
    state = servicer.state
    counters = proxy.counters
    assert len(replies) == total, "every logical transfer got its acknowledgement"
    assert counters.responses_cut >= 0.2 * total, counters
    assert counters.collateral_calls == 0
    assert len(state.executions) == total and None not in state.executions
    assert state.duplicate_executions == 0
    assert set(state.executions.values()) == {1}
    moved = sum(range(1, total + 1))
    assert state.balances["b"] == state.initial_balance + moved
    assert state.balances["a"] == state.initial_balance - moved
    # every reply is the one the single execution produced (replays carry the stored bytes)
    assert len({reply.transfer_id for reply in replies}) == total


async def test_aio_lost_responses_apply_exactly_once() -> None:
    from protos.ledger_service import serve_aio

    server, port, servicer = await serve_aio(interceptors=[AioDedupInterceptor(MemoryStore())])
    with FaultProxy(port, cut_response_probability=0.3, seed=7) as proxy:
        channel = aio_resilient_channel(
            proxy.target, retry=RETRY, idempotency=IdempotencyKeys(), options=OWN_CONNECTION
        )
        stub = ledger_pb2_grpc.LedgerStub(channel)
        replies = [await stub.Transfer(transfer(amount=n + 1), timeout=30) for n in range(200)]
        await channel.close()
        cut = proxy.counters.responses_cut
    await server.stop(None)
    assert len(replies) == 200 and cut >= 30
    assert len(servicer.state.executions) == 200
    assert servicer.state.duplicate_executions == 0
    assert servicer.state.balances["b"] == servicer.state.initial_balance + sum(range(1, 201))


def test_redis_stopped_mid_run_fails_closed_then_recovers_without_loss_or_duplicates(
    redis_server: RedisServer, redis_url: str
) -> None:
    if not isinstance(redis_server, RedisServer):
        pytest.skip("REDIS_URL points at a server these tests cannot stop")
    store = RedisStore.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    server, port, servicer = serve(interceptors=[DedupInterceptor(store)])
    patient = RetryPolicy(max_attempts=200, initial_backoff=0.01, max_backoff=0.05, jitter="full")
    channel = resilient_channel(f"127.0.0.1:{port}", retry=patient, idempotency=IdempotencyKeys())
    stub = ledger_pb2_grpc.LedgerStub(channel)
    done = threading.Event()
    replies: list[ledger_pb2.TransferReply] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            for n in range(300):
                replies.append(stub.Transfer(transfer(amount=n + 1), timeout=30))
                if n == 100:
                    done.set()  # the outage starts now, in the middle of the run
        except BaseException as error:  # reported by the assertions below
            failures.append(error)
        finally:
            done.set()

    runner = threading.Thread(target=run)
    runner.start()
    assert done.wait(30)
    redis_server.stop()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            before = len(servicer.state.calls_to(TRANSFER))
            with pytest.raises(grpc.RpcError) as probe:
                ledger_pb2_grpc.LedgerStub(plain).Transfer(
                    transfer(), metadata=[(KEY, "during-outage")], timeout=5
                )
            threading.Event().wait(0.3)  # the runner keeps retrying against the dead store
            ran_during_outage = len(servicer.state.calls_to(TRANSFER)) - before
    finally:
        redis_server.start()
    runner.join(timeout=60)
    channel.close()
    server.stop(None)
    store.close()

    assert probe.value.code() == grpc.StatusCode.UNAVAILABLE
    # the client learns only that the store is unavailable (host and driver text stay in the log)
    assert probe.value.details() == "idempotency store unavailable"
    assert ran_during_outage <= 1, "at most the call in flight when Redis died ran its handler"
    assert failures == [] and len(replies) == 300
    state = servicer.state
    assert state.duplicate_executions == 0
    assert len([k for k in state.executions if k != "during-outage"]) == 300
    assert "during-outage" not in state.executions
    assert state.balances["b"] == state.initial_balance + sum(range(1, 301))
