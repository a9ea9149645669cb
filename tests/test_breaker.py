"""CircuitBreaker (on pybreaker) through the client stack, against real ledger servers and Redis."""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc.aio
import pybreaker
import pytest
import redis

from protos import ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, Fault, SyncLedger, serve, serve_aio
from resilient_grpc import CircuitBreaker, IdempotencyKeys, RetryPolicy, telemetry
from resilient_grpc.aio.client import resilient_channel as aio_resilient_channel
from resilient_grpc.breaker import Admission
from resilient_grpc.client import resilient_channel
from resilient_grpc.errors import BreakerOpenError, attempts_of
from resilient_grpc.testing.servers import RedisServer
from tests.helpers import BALANCE_REQUEST

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ledger_target(ledger: tuple[SyncLedger, int]) -> str:
    return f"127.0.0.1:{ledger[1]}"


@pytest.fixture
def transitions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Breaker transitions reported to telemetry (recorded, then passed on to the real function)."""
    seen: list[tuple[str, str, str]] = []
    original = telemetry.breaker_state_changed

    def record(name: str, old: str, new: str) -> None:
        seen.append((name, old, new))
        original(name, old, new)

    monkeypatch.setattr(telemetry, "breaker_state_changed", record)
    return seen


def call_outcome(stub: ledger_pb2_grpc.LedgerStub) -> str:
    """``"ok"``, ``"breaker"`` (refused locally) or the status code name of a real failure."""
    try:
        stub.GetBalance(BALANCE_REQUEST, timeout=5)
    except BreakerOpenError:
        return "breaker"
    except grpc.RpcError as error:
        return str(error.code().name)
    return "ok"


def wait_for_reset(breaker: CircuitBreaker, target: str, limit: float = 3.0) -> None:
    """Wait (bounded) until the open breaker of ``target`` would let a probe through."""
    target_breaker = breaker.for_target(target)
    storage = target_breaker.circuit._state_storage
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        opened_at = storage.opened_at
        if opened_at is not None and datetime.datetime.now(
            datetime.timezone.utc
        ) >= opened_at + datetime.timedelta(seconds=breaker.reset_timeout):
            return
        time.sleep(0.01)
    raise AssertionError(f"breaker of {target} did not reach its reset time within {limit} s")


def test_opens_after_threshold_then_no_requests_then_exactly_one_probe(
    ledger, ledger_target, transitions
) -> None:
    servicer, _ = ledger
    breaker = CircuitBreaker(fail_max=3, reset_timeout=0.3, probe_every=None)
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 3)

        assert [call_outcome(stub) for _ in range(3)] == ["UNAVAILABLE"] * 3
        assert breaker.for_target(ledger_target).state == "open"

        # While open: fail fast, the server sees nothing at all.
        assert [call_outcome(stub) for _ in range(50)] == ["breaker"] * 50
        assert len(servicer.state.calls_to(GET_BALANCE)) == 3

        # After the reset timeout, 10 concurrent calls: exactly one probe reaches the server.
        # The probe is slow and fails, so the others arrive while it is in flight.
        servicer.state.faults.add(GET_BALANCE, Fault(delay=0.3))
        wait_for_reset(breaker, ledger_target)
        with ThreadPoolExecutor(max_workers=10) as pool:
            outcomes = list(pool.map(lambda _: call_outcome(stub), range(10)))
        assert sorted(outcomes) == ["UNAVAILABLE"] + ["breaker"] * 9
        assert len(servicer.state.calls_to(GET_BALANCE)) == 4
        assert breaker.for_target(ledger_target).state == "open"  # the failed probe reopened it

        # Next reset: a successful probe closes the breaker and traffic flows again.
        wait_for_reset(breaker, ledger_target)
        assert call_outcome(stub) == "ok"
        assert breaker.for_target(ledger_target).state == "closed"
        assert [call_outcome(stub) for _ in range(5)] == ["ok"] * 5
        assert len(servicer.state.calls_to(GET_BALANCE)) == 10

    name = f"resilient_grpc:{ledger_target}"
    assert [t for t in transitions if t[0] == name] == [
        (name, "closed", "open"),
        (name, "open", "half-open"),
        (name, "half-open", "open"),
        (name, "open", "half-open"),
        (name, "half-open", "closed"),
    ]


def test_business_errors_are_never_counted(ledger, ledger_target) -> None:
    servicer, _ = ledger
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        for code in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED,
        ):
            servicer.state.faults.fail_times(GET_BALANCE, 3, Fault(code=code))
            assert [call_outcome(stub) for _ in range(3)] == [code.name] * 3
        assert breaker.for_target(ledger_target).state == "closed"
        assert breaker.for_target(ledger_target).circuit.fail_counter == 0

        # A business error proves the backend answers: it resets the consecutive count.
        servicer.state.faults.add(
            GET_BALANCE, Fault(), Fault(code=grpc.StatusCode.NOT_FOUND), Fault()
        )
        assert [call_outcome(stub) for _ in range(3)] == ["UNAVAILABLE", "NOT_FOUND", "UNAVAILABLE"]
        assert breaker.for_target(ledger_target).state == "closed"


def test_counted_codes_are_configurable(ledger, ledger_target) -> None:
    servicer, _ = ledger
    breaker = CircuitBreaker(
        fail_max=2, reset_timeout=30, failure_rate=0, codes=[grpc.StatusCode.UNAVAILABLE]
    )
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 4, Fault(code=grpc.StatusCode.INTERNAL))
        assert [call_outcome(stub) for _ in range(4)] == ["INTERNAL"] * 4
        assert breaker.for_target(ledger_target).state == "closed"
        servicer.state.faults.fail_times(GET_BALANCE, 2)
        assert [call_outcome(stub) for _ in range(3)] == ["UNAVAILABLE", "UNAVAILABLE", "breaker"]


def test_an_attempt_cut_by_per_attempt_timeout_counts_as_unhealthy(ledger, ledger_target) -> None:
    servicer, _ = ledger
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30)
    policy = RetryPolicy(max_attempts=1, per_attempt_timeout=0.05)
    with resilient_channel(ledger_target, retry=policy, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 2, Fault(delay=0.3))
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetBalance(BALANCE_REQUEST, timeout=5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert breaker.for_target(ledger_target).state == "open"


def test_the_callers_own_short_deadline_does_not_count(ledger, ledger_target) -> None:
    """One impatient caller must not open the breaker for everyone (issue 9, item 8)."""
    servicer, _ = ledger
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30, failure_rate=0.0)
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 5, Fault(code=None, delay=0.2))
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetBalance(BALANCE_REQUEST, timeout=0.05)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        target = breaker.for_target(ledger_target)
        assert target.state == "closed"
        assert target.circuit.fail_counter == 0
        stub.GetBalance(BALANCE_REQUEST, timeout=5)  # everyone else still gets through


@pytest.mark.parametrize("per_target", [True, False])
def test_one_breaker_per_target_unless_shared(ledger, ledger_target, per_target: bool) -> None:
    servicer, _ = ledger
    other_server, other_port, other = serve()
    breaker = CircuitBreaker(fail_max=2, reset_timeout=30, per_target=per_target)
    try:
        with (
            resilient_channel(ledger_target, breaker=breaker) as first,
            resilient_channel(f"127.0.0.1:{other_port}", breaker=breaker) as second,
        ):
            servicer.state.faults.fail_times(GET_BALANCE, 2)
            stub = ledger_pb2_grpc.LedgerStub(first)
            assert [call_outcome(stub) for _ in range(2)] == ["UNAVAILABLE"] * 2
            assert call_outcome(stub) == "breaker"
            # the other target has its own breaker, unless one breaker is shared by all
            expected = "ok" if per_target else "breaker"
            assert call_outcome(ledger_pb2_grpc.LedgerStub(second)) == expected
            assert len(other.state.calls_to(GET_BALANCE)) == (1 if per_target else 0)
    finally:
        other_server.stop(None)


def test_breaker_open_error_is_an_rpc_error_with_code_unavailable() -> None:
    retry_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
    error = BreakerOpenError("ledger.example:443", retry_at)

    assert isinstance(error, grpc.RpcError)
    assert isinstance(error, grpc.Call)
    assert isinstance(error, grpc.Future)
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "circuit breaker for ledger.example:443 is open" in error.details()
    assert "next probe after" in error.details()
    assert not error.trailing_metadata()
    assert not error.initial_metadata()
    assert error.done() and not error.is_active()
    assert error.exception() is error
    with pytest.raises(BreakerOpenError):
        error.result()
    assert attempts_of(error) == 0
    copy = pickle.loads(pickle.dumps(error))
    assert copy.code() == grpc.StatusCode.UNAVAILABLE and copy.target == "ledger.example:443"


def test_breaker_open_error_while_a_probe_is_in_flight() -> None:
    error = BreakerOpenError("t", None)
    assert "probe call is already in flight" in error.details()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fail_max": 0}, "fail_max"),
        ({"fail_max": "5"}, "fail_max"),
        ({"fail_max": True}, "fail_max"),
        ({"reset_timeout": 0}, "reset_timeout"),
        ({"reset_timeout": -1.0}, "reset_timeout"),
        ({"reset_timeout": float("inf")}, "reset_timeout"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"codes": "UNAVAILABLE"}, "codes"),
        ({"codes": ["NOPE"]}, "codes"),
        ({"codes": ["OK"]}, "codes"),
        ({"per_target": "yes"}, "per_target"),
        ({"name": ""}, "name"),
        ({"storage": 42}, "storage"),
        ({"window": 0}, "window"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_rate": float("nan")}, "failure_rate"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(**kwargs)


# Shared state in Redis --------------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


PEER_SCRIPT = textwrap.dedent(
    """
    import sys
    import grpc, redis
    from protos import ledger_pb2, ledger_pb2_grpc
    from resilient_grpc import CircuitBreaker
    from resilient_grpc.client import resilient_channel
    from resilient_grpc.errors import BreakerOpenError

    url, namespace, target = sys.argv[1:4]
    breaker = CircuitBreaker.redis(redis.Redis.from_url(url), namespace=namespace, fail_max=2)
    with resilient_channel(target, breaker=breaker) as channel:
        try:
            ledger_pb2_grpc.LedgerStub(channel).GetBalance(
                ledger_pb2.BalanceRequest(account="alice"), timeout=5
            )
        except BreakerOpenError as error:
            print("refused:", error.details())
        else:
            print("called")
    """
)


def test_redis_storage_shares_an_open_breaker_across_processes(
    ledger, ledger_target, redis_url, redis_client
) -> None:
    servicer, _ = ledger
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.redis(redis_client, namespace=namespace, fail_max=2, reset_timeout=30)
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 2)
        assert [call_outcome(stub) for _ in range(3)] == ["UNAVAILABLE"] * 2 + ["breaker"]

    state_key = f"{namespace}:{ledger_target}:pybreaker:state"
    assert redis_client.get(state_key) == b"open"

    # Another process, its own breaker object, same Redis namespace: refused without calling.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    peer = subprocess.run(
        [sys.executable, "-c", PEER_SCRIPT, redis_url, namespace, ledger_target],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO_ROOT,
    )
    assert peer.returncode == 0, peer.stderr
    assert peer.stdout.startswith("refused: circuit breaker for"), peer.stdout
    assert len(servicer.state.calls_to(GET_BALANCE)) == 2


async def test_redis_storage_with_aio_runs_breaker_io_off_the_loop(redis_client) -> None:
    server, port, servicer = await serve_aio()
    target = f"127.0.0.1:{port}"
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.redis(redis_client, namespace=namespace, fail_max=2, reset_timeout=30)
    assert breaker.for_target(target).blocking
    try:
        async with aio_resilient_channel(
            target,
            retry=RetryPolicy(max_attempts=5, initial_backoff=0.01),
            breaker=breaker,
            idempotency=IdempotencyKeys(),
        ) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            servicer.state.faults.fail_times(GET_BALANCE, 5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
            assert attempts_of(caught.value) == 2  # retries stopped when the breaker opened
            with pytest.raises(BreakerOpenError):
                await stub.GetBalance(BALANCE_REQUEST, timeout=5)
        assert redis_client.get(f"{namespace}:{target}:pybreaker:state") == b"open"
        assert len(servicer.state.calls_to(GET_BALANCE)) == 2
    finally:
        await server.stop(None)


def test_a_pybreaker_storage_instance_is_one_breaker_for_every_target(redis_client) -> None:
    storage = pybreaker.CircuitRedisStorage(
        pybreaker.STATE_CLOSED, redis_client, namespace=f"test-{uuid.uuid4().hex[:8]}"
    )
    breaker = CircuitBreaker(storage=storage)
    assert breaker.for_target("a:1") is breaker.for_target("b:2")
    assert breaker.for_target("a:1").blocking


def test_redis_outage_lets_calls_through_and_recovers(
    ledger, ledger_target, redis_server, redis_url, caplog
) -> None:
    if not isinstance(redis_server, RedisServer):
        pytest.skip("REDIS_URL points at a Redis these tests may not stop")
    servicer, _ = ledger
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    breaker = CircuitBreaker.redis(
        client, namespace=namespace, fail_max=2, reset_timeout=30, probe_every=None
    )
    try:
        with resilient_channel(ledger_target, breaker=breaker) as channel:
            stub = ledger_pb2_grpc.LedgerStub(channel)
            redis_server.stop()  # a real outage: the process is killed
            # The breaker cannot read or write its state: calls go through (fail open),
            # and the outage is logged once, not per call.
            with caplog.at_level("WARNING", logger="resilient_grpc.breaker"):
                assert [call_outcome(stub) for _ in range(3)] == ["ok"] * 3
            warnings = [r for r in caplog.records if r.name == "resilient_grpc.breaker"]
            assert len(warnings) == 1 and "state storage failed" in warnings[0].getMessage()
            assert len(servicer.state.calls_to(GET_BALANCE)) == 3

            redis_server.start()  # back: the breaker guards again, with state in Redis
            servicer.state.faults.fail_times(GET_BALANCE, 2)
            assert [call_outcome(stub) for _ in range(3)] == ["UNAVAILABLE"] * 2 + ["breaker"]
            assert client.get(f"{namespace}:{ledger_target}:pybreaker:state") == b"open"
    finally:
        client.close()


# Failure rate: a burst of failures amid healthy traffic is not an outage -----------------------


def test_a_burst_amid_healthy_traffic_does_not_open_but_an_outage_does(
    ledger, ledger_target
) -> None:
    servicer, _ = ledger
    # A long window, so a slow machine cannot age the successes out in the middle of the test.
    breaker = CircuitBreaker(fail_max=5, reset_timeout=30, window=60.0, failure_rate=0.5)
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert [call_outcome(stub) for _ in range(15)] == ["ok"] * 15
        servicer.state.faults.fail_times(GET_BALANCE, 7)  # 7 of 22 failed: 32 %
        assert [call_outcome(stub) for _ in range(7)] == ["UNAVAILABLE"] * 7
        assert breaker.for_target(ledger_target).state == "closed"
        # A real outage: the rate reaches 50 % at the 15th failure, which is the first counted
        # one; the 19th opens the breaker and the next call fails fast.
        servicer.state.faults.fail_times(GET_BALANCE, 100)
        outcomes = [call_outcome(stub) for _ in range(20)]
        assert outcomes[:12] == ["UNAVAILABLE"] * 12
        assert outcomes[12:] == ["breaker"] * 8
        assert breaker.for_target(ledger_target).state == "open"


def test_plain_consecutive_rule_with_failure_rate_zero(ledger, ledger_target) -> None:
    servicer, _ = ledger
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30, failure_rate=0)
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert [call_outcome(stub) for _ in range(15)] == ["ok"] * 15
        servicer.state.faults.fail_times(GET_BALANCE, 3)
        assert [call_outcome(stub) for _ in range(4)] == ["UNAVAILABLE"] * 3 + ["breaker"]


def test_a_cut_connection_does_not_open_the_breaker_and_the_calls_recover(ledger) -> None:
    """Every call in flight on a connection fails at once when it is reset; the backend is fine."""
    from resilient_grpc.core.budget import RetryBudget
    from resilient_grpc.testing.proxy import FaultProxy

    servicer, port = ledger
    breaker = CircuitBreaker(fail_max=5, reset_timeout=30)
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
    with (
        FaultProxy(port) as proxy,
        resilient_channel(
            proxy.target,
            retry=policy,
            budget=RetryBudget(),
            breaker=breaker,
            idempotency=IdempotencyKeys(),
        ) as channel,
    ):
        stub = ledger_pb2_grpc.LedgerStub(channel)
        assert [call_outcome(stub) for _ in range(20)] == ["ok"] * 20
        # Twelve slow calls in flight on the one connection, then a reset under them.
        servicer.state.faults.add(GET_BALANCE, *[Fault(code=None, delay=0.5)] * 12)
        seen_before = len(servicer.state.calls_to(GET_BALANCE))
        with ThreadPoolExecutor(max_workers=12) as pool:
            futures = [pool.submit(call_outcome, stub) for _ in range(12)]
            deadline = time.monotonic() + 5
            while (
                len(servicer.state.calls_to(GET_BALANCE)) < seen_before + 12
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            assert proxy.cut_all() >= 1
            results = [future.result(timeout=30) for future in futures]
        assert results == ["ok"] * 12, results
        assert proxy.counters.collateral_calls >= 12
        assert breaker.for_target(proxy.target).state == "closed"


def test_an_open_breaker_lets_one_call_in_n_through_and_closes_when_it_succeeds(
    ledger, ledger_target, transitions
) -> None:
    """Issue 11: no self-inflicted downtime after an outage. While open, every ``probe_every``-th
    call is sent as a probe; a failed one keeps the breaker open (and is not retried), the first
    that succeeds closes it, long before ``reset_timeout``."""
    servicer, _ = ledger
    breaker = CircuitBreaker(fail_max=3, reset_timeout=30, probe_every=5, failure_rate=0)
    with resilient_channel(
        ledger_target, breaker=breaker, retry=RetryPolicy(), idempotency=IdempotencyKeys()
    ) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 4)  # opens it; the first probe fails too

        assert [call_outcome(stub) for _ in range(1)] == ["UNAVAILABLE"]  # 3 attempts
        assert breaker.for_target(ledger_target).state == "open"
        assert [call_outcome(stub) for _ in range(5)] == ["breaker"] * 4 + ["UNAVAILABLE"]
        assert len(servicer.state.calls_to(GET_BALANCE)) == 4  # the failed probe: no retry
        assert breaker.for_target(ledger_target).state == "open"
        # the backend is back: the next probe closes the breaker, traffic flows at once
        assert [call_outcome(stub) for _ in range(5)] == ["breaker"] * 4 + ["ok"]
        assert breaker.for_target(ledger_target).state == "closed"
        assert [call_outcome(stub) for _ in range(5)] == ["ok"] * 5
        assert len(servicer.state.calls_to(GET_BALANCE)) == 10


def test_admit_says_how_an_attempt_goes_as_an_admission() -> None:
    """Closed: ADMITTED; open: REFUSED, and every ``probe_every``-th refusal a SAMPLE; after
    ``reset_timeout``: one PROBE at a time. No admission is a bare int tested by truthiness."""
    target = CircuitBreaker(fail_max=1, reset_timeout=30, failure_rate=0, probe_every=2).for_target(
        "t"
    )
    admission = target.admit()
    assert admission is Admission.ADMITTED
    assert target.record(admission, failed=True)  # opened
    assert [target.admit() for _ in range(4)] == [
        Admission.REFUSED,
        Admission.SAMPLE,
        Admission.REFUSED,
        Admission.SAMPLE,
    ]
    assert not target.record(Admission.SAMPLE, failed=False)  # a sample answered: closed
    assert target.admit() is Admission.ADMITTED

    quick = CircuitBreaker(
        fail_max=1, reset_timeout=0.01, failure_rate=0, probe_every=None
    ).for_target("q")
    assert quick.record(quick.admit(), failed=True)
    time.sleep(0.05)  # past reset_timeout (pybreaker reads the wall clock)
    assert quick.admit() is Admission.PROBE
    assert quick.admit() is Admission.REFUSED  # one probe in flight at a time
    quick.release(Admission.PROBE)
    assert quick.admit() is Admission.PROBE


def simulate_breaker_outage(probe_every: int | None) -> tuple[float, int]:
    """100 logical calls a second (on a fake clock for the budget) through the sans-IO decisions
    (RetryState, a shared RetryBudget, the breaker's admit/record) to a backend that answers
    UNAVAILABLE for calls 200..699; returns (attempts sent per logical call during the outage,
    calls failed after it). ``reset_timeout`` (30 s of real time) never elapses here."""
    from resilient_grpc import RetryBudget
    from resilient_grpc.core.retry import RetryState

    now = [0.0]
    budget = RetryBudget(clock=lambda: now[0])
    target = CircuitBreaker(
        fail_max=5, reset_timeout=30, failure_rate=0, probe_every=probe_every
    ).for_target("sim")
    policy = RetryPolicy(max_attempts=3)
    sent_during = failed_after = 0
    for index in range(1200):
        now[0] = index / 100
        down = 200 <= index < 700
        state = RetryState(
            policy, method="/a.B/C", has_key=True, budget=budget, clock=lambda: now[0]
        )
        ok = False
        while True:
            admission = target.admit()
            if admission is Admission.REFUSED:
                break
            state.begin_attempt()
            sent_during += down
            opened = target.record(admission, failed=down)
            if not down:
                ok = True
                break
            if opened or not state.on_failure("UNAVAILABLE").retry:
                break
        if not ok and index >= 700:
            failed_after += 1
    return sent_during / 500, failed_after


def test_recovery_after_an_outage_is_bounded_by_probe_every_and_the_outage_not_amplified() -> None:
    amplification, failed_after = simulate_breaker_outage(probe_every=20)
    assert amplification <= 1.1
    assert failed_after <= 20  # at most probe_every calls after the backend is back
    classic_amplification, classic_failed = simulate_breaker_outage(probe_every=None)
    assert classic_amplification <= 1.1
    assert classic_failed == 500  # every call until reset_timeout (30 s) fails


def test_probe_every_is_validated() -> None:
    for bad in (0, -1, 2.5, "20"):
        with pytest.raises(ValueError, match="probe_every must be an integer >= 1"):
            CircuitBreaker(probe_every=bad)  # type: ignore[arg-type]


def test_redis_storage_on_a_cluster_shares_an_open_breaker(
    ledger, ledger_target, redis_cluster
) -> None:
    import redis.cluster

    servicer, _ = ledger
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    client = redis.cluster.RedisCluster.from_url(redis_cluster.startup_url)
    breaker = CircuitBreaker.redis(
        client, namespace=namespace, fail_max=2, reset_timeout=30, probe_every=None
    )
    with resilient_channel(ledger_target, breaker=breaker) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 2)
        assert [call_outcome(stub) for _ in range(3)] == ["UNAVAILABLE"] * 2 + ["breaker"]
    assert client.get(f"{namespace}:{ledger_target}:pybreaker:state") == b"open"
    # another breaker object on another cluster client: refused without calling
    other_client = redis.cluster.RedisCluster.from_url(redis_cluster.startup_url)
    other = CircuitBreaker.redis(
        other_client, namespace=namespace, fail_max=2, reset_timeout=30, probe_every=None
    )
    calls_before = len(servicer.state.calls_to(GET_BALANCE))
    with resilient_channel(ledger_target, breaker=other) as channel:
        assert call_outcome(ledger_pb2_grpc.LedgerStub(channel)) == "breaker"
    assert len(servicer.state.calls_to(GET_BALANCE)) == calls_before
    other_client.close()
    client.close()
