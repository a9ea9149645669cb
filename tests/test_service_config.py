"""gRPC service config (gRFC A6) <-> RetryPolicy / RetryBudget: matching, validation, round trips."""

from __future__ import annotations

import copy
import json
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import ledger_pb2, ledger_pb2_grpc
from protos.ledger_service import GET_BALANCE, TRANSFER, SyncLedger
from resilient_grpc import RetryBudget, RetryPolicy
from resilient_grpc.core.codes import STATUS_CODE_NAMES
from resilient_grpc.service_config import (
    budget_from_service_config,
    format_duration,
    method_config_from_service_config,
    parse_service_config,
    retry_policy_from_service_config,
    service_config_from_policy,
)

RETRY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}


def config_with(retry: dict[str, Any] | None = None, **entry: Any) -> dict[str, Any]:
    method_config: dict[str, Any] = {"name": [{"service": "ledger.v1.Ledger"}], **entry}
    if retry is not None:
        method_config["retryPolicy"] = retry
    return {"methodConfig": [method_config]}


def test_reads_a_native_retry_policy() -> None:
    policy = RetryPolicy.from_service_config(json.dumps(config_with(RETRY)))
    assert policy == RetryPolicy(
        max_attempts=4,
        initial_backoff=0.1,
        max_backoff=1.5,
        multiplier=2.0,
        jitter="full",
        retryable_codes=frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"}),
    )
    # bytes and numeric codes too
    numeric = config_with({**RETRY, "retryableStatusCodes": [14, 8]})
    assert RetryPolicy.from_service_config(json.dumps(numeric).encode()) == policy


def test_name_matching_is_most_specific_first_like_grpc() -> None:
    def entry(names: list[dict[str, str]], attempts: int) -> dict[str, Any]:
        return {"name": names, "retryPolicy": {**RETRY, "maxAttempts": attempts}}

    config = {
        "methodConfig": [
            entry([{}], 2),
            entry([{"service": "ledger.v1.Ledger"}], 3),
            entry([{"service": "ledger.v1.Ledger", "method": "Transfer"}], 4),
            {"name": [{"service": "ledger.v1.Ledger", "method": "Watch"}]},  # no retries
            {"name": [], "retryPolicy": RETRY},  # no names: skipped, as in gRPC
        ]
    }

    def attempts(method: str) -> int:
        return retry_policy_from_service_config(config, method=method).max_attempts

    assert attempts(TRANSFER) == 4
    assert attempts(GET_BALANCE) == 3
    assert attempts("/other.v1.Service/Anything") == 2
    assert attempts("/ledger.v1.Ledger/Watch") == 1
    without_default = {"methodConfig": config["methodConfig"][1:]}
    assert retry_policy_from_service_config(without_default, method="/x.Y/Z").max_attempts == 1


def test_name_forms_service_method_null_and_empty_are_the_same() -> None:
    for name in ({"service": "s"}, {"service": "s", "method": None}, {"service": "s", "method": ""}):
        parsed = parse_service_config({"methodConfig": [{"name": [name], "retryPolicy": RETRY}]})
        assert parsed.method_configs[0].names == (("s", ""),)
    for name in ({}, {"service": ""}, {"service": None, "method": None}):
        parsed = parse_service_config({"methodConfig": [{"name": [name], "retryPolicy": RETRY}]})
        assert parsed.method_configs[0].names == (("", ""),)


def test_max_attempts_above_five_counts_as_five_like_grpc() -> None:
    config = config_with({**RETRY, "maxAttempts": 9})
    assert RetryPolicy.from_service_config(config).max_attempts == 5
    assert retry_policy_from_service_config(config, max_attempts_cap=None).max_attempts == 9


def test_initial_backoff_above_max_behaves_as_max() -> None:
    policy = RetryPolicy.from_service_config(
        config_with({**RETRY, "initialBackoff": "3s", "maxBackoff": "2s"})
    )
    assert (policy.initial_backoff, policy.max_backoff) == (2.0, 2.0)


def test_timeout_is_the_call_deadline_not_a_per_attempt_timeout() -> None:
    config = config_with(RETRY, timeout="2.5s", waitForReady=True)
    assert RetryPolicy.from_service_config(config).per_attempt_timeout is None
    entry = method_config_from_service_config(config, method=TRANSFER)
    assert entry is not None
    assert (entry.timeout, entry.wait_for_ready) == (2.5, True)
    assert method_config_from_service_config(config, method="/x.Y/Z") is None


def test_without_method_exactly_one_distinct_policy_is_required() -> None:
    two = {
        "methodConfig": [
            {"name": [{"service": "a.A"}], "retryPolicy": RETRY},
            {"name": [{"service": "b.B"}], "retryPolicy": {**RETRY, "maxAttempts": 2}},
        ]
    }
    with pytest.raises(ValueError, match=r"methodConfig: 2 entries .*method="):
        RetryPolicy.from_service_config(two)
    same = copy.deepcopy(two)
    same["methodConfig"][1]["retryPolicy"] = RETRY
    assert RetryPolicy.from_service_config(same).max_attempts == 4
    with pytest.raises(ValueError, match="methodConfig: no entry has a retryPolicy"):
        RetryPolicy.from_service_config({"methodConfig": [{"name": [{}]}]})


def test_hedging_is_refused_for_the_method_that_uses_it() -> None:
    config = {
        "methodConfig": [
            {"name": [{"service": "h.H"}], "hedgingPolicy": {"maxAttempts": 3}},
            {"name": [{"service": "r.R"}], "retryPolicy": RETRY},
        ]
    }
    with pytest.raises(ValueError, match=r"methodConfig\[0\]\.hedgingPolicy"):
        retry_policy_from_service_config(config, method="/h.H/M")
    assert retry_policy_from_service_config(config, method="/r.R/M").max_attempts == 4


def test_budget_from_retry_throttling() -> None:
    config = {"retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}
    budget = RetryBudget.from_service_config(config)
    assert budget is not None
    assert (budget.ratio, budget.min_retries_per_second, budget.window) == (0.1, 0.5, 10.0)
    # the reserve of one window equals gRPC's initial allowance of maxTokens / 2 failures
    assert budget.balance == pytest.approx(5.0)
    assert budget_from_service_config(config, window=5.0).min_retries_per_second == 1.0  # type: ignore[union-attr]
    assert RetryBudget.from_service_config(config_with(RETRY)) is None
    # gRPC keeps 3 decimals of tokenRatio; above 1 the budget's ratio is capped at 1
    assert budget_from_service_config(
        {"retryThrottling": {"maxTokens": "4", "tokenRatio": 0.12399}}
    ).ratio == 0.123  # type: ignore[union-attr]
    assert budget_from_service_config(
        {"retryThrottling": {"maxTokens": 4, "tokenRatio": 2.5}}
    ).ratio == 1.0  # type: ignore[union-attr]


def test_writes_what_native_grpc_supports() -> None:
    policy = RetryPolicy(
        max_attempts=8,
        initial_backoff=0.05,
        max_backoff=2.0,
        multiplier=1.5,
        jitter="equal",
        retryable_codes=frozenset({"UNAVAILABLE", "ABORTED"}),
        per_attempt_timeout=1.0,
        idempotent_methods=frozenset({GET_BALANCE}),
    )
    config = policy.to_service_config(
        [TRANSFER, "/ledger.v1.Ledger/*", "*"], budget=RetryBudget(0.1, 10, 10)
    )
    assert config == {
        "methodConfig": [
            {
                "name": [
                    {},
                    {"service": "ledger.v1.Ledger"},
                    {"service": "ledger.v1.Ledger", "method": "Transfer"},
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 1.5,
                    "retryableStatusCodes": ["ABORTED", "UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 200, "tokenRatio": 0.1},
    }
    no_retries = service_config_from_policy(RetryPolicy(max_attempts=1), [TRANSFER], timeout=3)
    assert no_retries == {
        "methodConfig": [
            {"name": [{"service": "ledger.v1.Ledger", "method": "Transfer"}], "timeout": "3s"}
        ]
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.1, "0.1s"), (5.0, "5s"), (1e-10, "0.000000001s"), (0.123456789, "0.123456789s"),
     (12.5, "12.5s"), (1e-5, "0.00001s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_bad_write_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="methods"):
        service_config_from_policy(RetryPolicy(), [])
    with pytest.raises(ValueError, match="methods"):
        service_config_from_policy(RetryPolicy(), TRANSFER)
    with pytest.raises(ValueError, match="methods"):
        service_config_from_policy(RetryPolicy(), ["ledger.v1.Ledger/Transfer"])
    with pytest.raises(ValueError, match="timeout"):
        service_config_from_policy(RetryPolicy(), [TRANSFER], timeout=-1)


# --- every invalid field is rejected with its path ---------------------------------------


def replace(path: list[Any], value: Any, *, delete: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "methodConfig": [{"name": [{"service": "s.S", "method": "M"}], "retryPolicy": dict(RETRY)}],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
    node: Any = config
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


P = ["methodConfig", 0, "retryPolicy"]
INVALID = [
    # (where, new value, expected message start)
    ([*P, "maxAttempts"], 1, "methodConfig[0].retryPolicy.maxAttempts: must be greater than 1"),
    ([*P, "maxAttempts"], 2.5, "methodConfig[0].retryPolicy.maxAttempts: expected an integer"),
    ([*P, "maxAttempts"], "three", "methodConfig[0].retryPolicy.maxAttempts: expected an integer"),
    ([*P, "maxAttempts"], True, "methodConfig[0].retryPolicy.maxAttempts: expected an integer"),
    ([*P, "initialBackoff"], "100ms", "methodConfig[0].retryPolicy.initialBackoff: '100ms' is not a duration"),
    ([*P, "initialBackoff"], 0.1, "methodConfig[0].retryPolicy.initialBackoff: expected a duration string"),
    ([*P, "initialBackoff"], "0s", "methodConfig[0].retryPolicy.initialBackoff: must be greater than 0"),
    ([*P, "initialBackoff"], "-1s", "methodConfig[0].retryPolicy.initialBackoff: must be greater than 0"),
    ([*P, "initialBackoff"], "0.1234567891s", "methodConfig[0].retryPolicy.initialBackoff: '0.1234567891s'"),
    ([*P, "maxBackoff"], "1 s", "methodConfig[0].retryPolicy.maxBackoff: '1 s' is not a duration"),
    ([*P, "maxBackoff"], "999999999999s", "methodConfig[0].retryPolicy.maxBackoff: '999999999999s' is beyond"),
    ([*P, "backoffMultiplier"], 0, "methodConfig[0].retryPolicy.backoffMultiplier: must be greater than 0"),
    ([*P, "backoffMultiplier"], 0.5, "methodConfig[0].retryPolicy.backoffMultiplier: 0.5 < 1"),
    ([*P, "backoffMultiplier"], "fast", "methodConfig[0].retryPolicy.backoffMultiplier: expected a number"),
    ([*P, "backoffMultiplier"], [2], "methodConfig[0].retryPolicy.backoffMultiplier: expected a number"),
    ([*P, "retryableStatusCodes"], [], "methodConfig[0].retryPolicy.retryableStatusCodes: must not be empty"),
    ([*P, "retryableStatusCodes"], "UNAVAILABLE", "methodConfig[0].retryPolicy.retryableStatusCodes: expected a list"),
    ([*P, "retryableStatusCodes"], ["UNAVAILABLE", "TEMPORARILY_DOWN"], "methodConfig[0].retryPolicy.retryableStatusCodes[1]: 'TEMPORARILY_DOWN' is not a gRPC status code"),
    ([*P, "retryableStatusCodes"], [99], "methodConfig[0].retryPolicy.retryableStatusCodes[0]: 99 is not a gRPC status code"),
    ([*P, "retryableStatusCodes"], ["OK"], "methodConfig[0].retryPolicy.retryableStatusCodes[0]: OK is not an error"),
    ([*P, "retryableStatusCodes"], [None], "methodConfig[0].retryPolicy.retryableStatusCodes[0]: expected a status code"),
    (P, "yes", "methodConfig[0].retryPolicy: expected an object"),
    (["methodConfig", 0, "timeout"], "soon", "methodConfig[0].timeout: 'soon' is not a duration"),
    (["methodConfig", 0, "waitForReady"], "yes", "methodConfig[0].waitForReady: expected true or false"),
    (["methodConfig", 0, "hedgingPolicy"], {"maxAttempts": 2}, "methodConfig[0]: retryPolicy and hedgingPolicy cannot both be set"),
    (["methodConfig", 0, "name"], {"service": "s.S"}, "methodConfig[0].name: expected a list"),
    (["methodConfig", 0, "name", 0], "s.S/M", "methodConfig[0].name[0]: expected an object"),
    (["methodConfig", 0, "name", 0, "service"], 7, "methodConfig[0].name[0].service: expected a string"),
    (["methodConfig", 0, "name", 0, "service"], None, "methodConfig[0].name[0].method: 'M' is set without a service"),
    (["methodConfig", 0], [], "methodConfig[0]: expected an object"),
    (["methodConfig"], {}, "methodConfig: expected a list"),
    (["retryThrottling"], [], "retryThrottling: expected an object"),
    (["retryThrottling", "maxTokens"], 0, "retryThrottling.maxTokens: must be an integer in [1,"),
    (["retryThrottling", "maxTokens"], 1.5, "retryThrottling.maxTokens: expected an integer"),
    (["retryThrottling", "tokenRatio"], 0, "retryThrottling.tokenRatio: must be greater than 0"),
    (["retryThrottling", "tokenRatio"], 0.0004, "retryThrottling.tokenRatio: must be greater than 0 with gRPC's 3 decimals"),
    (["retryThrottling", "tokenRatio"], "lots", "retryThrottling.tokenRatio: expected a number"),
]
MISSING = [
    ([*P, "maxAttempts"], "methodConfig[0].retryPolicy.maxAttempts: required"),
    ([*P, "initialBackoff"], "methodConfig[0].retryPolicy.initialBackoff: required"),
    ([*P, "maxBackoff"], "methodConfig[0].retryPolicy.maxBackoff: required"),
    ([*P, "backoffMultiplier"], "methodConfig[0].retryPolicy.backoffMultiplier: required"),
    ([*P, "retryableStatusCodes"], "methodConfig[0].retryPolicy.retryableStatusCodes: required"),
    (["retryThrottling", "maxTokens"], "retryThrottling.maxTokens: required"),
    (["retryThrottling", "tokenRatio"], "retryThrottling.tokenRatio: required"),
]


@pytest.mark.parametrize(("path", "value", "message"), INVALID)
def test_invalid_field_is_rejected_with_its_path(path: list[Any], value: Any, message: str) -> None:
    config = replace(path, value)
    with pytest.raises(ValueError) as caught:
        parse_service_config(config)
    assert str(caught.value).startswith(message), str(caught.value)
    # the same through the public entry points, from JSON text
    with pytest.raises(ValueError, match="^" + message.split(":")[0].replace("[", r"\[").replace("]", r"\]")):
        if path[0] == "retryThrottling":
            RetryBudget.from_service_config(json.dumps(config))
        else:
            RetryPolicy.from_service_config(json.dumps(config), method="/s.S/M")


@pytest.mark.parametrize(("path", "message"), MISSING)
def test_missing_required_field_is_rejected_with_its_path(path: list[Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_service_config(replace(path, None, delete=True))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "service config: invalid JSON"),
        (b"\xff\xfe", "service config: not UTF-8"),
        ("[1, 2]", "service config: expected a JSON object, got a list"),
        ('{"retryThrottling": {"maxTokens": 10, "tokenRatio": NaN}}', "service config: invalid JSON"),
        (42, "service config: expected a JSON object"),
    ],
)
def test_malformed_config_is_rejected(config: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_service_config(config)
    assert str(caught.value).startswith(message)


def test_duplicate_names_are_rejected_with_both_places() -> None:
    config = {
        "methodConfig": [
            {"name": [{"service": "s.S"}], "retryPolicy": RETRY},
            {"name": [{"service": "t.T"}, {"service": "s.S", "method": ""}], "retryPolicy": RETRY},
        ]
    }
    with pytest.raises(ValueError, match=r"methodConfig\[1\]\.name\[1\]: duplicate name .*methodConfig\[0\]\.name\[0\]"):
        parse_service_config(config)


def test_bad_method_argument_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^method:"):
        RetryPolicy.from_service_config(config_with(RETRY), method="ledger.v1.Ledger.Transfer")


# --- round trips (hypothesis) -------------------------------------------------------------

durations = st.builds(
    lambda whole, nanos, digits: f"{whole}.{str(nanos).zfill(9)[:digits]}s" if digits else f"{whole}s",
    st.integers(0, 100_000),
    st.integers(0, 999_999_999),
    st.integers(0, 9),
).filter(lambda text: float(text[:-1]) > 0)
codes = st.lists(
    st.one_of(
        st.sampled_from(sorted(STATUS_CODE_NAMES - {"OK"})),
        st.integers(1, 16),
    ),
    min_size=1,
    max_size=6,
)
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[A-Za-z][A-Za-z0-9]{0,8}){0,2}", fullmatch=True)


@st.composite
def native_configs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    service = draw(identifiers)
    method = draw(st.from_regex(r"[A-Z][A-Za-z0-9]{0,10}", fullmatch=True))
    name = draw(
        st.sampled_from([{"service": service, "method": method}, {"service": service}, {}])
    )
    retry = {
        "maxAttempts": draw(st.one_of(st.integers(2, 12), st.integers(2, 5).map(str))),
        "initialBackoff": draw(durations),
        "maxBackoff": draw(durations),
        "backoffMultiplier": draw(
            st.one_of(
                st.floats(1.0, 10.0, allow_nan=False, allow_infinity=False),
                st.integers(1, 5),
            )
        ),
        "retryableStatusCodes": draw(codes),
    }
    config: dict[str, Any] = {"methodConfig": [{"name": [name], "retryPolicy": retry}]}
    if draw(st.booleans()):
        config["retryThrottling"] = {
            "maxTokens": draw(st.integers(1, 100_000)),
            "tokenRatio": draw(st.floats(0.001, 5.0, allow_nan=False)),
        }
    return config, f"/{service}/{method}"


@settings(max_examples=200, deadline=None)
@given(native_configs())
def test_from_to_from_is_stable(case: tuple[dict[str, Any], str]) -> None:
    config, method = case
    policy = RetryPolicy.from_service_config(json.dumps(config), method=method)
    budget = RetryBudget.from_service_config(config)
    exported = policy.to_service_config([method], budget=budget)
    again = RetryPolicy.from_service_config(json.dumps(exported), method=method)
    assert again == policy
    budget_again = RetryBudget.from_service_config(json.dumps(exported))
    if budget is None:
        assert budget_again is None
    else:
        assert budget_again is not None
        assert budget_again.ratio == budget.ratio
        assert budget_again.min_retries_per_second == pytest.approx(budget.min_retries_per_second)
        assert budget_again.window == budget.window
    # and the export is itself a fixed point
    assert again.to_service_config([method], budget=budget_again) == exported


# --- the export drives real native gRPC retries -------------------------------------------


def native_channel(port: int, config: dict[str, Any]) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)],
    )


def test_exported_config_drives_native_grpc_retries(ledger: tuple[SyncLedger, int]) -> None:
    servicer, port = ledger
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    request = ledger_pb2.BalanceRequest(account="alice")
    with native_channel(port, policy.to_service_config(["/ledger.v1.Ledger/*"])) as channel:
        stub = ledger_pb2_grpc.LedgerStub(channel)
        servicer.state.faults.fail_times(GET_BALANCE, 2)
        stub.GetBalance(request, timeout=5)  # two UNAVAILABLE, then OK: retried natively
        assert len(servicer.state.calls_to(GET_BALANCE)) == 3

        servicer.state.faults.fail_times(GET_BALANCE, 3)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalance(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert len(servicer.state.calls_to(GET_BALANCE)) == 6
