"""``hedgingPolicy`` in gRPC service config: read, write, round trip, field-path errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_grpc import RetryBudget, RetryPolicy
from resilient_grpc.core.codes import STATUS_CODE_NAMES
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.service_config import (
    hedging_policy_from_service_config,
    parse_service_config,
    retry_policy_from_service_config,
    service_config_from_hedging,
)

RETRY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "h.H"}, {"service": "x.X", "method": "Get"}],
            "hedgingPolicy": {
                "maxAttempts": 3,
                "hedgingDelay": "0.05s",
                "nonFatalStatusCodes": ["UNAVAILABLE", 8],
            },
        },
        {"name": [{"service": "r.R"}], "retryPolicy": RETRY},
    ]
}


def test_reads_a_hedging_policy_with_its_methods() -> None:
    policy = HedgingPolicy.from_service_config(CONFIG)
    assert policy == HedgingPolicy(
        max_attempts=3,
        delay=0.05,
        non_fatal_codes=["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        methods=["/h.H/*", "/x.X/Get"],
    )
    assert HedgingPolicy.from_service_config(json.dumps(CONFIG), method="/h.H/Any") == policy


def test_defaults_cap_and_the_default_entry() -> None:
    config = {"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 9}}]}
    policy = hedging_policy_from_service_config(config)
    assert policy.max_attempts == 5  # gRPC caps at 5
    assert policy.delay == 0.0 and policy.non_fatal_codes == frozenset()
    assert policy.methods == frozenset()  # the default entry: every method
    assert hedging_policy_from_service_config(config, max_attempts_cap=None).max_attempts == 9


def test_a_retried_method_is_refused_and_an_unconfigured_one_is_sent_once() -> None:
    with pytest.raises(
        ValueError, match=r"methodConfig\[1\]\.retryPolicy: method /r\.R/M is retried"
    ):
        hedging_policy_from_service_config(CONFIG, method="/r.R/M")
    with pytest.raises(
        ValueError, match=r"methodConfig\[0\]\.hedgingPolicy: method /h\.H/M is hedged"
    ):
        retry_policy_from_service_config(CONFIG, method="/h.H/M")
    once = hedging_policy_from_service_config(CONFIG, method="/z.Z/M")
    assert once.max_attempts == 1 and once.applies_to("/z.Z/M")
    with pytest.raises(ValueError, match="no entry has a hedgingPolicy"):
        hedging_policy_from_service_config({"methodConfig": [{"name": [{}]}]})


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ([], "methodConfig[0].hedgingPolicy: expected an object"),
        ({}, "methodConfig[0].hedgingPolicy.maxAttempts: required"),
        ({"maxAttempts": 1}, "methodConfig[0].hedgingPolicy.maxAttempts: must be greater than 1"),
        ({"maxAttempts": 2.5}, "methodConfig[0].hedgingPolicy.maxAttempts: expected an integer"),
        (
            {"maxAttempts": 2, "hedgingDelay": "-1s"},
            "methodConfig[0].hedgingPolicy.hedgingDelay: must not be negative",
        ),
        (
            {"maxAttempts": 2, "hedgingDelay": 5},
            "methodConfig[0].hedgingPolicy.hedgingDelay: expected a duration string",
        ),
        (
            {"maxAttempts": 2, "nonFatalStatusCodes": ["OK"]},
            "methodConfig[0].hedgingPolicy.nonFatalStatusCodes[0]: OK is not an error and "
            "cannot be non-fatal",
        ),
        (
            {"maxAttempts": 2, "nonFatalStatusCodes": ["NOPE"]},
            "methodConfig[0].hedgingPolicy.nonFatalStatusCodes[0]: 'NOPE' is not a gRPC",
        ),
        (
            {"maxAttempts": 2, "nonFatalStatusCodes": "UNAVAILABLE"},
            "methodConfig[0].hedgingPolicy.nonFatalStatusCodes: expected a list",
        ),
    ],
)
def test_invalid_fields_name_their_path(policy: Any, message: str) -> None:
    config = {"methodConfig": [{"name": [{"service": "h.H"}], "hedgingPolicy": policy}]}
    with pytest.raises(ValueError) as caught:
        parse_service_config(config)
    assert str(caught.value).startswith(message), str(caught.value)


def test_writes_a_hedging_policy() -> None:
    policy = HedgingPolicy(max_attempts=7, delay=0.0, methods=["/h.H/*"])
    config = policy.to_service_config(budget=RetryBudget(ratio=0.1, min_retries_per_second=1))
    assert config == {
        "methodConfig": [
            {
                "name": [{"service": "h.H"}],
                "hedgingPolicy": {
                    "maxAttempts": 5,
                    "hedgingDelay": "0s",
                    "nonFatalStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.1},
    }
    assert HedgingPolicy().to_service_config()["methodConfig"][0]["name"] == [{}]
    single = service_config_from_hedging(HedgingPolicy(max_attempts=1), ["/a.B/C"])
    assert "hedgingPolicy" not in single["methodConfig"][0]
    with pytest.raises(ValueError, match="policy: expected a HedgingPolicy"):
        service_config_from_hedging(RetryPolicy(), ["/a.B/C"])  # type: ignore[arg-type]


IDENT = st.from_regex(r"[a-z][a-z0-9]{0,6}(\.[A-Z][a-z0-9]{0,6})?", fullmatch=True)


@st.composite
def hedging_policies(draw: st.DrawFn) -> HedgingPolicy:
    services = draw(st.lists(IDENT, min_size=1, max_size=3, unique=True))
    methods = [f"/{service}/{draw(st.sampled_from(['*', 'Get', 'Put']))}" for service in services]
    return HedgingPolicy(
        max_attempts=draw(st.integers(2, 5)),
        delay=draw(st.integers(0, 10**10)) / 10**9,
        non_fatal_codes=draw(
            st.frozensets(st.sampled_from(sorted(set(STATUS_CODE_NAMES) - {"OK"})), max_size=4)
        ),
        methods=methods,
    )


@given(hedging_policies())
@settings(max_examples=200, deadline=None)
def test_round_trip(policy: HedgingPolicy) -> None:
    written = json.dumps(policy.to_service_config())
    assert HedgingPolicy.from_service_config(written) == policy
    for method in policy.methods:
        concrete = method.replace("*", "Any")
        assert HedgingPolicy.from_service_config(written, method=concrete) == policy
