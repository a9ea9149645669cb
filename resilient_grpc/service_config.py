"""gRPC service config (gRFC A6 JSON) to and from :class:`RetryPolicy`, :class:`HedgingPolicy`
and :class:`RetryBudget`.

A team moving from gRPC's native retries keeps its service config: :func:`retry_policy_from_service_config`
reads a ``methodConfig[].retryPolicy`` and :func:`budget_from_service_config` reads
``retryThrottling``. :func:`service_config_from_policy` writes the subset native gRPC supports.

**Reading** follows gRPC's own rules:

* Method selection: the most specific ``name`` wins: ``{service, method}`` exactly, else
  ``{service}`` (every method of the service), else ``{}`` (the default for every method).
  ``method`` without ``service`` is invalid, each name may appear once in the whole config, an
  entry with an empty ``name`` list is skipped. A method that no entry matches, or whose entry
  has no ``retryPolicy``, is not retried by gRPC: you get a policy with ``max_attempts=1``.
* ``retryPolicy``: every field is required. ``maxAttempts`` must be > 1 and, as in gRPC, a
  value above 5 counts as 5 (``max_attempts_cap=None`` lifts that cap); ``initialBackoff`` /
  ``maxBackoff`` are protobuf JSON durations (``"0.1s"``, up to 9 decimals) > 0;
  ``backoffMultiplier`` > 0; ``retryableStatusCodes`` is a non-empty list of code names
  (``"UNAVAILABLE"``) or numbers (14). gRPC's jitter is uniform(0, backoff), which is
  ``jitter="full"``. gRPC caps every backoff at ``maxBackoff``, so an ``initialBackoff`` above
  ``maxBackoff`` behaves as ``maxBackoff`` and is read so.
* Not supported, so refused with ``ValueError`` rather than silently changed: a
  ``backoffMultiplier`` below 1 (a shrinking backoff). A method with a ``hedgingPolicy`` is
  read with :func:`hedging_policy_from_service_config` (``HedgingPolicy.from_service_config``):
  ``maxAttempts`` (> 1, capped at 5 like ``retryPolicy``), ``hedgingDelay`` (a duration >= 0,
  default ``"0s"``), ``nonFatalStatusCodes`` (default none); asking
  :func:`retry_policy_from_service_config` for such a method is refused, and the other way round.
* ``timeout`` in a method config is gRPC's default deadline for the *whole call*, not a
  per-attempt limit, so it does not go into :class:`RetryPolicy` (whose
  ``per_attempt_timeout`` bounds one attempt): read it with
  :func:`method_config_from_service_config` and use it as your call's deadline.
* The policy's ``idempotent_methods`` stays empty. gRPC retries the listed methods whether or not
  they are idempotent; this toolkit retries a non-idempotent method only when the call carries an
  idempotency key (every unary call gets one by default), which is what keeps retries safe.
  List methods that are safe to retry without a key with ``policy.with_changes(idempotent_methods=...)``.
* Unknown fields are ignored, as gRPC does. Anything invalid raises ``ValueError`` whose message
  starts with the field's path, e.g. ``methodConfig[0].retryPolicy.initialBackoff: ...``.

**retryThrottling -> RetryBudget.** gRPC keeps one token bucket per server name: it starts
full at ``maxTokens``, every failed attempt (retryable status) takes 1 token, every success gives
back ``tokenRatio``, and no retry is sent while the count is at or below ``maxTokens / 2``. In
the long run that keeps failures at or below ``tokenRatio`` x successes, after an initial
allowance of about ``maxTokens / 2`` failures. The Finagle budget here allows ``ratio`` x calls in
the last ``window`` seconds plus ``min_retries_per_second`` x ``window`` retries. The mapping
keeps both quantities: ``ratio = tokenRatio`` (the long-run share of retries; at most 1) and
``min_retries_per_second = (maxTokens / 2) / window``, so the reserve of retries per window
equals gRPC's initial allowance. What does not carry over: gRPC's allowance refills only through
successes, the budget's reserve refills every window (it still bounds a full outage to
``maxTokens / 2`` retries per window); gRPC counts first attempts' failures too; gRPC's
throttle is per server name, a budget is shared by whoever you give it to. ``tokenRatio`` is
read with 3 decimals, as gRPC does.

**Writing** (:func:`service_config_from_policy`) is lossy where native gRPC cannot express the
policy: ``jitter`` other than ``"full"`` becomes gRPC's uniform jitter; ``per_attempt_timeout``,
``idempotent_methods`` and ``max_pushback`` are dropped; ``max_attempts`` above 5 is written as 5 (what gRPC would
do anyway); ``max_attempts=1`` writes no ``retryPolicy`` (no retries); durations are rounded to
the nanosecond (and at least 1 ns). A budget becomes ``retryThrottling`` by the inverse mapping:
``maxTokens = round(2 x min_retries_per_second x window)`` (at least 1), ``tokenRatio = ratio``
with 3 decimals (at least 0.001, since gRPC requires > 0). gRPC also needs
``("grpc.enable_retries", 1)`` (the default in recent releases) and the config passed as the
``"grpc.service_config"`` channel option (``json.dumps`` it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from resilient_grpc.core import service_config as _pure
from resilient_grpc.core.budget import RetryBudget, retry_throttling_from_budget
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.service_config import (
    DEFAULT_BUDGET_WINDOW,
    MAX_ATTEMPTS_CAP,
    RetryThrottling,
    build,
    format_duration,
)

__all__ = [
    "DEFAULT_BUDGET_WINDOW",
    "MAX_ATTEMPTS_CAP",
    "MethodConfig",
    "RetryThrottling",
    "ServiceConfig",
    "budget_from_service_config",
    "format_duration",
    "hedging_policy_from_service_config",
    "method_config_from_service_config",
    "parse_service_config",
    "retry_policy_from_service_config",
    "retry_throttling_from_budget",
    "service_config_from_hedging",
    "service_config_from_policy",
]


@dataclass(frozen=True)
class MethodConfig:
    """One ``methodConfig`` entry: the names it applies to and what it sets.

    ``names`` holds ``(service, method)`` pairs, ``""`` where gRPC leaves a part out.
    ``retry_policy`` is ``None`` without a ``retryPolicy``; ``timeout`` is the default deadline
    of the whole call in seconds; ``hedging`` tells that the entry has a ``hedgingPolicy``
    (read into ``hedging_policy``).
    """

    index: int
    names: tuple[tuple[str, str], ...]
    retry_policy: RetryPolicy | None
    timeout: float | None
    wait_for_ready: bool | None
    hedging: bool
    #: The entry's ``hedgingPolicy`` (``None``: none), with ``methods`` set to its names.
    hedging_policy: HedgingPolicy | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """The retry-related parts of a validated service config."""

    method_configs: tuple[MethodConfig, ...]
    retry_throttling: RetryThrottling | None

    def for_method(self, method: str) -> MethodConfig | None:
        """The entry gRPC would apply to ``method`` (``"/pkg.Service/Method"``), if any."""
        return _pure.entry_for(self.method_configs, method)


# --- reading --------------------------------------------------------------------------------


def parse_service_config(
    config: str | bytes | Mapping[str, Any], *, max_attempts_cap: int | None = MAX_ATTEMPTS_CAP
) -> ServiceConfig:
    """Validate ``config`` (JSON text or the decoded dict) and read its retry-related parts."""
    parsed = _pure.parse(config, max_attempts_cap=max_attempts_cap)
    return ServiceConfig(
        tuple(
            MethodConfig(
                entry.index,
                entry.names,
                None if entry.retry is None else build(RetryPolicy, entry.retry),
                entry.timeout,
                entry.wait_for_ready,
                entry.hedging is not None,
                None if entry.hedging is None else build(HedgingPolicy, entry.hedging),
            )
            for entry in parsed.method_configs
        ),
        parsed.retry_throttling,
    )


def method_config_from_service_config(
    config: str | bytes | Mapping[str, Any], *, method: str
) -> MethodConfig | None:
    """The ``methodConfig`` entry gRPC applies to ``method`` (``None``: none applies)."""
    return parse_service_config(config).for_method(method)


def retry_policy_from_service_config(
    config: str | bytes | Mapping[str, Any],
    *,
    method: str | None = None,
    max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
) -> RetryPolicy:
    """The :class:`RetryPolicy` equivalent to a gRPC ``retryPolicy`` (see the module docstring).

    ``method`` (``"/pkg.Service/Method"``) selects the entry with gRPC's matching rules; a method
    that gRPC would not retry gets ``max_attempts=1``. Without ``method`` the config must hold
    exactly one distinct ``retryPolicy``.
    """
    return RetryPolicy.from_service_config(config, method=method, max_attempts_cap=max_attempts_cap)


def hedging_policy_from_service_config(
    config: str | bytes | Mapping[str, Any],
    *,
    method: str | None = None,
    max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
) -> HedgingPolicy:
    """The :class:`HedgingPolicy` equivalent to a gRPC ``hedgingPolicy``.

    Its ``methods`` are the entry's names (empty: the entry is the default for every method).
    ``method`` selects the entry with gRPC's matching rules; a method that gRPC would neither
    hedge nor retry gets a single-attempt policy for that method, and one that it would retry
    is refused (read it with :meth:`RetryPolicy.from_service_config`). Without ``method`` the
    config must hold exactly one distinct ``hedgingPolicy``.
    """
    return HedgingPolicy.from_service_config(
        config, method=method, max_attempts_cap=max_attempts_cap
    )


def budget_from_service_config(
    config: str | bytes | Mapping[str, Any], *, window: float = DEFAULT_BUDGET_WINDOW
) -> RetryBudget | None:
    """The :class:`RetryBudget` equivalent to ``retryThrottling`` (``None`` if there is none)."""
    return RetryBudget.from_service_config(config, window=window)


# --- writing --------------------------------------------------------------------------------


def service_config_from_policy(
    policy: RetryPolicy,
    methods: Iterable[str],
    *,
    budget: RetryBudget | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """A gRPC service config (a dict; ``json.dumps`` it) applying ``policy`` to ``methods``.

    ``methods`` holds ``"/pkg.Service/Method"``, ``"/pkg.Service/*"`` (every method of the
    service) or ``"*"`` (every method). ``budget`` becomes ``retryThrottling``, ``timeout``
    (seconds) the methods' default call deadline. What native gRPC cannot express is dropped
    or approximated as the module docstring lists.
    """
    if not isinstance(policy, RetryPolicy):
        raise ValueError(f"policy: expected a RetryPolicy, got {type(policy).__name__}")
    return policy.to_service_config(methods, budget=budget, timeout=timeout)


def service_config_from_hedging(
    policy: HedgingPolicy,
    methods: Iterable[str] | None = None,
    *,
    budget: RetryBudget | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """A gRPC service config (a dict) applying the ``hedgingPolicy`` of ``policy`` to ``methods``.

    ``methods`` defaults to ``policy.methods`` (``"*"``, every method, when it lists none).
    Lossy where gRPC cannot express the policy: ``idempotent_methods`` and ``max_pushback`` are
    dropped, ``max_attempts`` above 5 is written as 5, ``max_attempts=1`` writes no
    ``hedgingPolicy`` (one attempt), the delay is rounded to the nanosecond.
    """
    if not isinstance(policy, HedgingPolicy):
        raise ValueError(f"policy: expected a HedgingPolicy, got {type(policy).__name__}")
    return policy.to_service_config(methods, budget=budget, timeout=timeout)
