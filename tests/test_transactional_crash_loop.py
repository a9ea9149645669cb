"""Exactly once through crashes: keyed transfers through the full client stack while the server
process is SIGKILLed and restarted at random moments, some of them between a handler's writes and
its commit (and, in one run, PostgreSQL itself crashed and restarted).

Transactional mode (PostgresStore and SQLiteStore, sync and aio servers): every transfer the
client saw succeed is applied exactly once, none twice, and the sum of balances is unchanged.
Lease mode under the same faults applies transfers twice (PostgresStore with a handler that
commits on its own connection, and MemoryStore), which shows the faults are real.
"""

from __future__ import annotations

import os
import queue
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc import IdempotencyKeys, RetryPolicy, resilient_channel
from resilient_grpc.testing.servers import PostgresServer, free_port
from tests.private_servers import ExternalServer
from tests.sql_ledger_process import LedgerProcess
from tests.sql_ledger_servers import ACCOUNTS, BALANCE, LedgerSpec, prepare
from tests.test_transactional import Database

pytestmark = pytest.mark.slow

RETRY = RetryPolicy(
    max_attempts=40,
    initial_backoff=0.02,
    max_backoff=0.25,
    retryable_codes=frozenset({"UNAVAILABLE", "ABORTED"}),
)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


@dataclass
class Run:
    """What one crash loop did and saw."""

    succeeded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    kills: int = 0
    window_kills: int = 0
    database_outages: int = 0
    refused_while_down: int = 0


@dataclass
class Harness:
    database: str
    where: str
    flavour: str
    mode: str = "transactional"
    store: str = "same"
    lease: float = 0.5

    pause_file: str = ""

    def arguments(self, port: int) -> list[str]:
        return [
            *("--database", self.database, "--where", self.where, "--port", str(port)),
            *("--flavour", self.flavour, "--mode", self.mode, "--store", self.store),
            *("--lease", str(self.lease), "--pause-file", self.pause_file),
        ]

    def run(
        self,
        *,
        transfers: int,
        kills: int,
        workers: int = 8,
        postgres: PostgresServer | None = None,
        stop_when_duplicated: bool = False,
        time_limit: float = 60.0,
    ) -> Run:
        """``transfers`` keyed transfers by ``workers`` threads while the server is killed
        ``kills`` times (every other kill between a handler's writes and its commit); with ``postgres``,
        the database is also crashed and restarted twice. A kill "in the window" makes the next
        handler pause 2 s after its writes, waits until one has written, and kills then."""
        prepare(LedgerSpec(self.database, self.where))
        self.pause_file = os.path.join(tempfile.mkdtemp(prefix="crash-loop-"), "pause")
        port = free_port()
        server = LedgerProcess(self.arguments(port))
        spare = LedgerProcess([*self.arguments(port), "--standby"])  # replaces a killed server
        server.wait_ready()
        result = Run()
        memos = iter(range(transfers))
        started = [0]  # transfers begun: the kills are spread over the run
        lock = threading.Lock()
        done = threading.Event()
        deadline = time.monotonic() + time_limit
        checker = Database(self.database, self.where)
        channel = resilient_channel(
            f"127.0.0.1:{port}", retry=RETRY, idempotency=IdempotencyKeys(), options=CHANNEL_OPTIONS
        )
        stub = ledger_pb2_grpc.LedgerStub(channel)
        rng = random.Random(7)

        def work() -> None:
            while not done.is_set() and time.monotonic() < deadline:
                with lock:
                    index = next(memos, None)
                    source, target = rng.sample(ACCOUNTS, 2)
                    amount = rng.randint(1, 9)
                if index is None:
                    return
                started[0] = index + 1
                memo = f"m{index}"
                request = ledger_pb2.TransferRequest(
                    from_account=source, to_account=target, amount=amount, memo=memo
                )
                try:
                    stub.Transfer(request, timeout=30)
                    with lock:
                        result.succeeded.append(memo)
                except grpc.RpcError:
                    with lock:
                        result.failed.append(memo)

        threads = [threading.Thread(target=work) for _ in range(workers)]
        for thread in threads:
            thread.start()
        try:
            while result.kills < kills and time.monotonic() < deadline:
                if stop_when_duplicated and result.kills and checker_duplicates(checker):
                    break
                due = (result.kills + 1) * transfers // (kills + 1)
                while started[0] < due and time.monotonic() < deadline:
                    time.sleep(0.005)
                in_window = result.kills % 2 == 0
                if in_window:  # a handler between its writes and its return (2 s pause)
                    Path(self.pause_file).touch()
                    _drain(server)
                    try:
                        server.wrote.get(timeout=10)
                    except queue.Empty:
                        in_window = False
                else:
                    time.sleep(rng.uniform(0.0, 0.2))
                server.kill()
                Path(self.pause_file).unlink(missing_ok=True)
                result.kills += 1
                result.window_kills += in_window
                server, spare = spare, LedgerProcess([*self.arguments(port), "--standby"])
                server.go()
                server.wait_ready()
                if postgres is not None and result.kills in (kills // 3, 2 * kills // 3):
                    result.refused_while_down += _database_outage(postgres, port)
                    result.database_outages += 1
            if stop_when_duplicated:
                done.set()
            for thread in threads:
                thread.join(timeout=max(1.0, deadline - time.monotonic() + 30))
        finally:
            done.set()
            server.stop()
            spare.kill()
            channel.close()
        return result


def _database_outage(postgres: PostgresServer, port: int) -> int:
    """Crash PostgreSQL for a moment under the running server; a keyed call that arrives
    meanwhile is refused with UNAVAILABLE (fail closed). Returns 1 if the probe was refused."""
    postgres.stop()
    refused = 0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            probe = ledger_pb2.TransferRequest(
                from_account="a", to_account="b", amount=1, memo="probe"
            )
            try:
                ledger_pb2_grpc.LedgerStub(channel).Transfer(
                    probe, metadata=[("idempotency-key", uuid.uuid4().hex)], timeout=10
                )
            except grpc.RpcError as error:
                refused = int(error.code() == grpc.StatusCode.UNAVAILABLE)
        time.sleep(0.3)
    finally:
        postgres.start()
    return refused


def _drain(server: LedgerProcess) -> None:
    while not server.wrote.empty():
        server.wrote.get_nowait()


def checker_duplicates(database: Database) -> int:
    return len(database.query("SELECT memo FROM transfers GROUP BY memo HAVING count(*) > 1"))


def applied(database: Database) -> dict[str, int]:
    return {
        memo: count
        for memo, count in database.query("SELECT memo, count(*) FROM transfers GROUP BY memo")
    }


@pytest.fixture
def postgres_where(postgres_url: str) -> Iterator[str]:
    import psycopg

    schema = f"crash_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"


def _check_exactly_once(run: Run, database: Database, *, transfers: int) -> None:
    print(  # shown with -s: what the run did
        f"succeeded {len(run.succeeded)}, failed {len(run.failed)}, kills {run.kills} "
        f"({run.window_kills} between write and commit), database crashes {run.database_outages}"
    )
    counts = applied(database)
    twice = {memo: n for memo, n in counts.items() if n > 1}
    assert not twice, f"applied more than once: {twice}"
    missing = [memo for memo in run.succeeded if counts.get(memo) != 1]
    assert not missing, f"succeeded for the client but not applied: {missing}"
    assert database.total() == len(ACCOUNTS) * BALANCE
    assert len(run.succeeded) + len(run.failed) == transfers
    assert len(run.succeeded) >= 0.9 * transfers, (len(run.succeeded), run.failed[:10])


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_postgres_transactional_exactly_once_through_server_kills(
    flavour: str, postgres_where: str
) -> None:
    run = Harness("postgres", postgres_where, flavour).run(transfers=300, kills=10)
    assert run.kills >= 10 and run.window_kills >= 5
    _check_exactly_once(run, Database("postgres", postgres_where), transfers=300)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_sqlite_transactional_exactly_once_through_server_kills(
    flavour: str, tmp_path: Path
) -> None:
    where = str(tmp_path / "ledger.sqlite3")
    run = Harness("sqlite", where, flavour).run(transfers=300, kills=10)
    assert run.kills >= 10 and run.window_kills >= 5
    _check_exactly_once(run, Database("sqlite", where), transfers=300)


def test_postgres_crashes_too_nothing_applies_twice_and_service_resumes(
    postgres_where: str, postgres_server: PostgresServer | ExternalServer
) -> None:
    if not isinstance(postgres_server, PostgresServer):
        pytest.skip("POSTGRES_URL: cannot crash that server")
    run = Harness("postgres", postgres_where, "sync").run(
        transfers=120, kills=6, postgres=postgres_server
    )
    assert run.database_outages == 2 and run.refused_while_down == 2
    assert Database("postgres", postgres_where).applied("probe") == 0
    _check_exactly_once(run, Database("postgres", postgres_where), transfers=120)


@pytest.mark.parametrize("store", ["postgres", "memory"])
def test_lease_mode_applies_twice_under_the_same_faults(store: str, postgres_where: str) -> None:
    harness = Harness(
        "postgres",
        postgres_where,
        "sync",
        mode="lease",
        store="same" if store == "postgres" else "memory",
    )
    run = harness.run(transfers=150, kills=8, stop_when_duplicated=True)
    assert checker_duplicates(Database("postgres", postgres_where)) >= 1, run
