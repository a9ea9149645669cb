"""RetryPolicy validation: every bad value is refused at construction with the field's name."""

from __future__ import annotations

import math
from typing import Any

import pytest

from resilient_grpc import IdempotencyKeys, RetryBudget, RetryPolicy
from resilient_grpc.core.codes import code_name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_backoff": -0.1}, "initial_backoff"),
        ({"initial_backoff": 0}, "initial_backoff"),
        ({"initial_backoff": math.nan}, "initial_backoff"),
        ({"max_backoff": math.inf}, "max_backoff"),
        ({"initial_backoff": 2.0, "max_backoff": 1.0}, "max_backoff"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": "2"}, "multiplier"),
        ({"jitter": "gaussian"}, "jitter"),
        ({"retryable_codes": {"UNAVAILABLE", "NOPE"}}, "retryable_codes"),
        ({"retryable_codes": "UNAVAILABLE"}, "retryable_codes"),
        ({"retryable_codes": {"OK"}}, "retryable_codes"),
        ({"per_attempt_timeout": 0}, "per_attempt_timeout"),
        ({"idempotent_methods": {"Transfer"}}, "idempotent_methods"),
        ({"idempotent_methods": "/a.B/C"}, "idempotent_methods"),
    ],
)
def test_invalid_policy_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**kwargs)


def test_codes_accept_grpc_enum_names_and_numbers() -> None:
    import grpc

    policy = RetryPolicy(retryable_codes={grpc.StatusCode.UNAVAILABLE, "aborted", 8})
    assert policy.retryable_codes == {"UNAVAILABLE", "ABORTED", "RESOURCE_EXHAUSTED"}
    assert code_name(grpc.StatusCode.INTERNAL) == "INTERNAL"


def test_idempotent_method_patterns() -> None:
    policy = RetryPolicy(idempotent_methods={"/ledger.v1.Ledger/GetBalance", "/health.v1.Health/*"})
    assert policy.is_idempotent("/ledger.v1.Ledger/GetBalance")
    assert policy.is_idempotent("/health.v1.Health/Check")
    assert not policy.is_idempotent("/ledger.v1.Ledger/Transfer")


def test_with_changes_validates() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy().with_changes(max_attempts=-1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": math.nan}, "ratio"),
        ({"min_retries_per_second": -1}, "min_retries_per_second"),
        ({"window": 0}, "window"),
        ({"window": math.inf}, "window"),
    ],
)
def test_invalid_budget_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryBudget(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"header": "Idempotency-Key"},
        {"header": "grpc-key"},
        {"header": "key-bin"},
        {"header": ""},
        {"methods": "/a.B/C"},
        {"methods": ["Transfer"]},
    ],
)
def test_invalid_idempotency_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        IdempotencyKeys(**kwargs)
