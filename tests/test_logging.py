"""Log lines under the ``resilient_grpc`` logger: one WARNING per give-up or breaker opening,
DEBUG per attempt, never a key; through the facade and through the real client stacks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, AioLedger, Fault, SyncLedger
from resilient_grpc import IdempotencyKeys, idempotency_key, logs, telemetry
from resilient_grpc import aio as rg_aio
from resilient_grpc.client import resilient_channel
from resilient_grpc.core.retry import DelaySource, Reason, RetryDecision
from tests.helpers import FAST
from tests.telemetry_fixtures import client_call

REQUEST = ledger_pb2.TransferRequest(from_account="alice", to_account="bob", amount=5)
KEY = "idem-3b1f-secret-key-value"


@pytest.fixture(autouse=True)
def fresh_logging_state() -> Iterator[None]:
    telemetry._reset_for_tests()
    yield
    telemetry._reset_for_tests()


def lines(
    caplog: pytest.LogCaptureFixture, level: int, logger: str = "resilient_grpc"
) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and (r.name == logger or r.name.startswith(logger + "."))
    ]


def retry(
    attempt: int, delay: float = 0.1, source: DelaySource = DelaySource.COMPUTED
) -> RetryDecision:
    return RetryDecision(True, Reason.RETRY, delay, source, attempt)


def test_library_logger_has_a_null_handler_only() -> None:
    handlers = logging.getLogger("resilient_grpc").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert logs.client_logger.name == "resilient_grpc.client"


def test_give_up_is_one_warning_with_attempts_code_reason_and_method(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    with client_call(TRANSFER, target="127.0.0.1:5051") as call:
        call.attempt(1, "UNAVAILABLE", retry(1, 0.05))
        call.attempt(2, "UNAVAILABLE", retry(2, 1.5, DelaySource.PUSHBACK))
        call.attempt(3, "UNAVAILABLE", RetryDecision(False, Reason.MAX_ATTEMPTS, attempt=3))
        call.end("UNAVAILABLE", attempts=3, reason=Reason.MAX_ATTEMPTS)

    (warning,) = lines(caplog, logging.WARNING)
    assert warning == (
        "/ledger.v1.Ledger/Transfer to 127.0.0.1:5051 gave up after 3 attempts: "
        "last status UNAVAILABLE (max_attempts)"
    )
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.name == "resilient_grpc.client"
    assert (record.rpc_method, record.grpc_code, record.attempts, record.retry_reason) == (  # type: ignore[attr-defined]
        "/ledger.v1.Ledger/Transfer",
        "UNAVAILABLE",
        3,
        "max_attempts",
    )
    debug = lines(caplog, logging.DEBUG)
    assert debug[:3] == [
        "/ledger.v1.Ledger/Transfer attempt 1: UNAVAILABLE; retrying in 0.050 s (computed backoff)",
        "/ledger.v1.Ledger/Transfer attempt 2: UNAVAILABLE; retrying in 1.500 s (pushback backoff)",
        "/ledger.v1.Ledger/Transfer attempt 3: UNAVAILABLE; not retrying (max_attempts)",
    ]


@pytest.mark.parametrize(
    "reason", [Reason.DEADLINE, Reason.BUDGET_EXHAUSTED, Reason.PUSHBACK_STOP, Reason.BREAKER_OPEN]
)
def test_every_give_up_reason_warns_once(reason: Reason, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    with client_call(TRANSFER) as call:
        call.attempt(1, "UNAVAILABLE", RetryDecision(False, reason, attempt=1))
        call.end("UNAVAILABLE", attempts=1, reason=reason)
    (warning,) = lines(caplog, logging.WARNING)
    assert warning.endswith(f"gave up after 1 attempt: last status UNAVAILABLE ({reason.value})")


@pytest.mark.parametrize(
    ("code", "reason", "attempts"),
    [
        ("OK", Reason.SUCCESS, 3),  # succeeded after retries
        ("NOT_FOUND", Reason.NOT_RETRYABLE_CODE, 1),  # a business error: never retried
        ("UNAVAILABLE", Reason.NOT_IDEMPOTENT, 1),  # retrying was never an option
        ("UNAVAILABLE", Reason.BREAKER_OPEN, 0),  # refused by an open breaker: no flood
    ],
)
def test_other_ends_are_debug_only(
    code: str, reason: Reason, attempts: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    with client_call(TRANSFER) as call:
        if attempts == 0:
            call.breaker_rejected()
        call.end(code, attempts=attempts, reason=reason)
    assert lines(caplog, logging.WARNING) == []
    assert any(f"({reason.value})" in line for line in lines(caplog, logging.DEBUG))


def test_breaker_opening_warns_other_transitions_are_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    telemetry.breaker_state_changed("resilient_grpc:127.0.0.1:5051", "closed", "open")
    telemetry.breaker_state_changed("resilient_grpc:127.0.0.1:5051", "open", "half-open")
    telemetry.breaker_state_changed("resilient_grpc:127.0.0.1:5051", "half-open", "closed")
    assert lines(caplog, logging.WARNING, "resilient_grpc.breaker") == [
        "circuit breaker resilient_grpc:127.0.0.1:5051 opened (was closed): "
        "calls fail fast until a probe succeeds"
    ]
    assert lines(caplog, logging.INFO, "resilient_grpc.breaker") == [
        "circuit breaker resilient_grpc:127.0.0.1:5051: open -> half-open",
        "circuit breaker resilient_grpc:127.0.0.1:5051: half-open -> closed",
    ]


def test_store_errors_warn_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    for _ in range(5):
        telemetry.dedup_outcome(TRANSFER, "store_error")
    telemetry.dedup_outcome(TRANSFER, "replayed")
    assert lines(caplog, logging.WARNING, "resilient_grpc.server") == [
        "/ledger.v1.Ledger/Transfer: dedup store unavailable, refusing the call"
    ]
    assert lines(caplog, logging.DEBUG, "resilient_grpc.server")[-1] == (
        "/ledger.v1.Ledger/Transfer: dedup replayed"
    )
    monkeypatch.setattr(logs._server_throttle, "interval", 0.0)
    telemetry.dedup_outcome(TRANSFER, "store_error")
    telemetry.dedup_outcome(TRANSFER, "fail_open")
    assert lines(caplog, logging.WARNING, "resilient_grpc.server")[1:] == [
        "/ledger.v1.Ledger/Transfer: dedup store unavailable, refusing the call "
        "(4 more since the last line)",
        "/ledger.v1.Ledger/Transfer: dedup store unavailable, running the handler "
        "without deduplication",
    ]


# --- through the real client stacks -------------------------------------------------------


def check_real_give_up(caplog: pytest.LogCaptureFixture, port: int) -> None:
    (warning,) = lines(caplog, logging.WARNING)
    assert warning == (
        f"/ledger.v1.Ledger/Transfer to 127.0.0.1:{port} gave up after 3 attempts: "
        "last status UNAVAILABLE (max_attempts)"
    )
    attempts = [line for line in lines(caplog, logging.DEBUG) if " attempt " in line]
    assert len(attempts) == 3
    assert attempts[0].startswith("/ledger.v1.Ledger/Transfer attempt 1: UNAVAILABLE; retrying in")
    text = caplog.text
    assert KEY not in text
    for record in caplog.records:
        assert all(KEY not in str(value) for value in vars(record).values())


def test_sync_stack_logs_give_up_once_and_each_attempt_without_the_key(
    ledger: tuple[SyncLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, port = ledger
    servicer.state.faults.fail_times(TRANSFER, 3)
    with (
        resilient_channel(
            f"127.0.0.1:{port}", retry=FAST, idempotency=IdempotencyKeys()
        ) as channel,
        idempotency_key(KEY),
        pytest.raises(grpc.RpcError),
    ):
        ledger_pb2_grpc.LedgerStub(channel).Transfer(REQUEST, timeout=5)
    assert {c.key for c in servicer.state.calls_to(TRANSFER)} == {KEY}
    check_real_give_up(caplog, port)


async def test_aio_stack_logs_give_up_once_and_each_attempt_without_the_key(
    aio_ledger: tuple[AioLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, port = aio_ledger
    servicer.state.faults.fail_times(TRANSFER, 3)
    channel = rg_aio.resilient_channel(
        f"127.0.0.1:{port}", retry=FAST, idempotency=IdempotencyKeys()
    )
    try:
        with idempotency_key(KEY), pytest.raises(grpc.RpcError):
            await ledger_pb2_grpc.LedgerStub(channel).Transfer(REQUEST, timeout=5)
    finally:
        await channel.close()
    assert {c.key for c in servicer.state.calls_to(TRANSFER)} == {KEY}
    check_real_give_up(caplog, port)


def test_business_error_is_not_a_warning(
    ledger: tuple[SyncLedger, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_grpc")
    servicer, port = ledger
    servicer.state.faults.add(GET_BALANCE, Fault(code=grpc.StatusCode.NOT_FOUND))
    stub: Any
    with resilient_channel(f"127.0.0.1:{port}", retry=FAST) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetBalance(ledger_pb2.BalanceRequest(account="alice"), timeout=5)
    assert lines(caplog, logging.WARNING) == []
    assert any("NOT_FOUND" in line for line in lines(caplog, logging.DEBUG))
