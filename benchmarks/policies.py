"""The retry policies compared by the benchmark, each as a ``grpc.aio`` client for the ledger.

Every policy gets the same knobs (:class:`ClientSettings`): at most 3 attempts, each bounded by
a 250 ms attempt timeout, inside a 1 s deadline for the logical request; backoffs start at 50 ms
and double. Policies that can retry timed-out attempts do (``UNAVAILABLE`` and
``DEADLINE_EXCEEDED``), which is what a per-attempt timeout is for. The policies built from this
toolkit use its public API (``resilient_grpc.aio.client_interceptors``, ``RetryPolicy``,
``RetryBudget``, ``CircuitBreaker``; the server's ``DedupInterceptor``), not a re-implementation.

gRPC's native retry has no per-attempt timeout, so its call deadline is the attempt timeout and
its retries happen inside it; its ``retryThrottling`` is ``{maxTokens 10, tokenRatio 0.1}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from protos import ledger_pb2, ledger_pb2_grpc
from resilient_grpc.core.codes import UNHEALTHY_CODES

#: RESOURCE_EXHAUSTED is what a protected server (``OverloadInterceptor``) refuses with, always
#: with a ``grpc-retry-pushback-ms``; no unprotected server in the comparison sends it.
RETRIED_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
#: What the circuit breaker counts: the default unhealthy codes except RESOURCE_EXHAUSTED, since a
#: refusal with a pushback is a healthy server's admission control, and the pushback (with the
#: budget) already paces the retry; opening the breaker on it fails calls the server could serve.
BREAKER_CODES = UNHEALTHY_CODES - {"RESOURCE_EXHAUSTED"}
#: A hedged copy failing with one of these lets the next copy go at once (after the server's
#: pushback, if any): another replica may serve it. Anything else is the call's answer.
HEDGE_NON_FATAL_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class ClientSettings:
    """The retry knobs every policy shares (seconds)."""

    max_attempts: int = 3
    attempt_timeout: float = 0.25
    deadline: float = 1.0
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    budget_ratio: float = 0.1
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 0.5
    breaker_probe_every: int = 2
    breaker_failure_rate: float = 0.5
    hedge_delay: float = 0.05


Call = Callable[[ledger_pb2.TransferRequest], Awaitable[ledger_pb2.TransferReply]]
#: Channel options of a scenario (e.g. ``round_robin`` over several replicas).
Options = Sequence[tuple[str, Any]]


@dataclass
class Client:
    """An open channel and the coroutine function that makes one logical ``Transfer``."""

    channel: grpc.aio.Channel
    call: Call

    async def close(self) -> None:
        await self.channel.close(None)


@dataclass(frozen=True)
class Policy:
    """One contender: its name in the output, what it is, whether the server dedups, its client."""

    name: str
    label: str
    description: str
    server_dedup: bool
    connect: Callable[[str, ClientSettings, Options], Client]
    server_protected: bool = False


def _code_name(error: grpc.RpcError) -> str:
    code = error.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _no_retry(target: str, settings: ClientSettings, options: Options) -> Client:
    channel = grpc.aio.insecure_channel(target, options=list(options))
    stub = ledger_pb2_grpc.LedgerStub(channel)

    async def call(request: ledger_pb2.TransferRequest) -> ledger_pb2.TransferReply:
        reply: ledger_pb2.TransferReply = await stub.Transfer(
            request, timeout=settings.attempt_timeout
        )
        return reply

    return Client(channel, call)


def _naive(target: str, settings: ClientSettings, options: Options) -> Client:
    """Retry any error at once, up to ``max_attempts``, while the deadline allows."""
    channel = grpc.aio.insecure_channel(target, options=list(options))
    stub = ledger_pb2_grpc.LedgerStub(channel)

    async def call(request: ledger_pb2.TransferRequest) -> ledger_pb2.TransferReply:
        deadline = time.monotonic() + settings.deadline
        for attempt in range(1, settings.max_attempts + 1):
            remaining = deadline - time.monotonic()
            try:
                reply: ledger_pb2.TransferReply = await stub.Transfer(
                    request, timeout=max(min(settings.attempt_timeout, remaining), 0.001)
                )
                return reply
            except grpc.RpcError:
                if attempt == settings.max_attempts or deadline - time.monotonic() <= 0:
                    raise
        raise AssertionError("unreachable")

    return Client(channel, call)


def _tenacity(target: str, settings: ClientSettings, options: Options) -> Client:
    """The usual ``tenacity`` wrapper: stop after 3 attempts or the deadline, random exponential wait."""
    import tenacity

    channel = grpc.aio.insecure_channel(target, options=list(options))
    stub = ledger_pb2_grpc.LedgerStub(channel)

    def retryable(error: BaseException) -> bool:
        return isinstance(error, grpc.RpcError) and _code_name(error) in RETRIED_CODES

    async def call(request: ledger_pb2.TransferRequest) -> ledger_pb2.TransferReply:
        deadline = time.monotonic() + settings.deadline
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(settings.max_attempts)
            | tenacity.stop_after_delay(settings.deadline),
            wait=tenacity.wait_random_exponential(
                multiplier=settings.initial_backoff, max=settings.max_backoff
            ),
            retry=tenacity.retry_if_exception(retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                remaining = deadline - time.monotonic()
                reply: ledger_pb2.TransferReply = await stub.Transfer(
                    request, timeout=max(min(settings.attempt_timeout, remaining), 0.001)
                )
                return reply
        raise AssertionError("unreachable")

    return Client(channel, call)


def native_service_config(settings: ClientSettings) -> dict[str, Any]:
    """gRPC's own retry (gRFC A6) for the ledger, with ``retryThrottling`` as in the issue."""
    return {
        "methodConfig": [
            {
                "name": [{"service": "ledger.v1.Ledger"}],
                "retryPolicy": {
                    "maxAttempts": settings.max_attempts,
                    "initialBackoff": f"{settings.initial_backoff}s",
                    "maxBackoff": f"{settings.max_backoff}s",
                    "backoffMultiplier": settings.multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


def _native(target: str, settings: ClientSettings, options: Options) -> Client:
    config = native_service_config(settings)
    for name, value in options:  # the service config would override the channel's lb policy
        if name == "grpc.lb_policy_name":
            config["loadBalancingConfig"] = [{value: {}}]
    channel = grpc.aio.insecure_channel(
        target,
        options=[
            *options,
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(config)),
        ],
    )
    stub = ledger_pb2_grpc.LedgerStub(channel)

    async def call(request: ledger_pb2.TransferRequest) -> ledger_pb2.TransferReply:
        reply: ledger_pb2.TransferReply = await stub.Transfer(
            request, timeout=settings.attempt_timeout
        )
        return reply

    return Client(channel, call)


def _ours(
    *,
    jitter: str = "full",
    budget: bool = True,
    breaker: bool = False,
    throttle: bool = False,
    hedging: bool = False,
    budget_ratio: float | None = None,
    hedges: int | None = None,
    hedging_budget_ratio: float | None = None,
    probe_every: int | None = None,
    breaker_window: float | None = None,
    failure_backoff: float = 0.0,
    refund_wins: bool = False,
) -> Callable[[str, ClientSettings, Options], Client]:
    """A client built with ``resilient_grpc.aio.client_interceptors`` configured as asked:
    retries (``RetryPolicy``) or, with ``hedging``, hedged copies (``HedgingPolicy``, ``hedges``
    copies, ``failure_backoff``; latency hedges from a ``RetryBudget(hedging_budget_ratio)``
    when that is set); the budget, breaker (``probe_every``, ``breaker_window`` override the
    settings) and throttle bound both."""

    def connect(target: str, settings: ClientSettings, options: Options) -> Client:
        from resilient_grpc import (
            AdaptiveThrottle,
            CircuitBreaker,
            HedgingPolicy,
            IdempotencyKeys,
            RetryBudget,
            RetryPolicy,
        )
        from resilient_grpc.aio import client_interceptors

        policy = RetryPolicy(
            max_attempts=settings.max_attempts,
            initial_backoff=settings.initial_backoff,
            max_backoff=settings.max_backoff,
            multiplier=settings.multiplier,
            jitter=jitter,  # type: ignore[arg-type]
            retryable_codes=RETRIED_CODES,
            per_attempt_timeout=settings.attempt_timeout,
        )
        hedge = HedgingPolicy(
            max_attempts=settings.max_attempts if hedges is None else hedges,
            delay=settings.hedge_delay,
            non_fatal_codes=HEDGE_NON_FATAL_CODES,
            failure_backoff=failure_backoff,
            refund_wins=refund_wins,
        )
        interceptors = client_interceptors(
            retry=None if hedging else policy,
            hedging=hedge if hedging else None,
            budget=(
                RetryBudget(ratio=settings.budget_ratio if budget_ratio is None else budget_ratio)
                if budget
                else None
            ),
            breaker=(
                CircuitBreaker(
                    fail_max=settings.breaker_fail_max,
                    reset_timeout=settings.breaker_reset_timeout,
                    probe_every=(
                        settings.breaker_probe_every if probe_every is None else probe_every
                    ),
                    failure_rate=settings.breaker_failure_rate,
                    window=1.0 if breaker_window is None else breaker_window,
                    codes=BREAKER_CODES,
                )
                if breaker
                else None
            ),
            throttle=AdaptiveThrottle(codes=BREAKER_CODES) if throttle else None,
            idempotency=IdempotencyKeys(),
            target=target,
            hedging_budget=(
                RetryBudget(ratio=hedging_budget_ratio)
                if hedging and hedging_budget_ratio is not None
                else None
            ),
        )
        channel = grpc.aio.insecure_channel(
            target, options=list(options), interceptors=interceptors
        )
        stub = ledger_pb2_grpc.LedgerStub(channel)

        async def call(request: ledger_pb2.TransferRequest) -> ledger_pb2.TransferReply:
            reply: ledger_pb2.TransferReply = await stub.Transfer(
                request, timeout=settings.deadline
            )
            return reply

        return Client(channel, call)

    return connect


#: The full stack's client: what the measurements chose (see the README's benchmark section).
#: 5 copies, because with 3 the round_robin channel sends every copy of 1 call in 27 (3.7%) to
#: the slow replica; a latency hedge that wins is refunded, so the 10% hedging budget bounds
#: only the hedges that did not help (those of an overload); failure copies withdraw from the
#: 10% retry budget, back off (50 ms, doubling) and wait for the breaker to close, so a call
#: that failed at the end of an outage is answered after it; the breaker counts one failure
#: per call and looks at the last 0.5 s, so it opens early in an outage (0.25 s opened it now
#: and then after the overload spike).
FULL_STACK_CONFIG: dict[str, Any] = {
    "breaker": True,
    "hedging": True,
    "hedges": 5,
    "hedging_budget_ratio": 0.1,
    "refund_wins": True,
    "failure_backoff": 0.05,
    "breaker_window": 0.5,
}
FULL_STACK = (
    "HedgingPolicy(5 copies, 50 ms apart, failure_backoff=0.05, refund_wins=True) instead of "
    "retries + hedging budget 10% + retry budget 10% + CircuitBreaker(fail_max=5, "
    "reset_timeout=0.5, probe_every=2, window=0.5) + idempotency keys"
)

POLICIES: tuple[Policy, ...] = (
    Policy("no-retry", "no retry", "one attempt, 250 ms timeout", False, _no_retry),
    Policy("naive-x3", "naive retry x3", "retry any error at once, 3 attempts", False, _naive),
    Policy(
        "naive-x3-protected",
        "naive retry x3 + protected server",
        "naive x3 against a server with OverloadInterceptor() on an OverloadExecutor",
        False,
        _naive,
        server_protected=True,
    ),
    Policy(
        "exp-no-jitter",
        "exponential, no jitter",
        "ours: RetryPolicy(jitter='none'), no budget, no breaker",
        False,
        _ours(jitter="none", budget=False, breaker=False),
    ),
    Policy(
        "exp-full-jitter",
        "exponential + full jitter",
        "ours: RetryPolicy(jitter='full'), no budget, no breaker",
        False,
        _ours(jitter="full", budget=False, breaker=False),
    ),
    Policy(
        "budget",
        "+ retry budget 10%",
        "ours: full jitter + RetryBudget(ratio=0.1)",
        False,
        _ours(jitter="full", budget=True, breaker=False),
    ),
    Policy(
        "breaker",
        "+ circuit breaker",
        "ours: full jitter + budget + CircuitBreaker(fail_max=5, reset_timeout=0.5, probe_every=2)",
        False,
        _ours(breaker=True),
    ),
    Policy(
        "throttle",
        "+ adaptive throttle",
        "ours: full jitter + budget + AdaptiveThrottle() instead of the breaker",
        False,
        _ours(throttle=True),
    ),
    Policy(
        "hedging",
        "+ hedging (dedup)",
        "ours: HedgingPolicy(3 copies, 50 ms apart) instead of retries + budget + idempotency "
        "keys, no breaker; server DedupInterceptor",
        True,
        _ours(hedging=True),
    ),
    Policy(
        "full-stack",
        "full stack (hedging + breaker + dedup + protected server)",
        f"ours: {FULL_STACK}; server OverloadInterceptor() then DedupInterceptor, on an "
        "OverloadExecutor",
        True,
        _ours(**FULL_STACK_CONFIG),
        server_protected=True,
    ),
    Policy(
        "full-stack-unprotected",
        "full stack, unprotected server",
        f"ours: {FULL_STACK}; server DedupInterceptor only",
        True,
        _ours(**FULL_STACK_CONFIG),
    ),
    Policy(
        "grpc-native",
        "gRPC native retry",
        "service config retryPolicy (3 attempts) + retryThrottling {maxTokens 10, tokenRatio 0.1}",
        False,
        _native,
    ),
    Policy(
        "tenacity",
        "tenacity",
        "tenacity.AsyncRetrying: 3 attempts, random exponential wait, retry UNAVAILABLE/DEADLINE_EXCEEDED",
        False,
        _tenacity,
    ),
)

POLICY_NAMES: tuple[str, ...] = tuple(policy.name for policy in POLICIES)
#: What a full run compares unless ``--policies`` says otherwise: every policy but two whose
#: picture full jitter / naive x3 already show, so the run stays under 5 minutes.
DEFAULT_POLICIES: tuple[str, ...] = tuple(
    name for name in POLICY_NAMES if name not in ("exp-no-jitter", "tenacity")
)
