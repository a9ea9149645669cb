"""``RetryPolicy``: what is retried, how often, and how long to wait between attempts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, get_args

from resilient_grpc.core.budget import RetryBudget, retry_throttling_from_budget
from resilient_grpc.core.codes import DEFAULT_RETRYABLE_CODES, code_names
from resilient_grpc.core.methods import method_matches, method_patterns
from resilient_grpc.core.service_config import (
    MAX_ATTEMPTS_CAP,
    build,
    format_duration,
    method_config_entry,
    retry_spec,
)
from resilient_grpc.core.validation import finite_number, whole_number

if TYPE_CHECKING:  # only for the annotation: the core never imports grpc at run time
    import grpc

Jitter = Literal["full", "equal", "decorrelated", "none"]
JITTER_KINDS: tuple[str, ...] = get_args(Jitter)

#: What ``retryable_codes`` accepts: code names (any case), ``grpc.StatusCode`` members, numbers.
StatusCodeLike = Union[str, int, "grpc.StatusCode"]

#: Default bound of a server-requested delay (``grpc-retry-pushback-ms`` / ``RetryInfo``).
DEFAULT_MAX_PUSHBACK = 60.0


@dataclass(frozen=True, init=False)
class RetryPolicy:
    """Capped exponential backoff with jitter, in the shape of gRPC's own retry policy.

    Retry ``n`` (``n >= 1``) waits ``b = min(max_backoff, initial_backoff * multiplier**(n-1))``
    shaped by ``jitter``: ``"full"`` uniform(0, b), ``"equal"`` b/2 + uniform(0, b/2),
    ``"decorrelated"`` min(max_backoff, uniform(initial_backoff, 3 * previous delay)),
    ``"none"`` b. Only ``retryable_codes`` are retried (default: UNAVAILABLE only), and a method
    not listed in ``idempotent_methods`` is retried only when the call carries an idempotency
    key. ``per_attempt_timeout`` (seconds) bounds each attempt inside the call's deadline; an
    attempt cut by it while the call's deadline is still alive is retried whatever
    ``retryable_codes`` says (a ``DEADLINE_EXCEEDED`` the server itself returns follows
    ``retryable_codes``).

    ``max_pushback`` (seconds, default 60) caps a delay the server asks for (gRFC A6
    ``grpc-retry-pushback-ms`` or a ``google.rpc.RetryInfo``): a longer request is shortened to
    it, so a misbehaving server cannot park a caller without a deadline for an hour.

    ``idempotent_methods`` holds full method names (``"/pkg.Service/Method"``) or whole
    services (``"/pkg.Service/*"``). Every value is checked here: a bad one raises
    ``ValueError`` naming the field.
    """

    max_attempts: int
    initial_backoff: float
    max_backoff: float
    multiplier: float
    jitter: Jitter
    retryable_codes: frozenset[str]
    per_attempt_timeout: float | None
    idempotent_methods: frozenset[str]
    max_pushback: float

    def __init__(
        self,
        max_attempts: int = 3,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        multiplier: float = 2.0,
        jitter: Jitter = "full",
        retryable_codes: Iterable[StatusCodeLike] = DEFAULT_RETRYABLE_CODES,
        per_attempt_timeout: float | None = None,
        idempotent_methods: Iterable[str] = frozenset(),
        max_pushback: float = DEFAULT_MAX_PUSHBACK,
    ) -> None:
        values = {
            "max_attempts": max_attempts,
            "initial_backoff": initial_backoff,
            "max_backoff": max_backoff,
            "multiplier": multiplier,
            "jitter": jitter,
            "retryable_codes": retryable_codes,
            "per_attempt_timeout": per_attempt_timeout,
            "idempotent_methods": idempotent_methods,
            "max_pushback": max_pushback,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        whole_number("max_attempts", self.max_attempts, at_least=1)
        finite_number("initial_backoff", self.initial_backoff, above=0.0)
        finite_number("max_backoff", self.max_backoff, above=0.0)
        if self.max_backoff < self.initial_backoff:
            raise ValueError(
                f"max_backoff ({self.max_backoff!r}) must be >= initial_backoff "
                f"({self.initial_backoff!r})"
            )
        finite_number("multiplier", self.multiplier, at_least=1.0)
        if self.jitter not in JITTER_KINDS:
            raise ValueError(
                f"jitter must be one of {', '.join(JITTER_KINDS)}; got {self.jitter!r}"
            )
        object.__setattr__(
            self,
            "retryable_codes",
            code_names(self.retryable_codes, field="retryable_codes"),
        )
        if "OK" in self.retryable_codes:
            raise ValueError("retryable_codes: OK is not an error and cannot be retried")
        if self.per_attempt_timeout is not None:
            finite_number("per_attempt_timeout", self.per_attempt_timeout, above=0.0)
        object.__setattr__(
            self,
            "idempotent_methods",
            method_patterns(self.idempotent_methods, field="idempotent_methods"),
        )
        finite_number("max_pushback", self.max_pushback, above=0.0, unit=" of seconds")

    def is_idempotent(self, method: str) -> bool:
        """Whether ``method`` (``"/pkg.Service/Method"``) may be retried without a key."""
        return method_matches(self.idempotent_methods, method)

    def base_backoff(self, retry_number: int) -> float:
        """The un-jittered delay before retry ``retry_number`` (1 for the first retry)."""
        if retry_number < 1:
            raise ValueError(f"retry_number must be >= 1, got {retry_number!r}")
        # Compare exponents instead of computing a huge power: no overflow for large n.
        exponent = retry_number - 1
        if self.multiplier > 1 and exponent * math.log(self.multiplier) > math.log(
            self.max_backoff / self.initial_backoff
        ):
            return self.max_backoff
        return min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)

    def with_changes(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields replaced (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_service_config(
        cls,
        config: str | bytes | Mapping[str, Any],
        *,
        method: str | None = None,
        max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
    ) -> RetryPolicy:
        """Build a policy from gRPC service-config JSON (gRFC A6 ``retryPolicy``).

        ``method`` (``"/pkg.Service/Method"``) picks the ``methodConfig`` entry that applies
        to it (one that gRPC would not retry gets ``max_attempts=1``); without it the config
        must have exactly one ``retryPolicy``. ``max_attempts_cap=None`` lifts gRPC's cap of 5.
        """
        spec = retry_spec(config, method=method, max_attempts_cap=max_attempts_cap)
        return cls(max_attempts=1) if spec is None else build(cls, spec)

    def to_service_config(
        self,
        methods: Iterable[str],
        *,
        budget: RetryBudget | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The gRPC service config (a dict, ``json.dumps`` it) for the subset native gRPC supports.

        ``budget`` becomes ``retryThrottling``, ``timeout`` (seconds) the methods' deadline.
        """
        entry = method_config_entry(methods, timeout=timeout)
        if self.max_attempts >= 2:
            entry["retryPolicy"] = {
                "maxAttempts": min(self.max_attempts, MAX_ATTEMPTS_CAP),
                "initialBackoff": format_duration(self.initial_backoff),
                "maxBackoff": format_duration(self.max_backoff),
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": sorted(self.retryable_codes),
            }
        config: dict[str, Any] = {"methodConfig": [entry]}
        if budget is not None:
            config["retryThrottling"] = retry_throttling_from_budget(budget)
        return config
