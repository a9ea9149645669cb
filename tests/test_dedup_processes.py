"""Dedup across server processes: two replicas sharing one SQLite file or one Redis, a client
balancing over both (round_robin), and a replica killed in the middle of a handler."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import IdempotencyKeys, RetryPolicy, idempotency_key, resilient_channel
from tests.dedup_fixtures import KEY, transfer
from tests.dedup_server_process import ServerProcess

ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]
Replicas = Callable[..., tuple[ServerProcess, ServerProcess]]


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    started: list[ServerProcess] = []

    def start(store: str, **options: object) -> tuple[ServerProcess, ServerProcess]:
        with ThreadPoolExecutor(2) as pool:  # start both at once: imports take a while
            pair = list(pool.map(lambda _: ServerProcess(store, **options), range(2)))  # type: ignore[arg-type]
        started.extend(pair)
        return pair[0], pair[1]

    yield start
    for process in started:
        process.stop()


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:{tmp_path / 'dedup.sqlite3'}"
    return f"redis:{request.getfixturevalue('redis_url')}"


def _target(a: ServerProcess, b: ServerProcess) -> str:
    return f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_fifty_duplicates_over_two_processes_execute_once(
    kind: str, replicas: Replicas, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    a, b = replicas(_store(kind, tmp_path, request), delay=0.3)
    with grpc.insecure_channel(_target(a, b), options=ROUND_ROBIN) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        # both connections up (round_robin uses only READY ones), so the burst is spread
        for _ in range(1000):
            stub.GetBalance(ledger_pb2.BalanceRequest(account="a"), timeout=10)
            if all(any(line == "BALANCE" for line in p.lines) for p in (a, b)):
                break
            threading.Event().wait(0.01)
        assert a.wait_for("BALANCE", timeout=1) and b.wait_for("BALANCE", timeout=1)
        barrier = threading.Barrier(50)

        def call(_: int) -> bytes:
            barrier.wait(timeout=10)
            return stub.Transfer(transfer(3), metadata=[(KEY, "shared")], timeout=15).SerializeToString()

        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(call, range(50)))
    a.stop()
    b.stop()
    assert len(set(replies)) == 1
    assert a.executions() + b.executions() == ["shared"]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_replica_killed_mid_handler_is_taken_over_after_the_lease(
    kind: str, replicas: Replicas, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    lease = 1.0
    a, b = replicas(_store(kind, tmp_path, request), lease=lease, hang_once=str(tmp_path / "hang"))
    channel = resilient_channel(
        _target(a, b),
        retry=RetryPolicy(
            max_attempts=6,
            initial_backoff=0.05,
            max_backoff=0.5,
            retryable_codes=frozenset({"UNAVAILABLE", "ABORTED"}),
        ),
        idempotency=IdempotencyKeys(),
        options=ROUND_ROBIN,
    )
    stub = ledger_pb2_grpc.LedgerStub(channel)
    result: list[object] = []

    def call() -> None:
        try:
            with idempotency_key("killed-transfer"):
                result.append(stub.Transfer(transfer(11), timeout=20))
        except grpc.RpcError as error:
            result.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    # whichever replica got the first attempt hangs in the handler: kill it there
    victim = None
    for _ in range(600):
        victim = next((p for p in (a, b) if any(line.startswith("START") for line in p.lines)), None)
        if victim is not None:
            break
        threading.Event().wait(0.01)
    assert victim is not None, "no replica started the handler"
    victim.kill()
    survivor = b if victim is a else a
    caller.join(timeout=30)
    channel.close()
    survivor.stop()
    assert len(result) == 1 and not isinstance(result[0], Exception), result
    assert victim.executions() == []
    assert survivor.executions() == ["killed-transfer"]
